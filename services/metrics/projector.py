"""The projector: one source, the projection and the read-model database,
put together and run until stopped."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal

from metrics.feed import FeedSource
from metrics.processes import Catalog, load_catalog
from metrics.progress import FeedProgress, KafkaOffsets
from metrics.projection import Projection
from metrics.settings import Settings
from metrics.storage import create_engine, migrate

if TYPE_CHECKING:
    from metrics.consumer import KafkaSource

__all__ = ["SourceName", "build_source", "run_projector"]

logger = logging.getLogger(__name__)

SourceName = Literal["feed", "kafka"]


def build_source(
    settings: Settings, source: SourceName, catalog: Catalog | None = None
) -> FeedSource | KafkaSource:
    # The Kafka client is imported only when it is the source.
    from metrics.consumer import KafkaSource

    """Migrate the read models and build the source, ready to `run`."""
    engine = create_engine(settings, writer=True)
    migrate(engine)
    projection = Projection(engine, catalog or load_catalog(settings.processes_dir))
    if source == "feed":
        return FeedSource(settings, projection, FeedProgress(engine, settings.feed_url))
    return KafkaSource(settings, projection, KafkaOffsets(engine, settings.kafka_topic))


def run_projector(
    settings: Settings, source: SourceName, stop: threading.Event
) -> None:
    """Project events from the source until `stop` is set."""
    runner = build_source(settings, source)
    logger.info("projector starting source=%s", source)
    runner.run(stop)
    logger.info("projector stopped source=%s events_applied=%d", source, runner.applied)
