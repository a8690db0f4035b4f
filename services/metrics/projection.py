"""The projection: recorded deal events in, read models out.

`Projection.apply` takes a batch of raw events from any source and applies
it in one database transaction together with the source's progress (Kafka
offsets or feed position), so that a crash anywhere leaves the read models
and the progress consistent with each other.

The batch is applied in memory first: the state of every deal the batch
touches is read with one query, the events change it, and the changes are
written back with a few bulk statements. Events arrive at least once; an
event at or below its deal's stored `stream_version` is skipped. An event
that cannot be applied is parked with its error and the stream goes on, but
not its deal's: the deal counts the event (`deals.parked`) and its later
events are parked behind it, in order, instead of being applied to a state
that lacks it (a stage change missing would make every later visit wrong).
`metrics.parked` retries them, through `Projection.reapply`.

What an event changes (DOMAIN rule numbers refer to the product definition):
- `stage.changed` is the only source of stage visits, outcomes and stage
  change counts; its `effective_at` is the moment, never the arrival time.
- `deal.created` / `deal.updated` set owner, amount and currency (latest in
  stream order); the first `deal.created` sets the creation time.
- `meeting.held` / `meeting.no_show` count meetings; the earliest
  `meeting.held` by `occurred_at` is the first meeting.
- every other known type only advances the deal's stream version.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel

from metrics.envelope import (
    DealCreated,
    DealUpdated,
    Envelope,
    StageChanged,
    amount_micros,
    parse_data,
    parse_envelope,
    to_micros,
)
from metrics.errors import EventRejected, OffsetConflict, StorageUnavailable
from metrics.processes import TERMINAL_STATES, Catalog
from metrics.tables import parked_events
from metrics.writes import DEAL_COLUMNS, VISIT_COLUMNS, VisitClosing, writes_for

__all__ = [
    "BatchResult",
    "Incoming",
    "PartitionTally",
    "ProgressWriter",
    "Projection",
    "lock_batches",
]

logger = logging.getLogger(__name__)

Disposition = Literal["applied", "skipped", "parked"]
ProgressWriter = Callable[[sa.Connection, "BatchResult"], None]

ADVANCED, DROPPED, MOVED_BACK = "advanced", "dropped", "moved_back"

# The PostgreSQL advisory lock ("mtparked") between projector batches, which
# take it shared, and retries of parked events, which take it exclusively. A
# batch reads the state of its deals, then writes every column back: a retry
# committed in between would be undone. SQLite needs none: a projector
# transaction takes the write lock as it begins (BEGIN IMMEDIATE) and the
# first statement of a retry's transaction writes.
BATCH_LOCK = 0x6D74_7061_726B_6564


def lock_batches(connection: sa.Connection, *, exclusive: bool = False) -> None:
    """Take the batch lock for the transaction of `connection` (PostgreSQL):
    shared in a projector batch, `exclusive` in a retry."""
    if connection.dialect.name != "postgresql":
        return
    if exclusive:
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(BATCH_LOCK)))
    else:
        shared = sa.func.pg_advisory_xact_lock_shared(BATCH_LOCK)
        connection.execute(sa.select(shared))


@dataclass(slots=True)
class Incoming:
    """One raw event as a source delivered it, with where it came from."""

    value: bytes | str | dict[str, Any] | None
    source: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def describe(self) -> str:
        if self.partition is not None:
            return f"topic={self.topic} partition={self.partition} offset={self.offset}"
        return f"source={self.source}"


@dataclass(frozen=True, slots=True)
class _Decoded:
    """An event whose envelope parsed, with its data as the projection reads
    it, or the error that data raised (raised again when the event is
    applied, after its stream version is checked)."""

    envelope: Envelope
    data: BaseModel | None
    refused: Exception | None = None


def _decode(item: Incoming) -> _Decoded | EventRejected:
    """Parse one raw event: the envelope, then the data the projection reads."""
    if item.value is None:
        return EventRejected("empty message (no value)")
    try:
        envelope = parse_envelope(item.value)
    except EventRejected as rejected:
        return rejected
    try:
        return _Decoded(envelope, parse_data(envelope))
    except Exception as error:
        return _Decoded(envelope, None, error)


@dataclass(slots=True)
class PartitionTally:
    applied: int = 0
    skipped: int = 0
    parked: int = 0
    next_offset: int | None = None
    last_position: int | None = None


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    skipped: int = 0
    parked: int = 0
    last_position: int | None = None
    by_partition: dict[int | None, PartitionTally] = field(default_factory=dict)

    def count(
        self, item: Incoming, disposition: Disposition, position: int | None
    ) -> None:
        tally = self.by_partition.get(item.partition)
        if tally is None:
            tally = self.by_partition[item.partition] = PartitionTally()
        if disposition == "applied":
            self.applied += 1
            tally.applied += 1
        elif disposition == "skipped":
            self.skipped += 1
            tally.skipped += 1
        else:
            self.parked += 1
            tally.parked += 1
        offset = item.offset
        if offset is not None:
            known = tally.next_offset or 0
            tally.next_offset = offset + 1 if offset >= known else known
        if position is not None:
            known = self.last_position or 0
            self.last_position = position if position > known else known
            known = tally.last_position or 0
            tally.last_position = position if position > known else known


@dataclass(slots=True)
class _Deal:
    deal_id: str
    stream_version: int = 0
    last_position: int = 0
    process: str | None = None
    process_version: int | None = None
    owner: str | None = None
    amount_micros: int | None = None
    currency: str | None = None
    created_us: int | None = None
    status: str = "pending"
    stage: str | None = None
    stage_entered_us: int | None = None
    visit_count: int = 0
    closed_us: int | None = None
    outcome_reason: str | None = None
    first_meeting_us: int | None = None
    meetings_held: int = 0
    meetings_no_show: int = 0
    criteria_changes: int = 0
    other_changes: int = 0
    parked: int = 0
    stored: bool = False
    changed: bool = False


@dataclass(slots=True)
class _Visit:
    deal_id: str
    seq: int
    stage: str
    entered_us: int
    left_us: int | None = None
    left_to: str | None = None
    left_cause: str | None = None
    left_reason: str | None = None
    outcome: str | None = None
    duration_us: int | None = None


# A stored deal is read back positionally and both are written by field
# name: their fields must follow the tables' columns.
if (
    tuple(f.name for f in fields(_Deal))[: len(DEAL_COLUMNS)] != DEAL_COLUMNS
    or tuple(f.name for f in fields(_Visit)) != VISIT_COLUMNS
):
    raise RuntimeError("the projection's records no longer match the tables")


@dataclass(slots=True)
class _Changes:
    """Everything one batch writes, gathered in memory."""

    deals: dict[str, _Deal] = field(default_factory=dict)
    new_visits: dict[tuple[str, int], _Visit] = field(default_factory=dict)
    closed_visits: list[VisitClosing] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)
    # deal -> (position, event_id) of its earliest parked event, as far as
    # this batch needed to know it
    holding: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)


def _raw_text(value: bytes | str | dict[str, Any] | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def _identity_hint(value: bytes | str | dict[str, Any] | None) -> dict[str, Any]:
    """Best-effort identifiers of an event that did not parse, for the log."""
    if isinstance(value, dict):
        found = value
    else:
        try:
            found = json.loads(value) if value is not None else {}
        except ValueError:
            return {}
        if not isinstance(found, dict):
            return {}
    hint: dict[str, Any] = {}
    for key in ("event_id", "deal_id", "type"):
        if isinstance(found.get(key), str):
            hint[key] = found[key][:128]
    if isinstance(found.get("position"), int):
        hint["position"] = found["position"]
    return hint


class Projection:
    """Applies batches of recorded events to the read models."""

    def __init__(
        self, engine: sa.Engine, catalog: Catalog, *, batch_lock: bool = True
    ) -> None:
        """`batch_lock=False` for read models nobody retries parked events
        of (a rebuild's staging area): their batches must not wait for, nor
        hold up, those of the read models in the same database."""
        self._engine = engine
        self._catalog = catalog
        self._writes = writes_for(engine)
        self._batch_lock = batch_lock

    # -- the transaction ------------------------------------------------------

    def apply(self, batch: Sequence[Incoming], progress: ProgressWriter) -> BatchResult:
        """Apply a batch and the source's progress in one transaction.

        Raises `OffsetConflict` when another projector got there first (the
        transaction is rolled back) and `StorageUnavailable` when the
        database cannot be reached; both are worth retrying.
        """
        decoded = [_decode(item) for item in batch]
        try:
            with self._engine.begin() as connection:
                if self._batch_lock:
                    lock_batches(connection)
                result = BatchResult()
                changes = _Changes()
                self._project(connection, batch, decoded, result, changes)
                self._write(connection, changes)
                progress(connection, result)
            return result
        except (OffsetConflict, StorageUnavailable):
            raise
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            raise StorageUnavailable(f"read-model database: {error}") from error
        except Exception:
            logger.warning(
                "batch failed, applying it one event at a time events=%d %s",
                len(batch),
                batch[0].describe() if batch else "",
                exc_info=True,
            )
        return self._apply_one_by_one(batch, decoded, progress)

    def _apply_one_by_one(
        self,
        batch: Sequence[Incoming],
        decoded: Sequence[_Decoded | EventRejected],
        progress: ProgressWriter,
    ) -> BatchResult:
        """The fallback: each event in its own savepoint; one that still fails
        is parked with the database's error."""
        try:
            with self._engine.begin() as connection:
                if self._batch_lock:
                    lock_batches(connection)
                result = BatchResult()
                for item, event in zip(batch, decoded, strict=True):
                    single = BatchResult()
                    changes = _Changes()
                    try:
                        with connection.begin_nested():
                            self._project(connection, [item], [event], single, changes)
                            self._write(connection, changes)
                    except (sa.exc.OperationalError, sa.exc.InterfaceError):
                        raise
                    except Exception as error:
                        logger.exception("event cannot be written %s", item.describe())
                        single = BatchResult()
                        changes = _Changes()
                        unwritable = EventRejected(f"cannot be written: {error}")
                        parsed = event.envelope if isinstance(event, _Decoded) else None
                        counted = parsed is not None and self._advance_past(
                            connection, parsed, changes
                        )
                        self._park(
                            item, parsed, unwritable, single, changes, counted=counted
                        )
                        self._write(connection, changes)
                    self._merge(result, single)
                progress(connection, result)
            return result
        except OffsetConflict:
            raise
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            raise StorageUnavailable(f"read-model database: {error}") from error

    @staticmethod
    def _merge(total: BatchResult, part: BatchResult) -> None:
        total.applied += part.applied
        total.skipped += part.skipped
        total.parked += part.parked
        if part.last_position is not None:
            total.last_position = max(total.last_position or 0, part.last_position)
        for partition, tally in part.by_partition.items():
            into = total.by_partition.setdefault(partition, PartitionTally())
            into.applied += tally.applied
            into.skipped += tally.skipped
            into.parked += tally.parked
            if tally.next_offset is not None:
                into.next_offset = max(into.next_offset or 0, tally.next_offset)
            if tally.last_position is not None:
                into.last_position = max(into.last_position or 0, tally.last_position)

    def _advance_past(
        self, connection: sa.Connection, envelope: Envelope, changes: _Changes
    ) -> bool:
        """Move a deal's high-water mark past an event that was parked, so a
        second delivery of it is skipped instead of parked again, and count
        it in the deal's parked events (which holds the deal's later events);
        False when the deal was past it already (then it counts nothing)."""
        state = self._load(connection, [envelope.deal_id]).get(envelope.deal_id)
        if state is None:
            state = _Deal(envelope.deal_id)
        changes.deals[state.deal_id] = state
        if envelope.stream_version <= state.stream_version:
            return False
        state.stream_version = envelope.stream_version
        state.last_position = max(state.last_position, envelope.position)
        state.parked += 1
        state.changed = True
        return True

    # -- retries of parked events ---------------------------------------------

    def reapply(
        self, connection: sa.Connection, item: Incoming, stream_version: int | None
    ) -> Envelope:
        """Apply a parked event again, in the caller's transaction (which has
        taken `lock_batches` exclusively); raise `EventRejected` saying why
        it still cannot be applied, having written nothing.

        `stream_version` is the parked row's: set, the deal was moved past
        the event and counts it, so the stream-version check is bypassed for
        it (only for it) and the count goes down; the caller has checked that
        no earlier event of the deal is still parked. Null, the envelope was
        not read when it was parked and the deal's later events were not
        held: it applies only if the deal has not moved past it.
        """
        event = _decode(item)
        if isinstance(event, EventRejected):
            raise event
        envelope = event.envelope
        state = self._load(connection, [envelope.deal_id]).get(envelope.deal_id)
        if state is None:
            state = _Deal(envelope.deal_id)
        changes = _Changes(deals={state.deal_id: state})
        if stream_version is not None:
            if envelope.stream_version != stream_version:
                raise EventRejected(
                    f"its raw value has stream_version={envelope.stream_version}, "
                    f"parked as {stream_version}"
                )
            if state.parked < 1 or state.stream_version < stream_version:
                raise EventRejected(
                    f"deal {state.deal_id} does not count it as parked "
                    f"(parked={state.parked} stream_version={state.stream_version}):"
                    " the read models and parked_events disagree; rebuild them"
                )
            refused = self._applied(state, event, changes, item)
            if refused is not None:
                raise refused
            state.parked -= 1
        else:
            if envelope.stream_version <= state.stream_version:
                raise EventRejected(
                    f"deal {state.deal_id} has moved past it (stream_version "
                    f"{state.stream_version} >= {envelope.stream_version}): its "
                    "later events were applied without it; a rebuild of the read "
                    "models applies it in order"
                )
            if state.parked > 0:
                raise self._held(connection, state, changes)
            refused = self._applied(state, event, changes, item)
            if refused is not None:
                raise refused
            state.stream_version = envelope.stream_version
            state.last_position = max(state.last_position, envelope.position)
        state.changed = True
        self._write(connection, changes)
        return envelope

    # -- in memory --------------------------------------------------------------

    def _load(
        self, connection: sa.Connection, deal_ids: Iterable[str]
    ) -> dict[str, _Deal]:
        """The stored states of the deals, read in one query (in key order);
        deals not stored yet are absent."""
        states: dict[str, _Deal] = {}
        for row in self._writes.load_deals(connection, sorted(set(deal_ids))):
            state = states[row[0]] = _Deal(*row)
            state.stored = True
        return states

    def _project(
        self,
        connection: sa.Connection,
        batch: Sequence[Incoming],
        decoded: Sequence[_Decoded | EventRejected],
        result: BatchResult,
        changes: _Changes,
    ) -> None:
        states = self._load(
            connection,
            (e.envelope.deal_id for e in decoded if isinstance(e, _Decoded)),
        )
        changes.deals = states
        for item, event in zip(batch, decoded, strict=True):
            if isinstance(event, EventRejected):
                self._park(item, None, event, result, changes)
                continue
            envelope = event.envelope
            state = states.get(envelope.deal_id)
            if state is None:
                state = states[envelope.deal_id] = _Deal(envelope.deal_id)
            if envelope.stream_version <= state.stream_version:
                result.count(item, "skipped", envelope.position)
                continue
            if envelope.stream_version != state.stream_version + 1:
                logger.warning(
                    "stream gap deal_id=%s stream_version=%d expected=%d "
                    "position=%d %s",
                    envelope.deal_id,
                    envelope.stream_version,
                    state.stream_version + 1,
                    envelope.position,
                    item.describe(),
                )
            held = state.parked > 0
            if held:
                refused: EventRejected | None = self._held(connection, state, changes)
            else:
                refused = self._applied(state, event, changes, item)
            if refused is None:
                result.count(item, "applied", envelope.position)
            else:
                self._park(item, envelope, refused, result, changes, held=held)
                changes.holding.setdefault(
                    state.deal_id, (envelope.position, envelope.event_id)
                )
                state.parked += 1
            # Applied or parked, the event is consumed: a redelivery is skipped.
            state.stream_version = envelope.stream_version
            state.last_position = max(state.last_position, envelope.position)
            state.changed = True

    def _applied(
        self, state: _Deal, event: _Decoded, changes: _Changes, item: Incoming
    ) -> EventRejected | None:
        """Apply one event to its deal's state: None, or why it cannot be
        applied (any error counts). `_apply_event` makes every check that can
        fail before its first change, so an event refused changed nothing."""
        envelope = event.envelope
        try:
            self._apply_event(state, event, changes)
        except EventRejected as refused:
            return refused
        except Exception as error:
            logger.exception(
                "event cannot be applied event_id=%s deal_id=%s position=%d %s",
                envelope.event_id,
                envelope.deal_id,
                envelope.position,
                item.describe(),
            )
            return EventRejected(f"{type(error).__name__}: {error}")
        return None

    def _held(
        self, connection: sa.Connection, state: _Deal, changes: _Changes
    ) -> EventRejected:
        """Why an event of a deal with a parked event is parked too, naming
        the deal's earliest parked event (from this batch or the table)."""
        first = changes.holding.get(state.deal_id)
        if first is None:
            p = parked_events.c
            row = connection.execute(
                sa.select(p.position, p.event_id)
                .where(p.deal_id == state.deal_id, p.stream_version.is_not(None))
                .order_by(p.stream_version)
                .limit(1)
            ).first()
            first = (row.position, row.event_id) if row is not None else (None, None)
            changes.holding[state.deal_id] = first
        position, event_id = first
        return EventRejected(
            f"held behind the earlier parked event of deal {state.deal_id} "
            f"(position={position} event_id={event_id}): a retry of the deal "
            "applies them in order"
        )

    def _park(
        self,
        item: Incoming,
        envelope: Envelope | None,
        rejected: EventRejected,
        result: BatchResult,
        changes: _Changes,
        *,
        counted: bool = True,
        held: bool = False,
    ) -> None:
        """Park an event. `counted`: its deal was moved past it and counts it
        (only possible with an envelope); `held`: it is parked only because an
        earlier event of its deal is (logged as a warning, not an error)."""
        hint = (
            {
                "event_id": envelope.event_id,
                "deal_id": envelope.deal_id,
                "type": envelope.type,
                "position": envelope.position,
            }
            if envelope is not None
            else _identity_hint(item.value)
        )
        position = hint.get("position")
        assert position is None or isinstance(position, int)
        logger.log(
            logging.WARNING if held else logging.ERROR,
            "event parked event_id=%s deal_id=%s type=%s position=%s %s error=%s",
            hint.get("event_id"),
            hint.get("deal_id"),
            hint.get("type"),
            position,
            item.describe(),
            rejected,
        )
        changes.parked.append(
            {
                "parked_us": time.time_ns() // 1000,
                "source": item.source,
                "topic": item.topic,
                "partition": item.partition,
                "offset": item.offset,
                "position": position,
                "event_id": hint.get("event_id"),
                "deal_id": hint.get("deal_id"),
                "event_type": hint.get("type"),
                "error": str(rejected),
                "raw": _raw_text(item.value),
                "stream_version": envelope.stream_version
                if envelope is not None and counted
                else None,
            }
        )
        result.count(item, "parked", position)

    def _apply_event(self, state: _Deal, event: _Decoded, changes: _Changes) -> None:
        """Every check that can refuse the event comes before its first change
        to the state (an event refused must change nothing: it is parked, and
        a retry applies it whole)."""
        if event.refused is not None:
            raise event.refused
        envelope, data = event.envelope, event.data
        kind = envelope.type
        if kind == "stage.changed":
            assert isinstance(data, StageChanged)
            self._stage_changed(state, data, changes)
        elif kind == "deal.created":
            assert isinstance(data, DealCreated)
            amount = amount_micros(data.amount)
            if state.created_us is None:
                state.created_us = to_micros(envelope.occurred_at)
            if state.status == "pending" or state.process is None:
                state.process = data.process
            state.owner = data.owner
            state.amount_micros = amount
            state.currency = data.currency
        elif kind == "deal.updated":
            assert isinstance(data, DealUpdated)
            given = data.model_fields_set
            amount = amount_micros(data.amount)
            if "owner" in given and data.owner is not None:
                state.owner = data.owner
            if "amount" in given:
                state.amount_micros = amount
            if "currency" in given:
                state.currency = data.currency
        elif kind == "meeting.held":
            held_us = to_micros(envelope.occurred_at)
            state.meetings_held += 1
            if state.first_meeting_us is None or held_us < state.first_meeting_us:
                state.first_meeting_us = held_us
        elif kind == "meeting.no_show":
            state.meetings_no_show += 1

    def _stage_changed(
        self, state: _Deal, data: StageChanged, changes: _Changes
    ) -> None:
        effective_us = to_micros(data.effective_at)

        # Leave the open visit, if the deal is in a stage.
        if state.status == "open" and state.stage is not None:
            entered_us = state.stage_entered_us or effective_us
            outcome = self._outcome(state, state.stage, data)
            duration_us = max(0, effective_us - entered_us)
            visit = changes.new_visits.get((state.deal_id, state.visit_count))
            if visit is not None:
                visit.left_us = effective_us
                visit.left_to = data.to
                visit.left_cause = data.cause
                visit.left_reason = data.reason
                visit.outcome = outcome
                visit.duration_us = duration_us
            else:
                changes.closed_visits.append(
                    VisitClosing(
                        state.deal_id,
                        state.visit_count,
                        effective_us,
                        data.to,
                        data.cause,
                        data.reason,
                        outcome,
                        duration_us,
                    )
                )

        # Enter the next stage, or end in a terminal state.
        if data.to in TERMINAL_STATES:
            state.status = data.to
            state.closed_us = effective_us
            state.outcome_reason = data.reason
        else:
            state.visit_count += 1
            changes.new_visits[(state.deal_id, state.visit_count)] = _Visit(
                state.deal_id, state.visit_count, data.to, effective_us
            )
            state.status = "open"
            state.stage = data.to
            state.stage_entered_us = effective_us
            state.closed_us = None
            state.outcome_reason = None

        state.process = data.process
        state.process_version = data.process_version
        if data.cause == "criteria":
            state.criteria_changes += 1
        elif data.cause != "created":
            state.other_changes += 1

    def _outcome(self, state: _Deal, stage: str, data: StageChanged) -> str:
        """How a visit ended: advanced (a later stage or won), dropped (lost or
        disqualified) or moved_back (an override to the same or an earlier
        stage, or between stages the process files do not order)."""
        if data.to == "won":
            return ADVANCED
        if data.to in TERMINAL_STATES:
            return DROPPED
        if data.cause == "criteria":
            return ADVANCED
        later = self._catalog.is_later(
            data.process, data.process_version, stage, data.to
        )
        return ADVANCED if later else MOVED_BACK

    # -- to the database --------------------------------------------------------

    def _write(self, connection: sa.Connection, changes: _Changes) -> None:
        """Write the batch's changes with one statement per kind of change;
        rows in key order, so that concurrent writers lock in the same order."""
        inserts: list[_Deal] = []
        updates: list[_Deal] = []
        for state in sorted(changes.deals.values(), key=_deal_key):
            if state.changed:
                (updates if state.stored else inserts).append(state)
        writes = self._writes
        if inserts:
            writes.insert_deals(connection, inserts)
        if updates:
            writes.update_deals(connection, updates)
        if changes.new_visits:
            writes.insert_visits(connection, list(changes.new_visits.values()))
        if changes.closed_visits:
            closings = sorted(changes.closed_visits, key=_visit_key)
            writes.close_visits(connection, closings)
        if changes.parked:
            connection.execute(parked_events.insert(), changes.parked)


def _deal_key(state: _Deal) -> str:
    return state.deal_id


def _visit_key(closing: VisitClosing) -> tuple[str, int]:
    return closing.deal_id, closing.seq
