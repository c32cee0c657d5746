#!/usr/bin/env bash
# Runs Stormgate's whole test suite from a clean checkout: installs and starts Apache Kafka 4.4
# (KRaft, one node, data on disk; see deploy/kafka/kafka.sh), then checks the vendored crates
# (vendor/check.sh), formatting and lints and runs every test against that broker, then every benchmark scenario in smoke mode so the
# harness cannot rot. This is the test command README.md documents and .ci/run calls.
#
# Everything builds in one profile, release-checked (Cargo.toml): release code generation, so
# the tests exercise the code users run, with debug assertions and overflow checks on in our
# crates, so that an invariant written as `debug_assert!` (a record settled twice, acks out of
# order) fails the test that breaks it instead of being compiled out. One profile for lints,
# tests and the smoke benchmarks: librdkafka is compiled once (build scripts run per profile).
#
# Ports: all derive from STORMGATE_TEST_KAFKA_PORT (P, default 19092), so two runs with
# different P coexist on one machine. The suite's broker takes P..P+4 (client, controller,
# SASL; kafka.sh's layout); tests that own a broker take P+10, P+20 and P+30 (each with the four
# ports after it); the benchmarks' broker takes P+40.
#
# Environment:
#   STORMGATE_TEST_KAFKA_PORT  the suite broker's client port (default 19092; a port of its own,
#                              so a broker you run on 9092 is left alone)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

port=${STORMGATE_TEST_KAFKA_PORT:-19092}
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(($(date +%s) - started))" >&2; }

step "starting Apache Kafka on 127.0.0.1:$port (the first run resolves it from Maven Central)"
# From empty storage: topics of an earlier run would only take disk space.
deploy/kafka/kafka.sh reset "$port"
# At the end, every broker of the run (a test or the harness killed half way leaves its own).
cleanup() {
  local offset
  for offset in 0 10 20 30 40; do
    deploy/kafka/kafka.sh reset "$((port + offset))" 2>/dev/null || true
  done
}
trap cleanup EXIT
listeners=$(deploy/kafka/kafka.sh start "$port")
brokers=$(sed -n 's/^KAFKA_BROKERS=//p' <<<"$listeners")
[[ -n $brokers ]] || {
  echo "deploy/kafka/kafka.sh start printed no KAFKA_BROKERS line: $listeners" >&2
  exit 1
}
export STORMGATE_TEST_KAFKA=$brokers
export BENCH_KAFKA_PORT=$((port + 40))
echo "STORMGATE_TEST_KAFKA=$STORMGATE_TEST_KAFKA BENCH_KAFKA_PORT=$BENCH_KAFKA_PORT" >&2
deploy/kafka/kafka.sh status "$port" >&2

step "vendored crates: their crates.io releases plus vendor/patches, nothing else"
vendor/check.sh

step "cargo fmt --check"
cargo fmt --all -- --check

profile=release-checked
step "cargo clippy ($profile, all targets, warnings are errors)"
cargo clippy --profile "$profile" --workspace --all-targets --locked -- -D warnings

step "cargo test ($profile: release with debug assertions and overflow checks)"
cargo test --profile "$profile" --workspace --locked

step "benchmark harness, smoke mode (every scenario for a second or two; see benches/)"
BENCH_PROFILE=$profile benches/run.sh all --smoke

step "the suite's broker after the tests"
deploy/kafka/kafka.sh status "$port" >&2

step "all tests passed"
