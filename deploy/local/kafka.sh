#!/usr/bin/env bash
# A throwaway single-node Apache Kafka (KRaft, broker and controller in one
# process) on 127.0.0.1, for tests and local runs.
#
#   deploy/local/kafka.sh start          fetch the jars if needed, format, start
#   deploy/local/kafka.sh stop [--keep]  stop it, then remove its data
#                                        (kept with --keep)
#   deploy/local/kafka.sh status         say whether it runs (exit 0 if so)
#   deploy/local/kafka.sh bootstrap      print its bootstrap address
#
# Environment:
#   DEALLEDGER_LOCAL_DIR   root of local state (default: <repo>/.local)
#   KAFKA_DIR              config, data and log (default: $DEALLEDGER_LOCAL_DIR/kafka)
#   KAFKA_LIBS_DIR         the broker's jars (default: $DEALLEDGER_LOCAL_DIR/kafka-libs)
#   KAFKA_PORT             the broker port (default: a free one)
#   KAFKA_CONTROLLER_PORT  the controller port (default: a free one)
#   KAFKA_HEAP_OPTS        JVM heap flags (default: -Xmx512m -Xms256m)
#   KAFKA_START_TIMEOUT    seconds to wait for the broker (default: 90)
#   MAVEN_REPO_LOCAL       Maven's local repository (default: Maven's, ~/.m2)
#
# The jars come from Maven Central through kafka/pom.xml beside this script
# and are kept in KAFKA_LIBS_DIR, so only the first start downloads them.
# Topics are not created on first use: the services create their own.
#
# Layout of KAFKA_DIR: server.properties, log4j2.properties, data/ (the
# log and metadata folder), server.log (everything the JVM prints), pid,
# port.

set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KAFKA_DIR="${KAFKA_DIR:-$DEALLEDGER_LOCAL_DIR/kafka}"
KAFKA_LIBS_DIR="${KAFKA_LIBS_DIR:-$DEALLEDGER_LOCAL_DIR/kafka-libs}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT=30
POM="$LOCAL_SCRIPTS_DIR/kafka/pom.xml"
LOG="$KAFKA_DIR/server.log"
READY_LINE='Kafka Server started'

usage() {
    sed -n '4,10s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

need() {
    command -v "$1" >/dev/null || die "$1 is not installed ($2)"
}

# ---------------------------------------------------------------- the jars

# The libs folder is complete when its stamp holds the hash of the pom it
# was made from; a changed pom fetches again.
pom_hash() {
    sha256sum "$POM" | cut -d' ' -f1
}

libs_complete() {
    [[ -f "$KAFKA_LIBS_DIR/.complete" && "$(cat "$KAFKA_LIBS_DIR/.complete")" == "$(pom_hash)" ]]
}

fetch_libs() {
    if libs_complete; then
        return 0
    fi
    need mvn "Maven fetches Kafka's jars"
    say "fetching Kafka's jars from Maven Central into $KAFKA_LIBS_DIR"
    local started=$SECONDS
    local partial="$KAFKA_LIBS_DIR.partial.$$"
    rm -rf -- "$partial"
    local maven=(mvn -B -q -f "$POM")
    if [[ -n "${MAVEN_REPO_LOCAL:-}" ]]; then
        maven+=("-Dmaven.repo.local=$MAVEN_REPO_LOCAL")
    fi
    local output
    output="$(mktemp)"
    if ! "${maven[@]}" dependency:copy-dependencies "-Dkafka.libs.dir=$partial" >"$output" 2>&1; then
        cat -- "$output" >&2
        rm -rf -- "$partial" "$output"
        die "Maven could not fetch Kafka's jars (its output is above)"
    fi
    rm -f -- "$output"
    pom_hash >"$partial/.complete"
    rm -rf -- "$KAFKA_LIBS_DIR"
    # -T: never move the folder into one that a concurrent start just made.
    if ! mv -T -- "$partial" "$KAFKA_LIBS_DIR" 2>/dev/null; then
        rm -rf -- "$partial"
        libs_complete || die "could not put Kafka's jars in $KAFKA_LIBS_DIR"
    fi
    say "fetched $(find "$KAFKA_LIBS_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - started)) s"
}

# The java command line that runs a main class from the Kafka jars.
java_command() {
    local heap
    read -ra heap <<<"$KAFKA_HEAP_OPTS"
    JAVA_CMD=(
        java "${heap[@]}"
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
        "-Dlog4j2.configurationFile=$KAFKA_DIR/log4j2.properties"
        "-Dkafka.logs.dir=$KAFKA_DIR"
        -cp "$KAFKA_LIBS_DIR/*"
    )
}

# ------------------------------------------------------------ the process

pid() {
    cat "$KAFKA_DIR/pid" 2>/dev/null
}

