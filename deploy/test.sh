#!/usr/bin/env bash
# Runs Stormgate's whole test suite from a clean checkout: installs and starts a real
# Kafka-protocol broker (Tansu, see deploy/kafka/tansu.sh), then checks formatting and lints
# and runs every test against that broker, then every benchmark scenario in smoke mode so the
# harness cannot rot. This is the test command README.md documents and
# .ci/run calls.
#
# Everything builds in the release profile: librdkafka is compiled once (build scripts run
# per profile), and the tests exercise the code users run.
#
# Environment:
#   STORMGATE_TEST_KAFKA_PORT  broker port for the tests (default 19092; a port of its own, so
#                              a broker you run on 9092 is left alone)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

port=${STORMGATE_TEST_KAFKA_PORT:-19092}
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(($(date +%s) - started))" >&2; }

step "starting the Kafka-protocol broker on 127.0.0.1:$port"
brokers=$(deploy/kafka/tansu.sh start "$port")
trap 'deploy/kafka/tansu.sh stop "$port" || true' EXIT
export STORMGATE_TEST_KAFKA=${brokers#KAFKA_BROKERS=}
echo "STORMGATE_TEST_KAFKA=$STORMGATE_TEST_KAFKA" >&2

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (release, all targets, warnings are errors)"
cargo clippy --release --workspace --all-targets --locked -- -D warnings

step "cargo test (release)"
cargo test --release --workspace --locked

step "benchmark harness, smoke mode (every scenario for a second or two; see benches/)"
benches/run.sh all --smoke

step "all tests passed"
