"""Moving events between instances: export to JSON Lines, import from it.

`export` writes recorded envelopes, one a line, in position order, paging
through the feed so that memory stays flat however long the log. It stops
at the head as it was when the export began: nothing can appear below it
later (see `progression.eventlog`), so the file is a consistent cut.

`import_events` appends such a file to another instance by handing its
inputs to that instance's ingestion, in batches; the `stage.changed` lines
are skipped and the target decides again with its own processes. Event ids
make it idempotent: an input already there is a duplicate and adds nothing,
so an import run twice, or run again after a crash, doubles nothing. The
same id with other content is a conflict, counted and reported. A file of
posted envelopes (no `position`), as `progression generate` writes, is
imported the same way.
"""

from __future__ import annotations

__all__ = ["ExportSummary", "ImportSummary", "export", "import_events"]

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .decision import STAGE_CHANGED
from .eventlog import EventLog
from .ingestion import Ingestion

log = logging.getLogger(__name__)

FEED_PAGE = 1000
IMPORT_BATCH = 1000
# Fields the log adds to a recorded envelope; the target assigns its own.
RECORDED_ONLY = ("recorded_at", "position", "stream_version")
# Problems listed in a summary; every one is logged.
PROBLEMS_KEPT = 20

# Called with the amount done so far and the amount in all (None: unknown).
Report = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class ExportSummary:
    events: int
    first_position: int | None
    last_position: int | None
    head_position: int
    seconds: float


def export(
    log_: EventLog,
    out: TextIO,
    *,
    from_position: int = 1,
    to_position: int | None = None,
    deal_ids: Collection[str] = (),
    report: Report | None = None,
) -> ExportSummary:
    """Write the recorded envelopes between two positions (both included).

    With `deal_ids`, only those deals' events, still in position order; the
    feed is read all the same, so the time taken is that of the range.
    `report` is called with the positions covered and the positions to go.
    """
    if from_position < 1:
        raise ValueError(f"from_position must be 1 or more, not {from_position}")
    if to_position is not None and to_position < from_position:
        raise ValueError(
            f"to_position ({to_position}) is below from_position ({from_position})"
        )
    started = time.perf_counter()
    head = log_.head_position()
    last = head if to_position is None else min(to_position, head)
    after = from_position - 1
    span = max(0, last - after)
    wanted = set(deal_ids)
    written = 0
    first: int | None = None
    final: int | None = None
    if report is not None:
        report(0, span)

    while after < last:
        page = log_.feed(after, FEED_PAGE)
        if not page:
            break
        for event in page:
            if event.position > last:
                break
            if wanted and event.deal_id not in wanted:
                continue
            out.write(json.dumps(event.envelope(), separators=(",", ":")) + "\n")
            written += 1
            first = event.position if first is None else first
            final = event.position
        after = page[-1].position
        if report is not None:
            report(min(after, last) - (from_position - 1), span)

    summary = ExportSummary(
        written, first, final, head, seconds=time.perf_counter() - started
    )
    log.info(
        "export done events=%d first_position=%s last_position=%s "
        "head_position=%d deals=%s seconds=%.2f",
        summary.events,
        summary.first_position,
        summary.last_position,
        head,
        ",".join(sorted(wanted)) or "all",
        summary.seconds,
    )
    return summary


@dataclass(frozen=True, slots=True)
class ImportProblem:
    line: int
    event_id: str | None
    status: str  # conflict or invalid
    detail: str


@dataclass(slots=True)
class ImportSummary:
    lines: int = 0
    inputs: int = 0
    created: int = 0
    duplicate: int = 0
    conflict: int = 0
    invalid: int = 0
    decisions_skipped: int = 0  # stage.changed lines: the target decides again
    decisions_made: int = 0  # stage changes the target recorded for new inputs
    problems: list[ImportProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every input of the file is now in the target's log."""
        return self.conflict == 0 and self.invalid == 0

    def refused(self, problem: ImportProblem) -> None:
        if problem.status == "conflict":
            self.conflict += 1
        else:
            self.invalid += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(problem)
        log.warning(
            "import refused line=%d event_id=%s status=%s detail=%r",
            problem.line,
            problem.event_id,
            problem.status,
            problem.detail,
        )


def _posted(line: int, text: bytes) -> dict[str, Any] | ImportProblem | None:
    """The posted envelope a line holds; None for a line to skip."""
    if not text.strip():
        return None
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return ImportProblem(line, None, "invalid", f"not JSON: {exc}")
    if not isinstance(raw, dict):
        return ImportProblem(line, None, "invalid", "not a JSON object")
    envelope = {
        key: value
        for key, value in raw.items()
        if key not in RECORDED_ONLY
        # A recorded envelope says "source": null where a posted one has none.
        and not (key in ("source", "actor") and value is None)
    }
    return envelope


def import_events(
    ingestion: Ingestion,
    lines: Iterable[bytes],
    *,
    batch_size: int = IMPORT_BATCH,
    total_bytes: int | None = None,
    report: Report | None = None,
) -> ImportSummary:
    """Submit the inputs of a JSON Lines file, in file order, in batches.

    Each batch is appended in one transaction, so a crash loses at most the
    batch in flight, and running the import again completes it. `report`
    is called with the bytes read so far and `total_bytes`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
    started = time.perf_counter()
    summary = ImportSummary()
    batch: list[tuple[int, dict[str, Any]]] = []
    done_bytes = 0

    def submit() -> None:
        results = ingestion.submit([envelope for _, envelope in batch])
        for (line, envelope), result in zip(batch, results, strict=True):
            if result.status == "created":
                summary.created += 1
                summary.decisions_made += len(result.decisions)
            elif result.status == "duplicate":
                summary.duplicate += 1
            else:
                event_id = envelope.get("event_id")
                summary.refused(
                    ImportProblem(
                        line,
                        event_id if isinstance(event_id, str) else None,
                        result.status,
                        str(result.error),
                    )
                )
        batch.clear()
        if report is not None:
            report(done_bytes, total_bytes)

    if report is not None:
        report(0, total_bytes)
    for number, text in enumerate(lines, start=1):
        summary.lines += 1
        done_bytes += len(text)
        posted = _posted(number, text)
        if posted is None:
            continue
        if isinstance(posted, ImportProblem):
            summary.refused(posted)
            continue
        if posted.get("type") == STAGE_CHANGED:
            summary.decisions_skipped += 1
            continue
        summary.inputs += 1
        batch.append((number, posted))
        if len(batch) >= batch_size:
            submit()
    if batch:
        submit()
    if report is not None:
        report(done_bytes, total_bytes)

    summary.problems.sort(key=lambda problem: problem.line)
    summary.seconds = time.perf_counter() - started
    log.info(
        "import done lines=%d inputs=%d created=%d duplicate=%d conflict=%d "
        "invalid=%d decisions_skipped=%d decisions_made=%d seconds=%.2f",
        summary.lines,
        summary.inputs,
        summary.created,
        summary.duplicate,
        summary.conflict,
        summary.invalid,
        summary.decisions_skipped,
        summary.decisions_made,
        summary.seconds,
    )
    return summary
