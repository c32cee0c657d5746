#!/usr/bin/env python3
"""Stormgate's benchmark harness: one command per scenario, JSON results, plots.

Usage (through benches/run.sh, which builds the binaries first):

    benches/run.sh SCENARIO [--smoke]     one of: parse-only e2e ceiling before shards
                                          connections latency acks fairness tls all
    benches/run.sh report                 tables (benches/results/summary.md) and plots
                                          (docs/img/*.svg) from the latest results

Every scenario starts what it needs itself: Apache Kafka 4.4 (deploy/kafka/kafka.sh on
BENCH_KAFKA_PORT, default 29092, and the four ports after it), started with empty storage once
per harness run and stopped at its end, a fresh topic for each Kafka measurement (deleted after
it), the stormgate server on a free loopback port, and the load generator
(target/release/stormgate-loadgen; target/$BENCH_PROFILE/ when set). CPU time and memory of the server and of the broker's JVM
come from /proc/PID/stat and /proc/PID/status; the server's own line-to-delivery-report latency
histogram comes from its --stats-file; record counts are verified by consuming the topic from
offset 0 to the end the broker states (its watermarks): every short read, duplicate or gap
fails the run.
The TLS scenario's certificates come from the load generator (`stormgate-loadgen pki`, rcgen),
so nothing needs installing for it either.

--smoke runs each scenario for a second or two with few connections, so CI proves that the
harness works; its results go to benches/results/smoke/ and are not worth comparing.

Only the standard library is used, so the harness runs wherever python3 does.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# deploy/test.sh runs the smoke scenarios on its test profile's binaries (BENCH_PROFILE=
# release-checked), so that CI builds librdkafka once; measurements use release.
BIN = ROOT / "target" / os.environ.get("BENCH_PROFILE", "release")
STORMGATE = BIN / "stormgate"
LOADGEN = BIN / "stormgate-loadgen"
KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"
RESULTS = ROOT / "benches" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KAFKA_PORT = int(os.environ.get("BENCH_KAFKA_PORT", "29092"))
TOPIC_PARTITIONS = 6
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: /proc sampling, the broker, the server, the load generator.


def cpu_seconds(pid):
    """User + system CPU seconds of a process (and its reaped children: none here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_bytes(pid):
    """(VmRSS, VmHWM) of a process in bytes."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Apache Kafka on KAFKA_PORT for the whole harness run: started with empty storage on
    first use, stopped (and its data deleted) when the harness exits. Each measurement gets a
    topic of its own, deleted after it, so the broker holds one run's records at a time.

    One broker for every run, rather than one per run, because the JVM compiles its hot paths
    during its first seconds under load: a fresh broker per 10-second run would measure that
    compilation (on the same two cores as the server), not a broker as it runs in production.
    """

    _started = None

    def __init__(self):
        self.brokers = f"127.0.0.1:{KAFKA_PORT}"

    @classmethod
    def get(cls):
        if cls._started is None:
            broker = cls()
            kafka_sh("reset", KAFKA_PORT)
            out = kafka_sh("start", KAFKA_PORT)
            assert f"KAFKA_BROKERS={broker.brokers}" in out.splitlines(), out
            atexit.register(kafka_sh, "reset", KAFKA_PORT, check=False)
            cls._started = broker
        return cls._started

    def topic(self, label):
        name = f"bench-{label}-{uuid.uuid4().hex[:12]}"
        kafka_sh("create-topic", name, TOPIC_PARTITIONS, KAFKA_PORT)
        return name

    def drop(self, topic):
        kafka_sh("delete-topic", topic, KAFKA_PORT)

    def pid(self):
        return int(kafka_sh("pid", KAFKA_PORT).strip())

    def cpu(self):
        return cpu_seconds(self.pid())

    def rss_mib(self):
        return round(memory_bytes(self.pid())[0] / 2**20, 1)


def kafka_sh(*args, check=True):
    """Runs deploy/kafka/kafka.sh; returns its stdout (its progress goes to the log)."""
    proc = subprocess.run([KAFKA_SH, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"kafka.sh {' '.join(map(str, args))} exited {proc.returncode}")
    return proc.stdout


class Server:
    """The stormgate binary on a free loopback port, with its statistics file.

    With `metrics`, its operations endpoint listens on another free loopback port, for
    `metric()` to read counters while it runs."""

    def __init__(self, *args, env=None, metrics=False):
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.dir = Path(tempfile.mkdtemp(prefix="stormgate-bench-"))
        self.stats_path = self.dir / "stats.json"
        self.log_path = self.dir / "server.log"
        cmd = [
            str(STORMGATE),
            "--listen", f"127.0.0.1:{self.port}",
            "--stats-file", str(self.stats_path),
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}" if metrics else "off",
            # Benchmarks measure capacity: no per-connection line-rate limit (a few runs send
            # from fewer connections than the default limit allows for).
            "--max-lines-per-sec", "0",
            "--log-format", "json",
            *map(str, args),
        ]
        full_env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        full_env.update(env or {})
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=full_env)
        self.args = args
        deadline = time.time() + 30
        while '"listening"' not in self.log_path.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.pid = self.proc.pid
        if metrics:
            wait_until(lambda: self.metric("stormgate_ready") is not None, 30,
                       "the operations endpoint to answer")

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def metric(self, name):
        """A metric from the operations endpoint, summed over its label sets (shards);
        None while the endpoint does not answer."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cpu(self):
        return cpu_seconds(self.pid)

    def memory(self):
        return memory_bytes(self.pid)

    def stop(self, timeout=120):
        """SIGTERM, wait for the drain, return the final statistics."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        if rc != 0:
            raise RuntimeError(f"server exited {rc}: {self.log_path.read_text()[-2000:]}")
        return json.loads(self.stats_path.read_text())


