"""Parked events: retrying them once the cause is fixed.

An event the projection cannot apply is parked (`parked_events`) and its
deal's stream version moves past it, so that a redelivery is skipped; from
then on the deal's later events are parked behind it (`deals.parked` counts
them), because applying them to a state that lacks it would make the read
models wrong. After a fix to the code or to a process file, `retry` applies
them again through the projection's own code (`Projection.reapply`):

- per deal, in stream order, each event in one transaction that deletes
  its row (only if it is still there), applies it and counts it off the
  deal, so it applies exactly once, even when two retries race;
- an event that fails again stays parked with its new error, and the deal's
  later parked events stay held (they are not tried);
- retrying an event while an earlier parked event of its deal is still
  parked is refused, naming that one: the earlier ones are never retried
  implicitly, only the events asked for (`--all` or a deal asks for all);
- an event whose envelope could not be read when it was parked held nothing
  back: the deal's later events were applied without it. It applies only if
  its deal has not moved past it; otherwise it stays parked saying so, and
  only a rebuild of the read models applies it in order.

On PostgreSQL each retry takes the batch lock exclusively (`lock_batches`),
so no projector batch that read the same deal before it writes the deal's
state back over the retry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from metrics.answers import RetriedEvent, RetryAnswer, RetryOutcome
from metrics.errors import EventRejected, StorageUnavailable
from metrics.processes import Catalog
from metrics.projection import Incoming, Projection, lock_batches
from metrics.tables import parked_events

__all__ = ["retry"]

logger = logging.getLogger(__name__)

_ID_CHUNK = 500


class _Refused(Exception):
    """A retry refused before applying anything: the transaction rolls back."""

    def __init__(self, outcome: RetriedEvent) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def retry(
    engine: sa.Engine,
    catalog: Catalog,
    ids: Sequence[int] | None = None,
    *,
    deal: str | None = None,
) -> RetryAnswer:
    """Retry the parked events `ids`, or every parked event when `ids` is
    None; with `deal`, only that deal's. What happened to each event comes
    back in the order they were tried, then the ids not found.

    Raises `StorageUnavailable` when the database cannot be reached; the
    events retried until then stay retried.
    """
    projection = Projection(engine, catalog)
    try:
        rows = _select(engine, ids, deal)
        results: list[RetriedEvent] = []
        for group in _by_deal(rows):
            blocking: RetriedEvent | None = None
            for row in group:
                counted = row.stream_version is not None
                if blocking is not None and counted:
                    results.append(_held(row, blocking))
                    continue
                done = _retry_one(engine, projection, row.id)
                results.append(done)
                # Failed again: the deal's later events stay held, untried.
                # (Held: the next one is checked against what holds it;
                # missing: another retry took it, the next one may apply.)
                if counted and done.outcome == "parked":
                    blocking = done
        if ids is not None:
            found = {row.id for row in rows}
            wanted = list(dict.fromkeys(i for i in ids if i not in found))
            results.extend(_not_found(engine, wanted, deal))
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        raise StorageUnavailable(f"read-model database: {error}") from error
    return _answer(results)


def _select(
    engine: sa.Engine, ids: Sequence[int] | None, deal: str | None
) -> list[sa.Row[Any]]:
    p = parked_events.c
    query = sa.select(
        p.id, p.deal_id, p.position, p.stream_version, p.event_id, p.event_type
    )
    if deal is not None:
        query = query.where(p.deal_id == deal)
    rows: list[sa.Row[Any]] = []
    with engine.connect() as connection:
        if ids is None:
            rows.extend(connection.execute(query.order_by(p.id)))
        else:
            wanted = sorted(set(ids))
            for start in range(0, len(wanted), _ID_CHUNK):
                chunk = wanted[start : start + _ID_CHUNK]
                rows.extend(connection.execute(query.where(p.id.in_(chunk))))
    return rows


def _by_deal(rows: Iterable[sa.Row[Any]]) -> list[list[sa.Row[Any]]]:
    """The rows of each deal in stream order (by position; the ids of rows
    without one); a row without a deal is a group of its own."""
    groups: dict[Any, list[sa.Row[Any]]] = {}
    for row in rows:
        key = row.deal_id if row.deal_id is not None else ("no deal", row.id)
        groups.setdefault(key, []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: (r.position is None, r.position or 0, r.id))
    return sorted(groups.values(), key=lambda group: min(r.id for r in group))


def _event(row: Any, outcome: RetryOutcome, error: str | None) -> RetriedEvent:
    return RetriedEvent(
        id=row.id,
        outcome=outcome,
        deal_id=row.deal_id,
        position=row.position,
        event_id=row.event_id,
        type=row.event_type,
        error=error,
    )


def _describe(row: Any) -> str:
    return (
        f"parked event id={row.id} (position={row.position} "
        f"event_id={row.event_id}) of deal {row.deal_id}"
    )


def _held(row: Any, blocking: RetriedEvent) -> RetriedEvent:
    return _event(
        row,
        "held",
        f"not retried: held behind {_describe(blocking)}, which is still "
        "parked; retry that one first",
    )


def _retry_one(
    engine: sa.Engine, projection: Projection, parked_id: int
) -> RetriedEvent:
    p = parked_events.c
    row: Any = None
    try:
        with engine.begin() as connection:
            lock_batches(connection, exclusive=True)
            # First statement that writes: on SQLite it takes the write lock.
            row = connection.execute(
                parked_events.delete()
                .where(p.id == parked_id)
                .returning(*parked_events.columns)
            ).first()
            if row is None:
                return _gone(parked_id)
            if row.stream_version is not None:
                earlier = connection.execute(
                    sa.select(p.id, p.deal_id, p.position, p.event_id)
                    .where(
                        p.deal_id == row.deal_id,
                        p.stream_version.is_not(None),
                        p.stream_version < row.stream_version,
                    )
                    .order_by(p.stream_version)
                    .limit(1)
                ).first()
                if earlier is not None:
                    raise _Refused(
                        _event(
                            row,
                            "held",
                            f"not retried: held behind {_describe(earlier)}, "
                            "which is still parked; retry that one first",
                        )
                    )
            item = Incoming(
                row.raw,
                source=row.source,
                topic=row.topic,
                partition=row.partition,
                offset=row.offset,
            )
            projection.reapply(connection, item, row.stream_version)
    except _Refused as refused:
        logger.info(
            "parked event not retried id=%d deal_id=%s position=%s reason=%s",
            parked_id,
            refused.outcome.deal_id,
            refused.outcome.position,
            refused.outcome.error,
        )
        return refused.outcome
    except EventRejected as rejected:
        return _keep(engine, row, str(rejected))
    except (sa.exc.IntegrityError, sa.exc.DataError) as error:
        return _keep(engine, row, f"cannot be written: {error}")
    logger.info(
        "parked event retried and applied id=%d event_id=%s deal_id=%s position=%s",
        row.id,
        row.event_id,
        row.deal_id,
        row.position,
    )
    return _event(row, "applied", None)


def _keep(engine: sa.Engine, row: Any, error: str) -> RetriedEvent:
    """The event stays parked, under its id, with the error of this retry."""
    with engine.begin() as connection:
        kept = connection.execute(
            parked_events.update()
            .where(parked_events.c.id == row.id)
            .values(error=error)
        ).rowcount
    if not kept:
        return _gone(row.id)
    logger.warning(
        "parked event retried, still parked id=%d event_id=%s deal_id=%s "
        "position=%s error=%s",
        row.id,
        row.event_id,
        row.deal_id,
        row.position,
        error,
    )
    return _event(row, "parked", error)


def _gone(parked_id: int) -> RetriedEvent:
    return RetriedEvent(
        id=parked_id,
        outcome="missing",
        deal_id=None,
        position=None,
        event_id=None,
        type=None,
        error=f"parked event id={parked_id} is no longer parked: another retry "
        "took it first",
    )


def _not_found(
    engine: sa.Engine, ids: Sequence[int], deal: str | None
) -> list[RetriedEvent]:
    """The ids asked for that were not selected: unknown, or of another deal."""
    others: dict[int, str | None] = {}
    if deal is not None and ids:
        p = parked_events.c
        with engine.connect() as connection:
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = list(ids[start : start + _ID_CHUNK])
                query = sa.select(p.id, p.deal_id).where(p.id.in_(chunk))
                others.update((r.id, r.deal_id) for r in connection.execute(query))
    found = []
    for parked_id in ids:
        if parked_id in others:
            why = (
                f"parked event id={parked_id} is of deal {others[parked_id]}, "
                f"not {deal}: not retried"
            )
        else:
            why = f"no parked event with id={parked_id}"
        found.append(
            RetriedEvent(
                id=parked_id,
                outcome="missing",
                deal_id=others.get(parked_id),
                position=None,
                event_id=None,
                type=None,
                error=why,
            )
        )
    return found


def _answer(results: list[RetriedEvent]) -> RetryAnswer:
    counts = dict.fromkeys(("applied", "parked", "held", "missing"), 0)
    for result in results:
        counts[result.outcome] += 1
    return RetryAnswer(**counts, events=results)
