#!/usr/bin/env bash
# A throwaway PostgreSQL for tests and local runs.
#
#   deploy/local/postgres.sh start          create a fresh cluster and start it
#   deploy/local/postgres.sh stop [--keep]  stop it, then remove its folder
#                                           (kept with --keep)
#   deploy/local/postgres.sh status         say whether it runs (exit 0 if so)
#   deploy/local/postgres.sh url            print its SQLAlchemy URL
#
# Environment:
#   DEALLEDGER_LOCAL_DIR  root of local state (default: <repo>/.local)
#   PG_DIR                the cluster's folder (default: $DEALLEDGER_LOCAL_DIR/postgres)
#   PG_PORT               the port to listen on (default: a free one)
#   PG_BIN                PostgreSQL's programs (default: /usr/lib/postgresql/15/bin)
#
# The cluster trusts every connection from this machine and runs with fsync
# off: it is for tests and local runs only, never for data anyone keeps.
#
# PostgreSQL refuses to run as root, so as root the cluster belongs to the
# `postgres` user and its programs run through `runuser -u postgres --`;
# as anyone else they run as that user.
#
# Layout of the folder: data/ (the cluster), postgres.log, port, and the
# server's Unix socket.

set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PG_DIR="${PG_DIR:-$DEALLEDGER_LOCAL_DIR/postgres}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_USER=postgres

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

is_root() {
    [[ "$(id -u)" -eq 0 ]]
}

# Run a command as the owner of the cluster (from /, since that user may
# not be allowed into the current folder).
as_owner() {
    if is_root; then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        "$@"
    fi
}

find_programs() {
    if [[ ! -x "$PG_BIN/initdb" ]] && command -v pg_config >/dev/null; then
        PG_BIN="$(pg_config --bindir)"
    fi
    [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]] ||
        die "PostgreSQL's server programs are not in $PG_BIN (set PG_BIN)"
}

# The real folder: PG_DIR, or the folder it links to (see make_folder).
real_dir() {
    readlink -f "$PG_DIR"
}

is_running() {
    local dir
    dir="$(real_dir)"
    [[ -f "$dir/data/postmaster.pid" ]] &&
        as_owner "$PG_BIN/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

url() {
    printf 'postgresql+psycopg://postgres@127.0.0.1:%s/postgres\n' "$(cat "$(real_dir)/port")"
}

remove_folder() {
    local dir
    dir="$(real_dir)"
    rm -rf -- "$dir"
    if [[ -L "$PG_DIR" ]]; then
        rm -f -- "$PG_DIR"
    fi
}

# Create an empty folder for the cluster, private to its owner. When the
# `postgres` user cannot reach PG_DIR (a parent folder closed to others),
# the cluster goes to a private folder under /tmp and PG_DIR links to it.
make_folder() {
    mkdir -p -- "$PG_DIR"
    chmod 700 "$PG_DIR"
    is_root || return 0
    chown "$PG_USER:" "$PG_DIR"
    if ! runuser -u "$PG_USER" -- test -w "$PG_DIR"; then
        rmdir -- "$PG_DIR"
        local elsewhere
        elsewhere="$(mktemp -d /tmp/dealledger-postgres.XXXXXX)"
        chown "$PG_USER:" "$elsewhere"
        ln -s -- "$elsewhere" "$PG_DIR"
        say "the $PG_USER user cannot reach $PG_DIR; the cluster is in $elsewhere"
    fi
}

start() {
    find_programs
    if [[ -e "$PG_DIR" ]]; then
        if is_running; then
            say "already running at $(url)"
            return 0
        fi
        say "removing the stopped cluster left in $PG_DIR"
        remove_folder
    fi

    local port="${PG_PORT:-}"
    if [[ -z "$port" ]]; then
        port="$(free_ports 1)"
    fi

    make_folder
    local dir
    dir="$(real_dir)"
    local log="$dir/postgres.log"

    as_owner "$PG_BIN/initdb" --pgdata="$dir/data" --username=postgres \
        --auth=trust --encoding=UTF8 --no-locale --no-sync --no-instructions \
        >"$dir/initdb.log" 2>&1 || {
        show_log_tail "$dir/initdb.log"
        die "initdb failed"
    }

    as_owner tee -a "$dir/data/postgresql.conf" >/dev/null <<CONF

# Throwaway cluster for tests and local runs (deploy/local/postgres.sh).
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
shared_buffers = 128MB
# Durability off for speed: a crash may lose or corrupt data. Tests only.
fsync = off
synchronous_commit = off
full_page_writes = off
CONF

    printf '%s\n' "$port" >"$dir/port"

    local started=$SECONDS
    if ! as_owner "$PG_BIN/pg_ctl" start --pgdata="$dir/data" --log="$log" \
        --wait --timeout=60 --silent >&2; then
        show_log_tail "$log"
        die "PostgreSQL did not start (full log: $log)"
    fi
    say "PostgreSQL running at $(url) after $((SECONDS - started)) s (log: $log)"
}

stop() {
    local keep=false
    case "${1:-}" in
        --keep) keep=true ;;
        "") ;;
        *) usage ;;
    esac
    if [[ ! -e "$PG_DIR" ]]; then
        say "not running (no $PG_DIR)"
        return 0
    fi
    find_programs
    local dir
    dir="$(real_dir)"
    if is_running; then
        as_owner "$PG_BIN/pg_ctl" stop --pgdata="$dir/data" --mode=fast \
            --wait --timeout=60 --silent >&2 ||
            die "PostgreSQL did not stop (log: $dir/postgres.log)"
        say "stopped"
    else
        say "not running"
    fi
    if "$keep"; then
        say "kept $PG_DIR"
    else
        remove_folder
    fi
}

status() {
    find_programs
    if [[ -e "$PG_DIR" ]] && is_running; then
        say "running at $(url) (folder: $PG_DIR)"
        return 0
    fi
    say "not running"
    return 3
}

print_url() {
    find_programs
    if [[ -e "$PG_DIR" ]] && is_running; then
        url
    else
        die "not running (start it first)"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    status) status ;;
    url) print_url ;;
    *) usage ;;
esac
