"""Hand-built deal event streams for the metrics tests.

`Log` hands out positions and per-deal stream versions the way the
progression service does, and writes the `stage.changed` decisions a test
describes, so a test reads as the story of its deals.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BASE = datetime(2025, 1, 1, tzinfo=UTC)

B2B_DEFAULT = """\
key: b2b-default
version: 1
stages:
  - {key: prospecting, expected_days: 3, win_probability: 0.05}
  - {key: connecting, expected_days: 7, win_probability: 0.15}
  - {key: researching, expected_days: 21, win_probability: 0.30}
  - {key: presenting, expected_days: 14, win_probability: 0.50}
  - {key: negotiating, expected_days: 14, win_probability: 0.70}
  - {key: closing, expected_days: 14, win_probability: 0.90}
"""

FAST_TRACK = """\
key: fast-track
version: 2
stages:
  - {key: qualify, expected_days: 2, win_probability: 0.2}
  - {key: quote, expected_days: 5, win_probability: 0.6}
"""

STAGES = [
    "prospecting",
    "connecting",
    "researching",
    "presenting",
    "negotiating",
    "closing",
]


def write_processes(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "b2b-default.yaml").write_text(B2B_DEFAULT)
    (directory / "fast-track.yaml").write_text(FAST_TRACK)
    return directory


def at(days: float) -> str:
    """RFC 3339 of BASE plus a number of days."""
    moment = BASE + timedelta(days=days)
    return moment.isoformat().replace("+00:00", "Z")


class Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._position = itertools.count(1)
        self._versions: dict[str, int] = {}
        self._stage: dict[str, str | None] = {}
        self._process: dict[str, str] = {}
        self._ids = itertools.count(1)

    def add(
        self,
        deal: str,
        kind: str,
        day: float,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        version = self._versions.get(deal, 0) + 1
        self._versions[deal] = version
        event = {
            "event_id": f"e-{next(self._ids)}",
            "type": kind,
            "deal_id": deal,
            "occurred_at": at(day),
            "recorded_at": at(day),
            "source": "test",
            "actor": None,
            "data": data or {},
            "schema_version": 1,
            "position": next(self._position),
            "stream_version": version,
        }
        self.events.append(event)
        return event

    def create(
        self,
        deal: str,
        day: float,
        owner: str = "ana",
        amount: float | None = None,
        currency: str | None = "EUR",
        process: str = "b2b-default",
        first_stage: str = "prospecting",
    ) -> None:
        data: dict[str, Any] = {"process": process, "owner": owner}
        if amount is not None:
            data["amount"] = amount
        if currency is not None:
            data["currency"] = currency
        created = self.add(deal, "deal.created", day, data)
        self._process[deal] = process
        self._stage[deal] = None
        self.change(deal, first_stage, day, cause="created", trigger=created)

    def change(
        self,
        deal: str,
        to: str,
        day: float,
        cause: str = "criteria",
        reason: str | None = None,
        trigger: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        data = {
            "from": self._stage.get(deal),
            "to": to,
            "cause": cause,
            "effective_at": at(day),
            "trigger_event_id": (trigger or {}).get("event_id", "e-0"),
            "action_event_id": None,
            "reason": reason,
            "criteria": [],
            "process": self._process.get(deal, "b2b-default"),
            "process_version": version
            or (2 if self._process.get(deal) == "fast-track" else 1),
        }
        self._stage[deal] = to
        return self.add(deal, "stage.changed", day, data)

    def advance_to(self, deal: str, stage: str, day: float) -> None:
        """Criteria moves, one stage at a time, up to `stage` (or won)."""
        current = self._stage[deal]
        assert current in STAGES
        target = len(STAGES) if stage == "won" else STAGES.index(stage)
        for index in range(STAGES.index(current) + 1, target + 1):
            self.change(deal, STAGES[index] if index < len(STAGES) else "won", day)

    def lose(self, deal: str, day: float, reason: str = "went_elsewhere") -> None:
        self.add(deal, "deal.lost", day, {"reason": reason})
        self.change(deal, "lost", day, cause="lost", reason=reason)

    def disqualify(self, deal: str, day: float, reason: str = "no_budget") -> None:
        self.add(deal, "disqualifier.identified", day, {"reason": reason})
        self.change(deal, "disqualified", day, cause="disqualified", reason=reason)

    def override(
        self,
        deal: str,
        to: str,
        day: float,
        reason: str = "by hand",
    ) -> None:
        self.add(deal, "stage.overridden", day, {"to": to, "reason": reason})
        self.change(deal, to, day, cause="override", reason=reason)

    def meeting(self, deal: str, day: float, held: bool = True) -> None:
        self.add(deal, "meeting.held" if held else "meeting.no_show", day, {})
