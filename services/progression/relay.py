"""The relay: committed events from the event log to Kafka, in position order.

This is the sending half of a transactional outbox. The log is the outbox:
an event reaches Kafka only after its append has committed, so nothing that
was rolled back is ever published, and nothing committed is left behind.

What it does
------------
One active relay per topic reads the log with `EventLog.feed` from the
position it last recorded, in batches, and publishes each event with key =
deal_id (so one deal's events stay on one partition, in stream order) and
value = the event's envelope as compact JSON. The producer is idempotent,
waits for every in-sync replica (`acks="all"`) and keeps at most five
requests in flight per connection, so retries neither reorder nor repeat
within one producer's life.

A few batches are with the producer at once. They are settled oldest
first: once Kafka has answered for a whole batch, the relay records in
`relay_progress` the highest position below which every event is
acknowledged. Anything not acknowledged is sent again, from that position,
by a fresh producer.

Delivery is at least once. A crash (or a lost lock) after Kafka's
acknowledgement and before the position is recorded sends those events
again on restart (at most the batches that were in flight), under a new
producer id, which Kafka's idempotence does not recognise; so does a
failure that Kafka acknowledged only part of, on other partitions.
Consumers deduplicate by (deal_id, stream_version). Nothing is ever skipped:
feed order is commit order (see `progression.eventlog`), so an event that
commits late still has a position above every one already handed out.

One relay at a time
-------------------
Two relays on one topic would interleave and resend, so each takes a lock
in the database first and stands by (trying every second) while another
holds it:

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`, key
  from the topic name), taken on a connection held for as long as the relay
  is active. The position is recorded through that same connection, so a
  relay whose session has ended can no longer record anything. A relay
  that dies, even by SIGKILL, ends its session and so frees the lock.
- SQLite: a lease row in `relay_lease` (holder, expires_at), renewed every
  few seconds by a thread and taken over once it has expired. Recording the
  position checks the lease in the same transaction. A relay that dies
  leaves its lease to expire (`LEASE_TTL_S`); one that stops cleanly
  deletes it.

Known shortcomings
------------------
- The lock fences the recorded position, not Kafka: a relay that has lost
  its lock without knowing yet (paused past its lease, or a dead database
  session) can still publish the batch it is working on. That adds
  duplicates, never gaps.
- An event Kafka refuses for good (larger than the broker's
  `message.max.bytes` or the producer's 1 MiB request limit, no write
  permission on the topic) stops the relay with an ERROR: skipping it would
  break the guarantee, and the position stays below it until someone acts.
- The SQLite lease relies on the clocks of the processes sharing the file,
  which is one machine's clock in practice.
- Throughput is bounded by kafka-python's per-record cost in Python (about
  12,000 events a second from a local database to a local broker), not by
  the broker.
- Workarounds for kafka-python 3.0 (checked against 3.0.12): it can leave
  records unanswered for good after a batch expired (the relay stops
  waiting a little after the delivery timeout and starts a fresh producer),
  its close() can leave the producer's thread running (stopped through a
  private attribute, see `Publisher.close`), and it leaves a socket to the
  garbage collector for every refused connection (harmless, but file
  descriptors linger a while during an outage).
"""

from __future__ import annotations

__all__ = [
    "LEASE_TTL_S",
    "BrokerUnavailable",
    "InFlight",
    "PublishRefused",
    "Publisher",
    "Relay",
    "RelayLockLost",
    "encode_key",
    "encode_value",
    "relay_lock_key",
]

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa

from progression.db import deferred
from progression.errors import ProgressionError, StorageUnavailable
from progression.eventlog import EventLog, RecordedEvent
from progression.settings import Settings
from progression.tables import relay_lease, relay_progress

# kafka-python 3.0 reads its protocol schemas with a deprecated importlib call
# when it is first imported; the warning is the library's, not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka import errors as kafka_errors
    from kafka.partitioner.default import murmur2

logger = logging.getLogger(__name__)

LEASE_TTL_S = 10.0  # SQLite: a dead relay's lease is taken over after this
LEASE_RENEW_S = 3.0
STANDBY_RETRY_S = 1.0
STANDBY_LOG_EVERY_S = 30.0
PROGRESS_LOG_EVERY_S = 30.0
LOCK_PING_EVERY_S = 5.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
ACK_WAIT_SLICE_S = 0.5
STOP_GRACE_S = 10.0  # after a stop request, how long acks in flight may take
IN_FLIGHT_BATCHES = 4
ACK_WARN_EVERY_S = 5.0
ACK_MARGIN_S = 5.0  # beyond the producer's delivery timeout
PRODUCER_JOIN_S = 5.0

