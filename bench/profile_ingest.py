"""Where the server's time goes on the write path: cProfile, in-process.

    python -m bench.profile_ingest        (with DEALLEDGER_TEST_PG_URL set)

Starts the progression service in this process on a fresh PostgreSQL
database, loads the first batches of the write_path workload unprofiled (so
that the deals have streams to read, as in the middle of the benchmark),
then profiles what the batch route does for the next batches: parse the
body, `Ingestion.submit`, build the per-item results and encode the answer.
It then profiles single events for existing deals, as the latency phase
sends them. HTTP itself (uvicorn, Starlette) is not in it.

Prints the functions with the most cumulative time per batch and per
single event, all of them and then the service's own, and writes the full
profiles to bench/results/ for pstats or snakeviz. Not a benchmark: the
profiler slows everything down several times; the shares matter, not the
totals.
"""

from __future__ import annotations

__all__ = ["main"]

import cProfile
import json
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.write_path import RESULTS, Postgres, build_workload, latency_events
from progression.api import _result_item
from progression.service import Service
from progression.settings import load_settings

WARM_BATCHES = 20  # of the first lane, loaded before profiling
PROFILED_BATCHES = 5
PROFILED_SINGLES = 200
TOP = 15


def _handle_batch(service: Service, body: bytes) -> bytes:
    """What POST /v1/events/batch does with a body, less HTTP."""
    events = json.loads(body)["events"]
    results = service.ingestion.submit(events)
    items = [
        _result_item(index, event["event_id"], result)
        for index, (event, result) in enumerate(zip(events, results, strict=True))
    ]
    return json.dumps({"results": items}).encode()


def _handle_single(service: Service, body: bytes) -> bytes:
    """What POST /v1/events does with a body, less HTTP."""
    [result] = service.ingestion.submit([json.loads(body)])
    assert result.event is not None, result.error
    return json.dumps(
        {
            "event": result.event.envelope(),
            "decisions": [d.envelope() for d in result.decisions],
        }
    ).encode()


def _profile(
    name: str, work: Sequence[Callable[[], Any]], per: str
) -> tuple[pstats.Stats, float]:
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for call in work:
        call()
    profile.disable()
    seconds = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"profile_ingest-{name}.pstats"
    profile.dump_stats(path)
    stats = pstats.Stats(profile)
    _print_top(stats, len(work), per, seconds)
    print(f"  full profile: {path}")
    return stats, seconds


def _print_top(stats: pstats.Stats, calls: int, per: str, seconds: float) -> None:
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), entry in entries.items():
        _cc, _nc, own, cumulative, _callers = entry
        label = f"{function} ({_short(filename)}:{line})"
        if function in ("_handle_batch", "_handle_single") or "'enable'" in label:
            continue
        rows.append((cumulative, own, label))
    rows.sort(reverse=True)
    print(
        f"  profiled {calls} of them, {1000 * seconds / calls:.1f} ms per {per} "
        "under the profiler"
    )
    ours = [row for row in rows if row[2].split("(", 1)[1].startswith("progression/")]
    for title, chosen in (("all functions", rows), ("progression's own", ours)):
        print(f"  {title}, by cumulative time:")
        print(f"  {'ms/' + per:>10} {'share':>6} {'own ms':>7}  function")
        for cumulative, own, label in chosen[:TOP]:
            print(
                f"  {1000 * cumulative / calls:>10.2f} {cumulative / seconds:>6.1%} "
                f"{1000 * own / calls:>7.2f}  {label}"
            )


def _short(filename: str) -> str:
    for marker in ("site-packages/", "services/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return Path(filename).name


def main() -> int:
    url = os.environ.get("DEALLEDGER_TEST_PG_URL")
    if not url:
        sys.stderr.write("profile_ingest: DEALLEDGER_TEST_PG_URL is not set\n")
        return 2
    pg = Postgres(url)
    workload = build_workload()
    lane = workload.lanes[0]
    bodies = [json.dumps({"events": batch}).encode() for batch in lane]
    try:
        database = pg.fresh("profile")
        service = Service.start(load_settings(database_url=pg.sqlalchemy_url(database)))
        try:
            for body in bodies[:WARM_BATCHES]:
                _handle_batch(service, body)
            print(
                f"profile_ingest: {WARM_BATCHES} batches of {len(lane[0]):,} "
                "loaded; profiling the next ones"
            )
            batch_work = [
                partial(_handle_batch, service, body)
                for body in bodies[WARM_BATCHES : WARM_BATCHES + PROFILED_BATCHES]
            ]
            print("batch of 1,000 events (POST /v1/events/batch, less HTTP)")
            _profile("batch", batch_work, "batch")

            loaded = {
                event["deal_id"]
                for batch in lane[: WARM_BATCHES + PROFILED_BATCHES]
                for event in batch
            }
            singles = [
                json.dumps(event).encode()
                for event in latency_events(workload)
                if event["deal_id"] in loaded
            ][:PROFILED_SINGLES]
            single_work = [partial(_handle_single, service, body) for body in singles]
            print("single event for an existing deal (POST /v1/events, less HTTP)")
            _profile("single", single_work, "event")
        finally:
            service.engine.dispose()
    finally:
        pg.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
