"""Fixtures of the metrics integration tests: a read model on the database
of the `database_url` fixture (SQLite and PostgreSQL) and the API over it."""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from metrics.api import create_app
from metrics.processes import load_catalog
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import write_processes


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        processes_dir=write_processes(tmp_path / "processes"),
        kafka_bootstrap="127.0.0.1:1",
    )


@pytest.fixture
def projected(settings: Settings) -> Iterator[Projected]:
    engine = create_engine(settings, writer=True)
    migrate(engine)
    yield Projected(engine, load_catalog(settings.processes_dir))
    engine.dispose()


@pytest.fixture
def client(settings: Settings, projected: Projected) -> Iterator[TestClient]:
    with TestClient(create_app(settings, projected.catalog)) as test_client:
        yield test_client


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh topic of three partitions on the real broker, deleted after."""
    with warnings.catch_warnings():
        # kafka-python's own deprecated importlib call, on its first import
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.admin import KafkaAdminClient, NewTopic

    name = f"deal-events-test-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])
    yield name
    admin.delete_topics([name])
    admin.close()


def produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Send recorded envelopes as the relay does: keyed by deal, as JSON."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for event in events:
        producer.send(
            topic, key=event["deal_id"].encode(), value=json.dumps(event).encode()
        )
    producer.flush()
    producer.close()