# The producer: idempotent, every in-sync replica, ordered retries, and
# batches of up to 256 KiB that wait up to 10 ms to fill. Retries are
# bounded by the delivery timeout, after which the relay starts a fresh
# producer from the recorded position. api_version stays unset: the client
# asks the broker. Measured against a local broker, kafka-python's per-record
# metrics cost about a third of the send rate and gzip (in the standard
# library) more than doubles it, the records being similar JSON documents.
PRODUCER_OPTIONS: dict[str, Any] = {
    "enable_idempotence": True,
    "acks": "all",
    "retries": 2_147_483_647,
    "max_in_flight_requests_per_connection": 5,
    "linger_ms": 10,
    "batch_size": 256 * 1024,
    "compression_type": "gzip",
    "metrics_enabled": False,
    "delivery_timeout_ms": 30_000,
    "request_timeout_ms": 10_000,
    "max_block_ms": 10_000,
    "bootstrap_timeout_ms": 5_000,
    "reconnect_backoff_max_ms": 2_000,
}
ADMIN_OPTIONS: dict[str, Any] = {
    "request_timeout_ms": 10_000,
    "bootstrap_timeout_ms": 5_000,
}

# Kafka errors that no retry can cure; any other error is retried.
_PERMANENT_KAFKA_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRecordError,
    kafka_errors.AuthorizationError,
    kafka_errors.InvalidTopicError,
    kafka_errors.PolicyViolationError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.KafkaConfigurationError,
)


# -- errors ------------------------------------------------------------------


