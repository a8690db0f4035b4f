"""Replay: a range of the event log published again, to a topic of one's choice.

A topic recreated, a cluster replaced, a new consumer that needs the past on
a topic of its own: `replay` publishes the events between two positions of
the log (both included), optionally only some deals' events, in position
order, to the topic it is given. It runs beside the relay and leaves the
relay's position alone.

Messages are the relay's
------------------------
Each event is sent exactly as the relay sends it, through the relay's own
publisher: key = deal id, value = the envelope as compact JSON (with
`position` and `stream_version`), the partition of the Java client's
default for the key, an idempotent producer waiting for every in-sync
replica. A missing topic is created with `PROGRESSION_KAFKA_PARTITIONS`.
So one deal's events are on one partition in stream order, and a consumer
cannot tell a replayed message from a relayed one.

How far it got
--------------
A replay is identified by its arguments: a digest of the topic, the
positions asked for and the deal filter (`ReplayRange.replay_id`). Its row
in `replay_progress` holds the range's last position (the one given, or the
log's head when the replay started without one), and `position`: the
highest position of the range Kafka has acknowledged together with every
event of the range below it. The row moves once per settled batch, and
never past an event Kafka has not acknowledged.

Run again with the same arguments, a replay resumes after `position`; run
again once complete, it publishes nothing. `restart` starts it over (and a
range without an end then ends at the new head). A run records under its
own run id, so a second run of the same replay takes it over and the first
stops at its next batch, with `ReplayTakenOver`.

At least once
-------------
A replay publishes every event of its range at least once. A run killed
after Kafka acknowledged some batches and before their position was
recorded sends them again when resumed (at most the batches that were in
flight); a restart sends the whole range again; a Kafka failure mid-batch
resends what followed it. Consumers deduplicate by (deal_id,
stream_version), which every message carries; the metrics projector skips
any event at or below its deal's stored version, so a replayed range,
however often, changes no read model twice. A stop (`stop` set: the
command's SIGINT or SIGTERM) sends nothing new, waits up to the relay's
grace period for what is in flight, and records it: nothing is repeated.

Known shortcomings
------------------
- With a deal filter, the deals' whole streams are read into memory at the
  start: meant for a few deals, not for thousands.
- The rate is the relay's, bounded by kafka-python's per-record cost in
  Python, not by the broker or the log (see `docs/benchmarks.md`).
- It publishes through the relay's `Publisher`, on purpose: a replayed
  message cannot be told from a relayed one, and a change to the publisher
  changes both.
"""

from __future__ import annotations

__all__ = [
    "TOPIC_NAME",
    "ReplayFailed",
    "ReplayRange",
    "ReplayRefused",
    "ReplaySummary",
    "ReplayTakenOver",
    "replay",
]

import bisect
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from progression.db import deferred
from progression.errors import ProgressionError, StorageUnavailable
from progression.eventlog import EventLog, RecordedEvent
from progression.relay import (
    IN_FLIGHT_BATCHES,
    STOP_GRACE_S,
    BrokerUnavailable,
    InFlight,
    Publisher,
    PublishRefused,
)
from progression.settings import Settings
from progression.tables import events, replay_progress

logger = logging.getLogger(__name__)

# Kafka's rule for a topic name.
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

ACK_WAIT_SLICE_S = 0.5
PROGRESS_LOG_EVERY_S = 30.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
# Failures in a row (Kafka or the database) before a run gives up; with the
# backoff and the producer's delivery timeout, a few minutes of outage.
ATTEMPTS = 6

# Called with the events of the range on the topic so far and in all.
Report = Callable[[int, int | None], None]


# -- errors ----------------------------------------------------------------------


class ReplayRefused(ProgressionError, ValueError):
    """The range asked for cannot be replayed; nothing was published.

    `argument` is the `ReplayRange` field at fault, `rule` what it breaks.
    """

    def __init__(self, argument: str, rule: str) -> None:
        self.argument = argument
        self.rule = rule
        super().__init__(f"{argument}: {rule}")


class ReplayTakenOver(ProgressionError):
    """Another run of the same replay records its progress now."""

    def __init__(self, replay_id: str) -> None:
        self.replay_id = replay_id
        super().__init__(
            f"replay {replay_id} was taken over by another run with the same "
            "arguments; this run stopped"
        )


class ReplayFailed(ProgressionError):
    """A run gave up part way; `summary` says how far it got, `cause` why.

    Running it again with the same arguments resumes it.
    """

    def __init__(self, summary: ReplaySummary, cause: ProgressionError) -> None:
        self.summary = summary
        self.cause = cause
        self.retriable = cause.retriable
        super().__init__(str(cause))


