#!/usr/bin/env bash
# Runs one benchmark scenario (or all of them) and writes its JSON result to benches/results/.
#
#   benches/run.sh parse-only|e2e|ceiling|before|shards|connections|latency|acks|buffer|fairness|
#                  tls|fleet|restart|recovery|all [--smoke]
#   benches/run.sh report      # benches/results/summary.md and docs/img/*.svg from the results
#
# Builds the release binaries first (the profile BENCH_PROFILE names, when set: deploy/test.sh
# smoke-runs its test profile's binaries); the harness (benches/harness.py, standard-library Python)
# starts its own broker (Apache Kafka, deploy/kafka/kafka.sh), server and load generator. See docs/PERFORMANCE.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ${1:-} != report ]]; then
  cargo build --profile "${BENCH_PROFILE:-release}" --locked -p stormgate -p stormgate-loadgen >&2
  deploy/kafka/kafka.sh install >/dev/null
fi
exec python3 benches/harness.py "$@"
