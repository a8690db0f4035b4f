"""The projector's progress and the parked events, as the API shows them."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any

import sqlalchemy as sa

from metrics.answers import (
    ParkedAnswer,
    ParkedEvent,
    ParkedEventDetail,
    PartitionStatus,
    ProjectorStatus,
    RebuildStatus,
)
from metrics.filters import format_micros
from metrics.settings import Settings
from metrics.tables import consumer_offsets, feed_position, parked_events, rebuilds

__all__ = [
    "KafkaEndOffsets",
    "parked",
    "parked_event",
    "projector_status",
    "rebuild_status",
    "with_lag",
]

logger = logging.getLogger(__name__)

_RETRY_AFTER_FAILURE_S = 2.0


class KafkaEndOffsets:
    """Asks the broker for the log-end offsets, for the lag.

    Kept apart from the projector's consumer: the API may run in another
    process. After a failure it does not ask again for 2 s, so an
    unreachable broker slows down at most one status request in that time
    (a failure while the topic is still being created clears itself soon).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer: Any = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    def ends(self, topic: str, partitions: list[int]) -> dict[int, int] | None:
        if not partitions:
            return {}
        with self._lock:
            if time.monotonic() - self._failed_at < _RETRY_AFTER_FAILURE_S:
                return None
            try:
                with warnings.catch_warnings():
                    # see metrics.consumer: a deprecation inside kafka-python
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from kafka import KafkaConsumer, TopicPartition
                    from kafka.errors import KafkaError

                if self._consumer is None:
                    self._consumer = KafkaConsumer(
                        bootstrap_servers=self._settings.kafka_bootstrap.split(","),
                        enable_auto_commit=False,
                        request_timeout_ms=31_000,
                        reconnect_backoff_max_ms=(
                            self._settings.kafka_reconnect_backoff_max_ms
                        ),
                    )
                found = self._consumer.end_offsets(
                    [TopicPartition(topic, p) for p in partitions]
                )
                return {tp.partition: int(offset) for tp, offset in found.items()}
            except (KafkaError, OSError, ValueError) as error:
                self._failed_at = time.monotonic()
                logger.warning(
                    "kafka end offsets unavailable, lag unknown bootstrap=%s "
                    "topic=%s error=%r",
                    self._settings.kafka_bootstrap,
                    topic,
                    error,
                )
                self.close()
                return None

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            finally:
                self._consumer = None


def projector_status(
    connection: sa.Connection, topic: str, ends: KafkaEndOffsets | None
) -> ProjectorStatus:
    o = consumer_offsets.c
    rows = connection.execute(
        sa.select(consumer_offsets).where(o.topic == topic).order_by(o.partition)
    ).all()
    feed = connection.execute(sa.select(feed_position)).first()
    parked_count = connection.execute(
        sa.select(sa.func.count()).select_from(parked_events)
    ).scalar_one()

    end_offsets = ends.ends(topic, [row.partition for row in rows]) if ends else None
    partitions = []
    for row in rows:
        end = end_offsets.get(row.partition) if end_offsets else None
        partitions.append(
            PartitionStatus(
                partition=row.partition,
                next_offset=row.next_offset,
                end_offset=end,
                lag=max(0, end - row.next_offset) if end is not None else None,
                last_position=row.last_position,
                events_applied=row.events_applied,
                events_skipped=row.events_skipped,
                events_parked=row.events_parked,
                updated_at=format_micros(row.updated_us),
            )
        )

    kafka_updated = max((row.updated_us for row in rows), default=None)
    feed_updated = feed.updated_us if feed is not None else None
    source = None
    if kafka_updated is not None or feed_updated is not None:
        source = "kafka" if (kafka_updated or 0) >= (feed_updated or 0) else "feed"
    positions = [row.last_position for row in rows if row.last_position is not None]
    if feed is not None:
        positions.append(feed.last_position)
    updated = max(x for x in (kafka_updated, feed_updated, 0) if x is not None)
    return ProjectorStatus(
        source=source,
        topic=topic if rows else None,
        partitions=partitions,
        feed_url=feed.feed_url if feed is not None else None,
        last_position=max(positions, default=None),
        events_applied=sum(row.events_applied for row in rows)
        + (feed.events_applied if feed is not None else 0),
        events_skipped=sum(row.events_skipped for row in rows)
        + (feed.events_skipped if feed is not None else 0),
        parked=parked_count,
        updated_at=format_micros(updated) if updated else None,
        rebuild=rebuild_status(connection),
    )


