"""Taking in events: check, decide, and append inputs with their decisions.

One `submit` call handles a batch in the order given. Each item ends as
`created` (appended, with the stage changes it caused), `duplicate` (the
same event_id and content were accepted before: the original answer),
`conflict` (the same event_id with other content) or `invalid` (nothing of
it written). All items that are appended go into the log in one
transaction, the decisions with the inputs that caused them. When another
writer moved a deal on in between, the whole batch is decided again
against the fresh streams: never merged blindly.
"""

from __future__ import annotations

__all__ = ["Ingestion", "ItemResult", "decision_event_id", "stream_events"]

import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .contract import RESERVED_PREFIX, Contract
from .criteria import DealFacts
from .deal import view_of
from .decision import STAGE_CHANGED, StreamEvent, decide, process_ref
from .errors import (
    EventConflict,
    InvalidEvent,
    ProcessUnavailable,
    ProgressionError,
    UnknownProcess,
    Violation,
)
from .eventlog import DealSummary, EventLog, NewEvent, RecordedEvent, StreamWrite
from .process import TERMINAL, Process, ProcessCatalog
from .upcasting import upcast

log = logging.getLogger(__name__)

Status = Literal["created", "duplicate", "conflict", "invalid"]
MAX_ATTEMPTS = 30
# Attempts that race freely; the later ones of a batch wait their turn with
# the other writers of its deals that lost as often (`EventLog.writers_of`).
OPTIMISTIC_ATTEMPTS = 4


@dataclass(slots=True)
class ItemResult:
    status: Status
    event: RecordedEvent | None = None
    decisions: list[RecordedEvent] = field(default_factory=list)
    error: ProgressionError | None = None


def decision_event_id(deal_id: str, stream_version: int) -> str:
    """A decision's id: fixed by where it lands, outside the senders' ids."""
    digest = hashlib.sha256(f"{deal_id}\x00{stream_version}".encode()).hexdigest()
    return f"{RESERVED_PREFIX}{digest[:40]}"


def stream_events(recorded: Sequence[RecordedEvent]) -> list[StreamEvent]:
    """A deal's recorded stream as the engine reads it: in the current shape."""
    return [
        StreamEvent(
            e.event_id,
            e.type,
            e.occurred_at,
            upcast(e.type, e.schema_version, e.data),
            e.stream_version,
        )
        for e in recorded
    ]


@dataclass(slots=True)
class _Pending:
    """A deal's stream as the batch extends it before the append."""

    recorded: list[RecordedEvent]
    stream: list[StreamEvent]
    facts: DealFacts
    new: list[NewEvent] = field(default_factory=list)
    items: list[int] = field(default_factory=list)

    @property
    def version(self) -> int:
        return len(self.stream)


