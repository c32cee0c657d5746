#!/usr/bin/env bash
# Install and run Apache Kafka 4.4.0 (KRaft, one combined broker/controller) for Stormgate's
# tests and benchmarks: the broker users run, with its data on disk, so a stop and start keeps
# every record, topic and producer id, as in production.
#
# Where it comes from: Maven Central, through pom.xml beside this script (pinned 4.4.0 jars and
# a log4j2 binding; Maven fails on a checksum mismatch), copied into the cache with
# `mvn dependency:copy-dependencies`; each jar's sha256 is then checked against jars.sha256.
# Kafka publishes no distribution tarball there, so the main classes run with
# `java -cp 'LIBS/*'`: kafka.tools.StorageTool formats, kafka.Kafka serves,
# org.apache.kafka.tools.TopicCommand creates and deletes topics. Needs Java 17 or later and
# Maven (Debian: openjdk-17-jre-headless, maven), and python3 for metadata.py.
#
# Measured on the 2-core development VM shared with other builds (load average 2-9,
# 2026-12-06): the first install resolves 47 jars (44 MB) in ~10 s, later ones check the
# cache in well under a second; `start` until the broker answers Metadata takes 5-12 s (the
# first, which formats, about 1 s more; up to 15 s while the machine compiles); `stop`
# (SIGTERM, Kafka's controlled shutdown) 0.5-2.3 s; the idle broker's RSS is 380-400 MB
# (heap 1 GiB reserved, mostly untouched).
#
# Ports: everything derives from PORT (the client listener), so brokers on PORT and PORT+10
# coexist. PORT+1 is the KRaft controller listener, PORT+2 a SASL_PLAINTEXT listener (SCRAM),
# and with KAFKA_TLS_CERT/KAFKA_TLS_KEY, PORT+3 is SSL and PORT+4 SASL_SSL. Every listener
# binds 127.0.0.1 only.
#
# SASL: the format step creates the SCRAM-SHA-512 user `stormgate`, password
# `stormgate-test-password` (a throwaway broker's, not a secret), on every listener with SASL.
#
# Data: records in <cache>/kafka/PORT/data on disk, the KRaft metadata log in /dev/shm (see
# meta_dir for why), both kept across stop and start (that is what the restart test proves);
# `reset` deletes them. The broker's log is <cache>/kafka/PORT/broker.log (the previous start's
# in broker.log.1).
#
# Usage:
#   kafka.sh install                              # idempotent; prints the classpath dir
#   kafka.sh start [PORT]                         # prints KAFKA_BROKERS=127.0.0.1:PORT, then
#                                                 # KAFKA_SASL_BROKERS=, and with TLS
#                                                 # KAFKA_SSL_BROKERS=, KAFKA_SASL_SSL_BROKERS=
#   kafka.sh stop [PORT]                          # SIGTERM, SIGKILL after KAFKA_STOP_TIMEOUT
#   kafka.sh reset [PORT]                         # stop, then delete the data directory
#   kafka.sh status [PORT]                        # exit 0 running, 3 stopped
#   kafka.sh pid [PORT]                           # the broker JVM's pid (for CPU time)
#   kafka.sh create-topic NAME [PARTITIONS] [PORT]
#   kafka.sh delete-topic NAME [PORT]
#   kafka.sh list-topics [PORT]                   # "NAME PARTITIONS" lines
#
# Environment:
#   STORMGATE_CACHE       cache root (default: <repo root>/.cache)
#   KAFKA_PORT            default PORT (default: 9092)
#   KAFKA_START_TIMEOUT   seconds to wait for the broker to answer Metadata (default: 90)
#   KAFKA_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL (default: 30)
#   KAFKA_TLS_CERT        PEM certificate (chain) for the SSL listeners; with KAFKA_TLS_KEY
#   KAFKA_TLS_KEY         its PEM private key, unencrypted (PKCS#8)
#   JAVA                  the java binary (default: java on PATH)
#
# Only stdout carries machine-readable results (the KAFKA_* lines, the classpath dir, status,
# pid, topic list); all progress and errors go to stderr, so
# `eval "$(deploy/kafka/kafka.sh start)"` works.
set -euo pipefail

