"""The progression service's tables: the event log, the deal heads, the processes.

Beside them, the relay's own two tables: how far it has published to each
topic (`relay_progress`) and, on SQLite, which relay may publish
(`relay_lease`; see `progression.relay`); and how far each replay of a
range of the log to a topic got (`replay_progress`; see
`progression.replay`).

One `MetaData` with a naming convention, so every constraint and index has a
name the migrations can refer to and the event log can recognise in a
database error. The Alembic migrations under `migrations/versions/` are
written by hand to match these tables; a test compares the two.
"""

from __future__ import annotations

__all__ = [
    "JSON_DOCUMENT",
    "POSITION",
    "UTCDateTime",
    "deals",
    "events",
    "metadata",
    "processes",
    "relay_lease",
    "relay_progress",
    "replay_progress",
]

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A point in time, stored as UTC and read back as an aware UTC datetime.

    A naive datetime is refused on write: its meaning depends on a clock
    nobody recorded. PostgreSQL stores `timestamptz`; SQLite has no time
    zones, so the value is converted to UTC and stored without an offset.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"refusing a naive datetime: {value.isoformat()}")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# The log's global position: a 64-bit identity on PostgreSQL; on SQLite it must
# be exactly INTEGER PRIMARY KEY AUTOINCREMENT (the table sets
# sqlite_autoincrement), so that a position is never handed out twice, even
# after the highest rows were rolled back or deleted.
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# JSON documents; JSONB on PostgreSQL. JSONB does not keep key order or
# whitespace, which is why callers compare events by their digest.
JSON_DOCUMENT: sa.types.TypeEngine[Any] = sa.JSON().with_variant(
    postgresql.JSONB(), "postgresql"
)

ID = sa.String(128)  # event and deal ids: 1 to 128 characters (the envelope)
DIGEST = sa.String(64)  # hex sha256

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", POSITION, sa.Identity(), primary_key=True),
    sa.Column("event_id", ID, nullable=False),
    sa.Column("deal_id", ID, nullable=False),
    sa.Column("stream_version", sa.Integer, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.Column("source", sa.Text, nullable=True),
    sa.Column("actor", sa.Text, nullable=True),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", JSON_DOCUMENT, nullable=False),
    sa.Column("causation_id", ID, nullable=True),
    sa.Column("digest", DIGEST, nullable=False),
    sa.UniqueConstraint("event_id"),
    sa.UniqueConstraint("deal_id", "stream_version"),
    sa.Index(None, "causation_id"),
    sqlite_autoincrement=True,
)

deals = sa.Table(
    "deals",
    metadata,
    sa.Column("deal_id", ID, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stage", sa.Text, nullable=True),
    sa.Column("stage_entered_at", UTCDateTime, nullable=True),
    sa.Column("process", sa.Text, nullable=True),
    sa.Column("process_version", sa.Integer, nullable=True),
    sa.Column("owner", sa.Text, nullable=True),
    sa.Column("amount", sa.Double, nullable=True),
    sa.Column("currency", sa.Text, nullable=True),
    sa.Column("lead_score", sa.Integer, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=True),
    # The list filters, each with deal_id second so that a filtered page is
    # read in deal_id order straight from the index (keyset pagination).
    sa.Index(None, "status", "deal_id"),
    sa.Index(None, "stage", "deal_id"),
    sa.Index(None, "owner", "deal_id"),
    sa.Index(None, "process", "deal_id"),
)

processes = sa.Table(
    "processes",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("definition", JSON_DOCUMENT, nullable=False),
    sa.Column("digest", DIGEST, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
)

# Kafka allows topic names of up to 249 characters.
TOPIC = sa.String(249)

relay_progress = sa.Table(
    "relay_progress",
    metadata,
    sa.Column("topic", TOPIC, primary_key=True),
    # The highest log position Kafka has acknowledged together with every
    # position below it; 0 before the first event.
    sa.Column("position", POSITION, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

relay_lease = sa.Table(
    "relay_lease",
    metadata,
    sa.Column("topic", TOPIC, primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)

replay_progress = sa.Table(
    "replay_progress",
    metadata,
    # A digest of the replay's arguments: topic, range and deal filter.
    sa.Column("replay_id", sa.String(32), primary_key=True),
    sa.Column("topic", TOPIC, nullable=False),
    sa.Column("from_position", POSITION, nullable=False),
    # The last position of the range: the one given, or the log's head when
    # the replay (re)started without one.
    sa.Column("to_position", POSITION, nullable=False),
    # The deal ids of the filter, sorted, as a JSON array; [] for every deal.
    sa.Column("deal_ids", JSON_DOCUMENT, nullable=False),
    # The highest position of the range that Kafka has acknowledged together
    # with every event of the range below it; from_position - 1 at the start.
    sa.Column("position", POSITION, nullable=False),
    # Events of the range acknowledged up to `position`.
    sa.Column("published", sa.BigInteger, nullable=False),
    # The run allowed to record; a run that finds another here stops.
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("completed_at", UTCDateTime, nullable=True),
)
