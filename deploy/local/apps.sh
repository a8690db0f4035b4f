#!/usr/bin/env bash
# The dealledger processes of the full local stack, on the stack's
# PostgreSQL and Kafka (start those first: deploy/local/stack.sh does).
#
#   deploy/local/apps.sh start    progression API, relay, projector, metrics API
#   deploy/local/apps.sh stop     stop them, the API last
#   deploy/local/apps.sh status   say which run
#   deploy/local/apps.sh env      print the `export` lines of the settings they
#                                 run with, for the operator commands
#
# Each process runs in the background with its log and pid file under
# $DEALLEDGER_LOCAL_DIR/apps. The progression and metrics services get a
# database each in the stack's PostgreSQL (created when missing).
#
#   PROGRESSION_PORT (8000), METRICS_PORT (8001), VENV (<repo>/.venv)

set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APPS_DIR="$DEALLEDGER_LOCAL_DIR/apps"
BIN="${VENV:-$REPO_ROOT/.venv}/bin"
APPS=(progression relay projector metrics)

pid_of() {
    local file="$APPS_DIR/$1.pid"
    [[ -f "$file" ]] && kill -0 "$(cat "$file")" 2>/dev/null && cat "$file"
}

database_url() {
    local admin name="$1"
    admin="$("$LOCAL_SCRIPTS_DIR/postgres.sh" url)"
    "$BIN/python" - "$admin" "$name" <<'PY'
import sys

import sqlalchemy as sa

admin, name = sys.argv[1], sys.argv[2]
engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    exists = conn.execute(
        sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
    ).scalar()
    if not exists:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
print(sa.make_url(admin).set(database=name).render_as_string(hide_password=False))
PY
}

launch() {
    local name="$1"
    shift
    if pid_of "$name" >/dev/null; then
        say "$name already runs (pid $(pid_of "$name"))"
        return
    fi
    "$@" >>"$APPS_DIR/$name.log" 2>&1 &
    printf '%s\n' "$!" >"$APPS_DIR/$name.pid"
    say "$name started (pid $!, log $APPS_DIR/$name.log)"
}

wait_ready() {
    local url="$1" name="$2"
    "$BIN/python" - "$url" <<'PY' || { show_log_tail "$APPS_DIR/$name.log"; die "$name is not ready"; }
import sys, time, urllib.request

deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=1) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.3)
sys.exit(1)
PY
}

# The relay and the projector have no readiness endpoint: at least they
# must not have exited by the time both APIs are ready.
still_running() {
    local name
    for name in "${APPS[@]}"; do
        if ! pid_of "$name" >/dev/null; then
            show_log_tail "$APPS_DIR/$name.log"
            die "$name exited after it was started"
        fi
    done
}

start() {
    mkdir -p "$APPS_DIR"
    local kafka progression_db metrics_db
    kafka="$("$LOCAL_SCRIPTS_DIR/kafka.sh" bootstrap)"
    progression_db="$(database_url progression)"
    metrics_db="$(database_url metrics)"
    local progression_port="${PROGRESSION_PORT:-8000}"
    local metrics_port="${METRICS_PORT:-8001}"

    export PROGRESSION_DATABASE_URL="$progression_db"
    export PROGRESSION_KAFKA_BOOTSTRAP="$kafka"
    export PROGRESSION_PORT="$progression_port"
    export METRICS_DATABASE_URL="$metrics_db"
    export METRICS_KAFKA_BOOTSTRAP="$kafka"
    export METRICS_PORT="$metrics_port"

    launch progression "$BIN/progression" serve
    wait_ready "http://127.0.0.1:$progression_port/readyz" progression
    launch relay "$BIN/progression" relay
    # The projector and the metrics API each migrate the read models when
    # they start (one at a time, under a lock); migrating once first makes a
    # failed migration show here, before either starts.
    if ! "$BIN/metrics" migrate >>"$APPS_DIR/metrics.log" 2>&1; then
        show_log_tail "$APPS_DIR/metrics.log"
        die "the read models could not be migrated"
    fi
    launch projector "$BIN/metrics" project --source kafka
    launch metrics "$BIN/metrics" serve
    wait_ready "http://127.0.0.1:$metrics_port/readyz" metrics
    still_running
    printf '\n  progression API  http://127.0.0.1:%s\n' "$progression_port" >&2
    printf '  metrics API      http://127.0.0.1:%s\n' "$metrics_port" >&2
    printf '  logs             %s\n\n' "$APPS_DIR" >&2
}

stop() {
    local i name pid
    for ((i = ${#APPS[@]} - 1; i >= 0; i--)); do
        name="${APPS[i]}"
        if pid="$(pid_of "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
            say "$name stopped"
        fi
        rm -f "$APPS_DIR/$name.pid"
    done
}

status() {
    local name result=0
    for name in "${APPS[@]}"; do
        if pid_of "$name" >/dev/null; then
            say "$name runs (pid $(pid_of "$name"))"
        else
            say "$name is not running"
            result=3
        fi
    done
    return "$result"
}

print_env() {
    local kafka
    kafka="$("$LOCAL_SCRIPTS_DIR/kafka.sh" bootstrap)"
    printf 'export PROGRESSION_DATABASE_URL=%q\n' "$(database_url progression)"
    printf 'export PROGRESSION_KAFKA_BOOTSTRAP=%q\n' "$kafka"
    printf 'export METRICS_DATABASE_URL=%q\n' "$(database_url metrics)"
    printf 'export METRICS_KAFKA_BOOTSTRAP=%q\n' "$kafka"
    printf 'export METRICS_FEED_URL=http://127.0.0.1:%s\n' "${PROGRESSION_PORT:-8000}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) print_env ;;
    *) sed -n '4,6s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
