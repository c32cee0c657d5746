#!/usr/bin/env bash
# Where a record's time goes at a paced rate: one run into a fresh Apache Kafka with the server's
# line-read -> delivery-report histogram, librdkafka's own latency windows (its statistics,
# logged at TRACE), and a 3 s `perf sched` recording of every thread's scheduling delays.
# A profile, not a benchmark: see docs/PROFILING.md ("Latency") and docs/PERFORMANCE.md.
#
#   benches/latency-profile.sh [LINES_PER_SEC_PER_CONN] [-- SERVER FLAGS...]
#
# Default: 100 connections x 8,500 lines/s (give half the measured peak: 4,700 on the 2-core
# VM of docs/PERFORMANCE.md), defaults otherwise;
# e.g. `benches/latency-profile.sh 8500 -- --kafka-batch-timeout 1ms`. Needs `perf` with
# access to sched tracepoints (root); without it the scheduling part is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rate=${1:-8500}
shift || true
[[ ${1:-} == -- ]] && shift
port=29100 listen=127.0.0.1:18700 metrics=127.0.0.1:18701
out=$(mktemp -d /tmp/stormgate-latency-profile.XXXXXX)
cargo build --release -q -p stormgate -p stormgate-loadgen
deploy/kafka/kafka.sh reset "$port" 2>/dev/null
deploy/kafka/kafka.sh start "$port" >/dev/null
trap 'deploy/kafka/kafka.sh reset "$port" >/dev/null 2>&1 || true' EXIT
topic=latency-profile-$$
deploy/kafka/kafka.sh create-topic "$topic" 6 "$port" >/dev/null
server=
# Whatever ends the script, the server goes too (it would otherwise outlive the broker).
trap 'kill -KILL $server 2>/dev/null || true; deploy/kafka/kafka.sh reset "$port" >/dev/null 2>&1 || true' EXIT
# start_server LOG: the server on $listen, its statistics in $out/stats.json.
start_server() {
  LOG_FORMAT=json RUST_LOG=info,stormgate::librdkafka_stats=trace ./target/release/stormgate \
    --listen "$listen" --shards 2 --kafka-brokers "127.0.0.1:$port" --kafka-topic "$topic" \
    --metrics-addr "$metrics" --max-lines-per-sec 0 --stats-file "$out/stats.json" "${server_flags[@]}" \
    2>"$1" &
  server=$!
  sleep 1
}
server_flags=("$@")
# Warm-up, with a server of its own: 15 s of the same load, so that the fresh broker's JVM
# has compiled its hot paths before the measurement (without it, two runs gave p50 19 and
# 47 ms, and the JIT compiler threads were among the most delayed).
start_server "$out/warm-up.log"
./target/release/stormgate-loadgen send --target "$listen" --connections 100 --duration 15s \
  --rate "$rate" --zip-base 50000 --quiet-progress >/dev/null 2>&1
kill -TERM "$server"
wait "$server" || true
# The measured server: its producer's id first, then the load.
start_server "$out/server.log"
./target/release/stormgate-loadgen send --target "$listen" --connections 1 --lines-per-conn 2 \
  --zip-base 99000 --quiet-progress >/dev/null 2>&1
sleep 1.5
./target/release/stormgate-loadgen send --target "$listen" --connections 100 --duration 12s \
  --rate "$rate" --seq --timestamps --quiet-progress >"$out/loadgen.json" 2>/dev/null &
loadgen=$!
sleep 4
if perf sched record -a -o "$out/sched.data" -- sleep 3 >/dev/null 2>&1; then
  # `head` closes the pipe early: under pipefail perf's SIGPIPE would end the script here.
  perf sched latency -i "$out/sched.data" --sort max 2>/dev/null | head -12 >"$out/sched.txt" || true
else
  echo "perf sched unavailable: scheduling delays not recorded" >"$out/sched.txt"
fi
wait "$loadgen"
kill -TERM "$server"
wait "$server" || true
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
lat = json.loads((out / "stats.json").read_text())["totals"]["delivery_latency_us"]
print(f"server, line read -> delivery report: p50 {lat['p50']} us, p99 {lat['p99']} us "
      f"({lat['count']:,} records)")
windows = {"int_latency": [], "outbuf_latency": [], "rtt": []}
for line in (out / "server.log").read_text().splitlines():
    event = json.loads(line) if line.startswith("{") else {}
    fields = event.get("fields", event)
    if "statistics" not in fields or fields.get("shard") != 0:
        continue
    for broker in json.loads(fields["statistics"])["brokers"].values():
        if broker.get("source") in ("internal", "logical"):
            continue
        for name in windows:
            if broker[name]["cnt"] > 0:
                windows[name].append((broker[name]["p50"], broker[name]["p99"]))
print("librdkafka, shard 0's producer, median over its 1 s windows:")
for name, values in windows.items():
    if values:
        p50 = statistics.median(v[0] for v in values)
        p99 = statistics.median(v[1] for v in values)
        print(f"  {name:15} p50 {p50:>7.0f} us   p99 {p99:>7.0f} us   ({len(values)} windows)")
print((out / "sched.txt").read_text())
print(f"raw data: {out}")
PY
