"""The event log: every deal's stream of events, in one global order.

Each deal is a stream numbered 1, 2, 3, ... (`stream_version`), and every
event also has a `position` in the whole log, strictly increasing in commit
order. Next to the events the log keeps one `deals` row per stream, the
stream's head: its version is what optimistic concurrency checks, and the
rest is the deal's current summary, rewritten with every append.

Appends are refused, never merged: a stream that moved on since the caller
read it gives `StreamConflict`, an event id already in the log gives
`DuplicateEventId`, and in both cases nothing of the append is written. The
database enforces both (a unique event id, a unique version per stream); the
version check on the head before the insert only makes the error precise.

Commit order is position order
------------------------------
A reader of the feed (the relay to Kafka, the HTTP feed, a projector) keeps
only the last position it has seen and asks for what comes after it. That is
only safe if no event can appear later *below* a position already handed
out. With a plain sequence it can: transaction A draws position 10,
transaction B draws 11 and commits first; a reader sees 11, moves its cursor
past 10, and never sees A's event when A commits.

So appends commit one at a time, in position order. On PostgreSQL each
append takes a transaction-level advisory lock (`COMMIT_ORDER_LOCK`) after
its per-deal version checks and immediately before inserting its events,
and keeps it until its commit has become visible: the next append draws its
positions only after that, so they are larger than every committed position
and every position drawn before. On SQLite every write transaction starts
with BEGIN IMMEDIATE (see `progression.db`), which already lets one writer
at a time into the database. Anything else that inserts events must take
the same lock, or it brings the hazard back.

The cost is plainly write concurrency on the log: one committer at a time,
however many deals are being written. The lock is held only for the event
insert and the commit, which is why appends are batched (one transaction for
many deals, one multi-row insert). What it buys: any reader can page by
position with a simple `position > cursor` and never miss an event, and
`head_position()` is a position below which nothing will ever appear.

Known shortcomings
------------------
- `recorded_at` is taken once per append, after the stream heads are locked
  and before the commit-order lock, so under concurrent appends a higher
  position can carry a slightly earlier `recorded_at`. Order by position.
- Positions have gaps wherever an append rolled back (PostgreSQL keeps the
  drawn identity values); they are strictly increasing, not contiguous.
- Events are inserted by different code on the two databases (see
  `_insert_events_postgres`), for speed on PostgreSQL; the contract tests
  run both.
"""

from __future__ import annotations

__all__ = [
    "COMMIT_ORDER_LOCK",
    "DEAL_STATUSES",
    "DealSummary",
    "EventLog",
    "NewEvent",
    "RecordedEvent",
    "StoredProcess",
    "StreamWrite",
]

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from progression.db import deferred
from progression.errors import (
    DuplicateEventId,
    InvalidEvent,
    ProcessVersionChanged,
    StorageUnavailable,
    StreamConflict,
    Violation,
)
from progression.tables import deals, events, processes

logger = logging.getLogger(__name__)

# The advisory lock key that serialises appends on PostgreSQL ("dealcmit").
COMMIT_ORDER_LOCK = 0x6465_616C_636D_6974

DEAL_STATUSES = frozenset({"pending", "open", "won", "lost", "disqualified"})

# Ids per query when reading by a collection of ids; well under the bound
# parameter limits of both databases.
_IDS_PER_QUERY = 500

