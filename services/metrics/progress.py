"""How far each source got, stored in the read-model database.

The progress is written in the same transaction as the read-model changes
of a batch (see `Projection.apply`). Every write names the value it expects
to replace; when another projector changed it first, the write raises
`OffsetConflict` and the whole batch is rolled back, so two projectors that
briefly both hold a partition (during a rebalance) never apply the same
events twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import sqlalchemy as sa

from metrics.errors import OffsetConflict, StorageUnavailable
from metrics.projection import BatchResult, ProgressWriter
from metrics.tables import consumer_offsets, feed_position

__all__ = ["FEED_KEY", "FeedProgress", "KafkaOffsets"]

FEED_KEY = "feed"


def _now_us() -> int:
    return time.time_ns() // 1000


class KafkaOffsets:
    """The next offset to read per partition of one topic."""

    def __init__(self, engine: sa.Engine, topic: str) -> None:
        self._engine = engine
        self.topic = topic

    def stored(self, partitions: Iterable[int]) -> dict[int, int]:
        wanted = sorted(set(partitions))
        if not wanted:
            return {}
        query = sa.select(
            consumer_offsets.c.partition, consumer_offsets.c.next_offset
        ).where(
            consumer_offsets.c.topic == self.topic,
            consumer_offsets.c.partition.in_(wanted),
        )
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(query).all()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            raise StorageUnavailable(f"read-model database: {error}") from error
        return {row.partition: row.next_offset for row in rows}

    def writer(self, expected: dict[int, int | None]) -> ProgressWriter:
        """A progress writer that moves each partition of the batch from the
        offset `expected` holds (None: no row yet) to the batch's next offset."""

        def write(connection: sa.Connection, result: BatchResult) -> None:
            for partition in sorted(p for p in result.by_partition if p is not None):
                tally = result.by_partition[partition]
                if tally.next_offset is None:
                    continue
                before = expected.get(partition)
                values = {
                    "next_offset": tally.next_offset,
                    "updated_us": _now_us(),
                }
                if before is None:
                    try:
                        with connection.begin_nested():
                            connection.execute(
                                consumer_offsets.insert().values(
                                    topic=self.topic,
                                    partition=partition,
                                    last_position=tally.last_position,
                                    events_applied=tally.applied,
                                    events_skipped=tally.skipped,
                                    events_parked=tally.parked,
                                    **values,
                                )
                            )
                    except sa.exc.IntegrityError:
                        raise OffsetConflict(
                            f"topic={self.topic} partition={partition}: offsets "
                            "were stored by another projector"
                        ) from None
                    continue
                c = consumer_offsets.c
                updated = connection.execute(
                    consumer_offsets.update()
                    .where(
                        c.topic == self.topic,
                        c.partition == partition,
                        c.next_offset == before,
                    )
                    .values(
                        last_position=sa.func.coalesce(
                            tally.last_position, c.last_position
                        ),
                        events_applied=c.events_applied + tally.applied,
                        events_skipped=c.events_skipped + tally.skipped,
                        events_parked=c.events_parked + tally.parked,
                        **values,
                    )
                )
                if updated.rowcount != 1:
                    raise OffsetConflict(
                        f"topic={self.topic} partition={partition}: stored offset "
                        f"is no longer {before}; another projector moved it"
                    )

        return write


class FeedProgress:
    """The last feed position applied."""

    def __init__(self, engine: sa.Engine, feed_url: str) -> None:
        self._engine = engine
        self._feed_url = feed_url

    def stored(self) -> int | None:
        query = sa.select(feed_position.c.last_position).where(
            feed_position.c.feed == FEED_KEY
        )
        try:
            with self._engine.connect() as connection:
                return connection.execute(query).scalar_one_or_none()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
            raise StorageUnavailable(f"read-model database: {error}") from error

    def writer(self, expected: int | None, next_after: int) -> ProgressWriter:
        """A progress writer that moves the feed position from `expected`
        (None: never stored) to `next_after`."""

        def write(connection: sa.Connection, result: BatchResult) -> None:
            values = {
                "feed_url": self._feed_url,
                "last_position": next_after,
                "updated_us": _now_us(),
            }
            if expected is None:
                try:
                    with connection.begin_nested():
                        connection.execute(
                            feed_position.insert().values(
                                feed=FEED_KEY,
                                events_applied=result.applied,
                                events_skipped=result.skipped,
                                events_parked=result.parked,
                                **values,
                            )
                        )
                except sa.exc.IntegrityError:
                    raise OffsetConflict(
                        "feed position was stored by another projector"
                    ) from None
                return
            c = feed_position.c
            updated = connection.execute(
                feed_position.update()
                .where(c.feed == FEED_KEY, c.last_position == expected)
                .values(
                    events_applied=c.events_applied + result.applied,
                    events_skipped=c.events_skipped + result.skipped,
                    events_parked=c.events_parked + result.parked,
                    **values,
                )
            )
            if updated.rowcount != 1:
                raise OffsetConflict(
                    f"feed position is no longer {expected}; another projector moved it"
                )

        return write