def with_lag(status: ProjectorStatus, ends: KafkaEndOffsets | None) -> ProjectorStatus:
    """The status with the broker's end offsets and the lag of each
    partition. Asked after the database transaction that read the status
    has ended: a broker that is slow to answer must not keep the read
    models' tables locked (a rebuild's switch waits for those locks)."""
    if ends is None or status.topic is None or not status.partitions:
        return status
    found = ends.ends(status.topic, [p.partition for p in status.partitions])
    if not found:
        return status
    partitions = []
    for partition in status.partitions:
        end = found.get(partition.partition)
        lag = max(0, end - partition.next_offset) if end is not None else None
        partitions.append(partition.model_copy(update={"end_offset": end, "lag": lag}))
    return status.model_copy(update={"partitions": partitions})


def rebuild_status(connection: sa.Connection) -> RebuildStatus | None:
    """The latest rebuild: the one in progress, or the last one that ended."""
    row = connection.execute(
        sa.select(rebuilds).order_by(rebuilds.c.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    fraction = None
    if row.total:
        fraction = round(min(1.0, row.done / row.total), 4)
    return RebuildStatus(
        id=row.id,
        source=row.source,
        state=row.state,
        started_at=format_micros(row.started_us),
        updated_at=format_micros(row.updated_us),
        finished_at=format_micros(row.finished_us) if row.finished_us else None,
        runs=row.runs,
        done=row.done,
        total=row.total,
        fraction_done=fraction,
        events_applied=row.events_applied,
        last_position=row.last_position,
    )


def parked(connection: sa.Connection, after: int, limit: int) -> ParkedAnswer:
    """Parked events in the order they were parked, `limit` after id `after`."""
    p = parked_events.c
    count = connection.execute(
        sa.select(sa.func.count()).select_from(parked_events)
    ).scalar_one()
    rows = connection.execute(
        sa.select(parked_events).where(p.id > after).order_by(p.id).limit(limit)
    ).all()
    events = [ParkedEvent(**_fields(row)) for row in rows]
    next_after = events[-1].id if len(events) == limit else None
    return ParkedAnswer(count=count, events=events, next_after=next_after)


def parked_event(connection: sa.Connection, parked_id: int) -> ParkedEventDetail | None:
    """One parked event, and the earlier parked event of its deal that holds
    it back, if any; None when no parked event has that id."""
    p = parked_events.c
    row = connection.execute(sa.select(parked_events).where(p.id == parked_id)).first()
    if row is None:
        return None
    held_behind = None
    if row.stream_version is not None:
        held_behind = connection.execute(
            sa.select(p.id)
            .where(
                p.deal_id == row.deal_id,
                p.stream_version.is_not(None),
                p.stream_version < row.stream_version,
            )
            .order_by(p.stream_version)
            .limit(1)
        ).scalar_one_or_none()
    return ParkedEventDetail(**_fields(row), held_behind=held_behind)


def _fields(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "parked_at": format_micros(row.parked_us),
        "source": row.source,
        "topic": row.topic,
        "partition": row.partition,
        "offset": row.offset,
        "position": row.position,
        "event_id": row.event_id,
        "deal_id": row.deal_id,
        "type": row.event_type,
        "error": row.error,
        "raw": row.raw,
        "stream_version": row.stream_version,
    }
