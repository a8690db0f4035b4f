"""Which deals a metric counts, and how it groups them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from metrics.tables import deals

__all__ = ["DealFilter", "format_micros"]


@dataclass(frozen=True)
class DealFilter:
    """The deals a metric counts: every deal whose `deal.created` has been
    seen, narrowed by process, creation time (`created_from_us` inclusive,
    `created_to_us` exclusive) and currency."""

    process: str | None = None
    created_from_us: int | None = None
    created_to_us: int | None = None
    currency: str | None = None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        c = deals.c
        found: list[sa.ColumnElement[bool]] = [c.created_us.is_not(None)]
        if self.process is not None:
            found.append(c.process == self.process)
        if self.created_from_us is not None:
            found.append(c.created_us >= self.created_from_us)
        if self.created_to_us is not None:
            found.append(c.created_us < self.created_to_us)
        if self.currency is not None:
            found.append(c.currency == self.currency)
        return found


def format_micros(micros: int) -> str:
    """RFC 3339 in UTC with a `Z`, as every answer writes moments."""
    moment = datetime.fromtimestamp(micros / 1_000_000, tz=UTC)
    moment = moment.replace(microsecond=micros % 1_000_000)
    return moment.isoformat().replace("+00:00", "Z")
