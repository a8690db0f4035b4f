"""Writing to the progression event log past ingestion, for tests that need
many events fast (relay, replay and their fault tests)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from progression.eventlog import DealSummary, EventLog, NewEvent, StreamWrite

__all__ = ["T0", "LogWriter", "pending_summary"]

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def pending_summary(deal_id: str) -> DealSummary:
    """The head of a deal that has no stage yet (the log keeps its version)."""
    return DealSummary(
        deal_id=deal_id,
        version=0,
        status="pending",
        stage=None,
        stage_entered_at=None,
        process=None,
        process_version=None,
        owner=None,
        amount=None,
        currency=None,
        lead_score=None,
        created_at=None,
        updated_at=None,
    )


class LogWriter:
    """Appends rounds of events to many deal streams at once, each where it
    stands, so the deals' events interleave in the log."""

    def __init__(self, log: EventLog, deals: int) -> None:
        self.log = log
        prefix = uuid.uuid4().hex[:6]
        self.versions = {f"deal-{prefix}-{n}": 0 for n in range(deals)}

    def append_round(self, per_deal: int) -> None:
        writes = []
        for deal_id, version in self.versions.items():
            new = [
                NewEvent(
                    event_id=f"{deal_id}-{version + k}",
                    type="email.opened",
                    deal_id=deal_id,
                    occurred_at=T0,
                    data={"n": version + k},
                    digest="ab" * 32,
                )
                for k in range(1, per_deal + 1)
            ]
            writes.append(StreamWrite(deal_id, version, new, pending_summary(deal_id)))
            self.versions[deal_id] = version + per_deal
        self.log.append(writes)
