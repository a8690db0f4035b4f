"""The Kafka source: a consumer in the projector group, or alone on every
partition for a rebuild.

Offsets live only in the read-model database, committed in the same
transaction as the read-model changes (Kafka's own group offsets are never
committed). On start and on every partition assignment the consumer seeks
each assigned partition to its stored offset, or to the beginning when none
is stored; several projector processes in the group split the partitions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from typing import Any

# kafka-python 3.0 reads its protocol schemas with a deprecated importlib call
# when it is first imported; the warning is the library's, not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer
    from kafka.consumer.subscription_state import ConsumerRebalanceListener
    from kafka.errors import KafkaError

from metrics.errors import HistoryIncomplete, OffsetConflict, StorageUnavailable
from metrics.progress import KafkaOffsets
from metrics.projection import Incoming, Projection
from metrics.settings import Settings

__all__ = ["KafkaSource"]

logger = logging.getLogger(__name__)

# Twice kafka-python's default: a fetch brings about 5,000 recorded events
# of a partition, so a poll of a full batch waits less for the broker (on
# the projector benchmark: a tenth more events/s, 40 MB more memory).
_PARTITION_FETCH_BYTES = 2 * 1024 * 1024


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._source.forget(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._source.seek_to_stored(assigned)


class KafkaSource:
    """Consumes the topic and applies every poll's records, until `stop`."""

    def __init__(
        self,
        settings: Settings,
        projection: Projection,
        offsets: KafkaOffsets,
        *,
        group: bool = True,
        catch_up_within: int | None = None,
    ) -> None:
        """`group`: share the topic's partitions with the other projectors of
        the consumer group; without it, read every partition alone (a
        rebuild). `catch_up_within`: watch the end of the topic and set
        `caught_up` once at most that many records are left to read."""
        self._settings = settings
        self._projection = projection
        self._offsets = offsets
        self._group = group
        self._catch_up_within = catch_up_within
        self._consumer: Any = None
        # What this process believes is stored per partition (None: no row).
        self._expected: dict[int, int | None] = {}
        self._ends_checked = 0.0
        self.applied = 0
        self.caught_up = threading.Event()
        # Records left to read and the end of each partition, as last seen
        # (with `catch_up_within` only).
        self.lag: int | None = None
        self.end_offsets: dict[int, int] = {}

    # -- partition assignment ---------------------------------------------------

    def forget(self, partitions: Any) -> None:
        for tp in partitions:
            self._expected.pop(tp.partition, None)
        if partitions:
            logger.info(
                "partitions revoked topic=%s partitions=%s",
                self._offsets.topic,
                ",".join(str(tp.partition) for tp in sorted(partitions)),
            )

    def seek_to_stored(self, partitions: Any) -> None:
        partitions = sorted(partitions)
        stored = self._offsets.stored(tp.partition for tp in partitions)
        for tp in partitions:
            offset = stored.get(tp.partition)
            if offset is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
            self._expected[tp.partition] = offset
            logger.info(
                "partition assigned topic=%s partition=%d offset=%s",
                tp.topic,
                tp.partition,
                "beginning" if offset is None else offset,
            )

    # -- the loop -----------------------------------------------------------------

    def _connect(self, stop: threading.Event) -> Any:
        settings = self._settings
        delay_s = 0.5
        while not stop.is_set():
            try:
                return KafkaConsumer(
                    bootstrap_servers=settings.kafka_bootstrap.split(","),
                    group_id=settings.kafka_group if self._group else None,
                    client_id=f"metrics-{socket.gethostname()}-{os.getpid()}",
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    max_poll_records=settings.batch_max_events,
                    check_crcs=settings.kafka_check_crcs,
                    max_partition_fetch_bytes=_PARTITION_FETCH_BYTES,
                    request_timeout_ms=max(settings.kafka_request_timeout_ms, 30_001),
                    session_timeout_ms=settings.kafka_session_timeout_ms,
                    # A third of the session timeout at most, as Kafka advises.
                    heartbeat_interval_ms=min(
                        3_000, settings.kafka_session_timeout_ms // 3
                    ),
                    reconnect_backoff_max_ms=settings.kafka_reconnect_backoff_max_ms,
                )
            except KafkaError as error:
                logger.warning(
                    "kafka unreachable, retrying bootstrap=%s topic=%s retry_in_s=%.1f "
                    "error=%r",
                    settings.kafka_bootstrap,
                    settings.kafka_topic,
                    delay_s,
                    error,
                )
                stop.wait(delay_s)
                delay_s = min(settings.feed_backoff_max_ms / 1000, delay_s * 2)
        return None

    def run(self, stop: threading.Event) -> None:
        settings = self._settings
        consumer = self._consumer = self._connect(stop)
        if consumer is None:
            return
        topic = settings.kafka_topic
        if self._group:
            # Subscribed only once the topic exists: subscribing first makes
            # kafka-python log every metadata refresh until it does, and now
            # and then never assign the partitions once it does. Asked of a
            # consumer of its own: a group consumer that fetched the whole
            # cluster's metadata before subscribing was seen to drop out of
            # its group and not come back for a minute.
            probe = KafkaConsumer(
                bootstrap_servers=settings.kafka_bootstrap.split(","),
                enable_auto_commit=False,
            )
            try:
                found = self._wait_for_topic(probe, stop)
            finally:
                probe.close()
            if found is None:
                consumer.close(autocommit=False)
                return
            consumer.subscribe(topics=[topic], listener=_SeekToStored(self))
        else:
            found = self._wait_for_topic(consumer, stop)
            if found is None:
                consumer.close(autocommit=False)
                return
            self._assign_every_partition(consumer, found)
        logger.info(
            "kafka source started bootstrap=%s topic=%s group=%s",
            settings.kafka_bootstrap,
            topic,
            settings.kafka_group if self._group else "none",
        )
        delay_s = 0.2
        try:
            while not stop.is_set():
                records = consumer.poll(
                    timeout_ms=settings.kafka_poll_timeout_ms,
                    max_records=settings.batch_max_events,
                )
                if self._catch_up_within is not None:
                    self._watch_end(consumer, records)
                if not records:
                    continue
                batch = [
                    Incoming(
                        record.value,
                        source="kafka",
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                    )
                    for tp in sorted(records)
                    for record in records[tp]
                ]
                try:
                    result = self._projection.apply(
                        batch, self._offsets.writer(dict(self._expected))
                    )
                except OffsetConflict as error:
                    logger.warning(
                        "offsets moved by another projector, seeking to stored "
                        "topic=%s error=%s",
                        topic,
                        error,
                    )
                    self.seek_to_stored(consumer.assignment())
                    continue
                except StorageUnavailable as error:
                    logger.warning(
                        "database unavailable, retrying topic=%s partitions=%s "
                        "retry_in_s=%.1f error=%s",
                        topic,
                        ",".join(str(tp.partition) for tp in sorted(records)),
                        delay_s,
                        error,
                    )
                    stop.wait(delay_s)
                    delay_s = min(5.0, delay_s * 2)
                    self._reseek_after_failure(consumer, stop)
                    continue
                delay_s = 0.2
                for partition, tally in result.by_partition.items():
                    if partition is not None and tally.next_offset is not None:
                        self._expected[partition] = tally.next_offset
                self.applied += result.applied
                logger.debug(
                    "kafka batch applied topic=%s partitions=%s applied=%d skipped=%d "
                    "parked=%d last_position=%s",
                    topic,
                    ",".join(str(tp.partition) for tp in sorted(records)),
                    result.applied,
                    result.skipped,
                    result.parked,
                    result.last_position,
                )
        finally:
            consumer.close(autocommit=False)
            logger.info("kafka source stopped topic=%s", topic)

    def _wait_for_topic(self, consumer: Any, stop: threading.Event) -> Any:
        """The topic's partition numbers, once it exists; None when stopped
        first. Says it is waiting at once, then every 30 s."""
        topic = self._settings.kafka_topic
        said = 0.0
        while not stop.is_set():
            try:
                found = consumer.partitions_for_topic(topic)
            except KafkaError as error:
                found = None
                logger.warning(
                    "kafka metadata unavailable topic=%s error=%r", topic, error
                )
            if found:
                return found
            if time.monotonic() - said >= 30.0:
                logger.info("waiting for the topic to exist topic=%s", topic)
                said = time.monotonic()
            stop.wait(1.0)
        return None

    def _assign_every_partition(self, consumer: Any, found: Any) -> None:
        """Take every partition of the topic, without a group, and go to the
        stored offsets."""
        from kafka import TopicPartition

        topic = self._settings.kafka_topic
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        self._refuse_a_truncated_history(consumer, partitions)
        self.seek_to_stored(partitions)

    def _refuse_a_truncated_history(self, consumer: Any, partitions: Any) -> None:
        """Reading every partition alone means reading the whole history: a
        partition whose first offset is past where this reader starts has
        lost events to retention, and the read models would miss them."""
        stored = self._offsets.stored(tp.partition for tp in partitions)
        firsts = consumer.beginning_offsets(partitions)
        for tp in partitions:
            start = stored.get(tp.partition, 0)
            if int(firsts[tp]) > start:
                raise HistoryIncomplete(
                    f"topic={tp.topic} partition={tp.partition} begins at offset "
                    f"{firsts[tp]}, after {start}: Kafka's retention removed the "
                    "beginning of the history; read it from the feed instead "
                    "(--source feed)"
                )

    def _watch_end(self, consumer: Any, records: Any) -> None:
        """At most once a second, or whenever a poll comes back empty: how
        many records are left, and whether that is few enough to be caught
        up. The positions are those after the records just polled."""
        now = time.monotonic()
        if records and now - self._ends_checked < 1.0:
            return
        self._ends_checked = now
        assigned = consumer.assignment()
        if not assigned:
            return
        try:
            ends = consumer.end_offsets(list(assigned))
            positions = {tp: consumer.position(tp) for tp in assigned}
        except KafkaError as error:
            logger.warning(
                "kafka end offsets unavailable topic=%s error=%r",
                self._offsets.topic,
                error,
            )
            return
        self.end_offsets = {tp.partition: int(end) for tp, end in ends.items()}
        self.lag = sum(max(0, int(ends[tp]) - positions[tp]) for tp in assigned)
        if self._catch_up_within is not None and self.lag <= self._catch_up_within:
            self.caught_up.set()

    def _reseek_after_failure(self, consumer: Any, stop: threading.Event) -> None:
        """After a failed transaction, go back to what the database holds."""
        while not stop.is_set():
            try:
                self.seek_to_stored(consumer.assignment())
                return
            except StorageUnavailable as error:
                logger.warning(
                    "database unavailable, retrying seek topic=%s error=%s",
                    self._offsets.topic,
                    error,
                )
                stop.wait(1.0)
