"""Hold a deal behind its parked event: every deal counts its parked events
(`deals.parked`), and a parked event whose envelope was read keeps its
stream version (`parked_events.stream_version`), so that the projector
parks the deal's later events too and a retry can apply them in order.

Existing deals count 0 and existing parked events keep a null stream
version: their deals were moved past them with the later events applied
on top, so they hold nothing back (a retry applies one only where its
deal has not moved past it; see docs/metrics.md).

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "deals",
        sa.Column("parked", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.add_column("parked_events", sa.Column("stream_version", sa.Integer))
    op.create_index(
        "ix_parked_events_deal_id", "parked_events", ["deal_id", "stream_version"]
    )


def downgrade() -> None:
    op.drop_index("ix_parked_events_deal_id", table_name="parked_events")
    with op.batch_alter_table("parked_events") as batch:
        batch.drop_column("stream_version")
    with op.batch_alter_table("deals") as batch:
        batch.drop_column("parked")
