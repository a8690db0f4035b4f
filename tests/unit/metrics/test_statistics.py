"""Medians and 90th percentiles interpolate between the closest ranks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics.statistics import MEDIAN, P90, duration_stats, quantile_micros


def reference(values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks, written from its definition."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    low = int(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    ranked = dict(enumerate([1, 2, 4, 10]))
    assert quantile_micros(ranked, 4, MEDIAN) == 3


def test_the_p90_of_five_values_interpolates_between_the_top_two() -> None:
    # h = 4 * 0.9 = 3.6: 4 + 0.6 * (6 - 4)
    ranked = dict(enumerate([1, 2, 2, 4, 6]))
    assert quantile_micros(ranked, 5, P90) == Fraction(26, 5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=40))
def test_the_sql_ranks_give_the_reference_quantiles(values: list[int]) -> None:
    engine = sa.create_engine("sqlite://")
    table = sa.Table(
        "t", sa.MetaData(), sa.Column("g", sa.Integer), sa.Column("v", sa.BigInteger)
    )
    with engine.begin() as connection:
        table.create(connection)
        connection.execute(table.insert(), [{"g": 1, "v": v} for v in values])
        found = duration_stats(connection, sa.select(table.c.g, table.c.v), keys=1)[
            (1,)
        ]
    assert found.count == len(values)
    assert found.total_us == sum(values)
    for q, fraction in ((0.5, MEDIAN), (0.9, P90)):
        got = float(quantile_micros(found.ranked_us, found.count, fraction))
        assert abs(got - reference(values, q)) <= 1e-6 * max(1, max(values))


def test_groups_are_ranked_apart(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 's.db'}")
    table = sa.Table(
        "t", sa.MetaData(), sa.Column("g", sa.String), sa.Column("v", sa.BigInteger)
    )
    with engine.begin() as connection:
        table.create(connection)
        connection.execute(
            table.insert(),
            [{"g": "a", "v": v} for v in (5, 1, 3)]
            + [{"g": "b", "v": v} for v in (100, 200)],
        )
        found = duration_stats(connection, sa.select(table.c.g, table.c.v), keys=1)
    assert found[("a",)].quantile_days(MEDIAN) == 3 / 86_400_000_000
    assert found[("b",)].quantile_days(MEDIAN) == 150 / 86_400_000_000
    assert found[("b",)].mean_days == 150 / 86_400_000_000
