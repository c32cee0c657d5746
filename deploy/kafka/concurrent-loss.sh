#!/usr/bin/env bash
# Reproduces a defect of the test broker (Tansu 0.6.0, memory engine), without Stormgate:
# when several producers write the same partitions at once, the broker now and then
# acknowledges records that a consumer never gets back.
#
# Each round: a fresh 6-partition topic, PRODUCERS plain rdkafka producers (the load
# generator's `produce` mode: one librdkafka producer each, acks=all) publishing RECORDS each
# in parallel, every delivery report a success; then one consumer reads every partition to
# its end and counts. A round is SHORT when it reads fewer records than were acknowledged.
#
# Measured on the 2-core development VM (2026-11-27): 8 short rounds in 134 with 3 producers
# x 30,000 uncompressed records (idempotent producers or not); each short by 600-4,300
# records, about one batch, with dense offsets (no offset holes); 0 short rounds in 30 with a
# single producer. Stormgate's tests and benchmarks therefore repeat a check once when its
# only failure is this one (see crates/stormgate/tests/support and benches/harness.py).
#
# Usage: deploy/kafka/concurrent-loss.sh [ROUNDS]     (env: PORT, PRODUCERS, RECORDS, CODEC)
set -euo pipefail

ROUNDS=${1:-20}
PORT=${PORT:-39092}
PRODUCERS=${PRODUCERS:-3}
RECORDS=${RECORDS:-30000}
CODEC=${CODEC:-none}

root=$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/../.." && pwd -P)
cd "$root"
cargo build --release --quiet -p stormgate-loadgen
loadgen=$root/target/release/stormgate-loadgen
work=$(mktemp -d)
trap 'deploy/kafka/tansu.sh stop "$PORT" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
deploy/kafka/tansu.sh start "$PORT" >/dev/null
brokers=127.0.0.1:$PORT

short=0
for round in $(seq 1 "$ROUNDS"); do
  topic=concurrent-loss-$round-$RANDOM
  deploy/kafka/tansu.sh create-topic "$topic" 6 "$PORT" >/dev/null 2>&1
  for p in $(seq 1 "$PRODUCERS"); do
    "$loadgen" produce --brokers "$brokers" --topic "$topic" --records "$RECORDS" \
      --zip-base $((p * 10000)) --compression "$CODEC" --summary "$work/p$p.json" \
      >/dev/null 2>&1 &
  done
  wait
  acked=$(python3 -c 'import json,sys; print(sum(d["delivered"] + d["warmup_records"] for d in map(lambda f: json.load(open(f)), sys.argv[1:])))' "$work"/p*.json)
  "$loadgen" consume --brokers "$brokers" --topic "$topic" --expect "$acked" --timeout 20s \
    --summary "$work/c.json" >/dev/null 2>&1 || true
  read -r got holes < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["records"], d["offset_holes"])' "$work/c.json")
  if ((got < acked)); then
    short=$((short + 1))
    echo "round $round: SHORT: acknowledged $acked, read $got (offset holes: $holes)"
  else
    echo "round $round: ok: acknowledged $acked, read $got"
  fi
done
echo "$short short rounds in $ROUNDS"
