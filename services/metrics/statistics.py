"""Counts, means, medians and 90th percentiles of durations, computed in
SQL over integer microseconds so that SQLite and PostgreSQL give the same
numbers.

Percentiles interpolate linearly between the closest ranks (PostgreSQL's
`percentile_cont`, NumPy's default): for `n` sorted values and quantile
`q`, h = (n - 1) q and the result is v[floor h] + (h - floor h) (v[ceil h]
- v[floor h]). The query returns only the values at those ranks, with a
window over each group, so the durations never leave the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sqlalchemy as sa

__all__ = ["MICROS_PER_DAY", "DurationStats", "duration_stats", "quantile_micros"]

MICROS_PER_DAY = 86_400_000_000

# Quantiles as fractions so that the closest ranks are exact integers.
MEDIAN = Fraction(1, 2)
P90 = Fraction(9, 10)


@dataclass(frozen=True)
class DurationStats:
    count: int
    total_us: int
    ranked_us: dict[int, int]

    @property
    def mean_days(self) -> float | None:
        if not self.count:
            return None
        return self.total_us / self.count / MICROS_PER_DAY

    def quantile_days(self, q: Fraction) -> float | None:
        if not self.count:
            return None
        return float(quantile_micros(self.ranked_us, self.count, q) / MICROS_PER_DAY)


EMPTY = DurationStats(0, 0, {})


def quantile_micros(ranked: dict[int, int], count: int, q: Fraction) -> Fraction:
    """The interpolated quantile from the values at the closest ranks
    (0-based ranks in ascending order)."""
    h = (count - 1) * q
    low = h.numerator // h.denominator
    fraction = h - low
    low_value = ranked[low]
    if not fraction:
        return Fraction(low_value)
    return low_value + fraction * (ranked[low + 1] - low_value)


def _rank_conditions(rank: Any, count: Any, quantiles: Sequence[Fraction]) -> Any:
    wanted = []
    for q in quantiles:
        # floor((n - 1) q) and ceil((n - 1) q) in integer arithmetic
        numerator, denominator = q.numerator, q.denominator
        wanted.append(rank == ((count - 1) * numerator) // denominator)
        wanted.append(
            rank == ((count - 1) * numerator + denominator - 1) // denominator
        )
    return sa.or_(*wanted)


def duration_stats(
    connection: sa.Connection,
    durations: sa.Select[Any],
    keys: int,
    quantiles: Sequence[Fraction] = (MEDIAN, P90),
) -> dict[tuple[Any, ...], DurationStats]:
    """Stats per group of `durations`, a select whose first `keys` columns
    are the group and whose last column is a duration in microseconds."""
    inner = durations.subquery()
    columns = list(inner.c)
    group, value = columns[:keys], columns[keys]
    partition = group or None
    ranked = sa.select(
        *group,
        value.label("v"),
        (sa.func.row_number().over(partition_by=partition, order_by=value) - 1).label(
            "rank"
        ),
        sa.func.count().over(partition_by=partition).label("n"),
        sa.func.sum(value).over(partition_by=partition).label("total"),
    ).subquery()
    rows = connection.execute(
        sa.select(ranked).where(_rank_conditions(ranked.c.rank, ranked.c.n, quantiles))
    )
    found: dict[tuple[Any, ...], DurationStats] = {}
    for row in rows:
        key = tuple(row[:keys])
        stats = found.get(key)
        if stats is None:
            stats = found[key] = DurationStats(int(row.n), int(row.total), {})
        stats.ranked_us[int(row.rank)] = int(row.v)
    return found