readonly KAFKA_VERSION=4.4.0
readonly SCRAM_USER=stormgate
readonly SCRAM_PASSWORD=stormgate-test-password

script_path=$(readlink -f -- "${BASH_SOURCE[0]}" 2>/dev/null || printf '%s' "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(cd -- "$(dirname -- "$script_path")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
readonly SCRIPT_DIR REPO_ROOT

CACHE_ROOT=${STORMGATE_CACHE:-$REPO_ROOT/.cache}
# Absolute now: pid and log paths are printed and reused from other working directories.
[[ $CACHE_ROOT == /* ]] || CACHE_ROOT=$PWD/$CACHE_ROOT
readonly CACHE_ROOT
readonly KAFKA_DIR=$CACHE_ROOT/kafka
readonly LIBS=$KAFKA_DIR/$KAFKA_VERSION/libs
readonly JAVA=${JAVA:-java}

START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
readonly START_TIMEOUT STOP_TIMEOUT
# How long a second invocation (e.g. tests starting the same broker at once) waits for the
# first one to finish.
readonly LOCK_TIMEOUT=300

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^# Only stdout/p' "$script_path" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

INSTALL_TMP=
cleanup() {
  if [[ -n $INSTALL_TMP ]]; then rm -rf -- "$INSTALL_TMP"; fi
}
trap cleanup EXIT

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

resolve_port() {
  local port=${1:-${KAFKA_PORT:-9092}}
  # PORT+4 must be a port too.
  if ! is_uint "$port" || ((10#$port < 1 || 10#$port > 65531)); then
    die "invalid port: '$port'"
  fi
  printf '%s' "$((10#$port))"
}

# Serialise invocations on the same state (the install, one port's broker). flock is
# util-linux (Essential on Debian); without it, run unlocked rather than fail.
lock() {
  local fd=$1 file=$2
  command -v flock >/dev/null 2>&1 || return 0
  mkdir -p -- "$(dirname -- "$file")"
  case $fd in
  8) exec 8>"$file" ;;
  9) exec 9>"$file" ;;
  *) die "internal: unsupported lock fd $fd" ;;
  esac
  flock -w "$LOCK_TIMEOUT" "$fd" || die "timed out after ${LOCK_TIMEOUT}s waiting for lock $file"
}

# ---------------------------------------------------------------------------------------------
# Install

require_java() {
  command -v "$JAVA" >/dev/null 2>&1 ||
    die "java not found; Kafka 4 needs Java 17 or later (Debian: apt-get install openjdk-17-jre-headless)"
  local version major
  version=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -1)
  major=${version%%.*}
  is_uint "${major:-x}" && ((major >= 17)) ||
    die "Kafka 4 needs Java 17 or later; $JAVA is version '${version:-unknown}'"
}

sha256_of() {
  local out
  out=$(sha256sum -- "$1")
  printf '%s' "${out%% *}"
}

# Every jar named in jars.sha256 is present with that digest, and there is no other jar.
libs_ok() {
  [[ -d $LIBS ]] || return 1
  (cd -- "$LIBS" && sha256sum --quiet --strict -c "$SCRIPT_DIR/jars.sha256" >/dev/null 2>&1) ||
    return 1
  local expected actual
  expected=$(grep -c . "$SCRIPT_DIR/jars.sha256")
  actual=$(find "$LIBS" -maxdepth 1 -name '*.jar' | wc -l)
  ((expected == actual))
}

ensure_installed() {
  require_java
  if libs_ok; then return 0; fi
  command -v mvn >/dev/null 2>&1 ||
    die "mvn not found; it resolves Kafka's jars from Maven Central (Debian: apt-get install maven)"
  mkdir -p -- "$KAFKA_DIR"
  lock 8 "$KAFKA_DIR/.install.lock"
  if libs_ok; then return 0; fi
  log "resolving Apache Kafka $KAFKA_VERSION from Maven Central (first run only)"
  INSTALL_TMP=$(mktemp -d "$KAFKA_DIR/.install.XXXXXX")
  # Maven's own repository lives in the cache too, so nothing is left in ~/.m2 and a second
  # install resolves offline. --strict-checksums fails on a checksum mismatch.
  mvn -q -B -Dstyle.color=never --strict-checksums -f "$SCRIPT_DIR/pom.xml" \
    -Dmaven.repo.local="$KAFKA_DIR/m2" \
    dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$INSTALL_TMP/libs" 2>&1 |
    # Maven 3.8 prints colour resets even in batch mode; keep the log plain.
    sed -e $'s/\e\\[[0-9;]*m//g' >&2 ||
    die "mvn could not resolve Kafka $KAFKA_VERSION (see its output above)"
  if ! (cd -- "$INSTALL_TMP/libs" && sha256sum --quiet --strict -c "$SCRIPT_DIR/jars.sha256" >&2); then
    die "a resolved jar differs from deploy/kafka/jars.sha256; refusing to install"
  fi
  rm -rf -- "$LIBS"
  mkdir -p -- "$(dirname -- "$LIBS")"
  mv -- "$INSTALL_TMP/libs" "$LIBS"
  rm -rf -- "$INSTALL_TMP"
  INSTALL_TMP=
  libs_ok || die "the installed jars in $LIBS are not the ones jars.sha256 names"
  log "installed Apache Kafka $KAFKA_VERSION in $LIBS"
}

# ---------------------------------------------------------------------------------------------
# One broker per port

port_dir() { printf '%s/%s' "$KAFKA_DIR" "$1"; }
pid_file() { printf '%s/broker.pid' "$(port_dir "$1")"; }
log_file() { printf '%s/broker.log' "$(port_dir "$1")"; }
data_dir() { printf '%s/data' "$(port_dir "$1")"; }

# The KRaft metadata log (topics, partitions, SCRAM users, the controller's own records) lives
# in memory-backed /dev/shm when there is one, apart from the records in data_dir. Why: the
# controller fsyncs that log on every write, and on a disk shared with builds ext4's journal
# makes one fsync wait for everyone's dirty pages. Measured here with it on disk: "Exceptionally
# slow controller event writeNoOpRecord took 27893 ms", during which producer ids were not
# handed out and the broker missed its heartbeats. /dev/shm keeps it across a stop and start
# (all the tests need), not across a reboot: then `start` formats both anew. One directory per
# cache root, so checkouts using the same port do not share it.
meta_dir() {
  if [[ -d /dev/shm && -w /dev/shm ]]; then
    local key
    key=$(printf '%s' "$KAFKA_DIR" | sha256sum)
    printf '/dev/shm/stormgate-kafka-%s/%s' "${key:0:12}" "$1"
  else
    printf '%s/metadata' "$(port_dir "$1")"
  fi
}

tls_enabled() { [[ -n ${KAFKA_TLS_CERT:-} || -n ${KAFKA_TLS_KEY:-} ]]; }

# The ports a broker on PORT binds: client, controller, SASL_PLAINTEXT, and the TLS pair.
ports_of() {
  local p=$1
  printf '%s ' "$p" "$((p + 1))" "$((p + 2))"
  if tls_enabled; then printf '%s ' "$((p + 3))" "$((p + 4))"; fi
}

# A zombie still answers kill -0, so also look at the state letter in /proc/PID/stat.
is_alive() {
  local pid=$1 stat rest
  kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  [[ ${rest%% *} != Z ]]
}

# True if PID is a live broker started by this script for PORT (guards against a recycled pid).
is_our_broker() {
  local pid=$1 port=$2 cmdline
  is_alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *" kafka.Kafka $(port_dir "$port")/server.properties"* ]]
}

running_pid() {
  local port=$1 pf pid
  pf=$(pid_file "$port")
  [[ -f $pf ]] || return 1
  pid=$(<"$pf")
  is_uint "$pid" || return 1
  is_our_broker "$pid" "$port" || return 1
  printf '%s' "$pid"
}

port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose.
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

serves_metadata() {
  python3 "$SCRIPT_DIR/metadata.py" ready "127.0.0.1:$1" 2>/dev/null
}

log_tail() {
  local lf=$1
  if [[ -f $lf ]]; then
    log "last lines of $lf:"
    grep -E ' (WARN|ERROR|FATAL) |Exception' -- "$lf" | tail -n 20 >&2 || true
    tail -n 10 -- "$lf" >&2 || true
  fi
}

# Wait until the broker on PORT answers Metadata while PID stays alive.
wait_ready() {
  local pid=$1 port=$2 deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    is_alive "$pid" || return 1
    if serves_metadata "$port"; then return 0; fi
    sleep 0.2
  done
  return 1
}

print_brokers() {
  local p=$1
  printf 'KAFKA_BROKERS=127.0.0.1:%s\n' "$p"
  printf 'KAFKA_SASL_BROKERS=127.0.0.1:%s\n' "$((p + 2))"
  if tls_enabled; then
    printf 'KAFKA_SSL_BROKERS=127.0.0.1:%s\n' "$((p + 3))"
    printf 'KAFKA_SASL_SSL_BROKERS=127.0.0.1:%s\n' "$((p + 4))"
  fi
}

# server.properties for a broker on PORT. Kafka's defaults hold unless a line says why not.
write_server_properties() {
  local p=$1 dir
  dir=$(port_dir "$p")
  local listeners="PLAINTEXT://127.0.0.1:$p,CONTROLLER://127.0.0.1:$((p + 1)),SASL_PLAINTEXT://127.0.0.1:$((p + 2))"
  local advertised="PLAINTEXT://127.0.0.1:$p,SASL_PLAINTEXT://127.0.0.1:$((p + 2))"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
  if tls_enabled; then
    listeners+=",SSL://127.0.0.1:$((p + 3)),SASL_SSL://127.0.0.1:$((p + 4))"
    advertised+=",SSL://127.0.0.1:$((p + 3)),SASL_SSL://127.0.0.1:$((p + 4))"
    protocols+=",SSL:SSL,SASL_SSL:SASL_SSL"
  fi
  cat >"$dir/server.properties" <<EOF
# Written by deploy/kafka/kafka.sh at every start; edit the script, not this file.

# One process is the whole cluster: KRaft controller and broker together, node 1, formatted
# with --standalone (a single-voter quorum found through the bootstrap server below).
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$((p + 1))
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
# Broker-to-broker traffic (there is none but the node's own) stays on plain TCP, so the
# SASL and TLS listeners are only what clients choose.
inter.broker.listener.name=PLAINTEXT

log.dirs=$(data_dir "$p")
# See meta_dir in kafka.sh: the controller's fsyncs go to memory, the records to disk.
metadata.log.dir=$(meta_dir "$p")
# Production's durability: no log.flush.* settings, so Kafka leaves flushing to the OS and
# relies on replication, as its documentation advises; a stop (SIGTERM) flushes everything.
# Topics that are used before anyone creates them (auto.create.topics.enable is Kafka's
# default, true) get 6 partitions, as the tests' own topics do.
num.partitions=6
default.replication.factor=1
# Internal topics on one node: replication 1 (their default of 3 cannot be met), and one
# partition each instead of 50, so that the first consumer group or transaction does not
# create 50 partitions on a 2-core machine.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
# Consumers joining a group are not held back 3 s waiting for more members.
group.initial.rebalance.delay.ms=0
# Two cores: one network thread per core (default 3), and four request handlers (default 8):
# handlers also wait on the page cache, so a few more than cores, not four times as many.
num.network.threads=2
num.io.threads=4
# Log recovery at start and flushing at stop, one thread per data directory (the default).
num.recovery.threads.per.data.dir=1
# The controller fences a broker whose heartbeats (every 2 s) stop for this long, and a fenced
# node leads no partition: producers then get NOT_LEADER_OR_FOLLOWER from a cluster of one.
# Kafka's 9 s is for a cluster whose other brokers can take over; on a busy 2-core machine a
# starved JVM misses that, and fencing the only broker just stops the test cluster. 60 s.
broker.session.timeout.ms=60000

# SASL/SCRAM on the SASL listeners; users come from the format step (see the script header).
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
  if tls_enabled; then
    cat >>"$dir/server.properties" <<EOF
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

# TLS from PEM files (KIP-651): key and certificate chain in one file, no keystore password.
ssl.keystore.type=PEM
ssl.keystore.location=$dir/keystore.pem
ssl.client.auth=none
EOF
  fi
}

write_log4j_config() {
  cat >"$(port_dir "$1")/log4j2.yaml" <<'EOF'
# Written by deploy/kafka/kafka.sh. Everything goes to stdout, which the script sends to
# broker.log; the request and state-change loggers, chatty at INFO, only say what is wrong.
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: state.change.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: WARN
      - name: kafka.log.LogCleaner
        level: WARN
EOF
}

write_keystore() {
  local p=$1
  [[ -n ${KAFKA_TLS_CERT:-} && -n ${KAFKA_TLS_KEY:-} ]] ||
    die "KAFKA_TLS_CERT and KAFKA_TLS_KEY go together"
  [[ -r $KAFKA_TLS_CERT && -r $KAFKA_TLS_KEY ]] ||
    die "cannot read KAFKA_TLS_CERT=$KAFKA_TLS_CERT or KAFKA_TLS_KEY=$KAFKA_TLS_KEY"
  grep -q -- '-----BEGIN PRIVATE KEY-----' "$KAFKA_TLS_KEY" ||
    die "KAFKA_TLS_KEY must be an unencrypted PKCS#8 PEM key (BEGIN PRIVATE KEY)"
  cat -- "$KAFKA_TLS_KEY" "$KAFKA_TLS_CERT" >"$(port_dir "$p")/keystore.pem"
}

# A random KRaft cluster id: 16 bytes, URL-safe base64 without padding, as
# `kafka-storage random-uuid` prints (which takes a JVM start). Kafka never starts one with '-'.
cluster_id() {
  python3 -c '
import base64, os
while True:
    u = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not u.startswith("-"):
        print(u)
        break'
}

# Format the data and metadata directories the first time a broker starts on PORT (or when
# one of them is gone, e.g. /dev/shm after a reboot), creating the SCRAM user.
format_once() {
  local p=$1 dir data meta
  dir=$(port_dir "$p")
  data=$(data_dir "$p")
  meta=$(meta_dir "$p")
  [[ -f $data/meta.properties && -f $meta/meta.properties ]] && return 0
  rm -rf -- "$data" "$meta"
  log "formatting $data and $meta (KRaft, standalone controller, SCRAM-SHA-512 user $SCRAM_USER)"
  "$JAVA" -cp "$LIBS/*" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
    kafka.tools.StorageTool format --standalone --cluster-id "$(cluster_id)" \
    --config "$dir/server.properties" \
    --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" \
    >"$dir/format.log" 2>&1 || {
    cat -- "$dir/format.log" >&2
    die "formatting $data failed"
  }
}

# The broker's JVM, from kafka-server-start.sh's and kafka-run-class.sh's defaults:
BROKER_JVM_OPTS=(
  # Kafka's default heap: the broker keeps little on the heap and serves from the page cache,
  # which gets the rest of the 24 GiB. -Xms = -Xmx so the heap never resizes under load;
  # untouched pages cost no RSS.
  -Xms1g -Xmx1g
  # kafka-run-class.sh's KAFKA_JVM_PERFORMANCE_OPTS: G1 with short pauses.
  -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
  # A broker that cannot allocate is broken: exit instead of limping on.
  -XX:+ExitOnOutOfMemoryError
)
# Short-lived tools (format, topics): the quick C1 compiler only and a small serial heap, so a
# tool costs ~2 s of CPU on these two shared cores instead of more.
TOOL_JVM_OPTS=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m -Djava.awt.headless=true)

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no arguments"
  ensure_installed
  printf '%s\n' "$LIBS"
}

cmd_start() {
  [[ $# -le 1 ]] || die "usage: start [PORT]"
  local port dir pf lf pid p t0
  port=$(resolve_port "${1:-}")
  ensure_installed
  command -v python3 >/dev/null 2>&1 || die "python3 is required (deploy/kafka/metadata.py)"
  dir=$(port_dir "$port")
  mkdir -p -- "$dir"
  lock 9 "$dir/lock"
  pf=$(pid_file "$port")
  lf=$(log_file "$port")

  if pid=$(running_pid "$port"); then
    log "reusing running broker on port $port (pid $pid)"
    wait_ready "$pid" "$port" || {
      log_tail "$lf"
      die "broker pid $pid on port $port does not answer Metadata"
    }
    print_brokers "$port"
    return 0
  fi
  rm -f -- "$pf"
  # A foreign listener would answer the readiness probe while our broker dies on "address in
  # use".
  for p in $(ports_of "$port"); do
    if port_open "$p"; then
      die "port $p is already in use by a process this script did not start"
    fi
  done

  t0=$SECONDS
  write_log4j_config "$port"
  write_server_properties "$port"
  if tls_enabled; then write_keystore "$port"; fi
  format_once "$port"
  if [[ -f $lf ]]; then mv -f -- "$lf" "$lf.1"; fi
  printf '=== %s kafka.sh: starting Apache Kafka %s on 127.0.0.1:%s ===\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$KAFKA_VERSION" "$port" >"$lf"

  # setsid: its own session, so a Ctrl-C aimed at the caller (a terminal, cargo test) does not
  # take the broker down; it lives until `stop`. The lock fds are closed for the broker.
  local launcher=()
  if command -v setsid >/dev/null 2>&1; then launcher=(setsid); fi
  "${launcher[@]}" "$JAVA" "${BROKER_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
    -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$lf" 2>&1 8>&- 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$pf"

  if ! wait_ready "$pid" "$port"; then
    local why="exited before it answered Metadata"
    if is_alive "$pid"; then
      why="did not answer Metadata within ${START_TIMEOUT}s; killed it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f -- "$pf"
    log_tail "$lf"
    die "Kafka on 127.0.0.1:$port $why"
  fi
  log "Apache Kafka $KAFKA_VERSION up on 127.0.0.1:$port in $((SECONDS - t0))s (pid $pid, log $lf)"
  print_brokers "$port"
}

# SIGTERM (Kafka's controlled shutdown: flush, close the logs), SIGKILL after STOP_TIMEOUT.
stop_broker() {
  local port=$1 pf pid i t0
  pf=$(pid_file "$port")
  if ! pid=$(running_pid "$port"); then
    rm -f -- "$pf"
    log "no broker from this script is running on port $port"
    return 0
  fi
  t0=$(date +%s%N)
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
  log "stopped Kafka on port $port (pid $pid) in $((($(date +%s%N) - t0) / 1000000)) ms; its data stays in $(data_dir "$port")"
}

cmd_stop() {
  [[ $# -le 1 ]] || die "usage: stop [PORT]"
  local port dir
  port=$(resolve_port "${1:-}")
  dir=$(port_dir "$port")
  mkdir -p -- "$dir"
  lock 9 "$dir/lock"
  stop_broker "$port"
}

cmd_reset() {
  [[ $# -le 1 ]] || die "usage: reset [PORT]"
  local port dir
  port=$(resolve_port "${1:-}")
  dir=$(port_dir "$port")
  mkdir -p -- "$dir"
  lock 9 "$dir/lock"
  stop_broker "$port"
  rm -rf -- "$(data_dir "$port")" "$(meta_dir "$port")"
  # The cache root's directory in /dev/shm goes too once no port uses it.
  rmdir -- "$(dirname -- "$(meta_dir "$port")")" 2>/dev/null || true
  log "deleted $(data_dir "$port") and $(meta_dir "$port")"
}

rss_mib() {
  local kb
  kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 0
  printf '%s' "$((${kb:-0} / 1024))"
}

cmd_status() {
  [[ $# -le 1 ]] || die "usage: status [PORT]"
  local port pid
  port=$(resolve_port "${1:-}")
  if pid=$(running_pid "$port"); then
    if serves_metadata "$port"; then
      printf 'running pid=%s rss_mib=%s KAFKA_BROKERS=127.0.0.1:%s log=%s\n' \
        "$pid" "$(rss_mib "$pid")" "$port" "$(log_file "$port")"
      return 0
    fi
    printf 'starting pid=%s port=%s (not answering Metadata yet)\n' "$pid" "$port"
    return 3
  fi
  if port_open "$port"; then
    printf 'stopped (port %s is in use by a process this script did not start)\n' "$port"
  else
    printf 'stopped port=%s\n' "$port"
  fi
  return 3
}

cmd_pid() {
  [[ $# -le 1 ]] || die "usage: pid [PORT]"
  local port pid
  port=$(resolve_port "${1:-}")
  pid=$(running_pid "$port") || die "no broker from this script is running on port $port"
  printf '%s\n' "$pid"
}

require_listening() {
  serves_metadata "$1" || die "no broker answers on 127.0.0.1:$1; run: $0 start $1"
}

topic_command() {
  local port=$1
  shift
  "$JAVA" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$(port_dir "$port")/log4j2.yaml" \
    -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$port" "$@"
}

cmd_list_topics() {
  [[ $# -le 1 ]] || die "usage: list-topics [PORT]"
  local port
  port=$(resolve_port "${1:-}")
  require_listening "$port"
  python3 "$SCRIPT_DIR/metadata.py" topics "127.0.0.1:$port"
}

cmd_create_topic() {
  [[ $# -ge 1 && $# -le 3 ]] || die "usage: create-topic NAME [PARTITIONS] [PORT]"
  local name=$1 partitions=${2:-6} port existing out
  port=$(resolve_port "${3:-}")
  [[ -n $name ]] || die "topic name must not be empty"
  if ! is_uint "$partitions" || ((10#$partitions < 1)); then
    die "invalid partition count: '$partitions'"
  fi
  partitions=$((10#$partitions))
  ensure_installed
  require_listening "$port"
  # A reused broker may hold the topic already: fine if the partition count matches, since
  # the benchmarks depend on it.
  existing=$(python3 "$SCRIPT_DIR/metadata.py" topics "127.0.0.1:$port" |
    awk -v n="$name" '$1 == n { print $2 }')
  if [[ -n $existing ]]; then
    [[ $existing == "$partitions" ]] ||
      die "topic $name already exists with $existing partitions, not $partitions"
    log "topic $name already exists with $partitions partitions"
    return 0
  fi
  out=$(topic_command "$port" --create --topic "$name" --partitions "$partitions" \
    --replication-factor 1 2>&1) || {
    printf '%s\n' "$out" >&2
    die "creating topic $name failed"
  }
  log "created topic $name with $partitions partitions on 127.0.0.1:$port"
}

cmd_delete_topic() {
  [[ $# -ge 1 && $# -le 2 ]] || die "usage: delete-topic NAME [PORT]"
  local name=$1 port out
  port=$(resolve_port "${2:-}")
  ensure_installed
  require_listening "$port"
  out=$(topic_command "$port" --delete --topic "$name" 2>&1) || {
    printf '%s\n' "$out" >&2
    die "deleting topic $name failed"
  }
  log "deleted topic $name on 127.0.0.1:$port"
}

main() {
  local cmd=${1:-}
  if [[ $# -gt 0 ]]; then shift; fi
  case $cmd in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  reset) cmd_reset "$@" ;;
  status) cmd_status "$@" ;;
  pid) cmd_pid "$@" ;;
  create-topic) cmd_create_topic "$@" ;;
  delete-topic) cmd_delete_topic "$@" ;;
  list-topics) cmd_list_topics "$@" ;;
  -h | --help | help) usage ;;
  *)
    usage
    die "unknown command: '${cmd}'"
    ;;
  esac
}

main "$@"
