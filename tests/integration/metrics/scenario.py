"""Seven deals whose metrics are worked out by hand in test_metrics_api.py.

Days count from 2025-01-01T00:00Z. b2b-default stages: prospecting (3 days
expected, p=0.05), connecting (7, 0.15), researching (21, 0.30), presenting,
negotiating, closing.

- d1 ana 1000 EUR: created 0, connecting 2, researching 5, won 30 (through
  presenting, negotiating and closing at 30); meeting held 1, no-show 3.
- d2 ana 2000 EUR: created 1, connecting 5, lost 9 ("price"); meeting held 4.
- d3 bo 500 USD: created 2, disqualified 3 (no_budget).
- d4 bo, no amount or currency: created 3, connecting 4, overridden back to
  prospecting 6, connecting 8, still there; meeting no-show 5.
- d5 bo 3000 EUR: created 4, connecting 10, researching 11, won 20.
- d6 ana 10000 EUR: created 5, still in prospecting.
- d7 cara 50 EUR, process fast-track: created 0 in qualify, quote 1, lost 2.
"""

from __future__ import annotations

from typing import Any

from tests.unit.metrics.streams import Log


def scenario() -> list[dict[str, Any]]:
    log = Log()
    log.create("d1", 0, owner="ana", amount=1000)
    log.meeting("d1", 1)
    log.create("d2", 1, owner="ana", amount=2000)
    log.advance_to("d1", "connecting", 2)
    log.create("d3", 2, owner="bo", amount=500, currency="USD")
    log.meeting("d1", 3, held=False)
    log.disqualify("d3", 3, "no_budget")
    log.create("d4", 3, owner="bo", currency=None)
    log.advance_to("d4", "connecting", 4)
    log.create("d5", 4, owner="bo", amount=3000)
    log.meeting("d2", 4)
    log.advance_to("d1", "researching", 5)
    log.advance_to("d2", "connecting", 5)
    log.meeting("d4", 5, held=False)
    log.create("d6", 5, owner="ana", amount=10000)
    log.override("d4", "prospecting", 6, reason="requalify")
    log.advance_to("d4", "connecting", 8)
    log.lose("d2", 9, "price")
    log.advance_to("d5", "connecting", 10)
    log.advance_to("d5", "researching", 11)
    log.advance_to("d5", "won", 20)
    log.advance_to("d1", "won", 30)
    log.create(
        "d7", 0, owner="cara", amount=50, process="fast-track", first_stage="qualify"
    )
    log.change("d7", "quote", 1)
    log.lose("d7", 2, "timing")
    return log.events
