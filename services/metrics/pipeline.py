"""The open pipeline: open deals, weighted pipeline and pipeline velocity.

Known shortcoming: amounts are added as they are, whatever their currency;
nothing is converted. Filter by `currency` for a figure in one currency.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from metrics.answers import PipelineFigures
from metrics.filters import DealFilter
from metrics.outcomes import ratio
from metrics.processes import Catalog
from metrics.statistics import MICROS_PER_DAY
from metrics.tables import deals

__all__ = ["pipeline"]

MICROS_PER_UNIT = 1_000_000


@dataclass
class _Open:
    deals: int = 0
    amount_micros: int = 0
    weighted_micros: float = 0.0
    without_amount: int = 0
    without_probability: int = 0
    currencies: set[str] = field(default_factory=set)


@dataclass
class _Won:
    won: int = 0
    lost: int = 0
    amount_micros: int = 0
    with_amount: int = 0
    cycle_us: int = 0


def pipeline(
    connection: sa.Connection, catalog: Catalog, where: DealFilter, by_owner: bool
) -> dict[Any, PipelineFigures]:
    c = deals.c
    group = [c.owner] if by_owner else []
    conditions = where.conditions()

    # The open deals, per stage of each process version.
    open_query = (
        sa.select(
            *group,
            c.process,
            c.process_version,
            c.stage,
            c.currency,
            sa.func.count(),
            sa.func.count(c.amount_micros),
            sa.func.coalesce(sa.func.sum(c.amount_micros), 0),
        )
        .where(c.status == "open", *conditions)
        .group_by(*group, c.process, c.process_version, c.stage, c.currency)
        .order_by(*group, c.process, c.process_version, c.stage, c.currency)
    )
    opened: dict[Any, _Open] = defaultdict(_Open)
    for row in connection.execute(open_query):
        key = row[0] if by_owner else None
        process, version, stage, currency, count, with_amount, total = row[-7:]
        tally = opened[key]
        tally.deals += count
        tally.amount_micros += int(total)
        tally.without_amount += count - with_amount
        if currency is not None:
            tally.currencies.add(currency)
        declared = catalog.version(process, version) if process else None
        probability = declared.stage(stage) if declared and stage else None
        if probability is None:
            tally.without_probability += count
        else:
            tally.weighted_micros += int(total) * probability.win_probability

    # Won and lost deals, for the win rate, the mean won amount and the cycle.
    cycle = sa.case((c.closed_us < c.created_us, 0), else_=c.closed_us - c.created_us)
    won_query = (
        sa.select(
            *group,
            sa.func.count().filter(c.status == "won"),
            sa.func.count().filter(c.status == "lost"),
            sa.func.coalesce(sa.func.sum(c.amount_micros).filter(c.status == "won"), 0),
            sa.func.count(c.amount_micros).filter(c.status == "won"),
            sa.func.coalesce(sa.func.sum(cycle).filter(c.status == "won"), 0),
        )
        .where(c.status.in_(["won", "lost"]), *conditions)
        .group_by(*group)
    )
    closed: dict[Any, _Won] = defaultdict(_Won)
    for row in connection.execute(won_query):
        key = row[0] if by_owner else None
        won, lost, amount, with_amount, cycle_us = (int(x) for x in row[-5:])
        closed[key] = _Won(won, lost, amount, with_amount, cycle_us)

    keys = set(opened) | set(closed) | (set() if by_owner else {None})
    result = {}
    for key in keys:
        o, w = opened[key], closed[key]
        win_rate = ratio(w.won, w.won + w.lost)
        mean_won = (
            w.amount_micros / w.with_amount / MICROS_PER_UNIT if w.with_amount else None
        )
        mean_cycle = w.cycle_us / w.won / MICROS_PER_DAY if w.won else None
        velocity = (
            o.deals * win_rate * mean_won / mean_cycle
            if win_rate is not None and mean_won is not None and mean_cycle
            else None
        )
        result[key] = PipelineFigures(
            open_deals=o.deals,
            open_amount=o.amount_micros / MICROS_PER_UNIT,
            weighted_pipeline=o.weighted_micros / MICROS_PER_UNIT,
            deals_without_amount=o.without_amount,
            deals_without_probability=o.without_probability,
            currencies=sorted(o.currencies),
            win_rate=win_rate,
            mean_won_amount=mean_won,
            mean_cycle_days=mean_cycle,
            pipeline_velocity=velocity,
        )
    return result