# The recorded process is alive and is still a Kafka broker.
is_running() {
    local p
    p="$(pid)" || return 1
    [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'
}

bootstrap() {
    printf '127.0.0.1:%s\n' "$(cat "$KAFKA_DIR/port")"
}

write_config() {
    local port="$1" controller_port="$2"
    cat >"$KAFKA_DIR/server.properties" <<PROPS
# Single-node KRaft cluster for tests and local runs (deploy/local/kafka.sh).
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$KAFKA_DIR/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false

# One broker: every internal topic has a single replica. Fewer partitions
# than the defaults (50) make the first consumer group and the first
# transaction quicker.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests start many short-lived groups: no 3 s wait before the first rebalance.
group.initial.rebalance.delay.ms=0
PROPS

    cat >"$KAFKA_DIR/log4j2.properties" <<'PROPS'
# Everything goes to standard error, which kafka.sh sends to server.log
# (standard output carries what the tools print, such as a cluster id).
status = warn
name = local-kafka
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stderr.ref = STDERR
logger.request.name = kafka.request.logger
logger.request.level = warn
PROPS
}

# Stop the recorded process: SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT.
terminate() {
    local p
    p="$(pid)"
    kill -TERM "$p" 2>/dev/null || return 0
    local waited=0
    while kill -0 "$p" 2>/dev/null; do
        if ((waited >= KAFKA_STOP_TIMEOUT * 10)); then
            say "no exit ${KAFKA_STOP_TIMEOUT} s after SIGTERM; sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# The end of the log, then its first errors: a failed start usually ends in
# pages of shutdown lines that hide what went wrong.
show_failure() {
    show_log_tail "$LOG"
    if grep -q -E '^\[[^]]*\] (ERROR|FATAL) ' "$LOG" 2>/dev/null; then
        printf -- '----- first errors in %s -----\n' "$LOG" >&2
        grep -m 5 -A 1 -E '^\[[^]]*\] (ERROR|FATAL) ' "$LOG" >&2
        printf -- '-----\n' >&2
    fi
}

start() {
    need java "Kafka runs on Java 17 or later"
    need python3 "it picks free ports"
    if [[ -e "$KAFKA_DIR" ]]; then
        if is_running; then
            say "already running at $(bootstrap)"
            return 0
        fi
        say "removing the stopped broker's folder $KAFKA_DIR"
        rm -rf -- "$KAFKA_DIR"
    fi

    fetch_libs

    local port controller_port ports
    read -ra ports <<<"$(free_ports 2)"
    port="${KAFKA_PORT:-${ports[0]}}"
    controller_port="${KAFKA_CONTROLLER_PORT:-${ports[1]}}"

    local started=$SECONDS
    mkdir -p -- "$KAFKA_DIR/data"
    write_config "$port" "$controller_port"

    java_command
    local cluster_id
    cluster_id="$("${JAVA_CMD[@]}" kafka.tools.StorageTool random-uuid 2>>"$LOG")" || true
    [[ "$cluster_id" =~ ^[A-Za-z0-9_-]{22}$ ]] ||
        { show_log_tail "$LOG"; die "could not make a cluster id (got: $cluster_id)"; }
    "${JAVA_CMD[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
        -c "$KAFKA_DIR/server.properties" --standalone >>"$LOG" 2>&1 ||
        { show_log_tail "$LOG"; die "could not format $KAFKA_DIR/data"; }

    # In a session of its own, so that Ctrl-C in the terminal that started
    # it does not reach the broker: `stop` ends it. setsid execs java
    # without forking (this background child leads no process group), so
    # $! is the broker's pid.
    setsid "${JAVA_CMD[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" \
        </dev/null >>"$LOG" 2>&1 &
    printf '%s\n' "$!" >"$KAFKA_DIR/pid"
    printf '%s\n' "$port" >"$KAFKA_DIR/port"

    local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    until grep -q "$READY_LINE" "$LOG"; do
        sleep 0.2
        if ! is_running; then
            show_failure
            die "Kafka exited while starting (full log: $LOG)"
        fi
        if ((SECONDS >= deadline)); then
            show_failure
            terminate
            die "Kafka did not start within $KAFKA_START_TIMEOUT s (full log: $LOG)"
        fi
    done
    say "Kafka running at $(bootstrap) after $((SECONDS - started)) s (log: $LOG)"
}

stop() {
    local keep=false
    case "${1:-}" in
        --keep) keep=true ;;
        "") ;;
        *) usage ;;
    esac
    if [[ ! -e "$KAFKA_DIR" ]]; then
        say "not running (no $KAFKA_DIR)"
        return 0
    fi
    if is_running; then
        terminate
        say "stopped"
    else
        say "not running"
    fi
    if "$keep"; then
        say "kept $KAFKA_DIR"
    else
        rm -rf -- "$KAFKA_DIR"
    fi
}

status() {
    if [[ -e "$KAFKA_DIR" ]] && is_running; then
        say "running at $(bootstrap), pid $(pid) (folder: $KAFKA_DIR)"
        return 0
    fi
    say "not running"
    return 3
}

print_bootstrap() {
    if [[ -e "$KAFKA_DIR" ]] && is_running; then
        bootstrap
    else
        die "not running (start it first)"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    status) status ;;
    bootstrap) print_bootstrap ;;
    *) usage ;;
esac