def loadgen(*args, quiet=False, allow_failure=False):
    """Runs the load generator and returns its JSON summary.

    `quiet` keeps its progress lines out of the log, but they are printed if it fails.
    `allow_failure` returns the summary of a run that exited non-zero (a consumer that did
    not reach --expect still says what it read), for the caller to judge."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        summary = Path(f.name)
    cmd = [str(LOADGEN), *map(str, args), "--summary", str(summary)]
    stderr = subprocess.PIPE if quiet else None
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write(proc.stderr[-4000:])
        if not (allow_failure and summary.exists() and summary.stat().st_size > 0):
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        log(f"{LOADGEN.name} {args[0]} exited {proc.returncode}")
    result = json.loads(summary.read_text())
    summary.unlink()
    return result


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "memlock_limit": resource.getrlimit(resource.RLIMIT_MEMLOCK),
    }


class CheckFailed(Exception):
    """A scenario could not check its result (a wait that timed out): the run fails."""


def wait_until(condition, timeout, what, interval=0.05):
    """Polls `condition` until it holds; raises CheckFailed if `timeout` seconds pass, since
    whatever the caller measures next would be measured on a server not in the state it
    needs."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise CheckFailed(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


def verdict(run, label, **checks):
    """Records in run["verified"] each named check (True when it holds) and whether all do;
    logs the ones that failed. Every scenario's result carries at least one verdict."""
    failed = [name for name, ok in checks.items() if not ok]
    run.setdefault("verified", {}).update({"checks": sorted(checks), "failed": failed,
                                          "ok": not failed})
    if failed:
        log(f"CHECK FAILED for {label}: {failed}")
    return run


def consume_check(broker, topic, label, delivered, sent, keys, warmup=0, lines_per_conn=None):
    """Reads `topic` from offset 0 to the end the broker states and checks it against what
    was sent: `delivered` (+ `warmup` records without a seq) records, exactly the broker's
    content, equal to the `sent` lines (every line with a seq), from `keys` + 1 (warm-up)
    stations, no duplicate, no gap, no bad record, no record under another station's key.
    With `lines_per_conn`, every station's seqs are exactly 0..n. Without it, a station's
    lost tail still fails: each station's seqs are gapless from 0, so the sum of the
    stations' counts is the line count only if no station lost its last lines (none can have
    more than it sent: a seq above that would be `missing` elsewhere or a duplicate).
    Returns the verified dict."""
    args = ["consume", "--brokers", broker.brokers, "--topic", topic,
            "--expect", delivered + warmup, "--timeout", "120s"]
    if lines_per_conn:
        args += ["--lines-per-conn", lines_per_conn]
    check = loadgen(*args, quiet=True, allow_failure=True)
    v = {k: check[k] for k in ("records", "broker_records", "duplicates", "missing", "keys",
                               "offset_holes", "bad_records", "key_mismatches",
                               "without_seq", "unexpected_seq", "seq_out_of_range")}
    checks = {
        "records_are_the_broker_content": check["records"] == check["broker_records"],
        "records_are_the_delivered": check["records"] == delivered + warmup,
        "delivered_are_the_sent": delivered == sent,
        "no_duplicates": check["duplicates"] == 0,
        "no_gaps_nor_lost_tails": check["missing"] == 0 and check["unexpected_seq"] == 0,
        "no_offset_holes": check["offset_holes"] == 0,
        "no_bad_records": check["bad_records"] == 0 and check["seq_out_of_range"] == 0,
        "keys_match_zipcodes": check["key_mismatches"] == 0,
        "every_line_has_its_seq": check["without_seq"] == warmup,
        "every_station": check["keys"] == keys + (1 if warmup else 0),
    }
    result = verdict({}, label, **checks)
    v.update(result["verified"])
    if not v["ok"]:
        log(f"VERIFY FAILED for {label}: {v} sent={sent} delivered={delivered}")
    return v