# -- what to replay --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """A topic, positions of the log (both included) and an optional deal filter.

    `to_position` None means the log's head when the replay starts. Deal ids
    are kept sorted and once each, so the same deals in another order are
    the same replay.
    """

    topic: str
    from_position: int = 1
    to_position: int | None = None
    deal_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "deal_ids", tuple(sorted(set(self.deal_ids))))
        if not TOPIC_NAME.fullmatch(self.topic):
            raise ReplayRefused(
                "topic",
                f"{self.topic!r} is not a Kafka topic name (1 to 249 of the "
                "letters A-Z and a-z, digits, '.', '_' and '-')",
            )
        if self.from_position < 1:
            raise ReplayRefused(
                "from_position", f"must be 1 or more, not {self.from_position}"
            )
        if self.to_position is not None and self.to_position < self.from_position:
            raise ReplayRefused(
                "to_position",
                f"must be at least the first position ({self.from_position}), "
                f"not {self.to_position}",
            )

    @property
    def replay_id(self) -> str:
        """32 hex digits of a SHA-256 over the arguments, as canonical JSON."""
        arguments = {
            "topic": self.topic,
            "from_position": self.from_position,
            "to_position": self.to_position,
            "deal_ids": list(self.deal_ids),
        }
        canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What one run did, and where the replay stands."""

    replay_id: str
    topic: str
    from_position: int
    to_position: int  # the range's last position
    deal_ids: tuple[str, ...]
    events: int  # events Kafka acknowledged in this run
    first_position: int | None  # of this run's events
    last_position: int | None
    position: int  # every event of the range up to here is on the topic
    published: int  # events of the range on the topic, over every run
    total: int  # events in the range
    resumed_after: int | None  # the position a resumed run started after
    seconds: float
    complete: bool
    already_complete: bool = False  # complete before this run; nothing sent

    @property
    def events_per_s(self) -> float | None:
        return self.events / self.seconds if self.seconds > 0 else None


# -- the range's events ----------------------------------------------------------


class _Events:
    """The events of the range after a position, in position order.

    Without a deal filter, pages of the feed; with one, the deals' streams,
    read first (`streams`) so that a deal the log does not hold is refused
    before anything is written.
    """

    def __init__(
        self,
        log_: EventLog,
        engine: sa.Engine,
        first: int,
        last: int,
        streams: dict[str, list[RecordedEvent]] | None,
    ) -> None:
        self._log = log_
        self._last = last
        self._chosen: list[RecordedEvent] | None = None
        if streams is not None:
            chosen = [
                event
                for stream in streams.values()
                for event in stream
                if first <= event.position <= last
            ]
            self._chosen = sorted(chosen, key=_position)
            self._positions = [event.position for event in self._chosen]
            self.total = len(self._chosen)
        else:
            self.total = _count(engine, first, last)

    @staticmethod
    def streams(
        log_: EventLog, deal_ids: Sequence[str]
    ) -> dict[str, list[RecordedEvent]] | None:
        """The deals' streams; None for no filter. Refuses an unknown deal."""
        if not deal_ids:
            return None
        streams = log_.read_streams(deal_ids)
        missing = [deal_id for deal_id in deal_ids if deal_id not in streams]
        if missing:
            raise ReplayRefused("deal_ids", f"no deal {missing[0]!r} in the event log")
        return streams

    def after(self, position: int, limit: int) -> list[RecordedEvent]:
        if self._chosen is not None:
            start = bisect.bisect_right(self._positions, position)
            return self._chosen[start : start + limit]
        if position >= self._last:
            return []
        page = self._log.feed(position, limit)
        if page and page[-1].position > self._last:
            page = [event for event in page if event.position <= self._last]
        return page


def _position(event: RecordedEvent) -> int:
    return event.position


def _count(engine: sa.Engine, first: int, last: int) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(events)
        .where(events.c.position >= first, events.c.position <= last)
    )
    try:
        with deferred(engine).connect() as connection:
            return int(connection.execute(query).scalar_one())
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
        raise _unavailable("count the range's events", error) from error


# -- the progress row ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    to_position: int
    position: int
    published: int
    started_at: datetime
    completed_at: datetime | None


