"""The read models: deals, stage visits, source progress, parked events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deals",
        sa.Column("deal_id", sa.String(128), primary_key=True),
        sa.Column("stream_version", sa.Integer, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
        sa.Column("process", sa.String(64)),
        sa.Column("process_version", sa.Integer),
        sa.Column("owner", sa.String(200)),
        sa.Column("amount_micros", sa.BigInteger),
        sa.Column("currency", sa.String(16)),
        sa.Column("created_us", sa.BigInteger),
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
    )
    op.create_index("ix_deals_status_stage", "deals", ["status", "stage"])
    op.create_index("ix_deals_created_us", "deals", ["created_us"])
    op.create_index("ix_deals_process", "deals", ["process"])

    op.create_table(
        "stage_visits",
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
    )
    op.create_index(
        "ix_stage_visits_stage_outcome", "stage_visits", ["stage", "outcome"]
    )

    op.create_table(
        "consumer_offsets",
        sa.Column("topic", sa.String(249), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger),
        sa.Column("events_applied", sa.BigInteger, nullable=False),
        sa.Column("events_skipped", sa.BigInteger, nullable=False),
        sa.Column("events_parked", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )

    op.create_table(
        "feed_position",
        sa.Column("feed", sa.String(16), primary_key=True),
        sa.Column("feed_url", sa.String(500), nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
        sa.Column("events_applied", sa.BigInteger, nullable=False),
        sa.Column("events_skipped", sa.BigInteger, nullable=False),
        sa.Column("events_parked", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )

    op.create_table(
        "parked_events",
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
    )


def downgrade() -> None:
    op.drop_table("parked_events")
    op.drop_table("feed_position")
    op.drop_table("consumer_offsets")
    op.drop_index("ix_stage_visits_stage_outcome", table_name="stage_visits")
    op.drop_table("stage_visits")
    op.drop_index("ix_deals_process", table_name="deals")
    op.drop_index("ix_deals_created_us", table_name="deals")
    op.drop_index("ix_deals_status_stage", table_name="deals")
    op.drop_table("deals")
