"""The read-model tables.

Every moment is stored as microseconds since the Unix epoch (`*_us`) and
every amount in millionths of its currency unit (`amount_micros`), so that
sums, differences and comparisons are exact integer arithmetic and give the
same answers on SQLite and PostgreSQL. The migrations under `migrations/`
create exactly these tables.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "consumer_offsets",
    "deals",
    "feed_position",
    "metadata",
    "parked_events",
    "rebuilds",
    "stage_visits",
]

metadata = sa.MetaData()

# One row per deal: its current state and the counters the metrics add up.
deals = sa.Table(
    "deals",
    metadata,
    sa.Column("deal_id", sa.String(128), primary_key=True),
    # The deal stream's high-water mark: events at or below it are skipped.
    sa.Column("stream_version", sa.Integer, nullable=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Column("process", sa.String(64)),
    sa.Column("process_version", sa.Integer),
    sa.Column("owner", sa.String(200)),
    sa.Column("amount_micros", sa.BigInteger),
    sa.Column("currency", sa.String(16)),
    sa.Column("created_us", sa.BigInteger),
    # pending (no stage yet), open, won, lost or disqualified
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(64)),
    sa.Column("stage_entered_us", sa.BigInteger),
    sa.Column("visit_count", sa.Integer, nullable=False),
    sa.Column("closed_us", sa.BigInteger),
    sa.Column("outcome_reason", sa.String(500)),
    sa.Column("first_meeting_us", sa.BigInteger),
    sa.Column("meetings_held", sa.Integer, nullable=False),
    sa.Column("meetings_no_show", sa.Integer, nullable=False),
    sa.Column("criteria_changes", sa.Integer, nullable=False),
    sa.Column("other_changes", sa.Integer, nullable=False),
    # The deal's events in parked_events with a stream version (migration
    # 0004): while above 0 the deal is held, and its later events are parked
    # behind the earliest of them instead of applied on an incomplete state.
    sa.Column("parked", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Index("ix_deals_status_stage", "status", "stage"),
    sa.Index("ix_deals_created_us", "created_us"),
    sa.Index("ix_deals_process", "process"),
    # Room in every page for the next version of its rows: an update that
    # changes no indexed column then stays in the page (a HOT update), and
    # the table does not grow with every batch (PostgreSQL; migration 0002).
    postgresql_with={"fillfactor": 70},
)

# One row per entry into a stage. `outcome` is null while the visit is open,
# else advanced, dropped or moved_back (see docs/metrics.md).
stage_visits = sa.Table(
    "stage_visits",
    metadata,
    sa.Column("deal_id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("entered_us", sa.BigInteger, nullable=False),
    sa.Column("left_us", sa.BigInteger),
    sa.Column("left_to", sa.String(64)),
    sa.Column("left_cause", sa.String(16)),
    sa.Column("left_reason", sa.String(500)),
    sa.Column("outcome", sa.String(16)),
    sa.Column("duration_us", sa.BigInteger),
    sa.Index("ix_stage_visits_stage_outcome", "stage", "outcome"),
)

# How far the Kafka source got, per partition, committed with the read models.
consumer_offsets = sa.Table(
    "consumer_offsets",
    metadata,
    sa.Column("topic", sa.String(249), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("last_position", sa.BigInteger),
    sa.Column("events_applied", sa.BigInteger, nullable=False),
    sa.Column("events_skipped", sa.BigInteger, nullable=False),
    sa.Column("events_parked", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

# How far the HTTP feed source got, committed with the read models.
feed_position = sa.Table(
    "feed_position",
    metadata,
    sa.Column("feed", sa.String(16), primary_key=True),
    sa.Column("feed_url", sa.String(500), nullable=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Column("events_applied", sa.BigInteger, nullable=False),
    sa.Column("events_skipped", sa.BigInteger, nullable=False),
    sa.Column("events_parked", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

# Events the projection could not apply, with the reason and the raw value.
parked_events = sa.Table(
    "parked_events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("parked_us", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("topic", sa.String(249)),
    sa.Column("partition", sa.Integer),
    sa.Column("offset", sa.BigInteger),
    sa.Column("position", sa.BigInteger),
    sa.Column("event_id", sa.String(128)),
    sa.Column("deal_id", sa.String(128)),
    sa.Column("event_type", sa.String(64)),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
    # The event's version in its deal's stream when its envelope was read: the
    # deal moved past it and counts it in deals.parked. Null when the envelope
    # could not be read (or the event was parked before migration 0004): such
    # an event holds nothing back.
    sa.Column("stream_version", sa.Integer),
    sa.Index("ix_parked_events_deal_id", "deal_id", "stream_version"),
)

# One row per `metrics rebuild`: where it stands, for the status API and for
# resuming. `state` is building, switched or abandoned; `done` and `total`
# count in the source's unit (offsets on Kafka, positions on the feed).
rebuilds = sa.Table(
    "rebuilds",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
    sa.Column("finished_us", sa.BigInteger),
    sa.Column("runs", sa.Integer, nullable=False),
    sa.Column("done", sa.BigInteger, nullable=False),
    sa.Column("total", sa.BigInteger),
    sa.Column("events_applied", sa.BigInteger, nullable=False),
    sa.Column("last_position", sa.BigInteger),
    sa.Column("detail", sa.Text),
    sa.Index("ix_rebuilds_state", "state"),
)
