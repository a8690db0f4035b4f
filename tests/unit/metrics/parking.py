"""Streams with events the projection parks, and the fixes that make them
apply, for the tests of holding and retrying parked events.

The code fix: the progression service starts writing `stage.changed` with
`schema_version` 2 before the metrics service knows that version, so the
projection parks those events ("newer than this projector knows"). The
fix deployed afterwards knows version 2 (its fields the projection reads
are those of version 1).
"""

from __future__ import annotations

from typing import Any

import pytest

from metrics import envelope, upcasting
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import Log


def newer_change(log: Log, deal: str, to: str, day: float) -> dict[str, Any]:
    """A criteria stage change written as schema_version 2."""
    event = log.change(deal, to, day)
    event["schema_version"] = 2
    return event


def deploy_stage_changed_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fix: the projection reads stage.changed version 2."""
    monkeypatch.setitem(upcasting.CURRENT_VERSIONS, "stage.changed", 2)
    monkeypatch.setitem(upcasting._STEPS, ("stage.changed", 1), dict)


def deploy_broken_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fix that knows version 2 but reads it wrong: `to` goes missing."""
    monkeypatch.setattr(envelope, "upcast", _renaming)


def _renaming(type_: str, version: int, data: Any) -> Any:
    if type_ == "stage.changed" and version == 2:
        return {("target" if k == "to" else k): v for k, v in data.items()}
    return data


def held_stream() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Three deals; d1's move to connecting is written as version 2, and d1
    goes on (a meeting, researching, an override back, a loss) after it; d2
    and d3 go on beside it. Also the version-2 event."""
    log = Log()
    log.create("d1", 0, owner="ana", amount=1000)
    log.create("d2", 0, owner="bo", amount=500)
    first = newer_change(log, "d1", "connecting", 1)
    log.meeting("d1", 2)
    log.change("d2", "connecting", 2)
    log.change("d1", "researching", 3)
    log.create("d3", 3, owner="ana")
    log.override("d1", "connecting", 5)
    log.advance_to("d2", "presenting", 6)
    log.lose("d1", 8, "price")
    log.meeting("d3", 9, held=False)
    return log.events, first


def dump(projected: Projected) -> tuple[list[Any], list[Any]]:
    """Everything the metrics read: every deal and every stage visit."""
    return (
        projected.rows("SELECT * FROM deals ORDER BY deal_id"),
        projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq"),
    )


def parked_ids(projected: Projected, deal: str | None = None) -> list[int]:
    where = f" WHERE deal_id = '{deal}'" if deal else ""
    query = f"SELECT id FROM parked_events{where} ORDER BY id"
    return [row[0] for row in projected.rows(query)]
