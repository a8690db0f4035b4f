"""Velocity: days in each stage, cycle length and time to first meeting."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from metrics.answers import Duration, StageDuration
from metrics.filters import DealFilter
from metrics.funnel import ordered_stages
from metrics.processes import Catalog
from metrics.projection import ADVANCED
from metrics.statistics import EMPTY, MEDIAN, P90, DurationStats, duration_stats
from metrics.tables import deals, stage_visits

__all__ = ["cycle_lengths", "stage_durations", "time_to_first_meeting", "to_duration"]


def _non_negative(expression: Any) -> Any:
    return sa.case((expression < 0, 0), else_=expression)


def to_duration(stats: DurationStats) -> Duration:
    return Duration(
        count=stats.count,
        mean_days=stats.mean_days,
        median_days=stats.quantile_days(MEDIAN),
    )


def stage_durations(
    connection: sa.Connection, catalog: Catalog, where: DealFilter, by_owner: bool
) -> dict[Any, list[StageDuration]]:
    """Days in stage over the visits left for a later stage or won."""
    v = stage_visits.c
    group = [deals.c.owner] if by_owner else []
    durations = (
        sa.select(*group, v.stage, v.duration_us)
        .select_from(stage_visits.join(deals, deals.c.deal_id == v.deal_id))
        .where(v.outcome == ADVANCED, *where.conditions())
    )
    found = duration_stats(connection, durations, keys=len(group) + 1)
    per_key: dict[Any, dict[str, DurationStats]] = {}
    for key, stats in found.items():
        per_key.setdefault(key[0] if by_owner else None, {})[key[-1]] = stats
    if not by_owner:
        per_key.setdefault(None, {})
    stages = ordered_stages(
        catalog, where.process, {stage for k in found for stage in k[-1:]}
    )
    return {
        owner: [
            StageDuration(
                stage=stage,
                count=s.count,
                mean_days=s.mean_days,
                median_days=s.quantile_days(MEDIAN),
                p90_days=s.quantile_days(P90),
            )
            for stage in stages
            for s in [per_stage.get(stage, EMPTY)]
        ]
        for owner, per_stage in per_key.items()
    }


def _per_owner(
    connection: sa.Connection, durations: sa.Select[Any], by_owner: bool
) -> dict[Any, DurationStats]:
    found = duration_stats(connection, durations, keys=1 if by_owner else 0)
    result = {(key[0] if by_owner else None): stats for key, stats in found.items()}
    if not by_owner:
        result.setdefault(None, EMPTY)
    return result


def cycle_lengths(
    connection: sa.Connection, where: DealFilter, by_owner: bool
) -> dict[Any, DurationStats]:
    """Won deals: the effective moment of `won` minus the deal's creation."""
    c = deals.c
    group = [c.owner] if by_owner else []
    durations = sa.select(*group, _non_negative(c.closed_us - c.created_us)).where(
        c.status == "won", *where.conditions()
    )
    return _per_owner(connection, durations, by_owner)


def time_to_first_meeting(
    connection: sa.Connection, where: DealFilter, by_owner: bool
) -> dict[Any, DurationStats]:
    """Deals with a meeting held: the first one minus the deal's creation (a
    meeting held before the deal was created counts 0 days)."""
    c = deals.c
    group = [c.owner] if by_owner else []
    durations = sa.select(
        *group, _non_negative(c.first_meeting_us - c.created_us)
    ).where(c.first_meeting_us.is_not(None), *where.conditions())
    return _per_owner(connection, durations, by_owner)
