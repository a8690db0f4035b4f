"""Outcomes: won, lost and disqualified deals, win rate, meeting show rate
and process adherence."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from metrics.answers import OutcomesFigures
from metrics.filters import DealFilter
from metrics.funnel import UNSPECIFIED_REASON
from metrics.tables import deals

__all__ = ["outcomes", "ratio"]


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def outcomes(
    connection: sa.Connection, where: DealFilter, by_owner: bool
) -> dict[Any, OutcomesFigures]:
    c = deals.c
    group = [c.owner] if by_owner else []
    conditions = where.conditions()

    terminal: dict[Any, dict[str, dict[str, int]]] = defaultdict(
        lambda: {"won": {}, "lost": {}, "disqualified": {}}
    )
    query = (
        sa.select(*group, c.status, c.outcome_reason, sa.func.count())
        .where(c.status.in_(["won", "lost", "disqualified"]), *conditions)
        .group_by(*group, c.status, c.outcome_reason)
    )
    for row in connection.execute(query):
        key = row[0] if by_owner else None
        status, reason, count = row[-3:]
        reasons = terminal[key][status]
        reason = reason or UNSPECIFIED_REASON
        reasons[reason] = reasons.get(reason, 0) + count

    sums = (
        sa.select(
            *group,
            sa.func.coalesce(sa.func.sum(c.meetings_held), 0),
            sa.func.coalesce(sa.func.sum(c.meetings_no_show), 0),
            sa.func.coalesce(sa.func.sum(c.criteria_changes), 0),
            sa.func.coalesce(sa.func.sum(c.other_changes), 0),
        )
        .where(*conditions)
        .group_by(*group)
    )
    counters: dict[Any, tuple[int, int, int, int]] = {}
    for row in connection.execute(sums):
        key = row[0] if by_owner else None
        held, no_show, criteria, other = (int(x) for x in row[-4:])
        counters[key] = (held, no_show, criteria, other)

    keys = set(counters) | set(terminal) | (set() if by_owner else {None})
    result = {}
    for key in keys:
        held, no_show, criteria, other = counters.get(key, (0, 0, 0, 0))
        by_status = terminal[key]
        won = sum(by_status["won"].values())
        lost = sum(by_status["lost"].values())
        result[key] = OutcomesFigures(
            won=won,
            lost=lost,
            disqualified=sum(by_status["disqualified"].values()),
            lost_by_reason=dict(sorted(by_status["lost"].items())),
            disqualified_by_reason=dict(sorted(by_status["disqualified"].items())),
            win_rate=ratio(won, won + lost),
            meetings_held=held,
            meetings_no_show=no_show,
            meeting_show_rate=ratio(held, held + no_show),
            stage_changes=criteria + other,
            criteria_changes=criteria,
            process_adherence=ratio(criteria, criteria + other),
        )
    return result