def children_cpu_seconds():
    """User + system CPU seconds of this process's reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def git_rev():
    out = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# Measurements shared by scenarios.


def per_million(cpu, lines):
    return round(cpu / lines * 1e6, 3) if lines else None


def parse_only_run(connections, duration, shards=0, threads=1, tls=None):
    """Null sink: the load generator sends as fast as the server reads for `duration`; over
    TLS with `tls` (see `make_pki`)."""
    server = Server("--sink", "null", "--shards", shards, *tls_server_args(tls))
    rss0, _ = server.memory()
    cpu0 = server.cpu()
    loadgen_cpu0 = children_cpu_seconds()
    # The load generator stops sending after `duration`, then waits until the server has read
    # everything still in the socket buffers (the drain): the rate counts both.
    sent = loadgen(
        "send", "--target", server.target, "--connections", connections,
        "--duration", f"{duration}s", "--threads", threads, "--drain-timeout", "120s",
        *tls_send_args(tls), quiet=SMOKE,
    )
    loadgen_cpu = children_cpu_seconds() - loadgen_cpu0
    cpu = server.cpu() - cpu0
    rss, hwm = server.memory()
    stats = server.stop()
    lines = stats["totals"]["lines_received"]
    elapsed = sent["duration_s"] + sent["drain_s"]
    return {
        "connections": connections,
        "shards": len(stats["shards"]),
        "duration_s": round(elapsed, 2),
        "drain_s": round(sent["drain_s"], 2),
        "loadgen_drain_timeouts": sent["drain_timeouts"],
        "lines": lines,
        "lines_per_s": round(lines / elapsed),
        "lines_per_s_per_shard": [round(s["lines_received"] / elapsed) for s in stats["shards"]],
        "loadgen_lines_sent": sent["lines_sent"],
        "server_cpu_s": round(cpu, 2),
        "cpu_s_per_million_lines": per_million(cpu, lines),
        # The load generator shares the cores: what it spends (on TLS, more) the server lacks.
        "loadgen_cpu_s": round(loadgen_cpu, 2),
        "server_rss_mib": round(rss / 2**20, 1),
        "server_rss_start_mib": round(rss0 / 2**20, 1),
        "server_rss_peak_mib": round(hwm / 2**20, 1),
        "backpressure_waits": stats["totals"]["backpressure_waits"],
        "line_errors": stats["totals"]["line_errors"],
        "tls": tls is not None,
        "tls_handshakes": stats["totals"]["tls_handshakes"],
        "tls_handshake_failures": stats["totals"]["tls_handshake_failures"],
    }


def hold_idle(server, idle, hold, opened, settled=None, zip_base=50000, send_args=()):
    """Starts a load generator that opens `idle` connections to `server`, identifies each and
    holds them for `hold` seconds; waits until `opened()` (a count on the server's side)
    reaches `idle`, then until `settled()` does (if given), then a second more.

    Returns the load generator's process, still holding (the caller ends it), and the figures:
    how fast the server opened them, and its CPU time and memory growth per connection."""
    time.sleep(0.5)
    rss0, _ = server.memory()
    cpu0 = server.cpu()
    t0 = time.time()
    proc = subprocess.Popen(
        [str(LOADGEN), "send", "--target", server.target, "--connections", str(idle),
         "--idle", "--duration", f"{hold}s", "--zip-base", str(zip_base), "--quiet-progress",
         *map(str, send_args)],
        stdout=subprocess.DEVNULL,
    )

    def reached(count):
        if proc.poll() is not None:
            raise RuntimeError(f"the idle load generator exited {proc.returncode}")
        return (count() or 0) >= idle

    wait_until(lambda: reached(opened), 120, f"{idle} connections to open")
    connect_s = time.time() - t0
    if settled:
        wait_until(lambda: reached(settled), 60, f"{idle} connections to settle")
    cpu = server.cpu() - cpu0
    time.sleep(1)
    rss_idle, _ = server.memory()
    per_conn = (rss_idle - rss0) / idle
    log(f"{idle} idle connections in {connect_s:.1f}s; RSS {rss0/2**20:.1f} → "
        f"{rss_idle/2**20:.1f} MiB: {per_conn:.0f} bytes each")
    return proc, {
        "idle_connections": idle,
        "connect_s": round(connect_s, 2),
        "opened_per_s": round(idle / connect_s),
        "server_cpu_us_per_connection": round(cpu / idle * 1e6),
        "server_rss_before_mib": round(rss0 / 2**20, 1),
        "server_rss_idle_mib": round(rss_idle / 2**20, 1),
        "rss_bytes_per_idle_connection": round(per_conn),
    }


WARMUP_LINES = 2
# Lines per second per connection in smoke mode.
SMOKE_RATE = 2000


def kafka_run(label, connections, duration, server_args=(), env=None, rate=0, verify=True,
              lines_per_conn=None, send_args=()):
    """Stations → stormgate → broker, then consume the topic and check every record.

    The rate is delivered records over the time from the first line sent to the end of the
    server's drain (SIGTERM after the load stops; exit after the last delivery report), so a
    server that buffers instead of delivering does not look faster than it is."""
    broker = Broker.get()
    topic = broker.topic(label)
    server = Server("--kafka-brokers", broker.brokers, "--kafka-topic", topic, *server_args,
                    env=env)
    # Warm up: the first records of a fresh idempotent producer wait for its producer id; the
    # measurement starts after that.
    loadgen("send", "--target", server.target, "--connections", 1, "--lines-per-conn",
            WARMUP_LINES, "--zip-base", 99000, quiet=True)
    time.sleep(1.5)
    cpu0 = server.cpu()
    bcpu0 = broker.cpu()
    t0 = time.time()
    limit = (["--lines-per-conn", lines_per_conn] if lines_per_conn
             else ["--duration", f"{duration}s"])
    if SMOKE and not rate:
        # Smoke runs prove the harness works, not speed: a paced trickle keeps them short and
        # light on the broker (flat out, one smoke second is ~1.5M records).
        rate = SMOKE_RATE
    sent = loadgen(
        "send", "--target", server.target, "--connections", connections, *limit,
        "--rate", rate, "--seq", "--timestamps", "--drain-timeout", "120s", *send_args,
        quiet=SMOKE,
    )
    cpu_load = server.cpu() - cpu0
    rss, hwm = server.memory()
    bcpu = broker.cpu() - bcpu0
    # The server's CPU is sampled before SIGTERM; the drain's share is small and excluded.
    stats = server.stop()
    elapsed = time.time() - t0
    totals = stats["totals"]
    delivered = totals["records_delivered"] - WARMUP_LINES
    result = {
        "label": label,
        "connections": connections,
        "rate_per_connection": rate,
        "lines_sent": sent["lines_sent"],
        "records_delivered": delivered,
        "records_failed": totals["records_failed"],
        "elapsed_s": round(elapsed, 2),
        "records_per_s": round(delivered / elapsed),
        "server_cpu_s": round(cpu_load, 2),
        "cpu_s_per_million_records": per_million(cpu_load, delivered),
        # The broker's JVM shares the two cores with the server and the load generator.
        "broker_cpu_s": round(bcpu, 2),
        "broker_cpu_s_per_million_records": per_million(bcpu, delivered),
        "broker_rss_mib": broker.rss_mib(),
        "server_rss_mib": round(rss / 2**20, 1),
        "server_rss_peak_mib": round(hwm / 2**20, 1),
        # Includes the warm-up lines' latency: 2 records among the run's.
        "latency_us": totals["delivery_latency_us"],
        "backpressure_waits": totals["backpressure_waits"],
        "acked_lines": sent.get("acked_lines", 0),
        "nacks": sent.get("nacks", 0),
    }
    if verify:
        # Everything was delivered before the server exited, so the topic is complete: read
        # it from offset 0 to the end the broker states. A short read, a duplicate, a gap, a
        # lost tail, a bad record or a failed one fails the run.
        result["verified"] = consume_check(
            broker, topic, label, delivered, sent["lines_sent"], connections,
            warmup=WARMUP_LINES, lines_per_conn=lines_per_conn)
        if totals["records_failed"] != 0:
            result["verified"]["ok"] = False
            log(f"VERIFY FAILED for {label}: {totals['records_failed']} records failed")
    broker.drop(topic)
    log(f"{label}: {result['records_per_s']:,} records/s, p99 "
        f"{result['latency_us']['p99']} µs, verified={result.get('verified', {}).get('ok')}")
    return result


# ---------------------------------------------------------------------------------------------
# Scenarios. Each returns a JSON-serialisable dict.


def scenario_parse_only():
    conns = [10, 100] if SMOKE else [100, 1000, 10000]
    duration = 2 if SMOKE else 10
    runs = []
    for c in conns:
        r = checked(parse_only_run(c, duration), c, None)
        log(f"parse-only {c} conns: {r['lines_per_s']:,} lines/s, "
            f"{r['cpu_s_per_million_lines']} CPU-s/M, RSS {r['server_rss_mib']} MiB")
        runs.append(r)
    return {"runs": runs}


def scenario_e2e():
    conns, duration = (10, 1) if SMOKE else (100, 10)
    return {"runs": [kafka_run(f"e2e-{c}", conns, duration, ["--kafka-compression", c])
                     for c in CODECS]}


def scenario_ceiling():
    """A plain rdkafka producer with the same settings into the same broker, then stormgate
    end to end with the defaults: the share of the ceiling stormgate reaches."""
    records = 20_000 if SMOKE else 3_000_000
    conns, duration = (10, 1) if SMOKE else (100, 10)
    broker = Broker.get()
    topic = broker.topic("ceiling")
    bcpu0 = broker.cpu()
    single = loadgen("produce", "--brokers", broker.brokers, "--topic", topic,
                     "--records", records, quiet=SMOKE)
    single["broker_cpu_s"] = round(broker.cpu() - bcpu0, 2)
    broker.drop(topic)
    log(f"one plain producer: {round(single['records_per_s']):,} records/s")
    # Stormgate runs one producer per shard, so the fair ceiling is as many plain producers
    # in parallel (each on its own thread, in its own process).
    nr = len(os.sched_getaffinity(0))
    topic = broker.topic("ceiling-parallel")
    bcpu0 = broker.cpu()
    procs = []
    for i in range(nr):
        out = Path(tempfile.mkdtemp()) / "produce.json"
        cmd = [str(LOADGEN), "produce", "--brokers", broker.brokers, "--topic", topic,
               "--records", str(records // nr), "--zip-base", str(10000 + 1000 * i),
               "--summary", str(out)]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), out))
    parallel = []
    for p, out in procs:
        if p.wait() != 0:
            raise RuntimeError("a parallel plain producer failed")
        parallel.append(json.loads(out.read_text()))
    parallel_broker_cpu = round(broker.cpu() - bcpu0, 2)
    broker.drop(topic)
    total = sum(r["delivered"] for r in parallel)
    ceiling = total / max(r["duration_s"] for r in parallel)
    log(f"{nr} plain producers in parallel: {round(ceiling):,} records/s")
    ours = kafka_run("ceiling-stormgate", conns, duration)
    return {
        "plain_producer": single,
        "plain_producers_parallel": {"producers": nr, "records": total,
                                     "records_per_s": round(ceiling),
                                     "broker_cpu_s": parallel_broker_cpu, "runs": parallel},
        "stormgate": ours,
        "stormgate_share_of_single_producer": round(ours["records_per_s"]
                                                    / single["records_per_s"], 3),
        "stormgate_share_of_ceiling": round(ours["records_per_s"] / ceiling, 3),
    }


def scenario_before():
    """The replaced server's old mode (each line waits for its delivery report, one record
    per batch) against the defaults, same load."""
    # A fixed number of lines rather than a duration: in the old mode the server reads one
    # line per delivery report, so what a flat-out sender pushes into its socket buffers in a
    # few seconds takes minutes to drain.
    # Verifying is slow for this run alone: one record per batch, so the consumer reads many
    # tiny batches (Tansu served about a thousand a second); hence 200 lines per connection.
    conns, lines = (10, 100) if SMOKE else (100, 200)
    before = kafka_run("before", conns, None, lines_per_conn=lines,
                       server_args=["--kafka-async", "false", "--kafka-batch-size", "1"])
    after = kafka_run("defaults", conns, None, lines_per_conn=lines * 20)
    return {"before": before, "defaults": after,
            "ratio": round(after["records_per_s"] / max(before["records_per_s"], 1), 1)}


def scenario_shards():
    conns = 100 if SMOKE else 1000
    duration = 2 if SMOKE else 10
    runs = []
    for shards in [1, 2, 4]:
        r = checked(parse_only_run(conns, duration, shards=shards), conns, None)
        log(f"{shards} shard(s): {r['lines_per_s']:,} lines/s")
        runs.append(r)
    return {"runs": runs}


def scenario_connections():
    """Idle connections up to the open-files limit, then 100 active ones beside them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log(f"open-files limit: soft {soft}, hard {hard} (the server raises its soft limit to hard)")
    idle = 500 if SMOKE else hard - 1000  # headroom for the 100 active and the server's own
    duration = 2 if SMOKE else 10
    broker = Broker.get()
    topic = broker.topic("connections")
    server = Server("--kafka-brokers", broker.brokers, "--kafka-topic", topic)
    bcpu0 = broker.cpu()
    # Accept rate: how fast the server's established connections (its side, from
    # /proc/net/tcp) reach `idle`.
    idle_proc, held = hold_idle(server, idle, duration * 3 + 30,
                                opened=lambda: count_established(server.port))
    active = loadgen("send", "--target", server.target, "--connections", 100,
                     "--duration", f"{duration}s", "--rate", 100, "--zip-base", 10000,
                     "--seq", "--drain-timeout", "120s", quiet=SMOKE)
    # Still holding: the idle connections outlived the active ones' run.
    if idle_proc.poll() is not None:
        raise CheckFailed(f"the idle load generator exited {idle_proc.returncode} early")
    idle_proc.kill()
    idle_proc.wait()
    bcpu = broker.cpu() - bcpu0
    stats = server.stop()
    totals = stats["totals"]
    # The idle connections publish nothing: the topic holds exactly the active ones' lines.
    verified = consume_check(broker, topic, "connections", totals["records_delivered"],
                             active["lines_sent"], 100)
    verified["ok"] = verified["ok"] and totals["records_failed"] == 0
    broker.drop(topic)
    return {
        "verified": verified,
        "open_files_limit": {"soft": soft, "hard": hard},
        "broker_cpu_s": round(bcpu, 2),
        "idle_connections": idle,
        "connect_s": held["connect_s"],
        "accepts_per_s": held["opened_per_s"],
        "server_rss_before_mib": held["server_rss_before_mib"],
        "server_rss_idle_mib": held["server_rss_idle_mib"],
        "rss_bytes_per_idle_connection": held["rss_bytes_per_idle_connection"],
        "active_connections": 100,
        "active_lines_sent": active["lines_sent"],
        "records_delivered": totals["records_delivered"],
        "active_latency_us": totals["delivery_latency_us"],
    }


