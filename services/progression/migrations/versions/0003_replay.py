"""Replays of a range of the log to a topic: how far each got.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTC_TIME = sa.DateTime(timezone=True)
TOPIC = sa.String(249)


def upgrade() -> None:
    op.create_table(
        "replay_progress",
        sa.Column("replay_id", sa.String(32), nullable=False),
        sa.Column("topic", TOPIC, nullable=False),
        sa.Column("from_position", POSITION, nullable=False),
        sa.Column("to_position", POSITION, nullable=False),
        sa.Column("deal_ids", JSON_DOCUMENT, nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("published", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("started_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("completed_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("replay_id", name=op.f("pk_replay_progress")),
    )


def downgrade() -> None:
    op.drop_table("replay_progress")
