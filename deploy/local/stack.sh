#!/usr/bin/env bash
# The local stack for development: `make up` and `make down`.
#
#   deploy/local/stack.sh up      start every component, print how to reach them
#   deploy/local/stack.sh down    stop every component (in reverse order)
#   deploy/local/stack.sh status  say which components run
#
# Each component is a script deploy/local/NAME.sh with start, stop and
# status, plus an exports_NAME function below that prints the `export`
# lines a shell needs to use it. To add a process, write its script and
# append its name to COMPONENTS.
#
# State and logs are under $DEALLEDGER_LOCAL_DIR (default: <repo>/.local),
# apart from the throwaway runs of deploy/local/with-services.

set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COMPONENTS=(postgres kafka apps)

exports_postgres() {
    printf 'export DEALLEDGER_TEST_PG_URL=%q\n' "$("$LOCAL_SCRIPTS_DIR/postgres.sh" url)"
}

exports_apps() {
    # Not METRICS_URL: the metrics service refuses METRICS_* settings it
    # does not know, so a shell with it could not run a metrics command.
    printf 'export DEALLEDGER_PROGRESSION_URL=http://127.0.0.1:%s\n' "${PROGRESSION_PORT:-8000}"
    printf 'export DEALLEDGER_METRICS_URL=http://127.0.0.1:%s\n' "${METRICS_PORT:-8001}"
    # The settings the apps run with, so that progression and metrics
    # commands typed in that shell reach the same databases and broker.
    "$LOCAL_SCRIPTS_DIR/apps.sh" env
}

exports_kafka() {
    printf 'export DEALLEDGER_TEST_KAFKA=%q\n' "$("$LOCAL_SCRIPTS_DIR/kafka.sh" bootstrap)"
}

component() {
    "$LOCAL_SCRIPTS_DIR/$1.sh" "${@:2}"
}

stop_all() {
    local i status=0
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        component "${COMPONENTS[i]}" stop || status=1
    done
    return "$status"
}

up() {
    local name
    for name in "${COMPONENTS[@]}"; do
        if ! component "$name" start; then
            say "$name could not be started; stopping the rest"
            stop_all || true
            exit 1
        fi
    done
    printf '\nThe local stack runs (stop it with: make down). To use it from a shell:\n\n'
    for name in "${COMPONENTS[@]}"; do
        "exports_$name"
    done
}

status() {
    local name result=0
    for name in "${COMPONENTS[@]}"; do
        component "$name" status || result=3
    done
    return "$result"
}

case "${1:-}" in
    up) up ;;
    down) stop_all ;;
    status) status ;;
    *) sed -n '4,6s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
