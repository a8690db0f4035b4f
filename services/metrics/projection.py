"""The projection: recorded deal events in, read models out.

`Projection.apply` takes a batch of raw events from any source and applies
it in one database transaction together with the source's progress (Kafka
offsets or feed position), so that a crash anywhere leaves the read models
and the progress consistent with each other.

The batch is applied in memory first: the state of every deal the batch
touches is read with one query, the events change it, and the changes are
written back with a few bulk statements. Events arrive at least once; an
event at or below its deal's stored `stream_version` is skipped. An event
that cannot be applied is parked with its error and the stream goes on.

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
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

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
from metrics.tables import deals, parked_events, stage_visits

__all__ = [
    "BatchResult",
    "Incoming",
    "PartitionTally",
    "ProgressWriter",
    "Projection",
]

logger = logging.getLogger(__name__)

Disposition = Literal["applied", "skipped", "parked"]
ProgressWriter = Callable[[sa.Connection, "BatchResult"], None]

ADVANCED, DROPPED, MOVED_BACK = "advanced", "dropped", "moved_back"
_SELECT_CHUNK = 500


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
        if item.offset is not None:
            tally.next_offset = max(tally.next_offset or 0, item.offset + 1)
        if position is not None:
            self.last_position = max(self.last_position or 0, position)
            tally.last_position = max(tally.last_position or 0, position)


_DEAL_COLUMNS = [column.name for column in deals.columns]


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
    stored: bool = False
    changed: bool = False

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _DEAL_COLUMNS}


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

    def row(self) -> dict[str, Any]:
        return {
            "deal_id": self.deal_id,
            "seq": self.seq,
            "stage": self.stage,
            "entered_us": self.entered_us,
            "left_us": self.left_us,
            "left_to": self.left_to,
            "left_cause": self.left_cause,
            "left_reason": self.left_reason,
            "outcome": self.outcome,
            "duration_us": self.duration_us,
        }


@dataclass(slots=True)
class _Changes:
    """Everything one batch writes, gathered in memory."""

    deals: dict[str, _Deal] = field(default_factory=dict)
    new_visits: dict[tuple[str, int], _Visit] = field(default_factory=dict)
    closed_visits: list[dict[str, Any]] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)


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

    def __init__(self, engine: sa.Engine, catalog: Catalog) -> None:
        self._engine = engine
        self._catalog = catalog
        self._update_deal = (
            deals.update()
            .where(deals.c.deal_id == sa.bindparam("b_deal_id"))
            .values(
                {
                    name: sa.bindparam(f"b_{name}")
                    for name in _DEAL_COLUMNS
                    if name != "deal_id"
                }
            )
        )
        self._close_visit = (
            stage_visits.update()
            .where(
                stage_visits.c.deal_id == sa.bindparam("b_deal_id"),
                stage_visits.c.seq == sa.bindparam("b_seq"),
            )
            .values(
                left_us=sa.bindparam("b_left_us"),
                left_to=sa.bindparam("b_left_to"),
                left_cause=sa.bindparam("b_left_cause"),
                left_reason=sa.bindparam("b_left_reason"),
                outcome=sa.bindparam("b_outcome"),
                duration_us=sa.bindparam("b_duration_us"),
            )
        )

    # -- the transaction ------------------------------------------------------

    def apply(self, batch: Sequence[Incoming], progress: ProgressWriter) -> BatchResult:
        """Apply a batch and the source's progress in one transaction.

        Raises `OffsetConflict` when another projector got there first (the
        transaction is rolled back) and `StorageUnavailable` when the
        database cannot be reached; both are worth retrying.
        """
        decoded = [self._decode(item) for item in batch]
        try:
            with self._engine.begin() as connection:
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
        decoded: Sequence[Envelope | EventRejected],
        progress: ProgressWriter,
    ) -> BatchResult:
        """The fallback: each event in its own savepoint; one that still fails
        is parked with the database's error."""
        try:
            with self._engine.begin() as connection:
                result = BatchResult()
                for item, envelope in zip(batch, decoded, strict=True):
                    single = BatchResult()
                    changes = _Changes()
                    try:
                        with connection.begin_nested():
                            self._project(
                                connection, [item], [envelope], single, changes
                            )
                            self._write(connection, changes)
                    except (sa.exc.OperationalError, sa.exc.InterfaceError):
                        raise
                    except Exception as error:
                        logger.exception("event cannot be written %s", item.describe())
                        single = BatchResult()
                        changes = _Changes()
                        unwritable = EventRejected(f"cannot be written: {error}")
                        parsed = envelope if isinstance(envelope, Envelope) else None
                        self._park(item, parsed, unwritable, single, changes)
                        if parsed is not None:
                            self._advance_past(connection, parsed, changes)
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
    ) -> None:
        """Move a deal's high-water mark past an event that was parked, so a
        second delivery of it is skipped instead of parked again."""
        state = self._load(connection, [envelope.deal_id]).get(envelope.deal_id)
        if state is None:
            state = _Deal(envelope.deal_id)
        if envelope.stream_version > state.stream_version:
            state.stream_version = envelope.stream_version
            state.last_position = max(state.last_position, envelope.position)
            state.changed = True
        changes.deals[state.deal_id] = state

    # -- in memory --------------------------------------------------------------

    @staticmethod
    def _decode(item: Incoming) -> Envelope | EventRejected:
        if item.value is None:
            return EventRejected("empty message (no value)")
        try:
            return parse_envelope(item.value)
        except EventRejected as rejected:
            return rejected

    def _load(
        self, connection: sa.Connection, deal_ids: Iterable[str]
    ) -> dict[str, _Deal]:
        wanted = sorted(set(deal_ids))
        states: dict[str, _Deal] = {}
        for start in range(0, len(wanted), _SELECT_CHUNK):
            chunk = wanted[start : start + _SELECT_CHUNK]
            rows = connection.execute(
                sa.select(deals).where(deals.c.deal_id.in_(chunk))
            ).mappings()
            for row in rows:
                states[row["deal_id"]] = _Deal(**row, stored=True)
        return states

    def _project(
        self,
        connection: sa.Connection,
        batch: Sequence[Incoming],
        decoded: Sequence[Envelope | EventRejected],
        result: BatchResult,
        changes: _Changes,
    ) -> None:
        states = self._load(
            connection, (e.deal_id for e in decoded if isinstance(e, Envelope))
        )
        changes.deals = states
        for item, envelope in zip(batch, decoded, strict=True):
            if isinstance(envelope, EventRejected):
                self._park(item, None, envelope, result, changes)
                continue
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
            try:
                self._apply_event(state, envelope, changes)
            except EventRejected as refused:
                self._park(item, envelope, refused, result, changes)
            except Exception as error:
                logger.exception(
                    "event cannot be applied event_id=%s deal_id=%s position=%d %s",
                    envelope.event_id,
                    envelope.deal_id,
                    envelope.position,
                    item.describe(),
                )
                failed = EventRejected(f"{type(error).__name__}: {error}")
                self._park(item, envelope, failed, result, changes)
            else:
                result.count(item, "applied", envelope.position)
            # Applied or parked, the event is consumed: a redelivery is skipped.
            state.stream_version = envelope.stream_version
            state.last_position = max(state.last_position, envelope.position)
            state.changed = True

    def _park(
        self,
        item: Incoming,
        envelope: Envelope | None,
        rejected: EventRejected,
        result: BatchResult,
        changes: _Changes,
    ) -> None:
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
        logger.error(
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
            }
        )
        result.count(item, "parked", position)

    def _apply_event(self, state: _Deal, envelope: Envelope, changes: _Changes) -> None:
        kind = envelope.type
        data = parse_data(envelope)
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
            closing = {
                "left_us": effective_us,
                "left_to": data.to,
                "left_cause": data.cause,
                "left_reason": data.reason,
                "outcome": self._outcome(state, state.stage, data),
                "duration_us": max(0, effective_us - entered_us),
            }
            visit = changes.new_visits.get((state.deal_id, state.visit_count))
            if visit is not None:
                for name, value in closing.items():
                    setattr(visit, name, value)
            else:
                closing = {f"b_{name}": value for name, value in closing.items()}
                closing["b_deal_id"] = state.deal_id
                closing["b_seq"] = state.visit_count
                changes.closed_visits.append(closing)

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
        inserts, updates = [], []
        for state in sorted(changes.deals.values(), key=lambda s: s.deal_id):
            if not state.changed:
                continue
            if state.stored:
                updates.append({f"b_{k}": v for k, v in state.row().items()})
            else:
                inserts.append(state.row())
        if inserts:
            connection.execute(deals.insert(), inserts)
        if updates:
            connection.execute(self._update_deal, updates)
        if changes.new_visits:
            connection.execute(
                stage_visits.insert(), [v.row() for v in changes.new_visits.values()]
            )
        if changes.closed_visits:
            connection.execute(self._close_visit, changes.closed_visits)
        if changes.parked:
            connection.execute(parked_events.insert(), changes.parked)