class BrokerUnavailable(ProgressionError):
    """Kafka could not be reached or did not acknowledge in time."""

    retriable = True

    def __init__(
        self,
        topic: str,
        message: str,
        *,
        partition: int | None = None,
        position: int | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.position = position
        super().__init__(message)


class PublishRefused(ProgressionError):
    """Kafka refused an event, or the topic, in a way no retry can cure."""

    def __init__(
        self,
        topic: str,
        message: str,
        *,
        partition: int | None = None,
        position: int | None = None,
        event_id: str | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.position = position
        self.event_id = event_id
        super().__init__(message)


class RelayLockLost(ProgressionError):
    """This relay no longer holds the lock; another may be publishing."""

    retriable = True

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        super().__init__(f"the relay lock for topic {topic!r} is lost: {reason}")


def _kafka_error(
    error: Exception,
    topic: str,
    *,
    partition: int | None = None,
    event: RecordedEvent | None = None,
) -> BrokerUnavailable | PublishRefused:
    """Our error for a Kafka client error: refused for good, or worth a retry."""
    position = None if event is None else event.position
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, _PERMANENT_KAFKA_ERRORS):
        return PublishRefused(
            topic,
            message,
            partition=partition,
            position=position,
            event_id=None if event is None else event.event_id,
        )
    return BrokerUnavailable(topic, message, partition=partition, position=position)


# -- the message ---------------------------------------------------------------


def encode_key(event: RecordedEvent) -> bytes:
    """The message key: the deal id, UTF-8."""
    return event.deal_id.encode("utf-8")


def encode_value(event: RecordedEvent) -> bytes:
    """The message value: the envelope as compact JSON.

    Non-ASCII characters are escaped, so the bytes are plain ASCII (valid
    UTF-8) and any string the log holds survives, even a lone surrogate.
    """
    return json.dumps(event.envelope(), separators=(",", ":")).encode("ascii")


def _partition_of(key: bytes, partitions: Sequence[int]) -> int:
    # The Java client's default for keyed records (murmur2, sign bit off),
    # chosen here so that every log line about an event can name it.
    index = int(murmur2(key) & 0x7FFFFFFF) % len(partitions)
    return partitions[index]


# -- Kafka ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Delivery:
    """What became of one batch."""

    acknowledged: int  # events acknowledged, counted from the batch's start
    position: int | None  # position of the last of them
    partitions: tuple[int, ...]  # partitions the acknowledged events went to
    error: BrokerUnavailable | PublishRefused | None


class InFlight:
    """One batch handed to the producer, until Kafka has answered for all of it."""

    def __init__(self, topic: str, batch: Sequence[RecordedEvent]) -> None:
        self.topic = topic
        self.batch = batch
        self.sent: list[tuple[RecordedEvent, int, Any]] = []
        self.send_error: BrokerUnavailable | PublishRefused | None = None
        self._unanswered = 0
        self._sealed = False
        self._guard = threading.Lock()
        self._answered = threading.Event()
        self._handed_at = self._warned_at = time.monotonic()
        # The producer answers for every record within its delivery timeout;
        # kafka-python 3.0 can leave some unanswered for good after a batch
        # expired, so the relay stops waiting a little after that.
        delivery_timeout_s = float(PRODUCER_OPTIONS["delivery_timeout_ms"]) / 1000
        self._give_up_at = self._handed_at + delivery_timeout_s + ACK_MARGIN_S

    @property
    def first_position(self) -> int:
        return self.batch[0].position

    def add(self, event: RecordedEvent, partition: int, future: Any) -> None:
        self.sent.append((event, partition, future))
        with self._guard:
            self._unanswered += 1
        future.add_both(self._answer)  # runs at once if already answered

    def seal(self) -> None:
        """Nothing more will be added; answered once every future is."""
        with self._guard:
            self._sealed = True
            if self._unanswered == 0:
                self._answered.set()

    def wait(self, timeout_s: float) -> bool:
        return self._answered.wait(timeout_s)

    @property
    def overdue(self) -> bool:
        return time.monotonic() >= self._give_up_at

    def warn_if_slow(self, recorded_position: int) -> None:
        """A WARNING every ACK_WARN_EVERY_S while Kafka has not answered.

        Meanwhile the producer retries by itself, up to its delivery timeout.
        """
        now = time.monotonic()
        if now - self._warned_at < ACK_WARN_EVERY_S:
            return
        self._warned_at = now
        waiting = [
            (event, partition)
            for event, partition, future in self.sent
            if not future.is_done
        ]
        if not waiting:
            return
        event, _ = waiting[0]
        logger.warning(
            "kafka has not acknowledged yet, the producer retries topic=%s "
            "partitions=%s position=%d first_unacknowledged=%d waited_s=%.1f",
            self.topic,
            ",".join(str(p) for p in sorted({p for _, p in waiting})),
            recorded_position,
            event.position,
            now - self._handed_at,
        )

    def delivery(self, unanswered: str = "") -> _Delivery:
        """The acknowledged start of the batch, and the first failure after it.

        `unanswered` says why events without an answer yet count as failed.
        """
        acknowledged = 0
        position: int | None = None
        partitions: set[int] = set()
        error = self.send_error
        for event, partition, future in self.sent:
            if not future.succeeded():
                if future.failed():
                    error = _kafka_error(
                        future.exception, self.topic, partition=partition, event=event
                    )
                break
            acknowledged += 1
            position = event.position
            partitions.add(partition)
        if error is None and acknowledged < len(self.batch):
            error = BrokerUnavailable(
                self.topic,
                unanswered or "not acknowledged",
                partition=self.sent[acknowledged][1]
                if acknowledged < len(self.sent)
                else None,
                position=self.batch[acknowledged].position,
            )
        return _Delivery(acknowledged, position, tuple(sorted(partitions)), error)

    def _answer(self, _result: object) -> None:
        # Called on the producer's thread.
        with self._guard:
            self._unanswered -= 1
            if self._sealed and self._unanswered == 0:
                self._answered.set()


class Publisher:
    """The topic and a producer, created on first use and after a failure."""

    def __init__(self, settings: Settings, topic: str, client_id: str) -> None:
        self._settings = settings
        self._topic = topic
        self._client_id = client_id
        self._bootstrap = settings.kafka_bootstrap.split(",")
        self._producer: Any = None
        self._topic_ready = False

    def send(self, batch: Sequence[RecordedEvent]) -> InFlight:
        """Hand the batch to the producer; Kafka's answers come later.

        A failure to send part of it is kept in the result (`send_error`):
        what was handed over is still answered for, the rest goes again.
        """
        topic = self._topic
        flight = InFlight(topic, batch)
        try:
            producer = self._connect(batch[0])
            partitions = sorted(producer.partitions_for(topic))
        except kafka_errors.KafkaError as error:
            flight.send_error = _kafka_error(error, topic, event=batch[0])
        except (BrokerUnavailable, PublishRefused) as error:
            flight.send_error = error
        else:
            for event in batch:
                key = encode_key(event)
                partition = _partition_of(key, partitions)
                try:
                    future = producer.send(
                        topic, key=key, value=encode_value(event), partition=partition
                    )
                except kafka_errors.KafkaError as error:
                    flight.send_error = _kafka_error(
                        error, topic, partition=partition, event=event
                    )
                    break
                flight.add(event, partition, future)
        flight.seal()
        return flight

    def _connect(self, first: RecordedEvent) -> Any:
        topic = self._topic
        try:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    client_id=self._client_id,
                    **PRODUCER_OPTIONS,
                )
                logger.info(
                    "producer connected topic=%s from_position=%d bootstrap=%s",
                    topic,
                    first.position,
                    self._settings.kafka_bootstrap,
                )
            # Only once a producer got through: kafka-python 3.0 leaves a
            # thread behind for every admin client that fails to bootstrap,
            # which would add up while the broker is down.
            if not self._topic_ready:
                self._ensure_topic()
                self._topic_ready = True
        except kafka_errors.KafkaError as error:
            raise _kafka_error(error, topic, event=first) from error
        return self._producer

    def _ensure_topic(self) -> None:
        """Create the topic with the configured partitions, unless it exists."""
        settings = self._settings
        topic = self._topic
        admin = KafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admin",
            **ADMIN_OPTIONS,
        )
        try:
            admin.create_topics(
                {
                    topic: {
                        "num_partitions": settings.kafka_partitions,
                        "replication_factor": settings.kafka_replication_factor,
                    }
                },
                wait_for_metadata=True,
            )
            logger.info(
                "topic created topic=%s partitions=%d replication_factor=%d",
                topic,
                settings.kafka_partitions,
                settings.kafka_replication_factor,
            )
        except kafka_errors.TopicAlreadyExistsError:
            [described] = admin.describe_topics([topic])
            count = len(described.get("partitions") or [])
            logger.info(
                "topic exists topic=%s partitions=%d configured_partitions=%d",
                topic,
                count,
                settings.kafka_partitions,
            )
        finally:
            admin.close()

    def reset(self) -> None:
        """Drop the producer; the next batch starts a fresh one."""
        self.close(timeout_s=0)

    def close(self, timeout_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout_s)
            return
        except kafka_errors.KafkaTimeoutError:
            pass
        # kafka-python 3.0's close() gives up at its flush while records are
        # unanswered and leaves the producer's I/O thread running. Stopping
        # that thread without sending fails what is left; then close() can
        # finish. (The thread is not public API: checked against 3.0.12.)
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(PRODUCER_JOIN_S)
        try:
            producer.close(timeout=PRODUCER_JOIN_S)
        except kafka_errors.KafkaError as error:
            logger.warning(
                "producer did not close cleanly topic=%s error=%s",
                self._topic,
                _text(error),
            )