# Constraint names from tables.NAMING_CONVENTION, as PostgreSQL reports them,
# and the column lists SQLite puts in its messages instead.
_UNIQUE_EVENT_ID = "uq_events_event_id"
_UNIQUE_STREAM_VERSION = "uq_events_deal_id_stream_version"
_DEALS_PRIMARY_KEY = "pk_deals"
_PROCESSES_PRIMARY_KEY = "pk_processes"
_SQLITE_COLUMNS = {
    "events.event_id": _UNIQUE_EVENT_ID,
    "events.deal_id, events.stream_version": _UNIQUE_STREAM_VERSION,
    "deals.deal_id": _DEALS_PRIMARY_KEY,
    "processes.key, processes.version": _PROCESSES_PRIMARY_KEY,
}


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: an input from a CRM or a decision of the service."""

    event_id: str
    type: str
    deal_id: str
    occurred_at: datetime  # timezone-aware; stored and returned as UTC
    data: dict[str, Any]
    schema_version: int = 1
    source: str | None = None
    actor: str | None = None
    causation_id: str | None = None  # a decision: the input that caused it
    digest: str = ""  # hex sha256 of the input's canonical content


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as the log holds it, with its place in the stream and the log.

    The fields after NewEvent's are keyword-only (they have no defaults).
    """

    event_id: str
    type: str
    deal_id: str
    occurred_at: datetime
    data: dict[str, Any]
    schema_version: int = 1
    source: str | None = None
    actor: str | None = None
    causation_id: str | None = None
    digest: str = ""
    _: KW_ONLY
    position: int
    stream_version: int
    recorded_at: datetime

    def envelope(self) -> dict[str, Any]:
        """The event as JSON-ready data, in the envelope of the contract."""
        return {
            "event_id": self.event_id,
            "type": self.type,
            "deal_id": self.deal_id,
            "occurred_at": _rfc3339(self.occurred_at),
            "recorded_at": _rfc3339(self.recorded_at),
            "source": self.source,
            "actor": self.actor,
            "data": self.data,
            "schema_version": self.schema_version,
            "position": self.position,
            "stream_version": self.stream_version,
        }


@dataclass(frozen=True, slots=True)
class DealSummary:
    """A deal as it stands: one row per stream, rewritten with each append."""

    deal_id: str
    version: int  # the stream's last stream_version
    status: str  # pending | open | won | lost | disqualified
    stage: str | None
    stage_entered_at: datetime | None
    process: str | None
    process_version: int | None
    owner: str | None
    amount: float | None
    currency: str | None
    lead_score: int | None
    created_at: datetime | None  # occurred_at of deal.created
    updated_at: datetime | None  # recorded_at of the last append (set by the log)


@dataclass(frozen=True, slots=True)
class StreamWrite:
    """Events for one deal stream, and the deal as it stands after them."""

    deal_id: str
    expected_version: int  # 0 for a deal not yet in the log
    events: Sequence[NewEvent]  # inputs and the decisions they caused
    summary: DealSummary  # version and updated_at are set by the log


@dataclass(frozen=True, slots=True)
class StoredProcess:
    """A version of a declared process, as first registered."""

    key: str
    version: int
    definition: dict[str, Any]
    digest: str
    recorded_at: datetime


