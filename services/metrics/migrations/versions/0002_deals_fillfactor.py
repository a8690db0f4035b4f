"""Leave room in the pages of deals for the next version of their rows.

Every batch rewrites the row of each deal it touches. With full pages each
new version goes to another page and every index gains an entry; with 30 %
free, an update that changes no indexed column (most of them: counters, the
stream version) stays in its page and is pruned there (a HOT update), so the
table stays compact for the metric queries. PostgreSQL only; existing pages
fill to the new factor as they are rewritten.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE deals SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE deals RESET (fillfactor)")