# -- the lock ------------------------------------------------------------------


class _Lock(Protocol):
    """The right to publish to one topic, and the position recorded under it."""

    kind: str

    def try_acquire(self) -> bool: ...

    def holder(self) -> str: ...

    def check(self) -> None: ...

    def progress(self) -> int: ...

    def record(self, position: int) -> None: ...

    def release(self) -> None: ...


def relay_lock_key(topic: str) -> int:
    """The PostgreSQL advisory lock key of the relay for `topic`.

    A signed 64-bit hash of the topic name; the other keys of this database
    (the commit-order and migration locks) are fixed spellings of ASCII
    words, which a hash meets with a chance of about one in 2**63.
    """
    digest = hashlib.blake2b(
        b"progression relay\0" + topic.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _text(error: BaseException) -> str:
    """An error for a log line, as text: a record keeps no traceback alive."""
    return str(getattr(error, "orig", None) or error)


def _now() -> datetime:
    return datetime.now(UTC)


def _unavailable(operation: str, error: Exception) -> StorageUnavailable:
    cause = getattr(error, "orig", None) or error
    return StorageUnavailable(f"could not {operation}: {cause}")


def _read_progress(connection: sa.Connection, topic: str) -> int | None:
    query = sa.select(relay_progress.c.position).where(relay_progress.c.topic == topic)
    position = connection.execute(query).scalar_one_or_none()
    return None if position is None else int(position)


def _start_progress(connection: sa.Connection, topic: str) -> int:
    """The recorded position, after creating the row at 0 when there is none."""
    position = _read_progress(connection, topic)
    if position is not None:
        return position
    connection.execute(
        sa.insert(relay_progress).values(topic=topic, position=0, updated_at=_now())
    )
    return 0


def _write_progress(connection: sa.Connection, topic: str, position: int) -> None:
    connection.execute(
        sa.update(relay_progress)
        .where(relay_progress.c.topic == topic)
        .values(position=position, updated_at=_now())
    )


class _AdvisoryLock:
    """PostgreSQL: a session-level advisory lock on a connection of its own.

    The connection is held for as long as the lock, and the position is
    recorded through it: when the session ends, so do the lock and the
    relay's ability to record. The connection is never handed back to the
    pool (a pooled session would keep the lock); it is closed for good.
    """

    kind = "postgres-advisory-lock"

    def __init__(self, engine: sa.Engine, topic: str, name: str) -> None:
        self._engine = engine
        self._topic = topic
        self._key = relay_lock_key(topic)
        self._name = name
        self._connection: sa.Connection | None = None
        self._held = False
        self._pinged_at = 0.0

    def try_acquire(self) -> bool:
        try:
            connection = self._connection
            if connection is None:
                connection = self._engine.connect()
                self._connection = connection
                connection.execution_options(isolation_level="AUTOCOMMIT")
                connection.execute(
                    sa.select(sa.func.set_config("application_name", self._name, False))
                )
            held = connection.execute(
                sa.select(sa.func.pg_try_advisory_lock(self._key))
            ).scalar_one()
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            self._drop()
            raise _unavailable("take the relay lock", error) from error
        self._held = bool(held)
        self._pinged_at = time.monotonic()
        return self._held

    def holder(self) -> str:
        """Who holds the lock, from pg_locks; best effort."""
        query = sa.text(
            "SELECT a.pid, a.application_name, host(a.client_addr) "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND CAST(l.classid AS bigint) = :high AND CAST(l.objid AS bigint) = :low"
        )
        unsigned = self._key & 0xFFFF_FFFF_FFFF_FFFF
        try:
            with deferred(self._engine).connect() as connection:
                row = connection.execute(
                    query, {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF}
                ).first()
        except (sa.exc.DBAPIError, sa.exc.TimeoutError):
            return "unknown"
        if row is None:
            return "unknown"
        return f"{row[1] or '?'} (backend pid {row[0]}, client {row[2] or 'local'})"

    def check(self) -> None:
        if not self._held or self._connection is None:
            raise RelayLockLost(self._topic, "not held")
        if time.monotonic() - self._pinged_at < LOCK_PING_EVERY_S:
            return
        self._on_lock_connection("check the lock's session", sa.text("SELECT 1"))
        self._pinged_at = time.monotonic()

    def progress(self) -> int:
        connection = self._holding()
        try:
            return _start_progress(connection, self._topic)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            self._drop()
            raise RelayLockLost(
                self._topic, f"reading the position failed: {error}"
            ) from error

    def record(self, position: int) -> None:
        connection = self._holding()
        try:
            _write_progress(connection, self._topic, position)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            self._drop()
            raise RelayLockLost(
                self._topic, f"recording the position failed: {error}"
            ) from error
        self._pinged_at = time.monotonic()

    def release(self) -> None:
        connection = self._connection
        if connection is not None and self._held:
            try:
                connection.execute(sa.select(sa.func.pg_advisory_unlock(self._key)))
            except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
                logger.warning(
                    "relay lock not released, its session ends instead topic=%s "
                    "error=%s",
                    self._topic,
                    _text(error),
                )
        self._drop()

    def _holding(self) -> sa.Connection:
        if not self._held or self._connection is None:
            raise RelayLockLost(self._topic, "not held")
        return self._connection

    def _on_lock_connection(self, operation: str, statement: sa.Executable) -> None:
        connection = self._holding()
        try:
            connection.execute(statement)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            self._drop()
            raise RelayLockLost(
                self._topic, f"could not {operation}: {error}"
            ) from error

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._held = False
        if connection is None:
            return
        try:
            connection.invalidate()
            connection.close()
        except sa.exc.SQLAlchemyError:
            pass


class _Lease:
    """SQLite: a lease row, renewed by a thread, taken over once expired."""

    kind = "sqlite-lease"

    def __init__(
        self, engine: sa.Engine, topic: str, holder: str, ttl_s: float
    ) -> None:
        self._engine = engine
        self._topic = topic
        self._holder = holder
        self._ttl = timedelta(seconds=ttl_s)
        self._renew_s = min(LEASE_RENEW_S, ttl_s / 3)
        self._other = "unknown"
        self._lost = threading.Event()
        self._stop_keeper = threading.Event()
        self._keeper: threading.Thread | None = None

    def try_acquire(self) -> bool:
        now = _now()
        previous = None
        try:
            with self._engine.begin() as connection:
                row = connection.execute(
                    sa.select(relay_lease.c.holder, relay_lease.c.expires_at).where(
                        relay_lease.c.topic == self._topic
                    )
                ).one_or_none()
                if row is not None and row.holder != self._holder:
                    if row.expires_at > now:
                        self._other = f"{row.holder} until {row.expires_at.isoformat()}"
                        return False
                    previous = row
                values = {
                    "holder": self._holder,
                    "acquired_at": now,
                    "expires_at": now + self._ttl,
                }
                if row is None:
                    connection.execute(
                        sa.insert(relay_lease).values(topic=self._topic, **values)
                    )
                else:
                    connection.execute(
                        sa.update(relay_lease)
                        .where(relay_lease.c.topic == self._topic)
                        .values(**values)
                    )
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("take the relay lease", error) from error

        if previous is not None:
            logger.info(
                "expired relay lease taken over topic=%s previous_holder=%s "
                "expired_at=%s",
                self._topic,
                previous.holder,
                previous.expires_at.isoformat(),
            )
        self._lost.clear()
        self._stop_keeper.clear()
        self._keeper = threading.Thread(
            target=self._keep, name=f"relay-lease-{self._topic}", daemon=True
        )
        self._keeper.start()
        return True

    def holder(self) -> str:
        return self._other

    def check(self) -> None:
        if self._lost.is_set():
            raise RelayLockLost(self._topic, "the lease was taken over")

    def progress(self) -> int:
        try:
            with self._engine.begin() as connection:
                return _start_progress(connection, self._topic)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("read the relay's position", error) from error

    def record(self, position: int) -> None:
        try:
            with self._engine.begin() as connection:
                if not self._renew(connection):
                    self._lost.set()
                    raise RelayLockLost(self._topic, "the lease was taken over")
                _write_progress(connection, self._topic, position)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("record the relay's position", error) from error

    def release(self) -> None:
        self._stop_keeper.set()
        if self._keeper is not None:
            self._keeper.join(timeout=LEASE_RENEW_S + 35)
            self._keeper = None
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    sa.delete(relay_lease).where(
                        relay_lease.c.topic == self._topic,
                        relay_lease.c.holder == self._holder,
                    )
                )
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            logger.warning(
                "relay lease not released, it will expire instead topic=%s error=%s",
                self._topic,
                _text(error),
            )

    def _renew(self, connection: sa.Connection) -> bool:
        result = connection.execute(
            sa.update(relay_lease)
            .where(
                relay_lease.c.topic == self._topic,
                relay_lease.c.holder == self._holder,
            )
            .values(expires_at=_now() + self._ttl)
        )
        return result.rowcount == 1

    def _keep(self) -> None:
        while not self._stop_keeper.wait(self._renew_s):
            try:
                with self._engine.begin() as connection:
                    renewed = self._renew(connection)
            except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
                logger.warning(
                    "relay lease not renewed, retrying topic=%s retry_in_s=%.1f "
                    "error=%s",
                    self._topic,
                    self._renew_s,
                    _text(error),
                )
                continue
            if not renewed:
                logger.warning(
                    "relay lease taken over by another relay topic=%s", self._topic
                )
                self._lost.set()
                return