class EventLog:
    """The progression service's event log, on SQLite or PostgreSQL.

    Safe to share between threads: it holds nothing but the engine. The
    engine should come from `progression.db.create_engine`, which sets up
    SQLite's transactions the way appends rely on.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._reader = deferred(engine)
        self._postgres = engine.dialect.name == "postgresql"
        self._local_writers = [threading.Lock() for _ in range(_LOCAL_STRIPES)]

    # -- writing ---------------------------------------------------------------

    @contextmanager
    def writers_of(self, deal_ids: Iterable[str]) -> Iterator[None]:
        """Hold back the other writers of these deals that also ask, in every
        process, for as long as the block runs (PostgreSQL: a session
        advisory lock a deal, taken in key order). Appends stay optimistic;
        this is for a writer that lost too many races on a hot deal, so that
        it reads and appends without a fellow loser in between. On SQLite
        (the embedded default, one process) the wait is among the threads of
        this process only."""
        if not self._postgres:
            stripes = sorted({_deal_lock_key(d) % _LOCAL_STRIPES for d in deal_ids})
            with contextlib.ExitStack() as held:
                for stripe in stripes:
                    held.enter_context(self._local_writers[stripe])
                yield
            return
        keys = sorted({_deal_lock_key(deal_id) for deal_id in deal_ids})
        with self._storage("wait for the deal's writers"):
            connection = self._engine.connect()
        try:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            for key in keys:
                connection.execute(sa.select(sa.func.pg_advisory_lock(key)))
            yield
        finally:
            try:
                connection.execute(sa.select(sa.func.pg_advisory_unlock_all()))
            finally:
                connection.close()

    def append(self, writes: Sequence[StreamWrite]) -> list[RecordedEvent]:
        """Append to several deal streams in one transaction, all or nothing.

        Each stream must be at its `expected_version`, else `StreamConflict`;
        an event id already in the log, or twice in `writes`, gives
        `DuplicateEventId`. Returns the recorded events in the order given.
        """
        if not writes:
            return []
        _check_writes(writes)
        event_count = sum(len(write.events) for write in writes)

        try:
            with (
                self._storage("append", classify=True),
                self._engine.begin() as connection,
            ):
                self._check_heads(connection, writes)
                recorded_at = datetime.now(UTC)
                self._write_heads(connection, writes, recorded_at)
                if self._postgres:
                    connection.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(COMMIT_ORDER_LOCK))
                    )
                recorded = self._insert_events(connection, writes, recorded_at)
        except sa.exc.IntegrityError as error:
            raise self._refused_append(error, writes) from error
        except sa.exc.DataError as error:
            # The database refused a value the contract allows, for instance
            # a NUL character in a string, which PostgreSQL's text and JSONB
            # cannot hold. Which event carried it is not reported.
            logger.info("append refused by the database error=%s", error.orig)
            raise InvalidEvent(
                [Violation("", f"the database refused a value: {error.orig}")]
            ) from error

        logger.debug(
            "appended streams=%d events=%d first_position=%d last_position=%d",
            len(writes),
            event_count,
            recorded[0].position,
            recorded[-1].position,
        )
        return recorded

    def _check_heads(
        self, connection: sa.Connection, writes: Sequence[StreamWrite]
    ) -> None:
        """Lock the streams' heads and refuse a stream not at its expected version.

        On PostgreSQL the rows are locked in deal_id order, so two appends to
        overlapping sets of deals queue instead of deadlocking.
        """
        deal_ids = sorted(write.deal_id for write in writes)
        actual: dict[str, int] = {}
        for chunk in _chunks(deal_ids):
            query = (
                sa.select(deals.c.deal_id, deals.c.version)
                .where(deals.c.deal_id.in_(chunk))
                .order_by(deals.c.deal_id)
                .with_for_update()
            )
            actual.update((d, v) for d, v in connection.execute(query))

        for write in writes:
            version = actual.get(write.deal_id, 0)
            if version != write.expected_version:
                _log_conflict(write.deal_id, write.expected_version, version)
                raise StreamConflict(write.deal_id, write.expected_version, version)

    def _write_heads(
        self,
        connection: sa.Connection,
        writes: Sequence[StreamWrite],
        recorded_at: datetime,
    ) -> None:
        """Insert the new streams' heads and move the existing ones on."""
        created = [
            _head_row(write, recorded_at)
            for write in sorted(writes, key=lambda write: write.deal_id)
            if write.expected_version == 0
        ]
        if created:
            connection.execute(sa.insert(deals), created)

        moved = [
            {
                **_head_row(write, recorded_at),
                "b_deal_id": write.deal_id,
                "b_expected": write.expected_version,
            }
            for write in writes
            if write.expected_version > 0
        ]
        if not moved:
            return
        for row in moved:
            del row["deal_id"]
        update = sa.update(deals).where(
            deals.c.deal_id == sa.bindparam("b_deal_id"),
            deals.c.version == sa.bindparam("b_expected"),
        )
        result = connection.execute(update, moved)
        # The heads were just checked under lock (FOR UPDATE on PostgreSQL,
        # the whole database on SQLite), so this only fails if something
        # wrote to the deals table without going through the log.
        if result.rowcount != len(moved):
            raise StreamConflict(moved[0]["b_deal_id"], moved[0]["b_expected"])

    def _insert_events(
        self,
        connection: sa.Connection,
        writes: Sequence[StreamWrite],
        recorded_at: datetime,
    ) -> list[RecordedEvent]:
        """Insert every event in one multi-row statement; positions come back."""
        rows: list[dict[str, Any]] = []
        for write in writes:
            for offset, new in enumerate(write.events, start=1):
                rows.append(
                    {
                        "event_id": new.event_id,
                        "deal_id": new.deal_id,
                        "stream_version": write.expected_version + offset,
                        "type": new.type,
                        "occurred_at": new.occurred_at,
                        "recorded_at": recorded_at,
                        "source": new.source,
                        "actor": new.actor,
                        "schema_version": new.schema_version,
                        "data": new.data,
                        "causation_id": new.causation_id,
                        "digest": new.digest,
                    }
                )
        if self._postgres:
            positions = _insert_events_postgres(connection, rows, recorded_at)
        else:
            positions = _insert_events_sqlite(connection, rows)

        recorded: list[RecordedEvent] = []
        last_position = 0
        for row in rows:
            event_id = row["event_id"]
            position = positions[event_id]
            if position <= last_position:
                # Never seen; refusing keeps feed order equal to stream order.
                raise RuntimeError(
                    f"positions not in the order given: event {event_id!r} "
                    f"got {position} after {last_position}"
                )
            last_position = position
            recorded.append(
                RecordedEvent(
                    event_id=event_id,
                    type=row["type"],
                    deal_id=row["deal_id"],
                    occurred_at=row["occurred_at"].astimezone(UTC),
                    data=row["data"],
                    schema_version=row["schema_version"],
                    source=row["source"],
                    actor=row["actor"],
                    causation_id=row["causation_id"],
                    digest=row["digest"],
                    position=position,
                    stream_version=row["stream_version"],
                    recorded_at=recorded_at,
                )
            )
        return recorded

    def _refused_append(
        self, error: sa.exc.IntegrityError, writes: Sequence[StreamWrite]
    ) -> Exception:
        """The error of ours for a unique constraint that refused an append.

        The transaction is rolled back by now. Which event or deal collided is
        found by reading again: events and heads are never removed and
        versions only grow, so whatever collided is still there to be seen.
        """
        constraint = _violated_constraint(error)
        if constraint == _UNIQUE_EVENT_ID:
            wanted = [new.event_id for write in writes for new in write.events]
            found = self.events_by_id(wanted)
            event_id = next((e for e in wanted if e in found), wanted[0])
            logger.info("duplicate event refused event_id=%s", event_id)
            return DuplicateEventId(event_id)

        if constraint in (_DEALS_PRIMARY_KEY, _UNIQUE_STREAM_VERSION):
            heads = self._versions([write.deal_id for write in writes])
            for write in writes:
                actual = heads.get(write.deal_id, 0)
                if actual != write.expected_version:
                    _log_conflict(write.deal_id, write.expected_version, actual)
                    return StreamConflict(write.deal_id, write.expected_version, actual)
            first = writes[0]
            _log_conflict(first.deal_id, first.expected_version, None)
            return StreamConflict(first.deal_id, first.expected_version)

        logger.warning("append refused by an unexpected constraint error=%s", error)
        return StorageUnavailable(f"the database refused the append: {error.orig}")

    def _versions(self, deal_ids: Collection[str]) -> dict[str, int]:
        with self._storage("read versions"), self._reader.connect() as connection:
            versions: dict[str, int] = {}
            for chunk in _chunks(deal_ids):
                query = sa.select(deals.c.deal_id, deals.c.version).where(
                    deals.c.deal_id.in_(chunk)
                )
                versions.update((d, v) for d, v in connection.execute(query))
            return versions

    # -- reading events --------------------------------------------------------

    def read_stream(self, deal_id: str) -> list[RecordedEvent]:
        """A deal's events in stream order; empty for a deal not in the log."""
        return self.read_streams([deal_id]).get(deal_id, [])

    def read_streams(self, deal_ids: Collection[str]) -> dict[str, list[RecordedEvent]]:
        """Several deals' events, each in stream order; absent deals omitted."""
        streams: dict[str, list[RecordedEvent]] = {}
        for event in self._select_by(events.c.deal_id, deal_ids, events.c.deal_id):
            streams.setdefault(event.deal_id, []).append(event)
        return streams

    def events_by_id(self, event_ids: Collection[str]) -> dict[str, RecordedEvent]:
        """The events with these ids that are in the log, by event id."""
        found = self._select_by(events.c.event_id, event_ids, events.c.position)
        return {event.event_id: event for event in found}

    def caused_by(self, event_ids: Collection[str]) -> dict[str, list[RecordedEvent]]:
        """The decisions caused by each of these events, in stream order."""
        caused: dict[str, list[RecordedEvent]] = {}
        found = self._select_by(events.c.causation_id, event_ids, events.c.position)
        for event in found:
            if event.causation_id is not None:
                caused.setdefault(event.causation_id, []).append(event)
        return caused

    def feed(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to `limit` events with a position above `after`, in position order.

        No event ever appears later below a position this has returned (see
        the module's docstring), so `after` can simply be the last position
        seen.
        """
        _check_limit(limit)
        query = (
            sa.select(events)
            .where(events.c.position > after)
            .order_by(events.c.position)
            .limit(limit)
        )
        with self._storage("read the feed"), self._reader.connect() as connection:
            return [_recorded(row) for row in connection.execute(query).mappings()]

    def head_position(self) -> int:
        """The highest committed position; 0 for an empty log."""
        query = sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0))
        with self._storage("read the head"), self._reader.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def _select_by(
        self,
        column: sa.Column[Any],
        values: Collection[str],
        order: sa.Column[Any],
    ) -> list[RecordedEvent]:
        """Events whose `column` is one of `values`, ordered by `order`, position.

        Many values take several queries, in one transaction; every value's
        events come from one of them, so each value's events are in order.
        On PostgreSQL (read committed) the queries do not share a snapshot:
        an append that commits between two of them shows in the later only.
        """
        found: list[RecordedEvent] = []
        with self._storage("read events"), self._reader.connect() as connection:
            for chunk in _chunks(sorted(set(values))):
                query = (
                    sa.select(events)
                    .where(column.in_(chunk))
                    .order_by(order, events.c.position)
                )
                rows = connection.execute(query).mappings()
                found.extend(_recorded(row) for row in rows)
        return found

    # -- reading deals ---------------------------------------------------------

    def deal(self, deal_id: str) -> DealSummary | None:
        """The deal's summary, or None for a deal not in the log."""
        query = sa.select(deals).where(deals.c.deal_id == deal_id)
        with self._storage("read a deal"), self._reader.connect() as connection:
            row = connection.execute(query).mappings().one_or_none()
        return None if row is None else DealSummary(**row)

    def deals(
        self,
        *,
        status: str | None = None,
        stage: str | None = None,
        owner: str | None = None,
        process: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[DealSummary]:
        """Deals matching every given filter, by deal_id, after the `after` id."""
        _check_limit(limit)
        query = sa.select(deals).order_by(deals.c.deal_id).limit(limit)
        filters = {
            "status": status,
            "stage": stage,
            "owner": owner,
            "process": process,
        }
        for name, value in filters.items():
            if value is not None:
                query = query.where(deals.c[name] == value)
        if after is not None:
            query = query.where(deals.c.deal_id > after)
        with self._storage("list deals"), self._reader.connect() as connection:
            return [DealSummary(**row) for row in connection.execute(query).mappings()]

    # -- processes -------------------------------------------------------------

    def register_process(
        self, key: str, version: int, definition: dict[str, Any], digest: str
    ) -> bool:
        """Record a process version; True if it was new, False if already known.

        A known (key, version) with another digest raises ProcessVersionChanged:
        a process that changed must get a new version number.
        """
        # Two attempts: a concurrent registration of the same version can win
        # the insert, and the second read then sees it.
        for _attempt in range(2):
            try:
                with (
                    self._storage("register a process", classify=True),
                    self._engine.begin() as c,
                ):
                    known = c.execute(
                        sa.select(processes.c.digest).where(
                            processes.c.key == key, processes.c.version == version
                        )
                    ).scalar_one_or_none()
                    if known is None:
                        c.execute(
                            sa.insert(processes).values(
                                key=key,
                                version=version,
                                definition=definition,
                                digest=digest,
                                recorded_at=datetime.now(UTC),
                            )
                        )
            except sa.exc.IntegrityError as error:
                if _violated_constraint(error) != _PROCESSES_PRIMARY_KEY:
                    raise StorageUnavailable(
                        f"the database refused the process: {error.orig}"
                    ) from error
                continue
            except sa.exc.DataError as error:
                raise StorageUnavailable(
                    f"the database refused the process: {error.orig}"
                ) from error

            if known is None:
                logger.info("process registered key=%s version=%d", key, version)
                return True
            if known != digest:
                logger.warning(
                    "process changed without a new version key=%s version=%d",
                    key,
                    version,
                )
                raise ProcessVersionChanged(key, version)
            return False
        raise StorageUnavailable(f"could not register process {key!r} {version}")

    def processes(self, key: str | None = None) -> list[StoredProcess]:
        """The registered process versions, by key and version."""
        query = sa.select(processes).order_by(processes.c.key, processes.c.version)
        if key is not None:
            query = query.where(processes.c.key == key)
        with self._storage("read processes"), self._reader.connect() as connection:
            rows = connection.execute(query).mappings()
            return [StoredProcess(**row) for row in rows]

    # -- errors ----------------------------------------------------------------

    @contextmanager
    def _storage(self, operation: str, *, classify: bool = False) -> Iterator[None]:
        """Turn a failing or unreachable database into StorageUnavailable.

        With `classify`, constraint and data errors pass through for the
        caller to tell apart. A connection lost during COMMIT leaves the
        outcome unknown; retrying an append is still safe, because a repeated
        event id is refused.
        """
        try:
            yield
        except (sa.exc.IntegrityError, sa.exc.DataError) as error:
            if classify:
                raise
            raise _unavailable(operation, error) from error
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable(operation, error) from error


def _unavailable(operation: str, error: Exception) -> StorageUnavailable:
    cause = getattr(error, "orig", None) or error
    logger.warning("storage failed operation=%r error=%s", operation, cause)
    return StorageUnavailable(f"could not {operation}: {cause}")


def _check_writes(writes: Sequence[StreamWrite]) -> None:
    """Refuse an append that is wrong before it reaches the database."""
    seen_deals: set[str] = set()
    seen_events: set[str] = set()
    for write in writes:
        if write.deal_id in seen_deals:
            raise ValueError(f"deal {write.deal_id!r} appears twice in one append")
        seen_deals.add(write.deal_id)
        if write.expected_version < 0:
            raise ValueError(f"deal {write.deal_id!r}: expected version below 0")
        if not write.events:
            raise ValueError(f"deal {write.deal_id!r}: a write needs an event")
        if write.summary.deal_id != write.deal_id:
            raise ValueError(f"deal {write.deal_id!r}: summary of another deal")
        if write.summary.status not in DEAL_STATUSES:
            raise ValueError(
                f"deal {write.deal_id!r}: unknown status {write.summary.status!r}"
            )
        for moment in (write.summary.stage_entered_at, write.summary.created_at):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"deal {write.deal_id!r}: a naive datetime")
        for new in write.events:
            if new.deal_id != write.deal_id:
                raise ValueError(
                    f"event {new.event_id!r} of deal {new.deal_id!r} in the "
                    f"stream of deal {write.deal_id!r}"
                )
            if new.occurred_at.utcoffset() is None:
                raise ValueError(f"event {new.event_id!r}: occurred_at is naive")
            if new.event_id in seen_events:
                logger.info("duplicate event in one append event_id=%s", new.event_id)
                raise DuplicateEventId(new.event_id)
            seen_events.add(new.event_id)


# The events of one append as one statement with a single parameter: a JSON
# array of the rows, unpacked by the server. SQLAlchemy's multi-row VALUES
# binds 12 parameters per event, and psycopg parses a statement of 12,000
# placeholders in Python on every append (that alone held the rate to about
# 7,000 events/s); one array per column spends most of its time escaping
# array elements. Identity values are drawn in the order the rows leave the
# ORDER BY, so positions follow the order given (the caller checks);
# RETURNING's order is not relied on.
_INSERT_EVENTS_POSTGRES = sa.text(
    """
    INSERT INTO events (
        event_id, deal_id, stream_version, type, occurred_at, recorded_at,
        source, actor, schema_version, data, causation_id, digest
    )
    SELECT
        event_id, deal_id, stream_version, type, occurred_at,
        CAST(:recorded_at AS timestamptz),
        source, actor, schema_version, data, causation_id, digest
    FROM ROWS FROM (
        json_to_recordset(CAST(:rows AS json)) AS (
            event_id varchar, deal_id varchar, stream_version integer,
            type text, occurred_at timestamptz, source text, actor text,
            schema_version integer, data jsonb, causation_id varchar,
            digest varchar
        )
    ) WITH ORDINALITY AS batch (
        event_id, deal_id, stream_version, type, occurred_at, source, actor,
        schema_version, data, causation_id, digest, ordinal
    )
    ORDER BY ordinal
    RETURNING event_id, position
    """
)


def _insert_events_postgres(
    connection: sa.Connection, rows: list[dict[str, Any]], recorded_at: datetime
) -> dict[str, int]:
    batch = [
        {
            **row,
            "occurred_at": row["occurred_at"].astimezone(UTC).isoformat(),
            "recorded_at": None,  # one value for all, bound on its own
        }
        for row in rows
    ]
    parameters = {"rows": json.dumps(batch), "recorded_at": recorded_at}
    returned = connection.execute(_INSERT_EVENTS_POSTGRES, parameters)
    return {event_id: position for event_id, position in returned}


def _insert_events_sqlite(
    connection: sa.Connection, rows: list[dict[str, Any]]
) -> dict[str, int]:
    # SQLAlchemy can return positions in parameter order on SQLite only one
    # row per statement; unordered, it sends one multi-row INSERT, which
    # SQLite numbers in the order given. Rows are matched by event id.
    statement = sa.insert(events).returning(events.c.event_id, events.c.position)
    returned = connection.execute(statement, rows)
    return {event_id: position for event_id, position in returned}


def _head_row(write: StreamWrite, recorded_at: datetime) -> dict[str, Any]:
    summary = write.summary
    return {
        "deal_id": write.deal_id,
        "version": write.expected_version + len(write.events),
        "status": summary.status,
        "stage": summary.stage,
        "stage_entered_at": summary.stage_entered_at,
        "process": summary.process,
        "process_version": summary.process_version,
        "owner": summary.owner,
        "amount": summary.amount,
        "currency": summary.currency,
        "lead_score": summary.lead_score,
        "created_at": summary.created_at,
        "updated_at": recorded_at,
    }


def _recorded(row: sa.RowMapping) -> RecordedEvent:
    return RecordedEvent(
        event_id=row["event_id"],
        type=row["type"],
        deal_id=row["deal_id"],
        occurred_at=row["occurred_at"],
        data=row["data"],
        schema_version=row["schema_version"],
        source=row["source"],
        actor=row["actor"],
        causation_id=row["causation_id"],
        digest=row["digest"],
        position=row["position"],
        stream_version=row["stream_version"],
        recorded_at=row["recorded_at"],
    )


def _violated_constraint(error: sa.exc.IntegrityError) -> str | None:
    """The name of the constraint behind an IntegrityError, on either database.

    PostgreSQL names it (psycopg's diagnostics); SQLite only lists the
    columns, as in "UNIQUE constraint failed: events.event_id".
    """
    diag = getattr(error.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if isinstance(name, str):
        return name
    message = str(error.orig)
    prefix = "UNIQUE constraint failed: "
    if message.startswith(prefix):
        return _SQLITE_COLUMNS.get(message.removeprefix(prefix).strip())
    return None


def _log_conflict(deal_id: str, expected: int, actual: int | None) -> None:
    logger.info(
        "stream conflict deal_id=%s expected_version=%d actual_version=%s",
        deal_id,
        expected,
        actual,
    )


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def _chunks(values: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == _IDS_PER_QUERY:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with "Z"; microseconds only when there are some."""
    utc = (
        moment.replace(tzinfo=None)
        if moment.tzinfo is UTC
        else moment.astimezone(UTC).replace(tzinfo=None)
    )
    timespec = "microseconds" if utc.microsecond else "seconds"
    return utc.isoformat(timespec=timespec) + "Z"


# Deals share these many in-process locks of `EventLog.writers_of` (SQLite).
_LOCAL_STRIPES = 64


def _deal_lock_key(deal_id: str) -> int:
    """A deal's advisory lock key: 63 bits of a digest of its id."""
    digest = hashlib.blake2b(f"dealledger-deal:{deal_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1