class Ingestion:
    def __init__(
        self,
        log_: EventLog,
        catalog: ProcessCatalog,
        contract: Contract,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.log = log_
        self.catalog = catalog
        self.contract = contract
        self.clock = clock

    def submit(self, raws: Sequence[Any]) -> list[ItemResult]:
        """Check, decide and append a batch; one result per item, in order."""
        now = self.clock()
        results: list[ItemResult | None] = [None] * len(raws)
        parsed: dict[int, NewEvent] = {}
        for index, raw in enumerate(raws):
            try:
                parsed[index] = self.contract.parse(raw, now=now)
            except InvalidEvent as exc:
                results[index] = ItemResult("invalid", error=exc)

        deal_ids = sorted({event.deal_id for event in parsed.values()})
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                if attempt <= OPTIMISTIC_ATTEMPTS:
                    return self._attempt(parsed, list(results))
                # Lost that many races: queue with the other losers of these
                # deals, so that each of them gets its turn.
                with self.log.writers_of(deal_ids):
                    return self._attempt(parsed, list(results))
            except ProgressionError as exc:
                if not exc.retriable or attempt == MAX_ATTEMPTS:
                    raise
                # Full jitter keeps writers on one hot deal from retrying in step.
                pause_s = random.uniform(0, min(0.05, 0.001 * 2**attempt))
                log.warning(
                    "append retried attempt=%d reason=%s pause_ms=%.1f error=%r",
                    attempt,
                    type(exc).__name__,
                    pause_s * 1000,
                    str(exc),
                )
                time.sleep(pause_s)
        raise AssertionError("unreachable")

    def _attempt(
        self, parsed: dict[int, NewEvent], results: list[ItemResult | None]
    ) -> list[ItemResult]:
        existing = self.log.events_by_id({e.event_id for e in parsed.values()})
        originals = self.log.caused_by(list(existing))
        first_in_batch: dict[str, int] = {}
        fresh: dict[int, NewEvent] = {}
        for index, event in parsed.items():
            known = existing.get(event.event_id)
            if known is not None:
                results[index] = self._repeat(event, known, originals)
            elif event.event_id in first_in_batch:
                first = parsed[first_in_batch[event.event_id]]
                results[index] = (
                    ItemResult("duplicate")
                    if first.digest == event.digest
                    else ItemResult("conflict", error=EventConflict(event.event_id))
                )
            else:
                first_in_batch[event.event_id] = index
                fresh[index] = event

        deal_ids = list(dict.fromkeys(e.deal_id for e in fresh.values()))
        streams = self.log.read_streams(deal_ids)
        pending = {}
        for deal_id in deal_ids:
            stream = stream_events(streams.get(deal_id, []))
            facts = DealFacts.of(e.as_fact() for e in stream if e.type != STAGE_CHANGED)
            pending[deal_id] = _Pending(streams.get(deal_id, []), stream, facts)
        for index, event in fresh.items():
            deal = pending[event.deal_id]
            problem = self._semantic_check(event, deal.stream)
            if problem is not None:
                results[index] = ItemResult("invalid", error=problem)
                continue
            self._extend(deal, event)
            deal.items.append(index)

        writes = [
            StreamWrite(
                deal_id, len(deal.recorded), deal.new, self._summary(deal_id, deal)
            )
            for deal_id, deal in pending.items()
            if deal.new
        ]
        recorded = self.log.append(writes) if writes else []

        by_id = {e.event_id: e for e in recorded}
        caused: dict[str, list[RecordedEvent]] = {}
        for decision in recorded:
            if decision.causation_id is not None:
                caused.setdefault(decision.causation_id, []).append(decision)
        for index in (i for deal in pending.values() for i in deal.items):
            appended = by_id[parsed[index].event_id]
            results[index] = ItemResult(
                "created", appended, caused.get(appended.event_id, [])
            )
        for index, event in parsed.items():
            result = results[index]
            if result is not None and result.status == "duplicate" and not result.event:
                original = by_id.get(event.event_id) or existing.get(event.event_id)
                if original is None:  # its first copy in the batch was refused
                    results[index] = results[first_in_batch[event.event_id]]
                    continue
                result.event = original
                result.decisions = (
                    caused.get(event.event_id, [])
                    if event.event_id in by_id
                    else originals.get(event.event_id, [])
                )
        if recorded:
            log.info(
                "events appended inputs=%d decisions=%d deals=%d last_position=%d",
                sum(len(d.items) for d in pending.values()),
                len(recorded) - sum(len(d.items) for d in pending.values()),
                len(writes),
                recorded[-1].position,
            )
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _repeat(
        self,
        event: NewEvent,
        known: RecordedEvent,
        originals: dict[str, list[RecordedEvent]],
    ) -> ItemResult:
        if known.digest != event.digest:
            return ItemResult("conflict", error=EventConflict(event.event_id))
        return ItemResult("duplicate", known, originals.get(event.event_id, []))

    def _semantic_check(
        self, event: NewEvent, stream: Sequence[StreamEvent]
    ) -> InvalidEvent | None:
        """What the schemas cannot know: the processes and the deal's stages."""
        if event.type == "deal.created":
            key = event.data.get("process") or "b2b-default"
            if not self.catalog.knows(key):
                known = ", ".join(self.catalog.process_keys())
                return InvalidEvent(
                    [Violation("/data/process", f"no process {key!r}; known: {known}")],
                    event.event_id,
                )
        if event.type == "stage.overridden":
            process = self._process_of(stream, event.deal_id)
            to = event.data["to"]
            if process is not None and not (to in TERMINAL or process.has_stage(to)):
                stages = ", ".join(s.key for s in process.stages)
                return InvalidEvent(
                    [
                        Violation(
                            "/data/to",
                            f"{to!r} is not a stage of {process.key} v"
                            f"{process.version} ({stages}) nor won, lost or "
                            "disqualified",
                        )
                    ],
                    event.event_id,
                )
        return None

    def _process_of(
        self, stream: Sequence[StreamEvent], deal_id: str
    ) -> Process | None:
        ref = process_ref(stream)
        if ref is None:
            return None
        key, version = ref
        try:
            return (
                self.catalog.current(key)
                if version is None
                else self.catalog.get(key, version)
            )
        except UnknownProcess as exc:
            log.error(
                "deal process not loadable process=%s version=%s deal=%s",
                key,
                version,
                deal_id,
            )
            raise ProcessUnavailable(deal_id, key, version) from exc

    def _extend(self, deal: _Pending, event: NewEvent) -> None:
        deal.new.append(event)
        arrived = StreamEvent(
            event.event_id,
            event.type,
            event.occurred_at,
            upcast(event.type, event.schema_version, event.data),
            deal.version + 1,
        )
        deal.stream.append(arrived)
        deal.facts.insert(arrived.as_fact())
        process = self._process_of(deal.stream, event.deal_id)
        if process is None:
            return
        now = self.clock()
        for decision in decide(deal.stream, process, deal.facts):
            version = deal.version + 1
            data = decision.data()
            new = NewEvent(
                event_id=decision_event_id(event.deal_id, version),
                type="stage.changed",
                deal_id=event.deal_id,
                occurred_at=now,
                data=data,
                source="dealledger",
                causation_id=event.event_id,
            )
            deal.new.append(new)
            deal.stream.append(
                StreamEvent(new.event_id, new.type, new.occurred_at, data, version)
            )

    def _summary(self, deal_id: str, deal: _Pending) -> DealSummary:
        view = view_of(deal_id, deal.stream, self._process_of(deal.stream, deal_id))
        return DealSummary(
            deal_id=deal_id,
            version=deal.version,
            status=view.status,
            stage=view.stage,
            stage_entered_at=view.stage_entered_at,
            process=view.process,
            process_version=view.process_version,
            owner=view.owner,
            amount=view.amount,
            currency=view.currency,
            lead_score=view.lead_score,
            created_at=view.created_at,
            updated_at=None,
        )
