"""Tables and plots from benches/results/*.json (standard library only: the SVG is written
by hand so the harness needs nothing installed).

    benches/run.sh report

writes benches/results/summary.md (the tables docs/PERFORMANCE.md quotes) and
docs/img/parse-throughput.svg, docs/img/latency-cdf.svg, docs/img/buffer-outage.svg.
"""

import json
import math
from pathlib import Path


def load(results):
    out = {}
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        out[doc["scenario"]] = doc
    return out


def fmt(n):
    return "—" if n is None else f"{n:,}"


def summary(docs):
    lines = []
    add = lines.append
    any_doc = next(iter(docs.values()), None)
    if any_doc:
        m = any_doc["machine"]
        add(f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {m['memory_gib']} GiB, "
            f"Linux {m['kernel']}; open files {m['open_files_limit']}, "
            f"memlock {m['memlock_limit']}.\n")
    if "parse-only" in docs:
        d = docs["parse-only"]
        add(f"### parse-only (`--sink null`), {d['started_at']}, {d['git']}\n")
        add("| connections | lines/s | CPU-s per M lines | RSS MiB | peak RSS MiB |")
        add("|---|---|---|---|---|")
        for r in d["result"]["runs"]:
            add(f"| {fmt(r['connections'])} | {fmt(r['lines_per_s'])} | "
                f"{r['cpu_s_per_million_lines']} | {r['server_rss_mib']} | "
                f"{r['server_rss_peak_mib']} |")
        add("")
    if "e2e" in docs:
        d = docs["e2e"]
        add(f"### end to end by codec, {d['started_at']}, {d['git']}\n")
        add("| codec | records/s | CPU-s per M | p50 µs | p99 µs | verified |")
        add("|---|---|---|---|---|---|")
        for r in d["result"]["runs"]:
            add(f"| {r['label'].removeprefix('e2e-')} | {fmt(r['records_per_s'])} | "
                f"{r['cpu_s_per_million_records']} | {fmt(r['latency_us']['p50'])} | "
                f"{fmt(r['latency_us']['p99'])} | {verified(r)} |")
        add("")
    if "ceiling" in docs:
        d = docs["ceiling"]["result"]
        add(f"### ceiling, {docs['ceiling']['started_at']}\n")
        par = d["plain_producers_parallel"]
        add(f"one plain producer {fmt(round(d['plain_producer']['records_per_s']))} records/s; "
            f"{par['producers']} in parallel {fmt(par['records_per_s'])} records/s (the ceiling); "
            f"stormgate {fmt(d['stormgate']['records_per_s'])} records/s "
            f"(verified: {verified(d['stormgate'])}): **{d['stormgate_share_of_ceiling']:.0%}** "
            f"of the ceiling, {d['stormgate_share_of_single_producer']:.0%} of one producer.\n")
    if "before" in docs:
        d = docs["before"]["result"]
        add(f"### before vs defaults, {docs['before']['started_at']}\n")
        add(f"before (sync, batch 1): {fmt(d['before']['records_per_s'])} records/s; "
            f"defaults: {fmt(d['defaults']['records_per_s'])} records/s: **{d['ratio']}×**.\n")
    if "shards" in docs:
        d = docs["shards"]
        add(f"### shard scaling (`--sink null`), {d['started_at']}\n")
        add("| shards | connections | lines/s | CPU-s per M lines |")
        add("|---|---|---|---|")
        for r in d["result"]["runs"]:
            add(f"| {r['shards']} | {fmt(r['connections'])} | {fmt(r['lines_per_s'])} | "
                f"{r['cpu_s_per_million_lines']} |")
        add("")
    if "connections" in docs:
        r = docs["connections"]["result"]
        add(f"### idle connections, {docs['connections']['started_at']}\n")
        add(f"{fmt(r['idle_connections'])} idle connections (open-files limit "
            f"{r['open_files_limit']['hard']}) accepted in {r['connect_s']} s "
            f"({fmt(r['accepts_per_s'])}/s); server RSS {r['server_rss_before_mib']} → "
            f"{r['server_rss_idle_mib']} MiB: **{fmt(r['rss_bytes_per_idle_connection'])} bytes "
            f"per idle connection**. 100 active connections beside them: p50 "
            f"{fmt(r['active_latency_us']['p50'])} µs, p99 {fmt(r['active_latency_us']['p99'])} µs "
            "line → delivery report.\n")
    if "latency" in docs:
        d = docs["latency"]["result"]
        add(f"### latency, {docs['latency']['started_at']}\n")
        add("| load | records/s | p50 µs | p99 µs | p99.9 µs |")
        add("|---|---|---|---|---|")
        for key in ("peak", "half", "quarter"):
            r = d[key]
            lat = r["latency_us"]
            add(f"| {key} | {fmt(r['records_per_s'])} | {fmt(lat['p50'])} | {fmt(lat['p99'])} | "
                f"{fmt(lat['p999'])} |")
        add("")
    if "acks" in docs:
        d = docs["acks"]["result"]
        add(f"### acknowledgements off vs on, {docs['acks']['started_at']}\n")
        add("| acks | records/s | p50 µs | p99 µs | lines acknowledged | verified |")
        add("|---|---|---|---|---|---|")
        for key in ("off", "on"):
            r = d[key]
            add(f"| {key} | {fmt(r['records_per_s'])} | {fmt(r['latency_us']['p50'])} | "
                f"{fmt(r['latency_us']['p99'])} | {fmt(r.get('acked_lines', 0))} | "
                f"{verified(r)} |")
        add(f"\nthroughput on/off {d['throughput_ratio']}, p99 on/off {d['p99_ratio']}.\n")
    if "buffer" in docs:
        buffer_summary(docs["buffer"], add)
    if "fairness" in docs:
        d = docs["fairness"]["result"]
        add(f"### one flooding connection beside paced ones (1 shard), "
            f"{docs['fairness']['started_at']}\n")
        add("| run | paced connections | records | paced p50 µs | paced p99 µs |")
        add("|---|---|---|---|---|")
        for key in ("alone", "flooded"):
            r = d[key]
            lat = r["normal_latency_us"]
            add(f"| {key} | {fmt(r['normal_connections'])} | {fmt(r['records_delivered'])} | "
                f"{fmt(lat['p50'])} | {fmt(lat['p99'])} |")
        add(f"\npaced stations' p99 with the flooder / without: **{d['p99_ratio']}** "
            "(send → consumed).\n")
    if "tls" in docs:
        tls_summary(docs["tls"], add)
    return "\n".join(lines) + "\n"


