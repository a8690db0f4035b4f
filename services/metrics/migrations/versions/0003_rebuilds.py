"""The rebuilds of the read models: one row per `metrics rebuild`, so that the
API can show a rebuild's progress and a rebuild that was stopped can be
resumed.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rebuilds",
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
    )
    op.create_index("ix_rebuilds_state", "rebuilds", ["state"])


def downgrade() -> None:
    op.drop_index("ix_rebuilds_state", table_name="rebuilds")
    op.drop_table("rebuilds")