# -- the relay -----------------------------------------------------------------


class _Backoff:
    def __init__(self) -> None:
        self._next_s = BACKOFF_FIRST_S

    def next(self) -> float:
        delay, self._next_s = self._next_s, min(BACKOFF_MAX_S, self._next_s * 2)
        return delay

    def reset(self) -> None:
        self._next_s = BACKOFF_FIRST_S


class Relay:
    """Publishes the event log to the configured topic while it holds the lock.

    `run` blocks until its `stop` event is set; one thread runs it. The
    attributes are for observing it: `active` is set while it holds the lock,
    `position` is the last position it recorded, `published` counts the
    events Kafka acknowledged to it (a resent event counts again).
    """

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._topic = settings.kafka_topic
        self._log = EventLog(engine)
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.active = threading.Event()
        self.position: int | None = None
        self.published = 0
        self._lock: _Lock
        if engine.dialect.name == "postgresql":
            name = f"progression relay {self.identity}"[:63]
            self._lock = _AdvisoryLock(engine, self._topic, name)
        else:
            self._lock = _Lease(engine, self._topic, self.identity, lease_ttl_s)

    @property
    def topic(self) -> str:
        return self._topic

    def recorded_position(self) -> int | None:
        """The position recorded for the topic; None before any relay ran."""
        try:
            with deferred(self._engine).connect() as connection:
                return _read_progress(connection, self._topic)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as error:
            raise _unavailable("read the relay's position", error) from error

    def run(self, stop: threading.Event) -> None:
        """Publish until `stop` is set, standing by while another relay is active.

        Raises PublishRefused when Kafka refuses an event for good.
        """
        logger.info(
            "relay starting topic=%s position=%s lock=%s relay=%s",
            self._topic,
            self._position_or_unknown(),
            self._lock.kind,
            self.identity,
        )
        backoff = _Backoff()
        while not stop.is_set():
            if not self._acquire(stop):
                break
            delay = 0.0
            try:
                self._publish(stop)
            except RelayLockLost as error:
                logger.warning(
                    "relay lock lost, standing by topic=%s position=%s error=%s",
                    self._topic,
                    self.position,
                    _text(error),
                )
            except StorageUnavailable as error:
                delay = backoff.next()
                logger.warning(
                    "database unavailable, letting the lock go and retrying "
                    "topic=%s position=%s retry_in_s=%.1f error=%s",
                    self._topic,
                    self.position,
                    delay,
                    _text(error),
                )
            else:
                backoff.reset()
            finally:
                self.active.clear()
                self._lock.release()
            stop.wait(delay)
        logger.info(
            "relay stopped topic=%s position=%s published=%d",
            self._topic,
            self.position,
            self.published,
        )

    def _acquire(self, stop: threading.Event) -> bool:
        """Take the lock, trying every second; False if stopped first."""
        backoff = _Backoff()
        logged_at: float | None = None
        while not stop.is_set():
            try:
                if self._lock.try_acquire():
                    return True
            except StorageUnavailable as error:
                delay = backoff.next()
                logger.warning(
                    "database unavailable, retrying the relay lock topic=%s "
                    "position=%s retry_in_s=%.1f error=%s",
                    self._topic,
                    self.position,
                    delay,
                    _text(error),
                )
                stop.wait(delay)
                continue
            backoff.reset()
            now = time.monotonic()
            if logged_at is None or now - logged_at >= STANDBY_LOG_EVERY_S:
                logged_at = now
                logger.info(
                    "relay standing by, another relay is active topic=%s "
                    "position=%s lock=%s held_by=%s",
                    self._topic,
                    self._position_or_unknown(),
                    self._lock.kind,
                    self._lock.holder(),
                )
            stop.wait(STANDBY_RETRY_S)
        return False

    def _publish(self, stop: threading.Event) -> None:
        """Publish from the recorded position while the lock holds.

        Up to IN_FLIGHT_BATCHES batches are with the producer at once; they
        are settled oldest first, and the position moves only over events
        Kafka has acknowledged together with everything before them.
        """
        settings = self._settings
        topic = self._topic
        position = self._lock.progress()
        recorded = self.position = position
        self.active.set()
        logger.info(
            "relay active topic=%s position=%d lock=%s relay=%s",
            topic,
            position,
            self._lock.kind,
            self.identity,
        )

        publisher = Publisher(settings, topic, f"progression-relay-{self.identity}")
        window: deque[InFlight] = deque()
        sent_to = position  # the last position handed to the producer
        report = _Report(topic)
        backoff = _Backoff()
        poll_s = settings.relay_poll_interval_ms / 1000
        try:
            while not stop.is_set():
                self._lock.check()
                if recorded < position:
                    recorded = self._record(position, recorded)

                # Settle the oldest batch once Kafka has answered for all of
                # it, or once the producer is overdue with an answer.
                if window and (window[0].wait(0) or window[0].overdue):
                    flight = window.popleft()
                    delivery = flight.delivery(
                        "no answer from the producer within its delivery timeout"
                    )
                    if delivery.position is not None:
                        position = delivery.position
                        self.published += delivery.acknowledged
                        recorded = self._record(position, recorded)
                        report.published(flight.first_position, delivery)
                    if delivery.error is None:
                        backoff.reset()
                        continue
                    # Everything after the failure goes again, in order, from
                    # a fresh producer.
                    window.clear()
                    publisher.reset()
                    sent_to = position
                    self._retry_or_give_up(delivery.error, position, backoff, stop)
                    continue

                # Hand the next batch over, unless a send already failed.
                if len(window) < IN_FLIGHT_BATCHES and not (
                    window and window[-1].send_error
                ):
                    try:
                        batch = self._log.feed(sent_to, settings.relay_batch_size)
                    except StorageUnavailable as error:
                        if not window:
                            delay = backoff.next()
                            logger.warning(
                                "event log unavailable, retrying topic=%s "
                                "position=%d retry_in_s=%.1f error=%s",
                                topic,
                                position,
                                delay,
                                _text(error),
                            )
                            stop.wait(delay)
                            continue
                        batch = []
                    if batch:
                        window.append(publisher.send(batch))
                        sent_to = batch[-1].position
                        continue
                    if not window:
                        report.idle(position)
                        stop.wait(poll_s)
                        continue

                if not window[0].wait(ACK_WAIT_SLICE_S):
                    window[0].warn_if_slow(position)

            # Stopping: what is in flight may still be acknowledged.
            give_up_at = time.monotonic() + STOP_GRACE_S
            while window:
                flight = window.popleft()
                flight.wait(max(0.0, give_up_at - time.monotonic()))
                delivery = flight.delivery("not acknowledged before the relay stopped")
                if delivery.position is not None:
                    position = delivery.position
                    self.published += delivery.acknowledged
                    recorded = self._record(position, recorded)
                    report.published(flight.first_position, delivery)
                if delivery.error is not None:
                    logger.info(
                        "stopping before kafka acknowledged everything topic=%s "
                        "partition=%s position=%d unacknowledged_from=%s",
                        topic,
                        delivery.error.partition,
                        position,
                        delivery.error.position,
                    )
                    break
        finally:
            publisher.close(timeout_s=0 if window else 1.0)
            if recorded < position:
                self._record(position, recorded)

    def _record(self, position: int, recorded: int) -> int:
        """Record the position; on a database failure keep the old one."""
        try:
            self._lock.record(position)
        except StorageUnavailable as error:
            logger.warning(
                "position not recorded, retrying with the next batch topic=%s "
                "position=%d recorded_position=%d error=%s",
                self._topic,
                position,
                recorded,
                _text(error),
            )
            return recorded
        self.position = position
        return position

    def _retry_or_give_up(
        self,
        error: BrokerUnavailable | PublishRefused,
        position: int,
        backoff: _Backoff,
        stop: threading.Event,
    ) -> None:
        if isinstance(error, PublishRefused):
            logger.error(
                "kafka refused an event, the relay gives up topic=%s partition=%s "
                "position=%s event_id=%s recorded_position=%d error=%s",
                error.topic,
                error.partition,
                error.position,
                error.event_id,
                position,
                _text(error),
            )
            raise error
        delay = backoff.next()
        logger.warning(
            "kafka unavailable, retrying topic=%s partition=%s position=%s "
            "recorded_position=%d retry_in_s=%.1f error=%s",
            error.topic,
            error.partition,
            error.position,
            position,
            delay,
            _text(error),
        )
        stop.wait(delay)

    def _position_or_unknown(self) -> str:
        try:
            return str(self.recorded_position())
        except StorageUnavailable:
            return "unknown"


class _Report:
    """INFO lines about progress: on catching up, then at most every 30 s."""

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._published = 0
        self._caught_up = False
        self._reported_at = time.monotonic()

    def published(self, first_position: int, delivery: _Delivery) -> None:
        self._published += delivery.acknowledged
        logger.debug(
            "batch published topic=%s partitions=%s first_position=%d position=%s "
            "events=%d",
            self._topic,
            ",".join(map(str, delivery.partitions)),
            first_position,
            delivery.position,
            delivery.acknowledged,
        )
        if time.monotonic() - self._reported_at >= PROGRESS_LOG_EVERY_S:
            self._log("relay publishing", delivery.position)

    def idle(self, position: int) -> None:
        if not self._caught_up:
            self._caught_up = True
            self._log("relay caught up", position)
        elif self._published and (
            time.monotonic() - self._reported_at >= PROGRESS_LOG_EVERY_S
        ):
            self._log("relay caught up", position)

    def _log(self, what: str, position: int | None) -> None:
        logger.info(
            "%s topic=%s position=%s published=%d",
            what,
            self._topic,
            position,
            self._published,
        )
        self._published = 0
        self._reported_at = time.monotonic()