def count_established(port):
    """Established TCP connections to the server's port, from /proc/net/tcp (no ss needed)."""
    n = 0
    hexport = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01" and cols[1].endswith(":" + hexport):
                        n += 1
        except FileNotFoundError:
            pass
    return n


def scenario_latency():
    """The latency target is at half the maximum rate: measure the maximum with the
    defaults, then run at half of it, paced by the load generator."""
    conns = 10 if SMOKE else 100
    duration = 1 if SMOKE else 10
    peak = kafka_run("latency-peak", conns, duration)
    half_rate = max(1, peak["records_per_s"] // 2 // conns)
    half = kafka_run("latency-half", conns, duration, rate=half_rate)
    quarter = kafka_run("latency-quarter", conns, duration, rate=max(1, half_rate // 2))
    return {"peak": peak, "half": half, "quarter": quarter,
            "half_rate_total": half_rate * conns}


def scenario_acks():
    """Acknowledgements off and on, same load, same run: what answering every line costs."""
    conns = 10 if SMOKE else 100
    duration = 1 if SMOKE else 10
    off = kafka_run("acks-off", conns, duration)
    on = kafka_run("acks-on", conns, duration, send_args=["--acks"])
    if on["acked_lines"] != on["lines_sent"]:
        log(f"ACKS MISSING: {on['acked_lines']:,} of {on['lines_sent']:,} lines acknowledged")
        on.setdefault("verified", {})["ok"] = False
    return {"off": off, "on": on,
            "throughput_ratio": round(on["records_per_s"] / max(off["records_per_s"], 1), 2),
            "p99_ratio": round(on["latency_us"]["p99"] / max(off["latency_us"]["p99"], 1), 2)}


def fairness_run(label, normal, rate, duration, flood):
    """`normal` paced stations (with send timestamps) and, if `flood`, one more connection
    sending flat out (without timestamps), into the real broker. A consumer follows the topic
    during the run, so its latency (send → consumed) covers the paced stations only."""
    broker = Broker.get()
    topic = broker.topic(label)
    # One shard: the flooder and the paced stations share it.
    server = Server("--kafka-brokers", broker.brokers, "--kafka-topic", topic, "--shards", "1")
    loadgen("send", "--target", server.target, "--connections", 1, "--lines-per-conn",
            WARMUP_LINES, "--zip-base", 99000, quiet=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        consumed_path = Path(f.name)
    consumer = subprocess.Popen(
        [str(LOADGEN), "consume", "--brokers", broker.brokers, "--topic", topic, "--follow",
         "--idle-timeout", "5s", "--kafka-prop", "fetch.wait.max.ms=5",
         "--summary", str(consumed_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    bcpu0 = broker.cpu()
    flooder = None
    flooder_summary = Path(tempfile.mkdtemp(prefix="stormgate-bench-")) / "flooder.json"
    if flood:
        flooder = subprocess.Popen(
            [str(LOADGEN), "send", "--target", server.target, "--connections", "1",
             "--duration", f"{duration}s", "--zip-base", "90000", "--drain-timeout", "120s",
             "--seq", "--summary", str(flooder_summary)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sent = loadgen("send", "--target", server.target, "--connections", normal, "--rate", rate,
                   "--duration", f"{duration}s", "--seq", "--timestamps",
                   "--drain-timeout", "120s", quiet=True)
    flooded = 0
    if flooder:
        if flooder.wait(timeout=300) != 0:
            raise CheckFailed(f"the flooder exited {flooder.returncode}")
        flooded = json.loads(flooder_summary.read_text())["lines_sent"]
    shutil.rmtree(flooder_summary.parent, ignore_errors=True)
    stats = server.stop()
    consumer.wait(timeout=600)
    consumed = json.loads(consumed_path.read_text())
    consumed_path.unlink()
    bcpu = broker.cpu() - bcpu0
    totals = stats["totals"]
    # What the following consumer saw proves nothing about completeness (it stops after 5 s
    # without a record): read the topic again from offset 0 and compare it with what both
    # senders sent.
    verified = consume_check(broker, topic, label, totals["records_delivered"] - WARMUP_LINES,
                             sent["lines_sent"] + flooded, normal + (1 if flood else 0),
                             warmup=WARMUP_LINES)
    verified["ok"] = verified["ok"] and totals["records_failed"] == 0
    broker.drop(topic)
    result = {
        "label": label,
        "verified": verified,
        "flooder_lines_sent": flooded,
        "normal_connections": normal,
        "rate_per_connection": rate,
        "flooder": flood,
        "normal_lines_sent": sent["lines_sent"],
        "records_delivered": totals["records_delivered"] - WARMUP_LINES,
        "normal_latency_us": consumed["consume_latency_us"],
        "normal_records_timed": consumed["consume_latency_us"]["count"],
        "backpressure_waits": totals["backpressure_waits"],
        # Includes the following consumer's fetches.
        "broker_cpu_s": round(bcpu, 2),
    }
    lat = result["normal_latency_us"]
    log(f"{label}: {fmt_int(result['records_delivered'])} records, paced stations' send → "
        f"consumed p50 {lat['p50']} µs, p99 {lat['p99']} µs")
    return result


def fmt_int(n):
    return f"{n:,}"


def scenario_fairness():
    """One connection sending flat out next to many paced ones on the same shard: the paced
    stations' latency with and without it (a per-connection in-flight cap is what keeps the
    flooder from taking the shard's queue)."""
    normal, rate, duration = (100, 20, 2) if SMOKE else (1000, 20, 10)
    base = fairness_run("fairness-alone", normal, rate, duration, flood=False)
    flooded = fairness_run("fairness-flooded", normal, rate, duration, flood=True)
    ratio = (flooded["normal_latency_us"]["p99"] or 0) / max(base["normal_latency_us"]["p99"] or 1, 1)
    log(f"fairness: p99 with the flooder / without = {ratio:.2f} (target <= 2)")
    return {"alone": base, "flooded": flooded, "p99_ratio": round(ratio, 2)}


def make_pki():
    """A throwaway CA and a server certificate for localhost and 127.0.0.1 (ECDSA P-256),
    written by the load generator (rcgen): a dict of file paths, and `dir` to remove."""
    out = Path(tempfile.mkdtemp(prefix="stormgate-bench-pki-"))
    pki = loadgen("pki", "--out", out, quiet=True)
    pki["dir"] = str(out)
    return pki


def tls_server_args(pki):
    return ["--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"]] if pki else []


def tls_send_args(pki):
    return ["--tls-ca", pki["ca"]] if pki else []


def ratios(tls, plain, keys):
    """TLS / plain for each of `keys`."""
    return {k: round(tls[k] / plain[k], 2) if tls.get(k) is not None and plain.get(k) else None
            for k in keys}


def idle_run(idle, tls=None):
    """Null sink, as parse-only: `idle` connections that each connect (with `tls`, make a full
    handshake) and identify, then hold. How fast the server opened them (plain: accepted, TLS:
    handshakes completed, from its operations endpoint), its CPU time for each until it had
    read every identify, and its memory per connection."""
    server = Server("--sink", "null", *tls_server_args(tls), metrics=True)
    opened = "stormgate_tls_handshakes_total" if tls else "stormgate_connections_accepted_total"
    loadgen_cpu0 = children_cpu_seconds()
    # Identify lines are the only lines: once the server has read `idle` of them, every
    # connection is in its idle state.
    proc, held = hold_idle(server, idle, 600, opened=lambda: server.metric(opened),
                           settled=lambda: server.metric("stormgate_lines_received_total"),
                           send_args=tls_send_args(tls))
    proc.kill()
    proc.wait()
    # Nearly all of it opening the connections (the load generator shares the cores): holding
    # them costs it nothing. Taken before the server, also a child, is reaped.
    held["loadgen_cpu_s"] = round(children_cpu_seconds() - loadgen_cpu0, 2)
    totals = server.stop()["totals"]
    held.update(tls=tls is not None, lines_received=totals["lines_received"],
                line_errors=totals["line_errors"],
                tls_handshakes=totals["tls_handshakes"],
                tls_handshake_failures=totals["tls_handshake_failures"])
    return held


def checked(run, connections, lines):
    """Marks a run verified when the server read exactly `lines` lines (None: every metrics
    line the load generator sent and each connection's identify) without an error, the load
    generator's drain did not time out and, over TLS, the server completed one handshake per
    connection and failed none."""
    if lines is None:
        lines = run["loadgen_lines_sent"] + connections
    check = {
        "lines_expected": lines,
        "lines_received": run.get("lines", run.get("lines_received")),
        "line_errors": run.get("line_errors", {}),
        "tls_handshakes": run["tls_handshakes"],
        "tls_handshake_failures": run["tls_handshake_failures"],
    }
    check["ok"] = (check["lines_received"] == lines and not check["line_errors"]
                   and run.get("loadgen_drain_timeouts", 0) == 0
                   and check["tls_handshake_failures"] == 0
                   and check["tls_handshakes"] == (connections if run["tls"] else 0))
    if not check["ok"]:
        log(f"CHECK FAILED ({'TLS' if run['tls'] else 'plain'}): {check}")
    run["verified"] = check
    return run


def scenario_tls():
    """Plain TCP against TLS on the same server settings (null sink, as parse-only), in the
    same run: (a) connections sending flat out: lines/s, server CPU per million lines, RSS;
    (b) idle connections, each after its handshake and identify: how fast the server opened
    them, its CPU and RSS per connection. Every TLS connection makes a full handshake
    (TLS 1.3, ECDSA P-256 certificate, no session resumption)."""
    conns, duration, idle = (10, 2, 200) if SMOKE else (100, 10, 5000)
    pki = make_pki()
    try:
        flat = {}
        for name, tls in (("plain", None), ("tls", pki)):
            r = parse_only_run(conns, duration, tls=tls)
            # Every metrics line sent, and each connection's identify.
            flat[name] = checked(r, conns, r["loadgen_lines_sent"] + conns)
            log(f"{name} {conns} conns flat out: {r['lines_per_s']:,} lines/s, "
                f"{r['cpu_s_per_million_lines']} CPU-s/M, RSS {r['server_rss_mib']} MiB")
        flat["tls_over_plain"] = ratios(
            flat["tls"], flat["plain"],
            ["lines_per_s", "cpu_s_per_million_lines", "server_rss_mib", "server_rss_peak_mib",
             "loadgen_cpu_s"])
        held = {}
        for name, tls in (("plain", None), ("tls", pki)):
            r = idle_run(idle, tls=tls)
            held[name] = checked(r, idle, idle)
            log(f"{name} {idle} idle: opened {r['opened_per_s']:,}/s, "
                f"{r['server_cpu_us_per_connection']} µs CPU and "
                f"{r['rss_bytes_per_idle_connection']:,} bytes RSS each")
        held["tls_over_plain"] = ratios(
            held["tls"], held["plain"],
            ["opened_per_s", "server_cpu_us_per_connection", "loadgen_cpu_s",
             "rss_bytes_per_idle_connection"])
    finally:
        shutil.rmtree(pki["dir"], ignore_errors=True)
    log(f"TLS/plain: flat out {flat['tls_over_plain']}, idle {held['tls_over_plain']}")
    return {"certificate_key": "ECDSA P-256", "flat_out": flat, "idle": held}


SCENARIOS = {
    "parse-only": scenario_parse_only,
    "e2e": scenario_e2e,
    "ceiling": scenario_ceiling,
    "before": scenario_before,
    "shards": scenario_shards,
    "connections": scenario_connections,
    "latency": scenario_latency,
    "acks": scenario_acks,
    "fairness": scenario_fairness,
    "tls": scenario_tls,
}

SMOKE = False


def run_scenario(name):
    log(f"scenario {name}{' (smoke)' if SMOKE else ''}")
    started = datetime.datetime.now(datetime.timezone.utc)
    result = SCENARIOS[name]()
    out_dir = RESULTS / "smoke" if SMOKE else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "scenario": name,
        "smoke": SMOKE,
        "started_at": started.isoformat(timespec="seconds"),
        "git": git_rev(),
        "machine": machine(),
        "result": result,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return doc


def main():
    global SMOKE
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all", "report"])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI")
    args = parser.parse_args()
    SMOKE = args.smoke
    if args.scenario == "report":
        import report
        report.main(RESULTS, ROOT / "docs" / "img")
        return
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    failed = []
    for name in names:
        try:
            doc = run_scenario(name)
        except CheckFailed as e:
            log(f"scenario {name}: {e}")
            failed.append(name)
            continue
        if not has_verdict(doc["result"]):
            log(f"scenario {name} checked nothing: every scenario must verify its result")
            failed.append(name)
        elif not verified(doc["result"]):
            failed.append(name)
    if failed:
        log(f"records went missing or were duplicated, or a check failed, in: "
            f"{', '.join(failed)}")
        sys.exit(1)


def has_verdict(result):
    """Whether any run in the result carries a check."""
    if isinstance(result, dict):
        return "verified" in result or any(has_verdict(v) for v in result.values())
    if isinstance(result, list):
        return any(has_verdict(v) for v in result)
    return False


def verified(result):
    """False if any run in the result failed its check (a Kafka run its consume check)."""
    if isinstance(result, dict):
        if result.get("verified", {}).get("ok") is False:
            return False
        return all(verified(v) for v in result.values())
    if isinstance(result, list):
        return all(verified(v) for v in result)
    return True


if __name__ == "__main__":
    main()