def buffer_summary(doc, add):
    d = doc["result"]
    add(f"### disk buffer vs memory, {doc['started_at']}, {doc['git']}\n")
    mem = d["memory"]
    add(f"{mem['connections']} acknowledging connections, same load, same run "
        "(`TCP_ACK_AFTER=durable`: a disk run's lines are answered once their fdatasync "
        "completed). Ack = every line's build → ack, as the stations see it (the load "
        "generator times them all); durable = a group commit's oldest record, append → "
        "fdatasync done, in the server.\n")
    add("| buffer | records/s | CPU-s per M | fsyncs/s | MB/s written | ack p50 ms | ack p99 ms "
        "| durable p50 ms | durable p99 ms | acked | verified |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("memory", mem), ("disk", d["disk"])]
    if d.get("disk_half"):
        rows.append(("disk, half rate", d["disk_half"]))
    for label, r in rows:
        b = r["buffer"]
        disk = label != "memory"
        dur = b["durable_ms"]
        ack = r.get("ack_latency_ms", {})
        add(f"| {label} | {fmt(r['records_per_s'])} | {r['cpu_s_per_million_records']} | "
            f"{fmt(b['fsyncs_per_s']) if disk else '—'} | "
            f"{b['written_mb_per_s'] if disk else '—'} | {fmt(ack.get('p50'))} | "
            f"{fmt(ack.get('p99'))} | {fmt(dur.get('p50'))} | "
            f"{fmt(dur.get('p99'))} | {fmt(r['acked_lines'])} of {fmt(r['lines_sent'])} | "
            f"{verified(r)} |")
    q, t, met = d["disk_over_memory"], d["targets"], d["targets_met"]
    ack = d["durable_ack_ms"]
    station = ack.get("station_send_to_ack", {}).get("p99")
    server = ack.get("server_append_to_durable", ack).get("p99")
    # Results from before the per-line histogram (b905cb7) have no read → durable.
    per_line = ack.get("server_read_to_durable", {}).get("p99")
    read_to_durable = f"{per_line} ms read → durable per line, " if per_line is not None else ""
    yes = {True: "met", False: "**not met**"}
    add(f"\ndisk/memory: **{q['records_per_s']}×** records/s (target ≥ "
        f"{t['throughput_ratio_min']}: {yes[met['throughput']]}), "
        f"**{q['cpu_s_per_million_records']}×** CPU per record (target ≤ {t['cpu_ratio_max']}: "
        f"{yes[met['cpu']]}); durable-ack p99 **{station} ms** at the station "
        f"({read_to_durable}{server} ms append → durable per commit, in the server) at "
        f"{fmt(ack['at_records_per_s'])} records/s "
        f"(target ≤ {t['durable_p99_ms_max']} ms: {yes[met['durable_p99']]}).\n")
    alone = d.get("durable_ack_broker_paused_ms")
    if alone:
        add(f"The same half-rate load with the broker paused (SIGSTOP: the server's durable path "
            f"alone, no deliveries, no broker on the cores or the disk): station ack p50/p99 "
            f"{alone['station_send_to_ack']['p50']}/{alone['station_send_to_ack']['p99']} ms, "
            f"fdatasync p99 {alone['fdatasync']['p99']} ms (with deliveries: "
            f"{ack.get('fdatasync', {}).get('p99')} ms).\n")
    o = d["outage"]
    add(f"Outage: {fmt(o['incoming_per_s'])} lines/s from {o['connections']} stations; the "
        f"broker stopped at {o['broker_stopped_at_s']} s and answered again "
        f"{o['broker_down_s']} s later; peak {fmt(o['peak_buffered_records'])} records "
        f"({o['peak_buffer_bytes'] / 2**20:.0f} MiB of segments) in the buffer. After the "
        f"restart: first delivery {o['first_delivery_after_start_s']} s, drain "
        f"{fmt(o['drain_records_per_s'])} records/s against {fmt(o['incoming_during_drain_per_s'])} "
        f"arriving = **{o['drain_over_incoming']}×** (target ≥ {t['drain_over_incoming_min']}: "
        f"{yes[met['drain']]}); back at the steady level after {o['caught_up_after_start_s']} s, "
        f"empty after {o['time_to_empty_s']} s; {fmt(o['replayed_records'])} records fed from "
        f"disk; {fmt(o['acked_lines'])} of {fmt(o['lines_sent'])} lines acknowledged; "
        f"verified: {verified(o)}.\n")


def tls_summary(doc, add):
    d = doc["result"]
    add(f"### TLS vs plain text (`--sink null`), {doc['started_at']}, {doc['git']}\n")
    flat = d["flat_out"]
    add(f"{flat['plain']['connections']} connections flat out, same run:\n")
    add("| | lines/s | server CPU-s per M lines | load generator CPU-s | RSS MiB | checked |")
    add("|---|---|---|---|---|---|")
    for key, label in (("plain", "plain"), ("tls", "TLS")):
        r = flat[key]
        add(f"| {label} | {fmt(r['lines_per_s'])} | {r['cpu_s_per_million_lines']} | "
            f"{r['loadgen_cpu_s']} | {r['server_rss_mib']} | {checked(r)} |")
    q = {k: fmt(v) for k, v in flat["tls_over_plain"].items()}
    add(f"| **TLS/plain** | **{q['lines_per_s']}** | **{q['cpu_s_per_million_lines']}** | "
        f"{q['loadgen_cpu_s']} | {q['server_rss_mib']} | |")
    held = d["idle"]
    add(f"\n{fmt(held['plain']['idle_connections'])} idle connections, each after its "
        f"handshake ({d['certificate_key']} certificate, no resumption) and identify:\n")
    add("| | opened/s | server CPU µs each | load generator CPU-s | RSS bytes each | checked |")
    add("|---|---|---|---|---|---|")
    for key, label in (("plain", "plain (accepted)"), ("tls", "TLS (handshakes)")):
        r = held[key]
        add(f"| {label} | {fmt(r['opened_per_s'])} | {fmt(r['server_cpu_us_per_connection'])} | "
            f"{r['loadgen_cpu_s']} | {fmt(r['rss_bytes_per_idle_connection'])} | {checked(r)} |")
    q = {k: fmt(v) for k, v in held["tls_over_plain"].items()}
    add(f"| **TLS/plain** | **{q['opened_per_s']}** | {q['server_cpu_us_per_connection']} | "
        f"{q['loadgen_cpu_s']} | **{q['rss_bytes_per_idle_connection']}** | |")
    add("\nServer CPU is counted in clock ticks (10 ms): a few hundred connections may show 0.\n")


def checked(r):
    v = r.get("verified")
    if not v:
        return "not checked"
    return "yes" if v["ok"] else "NO"


def verified(r):
    v = r.get("verified")
    if not v:
        return "not checked"
    return "yes" if v["ok"] else f"NO ({v['records']} read, {v['duplicates']} dup, {v['missing']} missing)"


# --- SVG -------------------------------------------------------------------------------------

W, H, PAD = 640, 360, 60


def svg(title, xlabel, ylabel, series, xlog=False, xticks=None):
    """A line chart: series = [(name, colour, [(x, y), ...])]."""
    pts = [p for _, _, s in series for p in s]
    if not pts:
        return None
    fx = (lambda x: math.log10(x)) if xlog else (lambda x: x)
    xs = [fx(x) for x, _ in pts]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x1 = x0 + 1
    y1 = max(y for _, y in pts) * 1.1 or 1

    def px(x):
        return PAD + (fx(x) - x0) / (x1 - x0) * (W - 2 * PAD)

    def py(y):
        return H - PAD - y / y1 * (H - 2 * PAD)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W/2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{PAD}" y1="{H-PAD}" x2="{W-PAD}" y2="{H-PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H-PAD}" stroke="black"/>',
           f'<text x="{W/2}" y="{H-15}" text-anchor="middle">{xlabel}</text>',
           f'<text x="15" y="{H/2}" text-anchor="middle" transform="rotate(-90 15 {H/2})">'
           f'{ylabel}</text>']
    for i in range(5):
        y = y1 * i / 4
        out.append(f'<text x="{PAD-5}" y="{py(y)+4:.1f}" text-anchor="end">{short(y)}</text>')
        out.append(f'<line x1="{PAD}" y1="{py(y):.1f}" x2="{W-PAD}" y2="{py(y):.1f}" '
                   'stroke="#ddd"/>')
    for x, label in (xticks or sorted({(x, short(x)) for x, _ in pts})):
        out.append(f'<text x="{px(x):.1f}" y="{H-PAD+16}" text-anchor="middle">{label}</text>')
    for n, (name, colour, s) in enumerate(series):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in s:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{W-PAD-150}" y="{PAD+16*n}" fill="{colour}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def short(v):
    for div, unit in ((1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v/div:.3g}{unit}"
    return f"{v:.3g}"


def plots(docs):
    out = {}
    if "parse-only" in docs:
        runs = docs["parse-only"]["result"]["runs"]
        out["parse-throughput.svg"] = svg(
            "parse-only (--sink null): lines/s vs connections", "connections (log scale)",
            "lines per second",
            [("stormgate, 2 shards", "#1f77b4",
              [(r["connections"], r["lines_per_s"]) for r in runs])],
            xlog=True)
    if "latency" in docs:
        d = docs["latency"]["result"]
        # Peak load is saturation (queueing, ~100 ms); it would flatten the curves that matter.
        colours = {"half": "#1f77b4", "quarter": "#2ca02c"}
        series = []
        ticks = [(q, f"p{q*100:g}") for q in (0.5, 0.9, 0.99, 0.999, 0.9999)]
        for key, colour in colours.items():
            cdf = d[key]["latency_us"].get("cdf", [])
            series.append((f"{key}: {d[key]['records_per_s']:,}/s", colour,
                           [(q, us / 1000) for q, us in cdf if q >= 0.5]))
        # Quantiles on a log scale of 1/(1-q), the usual latency-percentile axis.
        series = [(n, c, [(1 / (1 - q), y) for q, y in s]) for n, c, s in series]
        ticks = [(1 / (1 - q), label) for q, label in ticks]
        out["latency-cdf.svg"] = svg(
            "line read → delivery report, at half and a quarter of peak load", "percentile",
            "milliseconds", series, xlog=True, xticks=ticks)
    if "buffer" in docs:
        out["buffer-outage.svg"] = outage_plot(docs["buffer"]["result"]["outage"])
    return out


def outage_plot(o):
    """Records in the disk buffer and records delivered per second through the outage."""
    tl = o.get("timeline", [])
    buffered = [(t, b) for t, _, _, b in tl]
    rate = [(t1, (d1 - d0) / (t1 - t0)) for (t0, _, d0, _), (t1, _, d1, _) in zip(tl, tl[1:])
            if t1 > t0]
    down, up = o["broker_stopped_at_s"], o["broker_answering_at_s"]
    last = tl[-1][0] if tl else 0
    ticks = [(x, f"{x:.0f}") for x in range(0, int(last) + 1, max(1, int(last) // 8 or 1))]
    return svg(f"broker outage (down {down:.0f}–{up:.0f} s), {o['incoming_per_s']:,} lines/s "
               "arriving", "seconds", "records",
               [("in the disk buffer", "#1f77b4", buffered),
                ("delivered per second", "#2ca02c", rate)],
               xticks=ticks)


def main(results, img_dir):
    docs = load(results)
    if not docs:
        raise SystemExit(f"no results in {results}; run a scenario first")
    text = summary(docs)
    (results / "summary.md").write_text(text)
    print(text)
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, body in plots(docs).items():
        if body:
            (img_dir / name).write_text(body)
            print(f"wrote {img_dir / name}")
