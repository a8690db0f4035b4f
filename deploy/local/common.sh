# Helpers shared by the local service scripts. Sourced, not run.
# shellcheck shell=bash

LOCAL_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_SCRIPTS_DIR/../.." && pwd)"
SCRIPT_NAME="$(basename "$0")"

# Everything the local services write lives under this folder (gitignored).
DEALLEDGER_LOCAL_DIR="${DEALLEDGER_LOCAL_DIR:-$REPO_ROOT/.local}"
mkdir -p "$DEALLEDGER_LOCAL_DIR"
DEALLEDGER_LOCAL_DIR="$(cd "$DEALLEDGER_LOCAL_DIR" && pwd)"

say() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

die() {
    say "error: $*"
    exit 1
}

# free_ports N: print N distinct TCP ports on 127.0.0.1 that are free right now.
free_ports() {
    python3 - "$1" <<'PY'
import socket
import sys

held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

# show_log_tail FILE [LINES]: print the end of a log to stderr, framed.
show_log_tail() {
    local file="$1" lines="${2:-50}"
    if [[ -r "$file" ]]; then
        printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" >&2
        printf -- '----- end of %s -----\n' "$file" >&2
    else
        say "no log at $file"
    fi
}
