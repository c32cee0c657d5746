#!/usr/bin/env bash
# Checks that the test broker serves back every record it acknowledged while several producers
# write the same partitions at once; exits non-zero if any round is short.
#
# Why it exists: the previous test broker (Tansu 0.6.0, memory engine) failed this now and
# then (8 short rounds in 134 on 2026-11-27, each about one batch short: its high watermark
# lagged what it stored, so a consumer stopping at partition EOF read too little), and the
# tests then retried short reads. Apache Kafka replaced it and the retries are gone: every
# short read fails a test. This script is the standing evidence for that, without Stormgate.
#
# Each round: a fresh 6-partition topic, PRODUCERS plain rdkafka producers (the load
# generator's `produce` mode: one librdkafka producer each, acks=all, idempotent) publishing
# RECORDS each in parallel, every delivery report a success; then one consumer reads every
# partition from offset 0 to its end. A round is SHORT when it reads fewer records than were
# acknowledged, or fewer than the broker's watermarks say it holds, or finds an offset hole.
#
# Measured on the 2-core development VM against Apache Kafka 4.4.0 (2026-12-06): 0 short
# rounds in 10 (3 producers x 30,000 records; each round 90,003 acknowledged, read and held).
# Not part of deploy/test.sh: every test and benchmark run makes the same check on its own
# topic.
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
trap 'deploy/kafka/kafka.sh reset "$PORT" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
deploy/kafka/kafka.sh reset "$PORT" >/dev/null 2>&1
deploy/kafka/kafka.sh start "$PORT" >/dev/null
brokers=127.0.0.1:$PORT

short=0
for round in $(seq 1 "$ROUNDS"); do
  topic=concurrent-loss-$round-$RANDOM
  deploy/kafka/kafka.sh create-topic "$topic" 6 "$PORT" >/dev/null 2>&1
  for p in $(seq 1 "$PRODUCERS"); do
    "$loadgen" produce --brokers "$brokers" --topic "$topic" --records "$RECORDS" \
      --zip-base $((p * 10000)) --compression "$CODEC" --summary "$work/p$p.json" \
      >/dev/null 2>&1 &
  done
  wait
  acked=$(python3 -c 'import json,sys; print(sum(d["delivered"] + d["warmup_records"] for d in map(lambda f: json.load(open(f)), sys.argv[1:])))' "$work"/p*.json)
  "$loadgen" consume --brokers "$brokers" --topic "$topic" --expect "$acked" --timeout 60s \
    --summary "$work/c.json" >/dev/null 2>&1 || true
  read -r got held holes < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["records"], d["broker_records"], d["offset_holes"])' "$work/c.json")
  if ((got != acked || got != held || holes != 0)); then
    short=$((short + 1))
    echo "round $round: SHORT: acknowledged $acked, read $got, broker holds $held, offset holes $holes"
  else
    echo "round $round: ok: acknowledged $acked, read $got, broker holds $held"
  fi
  deploy/kafka/kafka.sh delete-topic "$topic" "$PORT" >/dev/null 2>&1
done
echo "$short short rounds in $ROUNDS"
((short == 0))
