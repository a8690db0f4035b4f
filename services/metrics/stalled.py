"""Stalled deals: open deals whose age in their current stage, as of a given
moment, exceeds the stage's expected days."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from metrics.answers import StalledDeal, StalledFigures
from metrics.filters import DealFilter, format_micros
from metrics.processes import Catalog
from metrics.statistics import MICROS_PER_DAY
from metrics.tables import deals

__all__ = ["stalled"]


def _expected_days(
    connection: sa.Connection, catalog: Catalog, where: DealFilter
) -> dict[tuple[str, int | None, str], float]:
    """Expected days of every (process, version, stage) an open deal is in."""
    c = deals.c
    combos = connection.execute(
        sa.select(c.process, c.process_version, c.stage)
        .where(c.status == "open", *where.conditions())
        .distinct()
    )
    found = {}
    for process, version, stage in combos:
        declared = catalog.version(process, version) if process else None
        declared_stage = declared.stage(stage) if declared and stage else None
        if declared_stage is not None:
            found[(process, version, stage)] = declared_stage.expected_days
    return found


def stalled(
    connection: sa.Connection,
    catalog: Catalog,
    where: DealFilter,
    as_of_us: int,
    limit: int,
    by_owner: bool,
) -> dict[Any, StalledFigures]:
    """The stalled deals, oldest in their stage first, at most `limit` per
    answer (per owner when grouped); `count` says how many there are.

    A deal in a stage no process file declares has no expected days and is
    never reported as stalled."""
    c = deals.c
    expected = _expected_days(connection, catalog, where)
    as_of = format_micros(as_of_us)
    if not expected:
        return (
            {} if by_owner else {None: StalledFigures(as_of=as_of, count=0, deals=[])}
        )

    over_age = sa.or_(
        *(
            sa.and_(
                c.process == process,
                c.process_version == version
                if version is not None
                else c.process_version.is_(None),
                c.stage == stage,
                c.stage_entered_us < as_of_us - round(days * MICROS_PER_DAY),
            )
            for (process, version, stage), days in expected.items()
        )
    )
    group = [c.owner] if by_owner else []
    partition = group or None
    ranked = (
        sa.select(
            c.deal_id,
            c.owner,
            c.process,
            c.process_version,
            c.stage,
            c.stage_entered_us,
            sa.func.row_number()
            .over(partition_by=partition, order_by=(c.stage_entered_us, c.deal_id))
            .label("rank"),
            sa.func.count().over(partition_by=partition).label("total"),
        )
        .where(c.status == "open", over_age, *where.conditions())
        .subquery()
    )
    rows = connection.execute(
        sa.select(ranked)
        .where(ranked.c.rank <= limit)
        .order_by(ranked.c.stage_entered_us, ranked.c.deal_id)
    )
    result: dict[Any, StalledFigures] = {}
    for row in rows:
        key = row.owner if by_owner else None
        figures = result.get(key)
        if figures is None:
            figures = result[key] = StalledFigures(
                as_of=as_of, count=int(row.total), deals=[]
            )
        figures.deals.append(
            StalledDeal(
                deal_id=row.deal_id,
                owner=row.owner,
                process=row.process,
                stage=row.stage,
                stage_entered_at=format_micros(row.stage_entered_us),
                age_days=(as_of_us - row.stage_entered_us) / MICROS_PER_DAY,
                expected_days=expected[(row.process, row.process_version, row.stage)],
            )
        )
    if not by_owner:
        result.setdefault(None, StalledFigures(as_of=as_of, count=0, deals=[]))
    return result
