"""The relay: how far it has published to each topic, and its SQLite lease.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sa.DateTime(timezone=True)
TOPIC = sa.String(249)


def upgrade() -> None:
    op.create_table(
        "relay_progress",
        sa.Column("topic", TOPIC, nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("topic", name=op.f("pk_relay_progress")),
    )
    op.create_table(
        "relay_lease",
        sa.Column("topic", TOPIC, nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", UTC_TIME, nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("topic", name=op.f("pk_relay_lease")),
    )


def downgrade() -> None:
    op.drop_table("relay_lease")
    op.drop_table("relay_progress")
