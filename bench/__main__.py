"""Run benchmarks by name: `python -m bench [NAME ...]`, all of them by default."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Name -> module of this package with a `main() -> int`. Add a benchmark here.
BENCHMARKS = {
    "write_path": "bench.write_path",
    "projector": "bench.projector",
    "operations": "bench.operations",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run dealledger's benchmarks."
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}"
        )
    status = 0
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        status = max(status, int(module.main()))
    return status


if __name__ == "__main__":
    sys.exit(main())