class _Book:
    """The replay's row in `replay_progress`, written under this run's id."""

    def __init__(self, engine: sa.Engine, wanted: ReplayRange, run_id: str) -> None:
        self._engine = engine
        self._wanted = wanted
        self._id = wanted.replay_id
        self._run_id = run_id

    def open(self, head: int, *, restart: bool) -> tuple[_Row, bool]:
        """The row this run continues, and whether it was there already.

        A new or restarted replay gets a fresh row, its range ending at the
        head when none was given; otherwise the run takes the row over.
        """
        wanted = self._wanted
        table = replay_progress
        now = _now()
        try:
            with self._engine.begin() as connection:
                found = (
                    connection.execute(
                        sa.select(table).where(table.c.replay_id == self._id)
                    )
                    .mappings()
                    .one_or_none()
                )
                if found is not None and not restart:
                    connection.execute(
                        sa.update(table)
                        .where(table.c.replay_id == self._id)
                        .values(run_id=self._run_id, updated_at=now)
                    )
                    return _row(found), True
                fresh = {
                    "to_position": head
                    if wanted.to_position is None
                    else wanted.to_position,
                    "position": wanted.from_position - 1,
                    "published": 0,
                    "run_id": self._run_id,
                    "started_at": now,
                    "updated_at": now,
                    "completed_at": None,
                }
                if found is None:
                    connection.execute(
                        sa.insert(table).values(
                            replay_id=self._id,
                            topic=wanted.topic,
                            from_position=wanted.from_position,
                            deal_ids=list(wanted.deal_ids),
                            **fresh,
                        )
                    )
                else:
                    connection.execute(
                        sa.update(table)
                        .where(table.c.replay_id == self._id)
                        .values(**fresh)
                    )
        except sa.exc.IntegrityError as error:
            # Another run inserted the same replay's row at the same moment.
            raise ReplayTakenOver(self._id) from error
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("open the replay's progress", error) from error
        return _row(fresh), found is not None

    def record(self, position: int, published: int, *, complete: bool) -> None:
        """Move the row on; ReplayTakenOver if another run holds it now."""
        now = _now()
        values: dict[str, Any] = {
            "position": position,
            "published": published,
            "updated_at": now,
        }
        if complete:
            values["completed_at"] = now
        try:
            with self._engine.begin() as connection:
                result = connection.execute(
                    sa.update(replay_progress)
                    .where(
                        replay_progress.c.replay_id == self._id,
                        replay_progress.c.run_id == self._run_id,
                    )
                    .values(**values)
                )
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("record the replay's progress", error) from error
        if result.rowcount != 1:
            raise ReplayTakenOver(self._id)


