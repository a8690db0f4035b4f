"""The funnel: per stage of a process, how many visits entered, advanced,
dropped (by reason) or moved back, how many deals are in it now, and the
conversions."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from metrics.answers import FunnelStage
from metrics.filters import DealFilter
from metrics.processes import Catalog
from metrics.projection import ADVANCED, DROPPED, MOVED_BACK
from metrics.tables import deals, stage_visits

__all__ = ["UNSPECIFIED_REASON", "funnel", "ordered_stages"]

UNSPECIFIED_REASON = "unspecified"


@dataclass
class _Tally:
    entered: int = 0
    advanced: int = 0
    dropped: int = 0
    moved_back: int = 0
    open: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)


def ordered_stages(catalog: Catalog, process: str | None, seen: set[str]) -> list[str]:
    """The stages in declared order (one process, or every process in key
    order), then stages only the data knows, alphabetically."""
    order: list[str] = []
    for key in [process] if process else catalog.keys:
        declared = catalog.current(key)
        if declared is None:
            continue
        order.extend(s for s in declared.stage_keys if s not in order)
    order.extend(sorted(seen - set(order)))
    return order


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def funnel(
    connection: sa.Connection,
    catalog: Catalog,
    where: DealFilter,
    by_owner: bool,
) -> dict[Any, list[FunnelStage]]:
    """The funnel per owner (`by_owner`) or overall (key None)."""
    v = stage_visits.c
    group = [deals.c.owner] if by_owner else []
    query = (
        sa.select(*group, v.stage, v.outcome, v.left_reason, sa.func.count())
        .select_from(stage_visits.join(deals, deals.c.deal_id == v.deal_id))
        .where(*where.conditions())
        .group_by(*group, v.stage, v.outcome, v.left_reason)
    )
    tallies: dict[Any, dict[str, _Tally]] = defaultdict(lambda: defaultdict(_Tally))
    seen: set[str] = set()
    for row in connection.execute(query):
        key = row[0] if by_owner else None
        stage, outcome, reason, count = row[-4:]
        seen.add(stage)
        tally = tallies[key][stage]
        tally.entered += count
        if outcome is None:
            tally.open += count
        elif outcome == ADVANCED:
            tally.advanced += count
        elif outcome == DROPPED:
            tally.dropped += count
            reason = reason or UNSPECIFIED_REASON
            tally.dropped_by_reason[reason] = (
                tally.dropped_by_reason.get(reason, 0) + count
            )
        elif outcome == MOVED_BACK:
            tally.moved_back += count
    stages = ordered_stages(catalog, where.process, seen)
    if not tallies and not by_owner:
        tallies[None] = defaultdict(_Tally)
    return {
        key: [
            FunnelStage(
                stage=stage,
                entered=t.entered,
                advanced=t.advanced,
                dropped=t.dropped,
                dropped_by_reason=dict(sorted(t.dropped_by_reason.items())),
                moved_back=t.moved_back,
                open=t.open,
                conversion=_ratio(t.advanced, t.entered),
                closed_conversion=_ratio(t.advanced, t.advanced + t.dropped),
            )
            for stage in stages
            for t in [per_stage[stage]]
        ]
        for key, per_stage in tallies.items()
    }