def _row(values: Any) -> _Row:
    return _Row(
        to_position=int(values["to_position"]),
        position=int(values["position"]),
        published=int(values["published"]),
        started_at=values["started_at"],
        completed_at=values["completed_at"],
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _unavailable(operation: str, error: Exception) -> StorageUnavailable:
    cause = getattr(error, "orig", None) or error
    logger.warning("storage failed operation=%r error=%s", operation, cause)
    return StorageUnavailable(f"could not {operation}: {cause}")


def _text(error: BaseException) -> str:
    return str(getattr(error, "orig", None) or error)


# -- the replay ------------------------------------------------------------------


def replay(
    engine: sa.Engine,
    settings: Settings,
    wanted: ReplayRange,
    *,
    restart: bool = False,
    stop: threading.Event | None = None,
    report: Report | None = None,
) -> ReplaySummary:
    """Publish the range to `wanted.topic`, resuming where it stopped.

    Returns once the range is on the topic, or once `stop` is set and what
    was in flight is settled (`complete` then False). Raises ReplayRefused
    before publishing anything for a range the log cannot give (a position
    beyond its head, a deal it does not hold), and ReplayFailed when a run
    gives up part way (Kafka or the database failing too often in a row, an
    event Kafka refuses for good, another run taking over).
    """
    return _Run(engine, settings, wanted, stop or threading.Event(), report).run(
        restart=restart
    )


class _Run:
    """One run of a replay: from its recorded position to the range's end."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        wanted: ReplayRange,
        stop: threading.Event,
        report: Report | None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._wanted = wanted
        self._stop = stop
        self._report = report
        self._log = EventLog(engine)
        self._run_id = uuid.uuid4().hex
        self._book = _Book(engine, wanted, self._run_id)
        self._id = wanted.replay_id
        # Filled in as the run goes.
        self._to_position = 0
        self._total = 0
        self._position = 0
        self._saved = 0  # the position the row holds
        self._published = 0
        self._resumed_after: int | None = None
        self._events = 0
        self._first: int | None = None
        self._last: int | None = None
        self._started = time.perf_counter()
        self._logged_at = time.monotonic()

    def run(self, *, restart: bool) -> ReplaySummary:
        wanted = self._wanted
        # The head only grows, so a range within it once stays within it.
        head = self._log.head_position()
        self._check_within(head)
        streams = _Events.streams(self._log, wanted.deal_ids)
        row, known = self._book.open(head, restart=restart)
        self._to_position = row.to_position
        self._position = self._saved = row.position
        self._published = row.published
        if known and not restart:
            self._resumed_after = row.position
        source = _Events(
            self._log,
            self._engine,
            wanted.from_position,
            row.to_position,
            streams,
        )
        self._total = source.total
        if row.completed_at is not None and not restart:
            logger.info(
                "replay already complete replay_id=%s topic=%s from_position=%d "
                "to_position=%d events=%d completed_at=%s",
                self._id,
                wanted.topic,
                wanted.from_position,
                row.to_position,
                row.published,
                row.completed_at.isoformat(),
            )
            return self._summary(complete=True, already_complete=True)

        logger.info(
            "replay starting replay_id=%s topic=%s from_position=%d to_position=%d "
            "deals=%s events=%d resume_after=%s",
            self._id,
            wanted.topic,
            wanted.from_position,
            row.to_position,
            ",".join(wanted.deal_ids) or "all",
            self._total,
            self._resumed_after,
        )
        self._tell()
        try:
            complete = self._publish(source)
        except (BrokerUnavailable, PublishRefused, StorageUnavailable) as error:
            with contextlib.suppress(ProgressionError):
                self._save()
            summary = self._summary(complete=False)
            logger.error(
                "replay gave up replay_id=%s topic=%s partition=%s position=%d "
                "failed_position=%s error=%s",
                self._id,
                wanted.topic,
                getattr(error, "partition", None),
                self._position,
                getattr(error, "position", None),
                _text(error),
            )
            raise ReplayFailed(summary, error) from error
        except ReplayTakenOver as error:
            logger.error(
                "replay taken over by another run replay_id=%s topic=%s position=%d",
                self._id,
                wanted.topic,
                self._position,
            )
            raise ReplayFailed(self._summary(complete=False), error) from error

        summary = self._summary(complete=complete)
        logger.info(
            "replay %s replay_id=%s topic=%s position=%d to_position=%d events=%d "
            "first_position=%s last_position=%s published=%d total=%d "
            "seconds=%.2f events_per_s=%.0f",
            "done" if complete else "stopped",
            self._id,
            wanted.topic,
            summary.position,
            summary.to_position,
            summary.events,
            summary.first_position,
            summary.last_position,
            summary.published,
            summary.total,
            summary.seconds,
            summary.events_per_s or 0.0,
        )
        return summary

    def _check_within(self, head: int) -> None:
        """Refuse a range that starts or ends beyond the log's head."""
        wanted = self._wanted
        if head == 0:
            raise ReplayRefused("from_position", "the event log is empty")
        if wanted.from_position > head:
            raise ReplayRefused(
                "from_position",
                f"{wanted.from_position} is beyond the event log's head ({head})",
            )
        if wanted.to_position is not None and wanted.to_position > head:
            raise ReplayRefused(
                "to_position",
                f"{wanted.to_position} is beyond the event log's head ({head})",
            )

    def _publish(self, source: _Events) -> bool:
        """Send the range from the recorded position; True once all of it is on.

        Up to IN_FLIGHT_BATCHES batches are with the producer at once,
        settled oldest first; the position moves only over events Kafka has
        acknowledged together with every event before them.
        """
        topic = self._wanted.topic
        batch_size = self._settings.relay_batch_size
        publisher = Publisher(
            self._settings, topic, f"progression-replay-{self._run_id[:12]}"
        )
        window: deque[InFlight] = deque()
        sent_to = self._position
        failures = 0
        try:
            while not self._stop.is_set():
                # Settle the oldest batch once Kafka has answered for all of
                # it, or once the producer is overdue with an answer.
                if window and (window[0].wait(0) or window[0].overdue):
                    flight = window.popleft()
                    error = self._settle(
                        flight,
                        "no answer from the producer within its delivery timeout",
                    )
                    if error is None:
                        failures = 0
                        continue
                    # What follows the failure goes again, from a fresh producer.
                    window.clear()
                    publisher.reset()
                    sent_to = self._position
                    failures += 1
                    self._retry_or_give_up(error, failures)
                    continue

                # Hand the next batch over, unless a send already failed.
                if len(window) < IN_FLIGHT_BATCHES and not (
                    window and window[-1].send_error
                ):
                    try:
                        batch = source.after(sent_to, batch_size)
                    except StorageUnavailable as error:
                        if window:
                            batch = []
                        else:
                            failures += 1
                            self._retry_or_give_up(error, failures)
                            continue
                    if batch:
                        window.append(publisher.send(batch))
                        sent_to = batch[-1].position
                        continue
                    if not window:
                        self._finish()
                        return True

                if not window[0].wait(ACK_WAIT_SLICE_S):
                    window[0].warn_if_slow(self._position)

            # Stopping: what is in flight may still be acknowledged.
            give_up_at = time.monotonic() + STOP_GRACE_S
            while window:
                flight = window.popleft()
                flight.wait(max(0.0, give_up_at - time.monotonic()))
                failed = self._settle(flight, "not acknowledged before the stop")
                if failed is not None:
                    logger.info(
                        "replay stopping before kafka acknowledged everything "
                        "replay_id=%s topic=%s partition=%s position=%d "
                        "unacknowledged_from=%s",
                        self._id,
                        topic,
                        failed.partition,
                        self._position,
                        failed.position,
                    )
                    break
            if self._saved < self._position:
                self._book.record(self._position, self._published, complete=False)
                self._saved = self._position
            return False
        finally:
            publisher.close(timeout_s=0 if window else 1.0)

    def _settle(
        self, flight: InFlight, unanswered: str
    ) -> BrokerUnavailable | PublishRefused | None:
        """Count and record what Kafka acknowledged of a batch; its failure."""
        delivery = flight.delivery(unanswered)
        if delivery.position is not None:
            acknowledged = flight.batch[: delivery.acknowledged]
            self._events += delivery.acknowledged
            self._published += delivery.acknowledged
            self._position = delivery.position
            if self._first is None:
                self._first = acknowledged[0].position
            self._last = delivery.position
            self._save()
            logger.debug(
                "replay batch published replay_id=%s topic=%s partitions=%s "
                "first_position=%d position=%d events=%d",
                self._id,
                self._wanted.topic,
                ",".join(map(str, delivery.partitions)),
                flight.first_position,
                delivery.position,
                delivery.acknowledged,
            )
            self._tell()
        return delivery.error

    def _save(self) -> None:
        """Record the position; on a database failure, with a later batch."""
        try:
            self._book.record(self._position, self._published, complete=False)
        except StorageUnavailable as error:
            logger.warning(
                "replay position not recorded, retrying with the next batch "
                "replay_id=%s topic=%s position=%d recorded_position=%d error=%s",
                self._id,
                self._wanted.topic,
                self._position,
                self._saved,
                _text(error),
            )
            return
        self._saved = self._position

    def _finish(self) -> None:
        """Every event of the range is on the topic: the row says complete."""
        self._position = self._to_position
        self._book.record(self._position, self._published, complete=True)
        self._saved = self._position
        self._tell()

    def _retry_or_give_up(self, error: ProgressionError, failures: int) -> None:
        """Wait before the next attempt; raise `error` when it is the last."""
        if isinstance(error, PublishRefused) or failures >= ATTEMPTS:
            raise error
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
        logger.warning(
            "replay failed, retrying replay_id=%s topic=%s partition=%s "
            "position=%d attempt=%d of=%d retry_in_s=%.1f error=%s",
            self._id,
            self._wanted.topic,
            getattr(error, "partition", None),
            self._position,
            failures,
            ATTEMPTS,
            delay,
            _text(error),
        )
        self._stop.wait(delay)

    def _tell(self) -> None:
        """The caller's progress report; an INFO line at most every 30 s."""
        if self._report is not None:
            self._report(self._published, self._total)
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_EVERY_S:
            self._logged_at = now
            logger.info(
                "replay publishing replay_id=%s topic=%s position=%d "
                "to_position=%d published=%d total=%d",
                self._id,
                self._wanted.topic,
                self._position,
                self._to_position,
                self._published,
                self._total,
            )

    def _summary(
        self, *, complete: bool, already_complete: bool = False
    ) -> ReplaySummary:
        wanted = self._wanted
        return ReplaySummary(
            replay_id=self._id,
            topic=wanted.topic,
            from_position=wanted.from_position,
            to_position=self._to_position,
            deal_ids=wanted.deal_ids,
            events=self._events,
            first_position=self._first,
            last_position=self._last,
            position=self._position,
            published=self._published,
            total=self._total,
            resumed_after=self._resumed_after,
            seconds=time.perf_counter() - self._started,
            complete=complete,
            already_complete=already_complete,
        )
