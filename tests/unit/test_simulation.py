"""Re-deciding recorded inputs, the percentile rule, moments, the generator."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from progression.contract import Contract
from progression.criteria import DealFacts
from progression.decision import StreamEvent, decide
from progression.history import EPOCH, generate
from progression.simulation import MEDIAN, P90, parse_moment, percentile, redecide
from progression.upcasting import upcast

from .engine_support import CATALOG, SCHEMAS, Deal, Input, effective, ev, happy_path

FAST_TRACK = CATALOG.current("inbound-fast-track")
DEFAULT = CATALOG.current("b2b-default")


def stream(items: list[Input]) -> list[StreamEvent]:
    return [
        StreamEvent(i.event_id, i.type, i.occurred_at, i.data, n)
        for n, i in enumerate(items, start=1)
    ]


# -- percentiles -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], MEDIAN, 2.5),
        ([1.0, 2.0, 3.0, 4.0], P90, 3.7),  # rank 2.7: 3 + 0.7
        ([4.0, 1.0, 3.0], MEDIAN, 3.0),  # unsorted input
        ([10.0, 20.0], P90, 19.0),
        ([5.0], P90, 5.0),
        ([0.0, 10.0], Fraction(1, 4), 2.5),
    ],
)
def test_percentiles_interpolate_between_the_closest_ranks(
    values: list[float], q: Fraction, expected: float
) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_no_values_have_no_percentile() -> None:
    assert percentile([], MEDIAN) is None


# -- re-deciding -------------------------------------------------------------------


def test_redeciding_gives_what_the_engine_gave_one_input_at_a_time() -> None:
    items = happy_path("d")
    recorded = Deal().post_all(items)
    assert effective(redecide(stream(items), DEFAULT)) == effective(recorded.decisions)


def test_redeciding_a_generated_history_matches_the_engine_rebuilding_facts() -> None:
    deals: dict[str, list[StreamEvent]] = defaultdict(list)
    for raw in generate(150, seed=9):
        deals[raw["deal_id"]].append(
            StreamEvent(
                raw["event_id"],
                raw["type"],
                datetime.fromisoformat(raw["occurred_at"]),
                upcast(raw["type"], raw.get("schema_version", 1), raw["data"]),
                len(deals[raw["deal_id"]]) + 1,
            )
        )
    for process in (DEFAULT, FAST_TRACK):
        for inputs in deals.values():
            # The reference: facts rebuilt from the whole stream every time.
            stream: list[StreamEvent] = []
            expected = []
            for item in inputs:
                stream.append(replace(item, arrival=len(stream) + 1))
                for decision in decide(stream, process):
                    expected.append(decision)
                    stream.append(
                        StreamEvent(
                            "d",
                            "stage.changed",
                            decision.effective_at,
                            decision.data(),
                            len(stream) + 1,
                        )
                    )
            assert redecide(inputs, process) == expected


def test_the_candidate_process_replaces_the_one_the_deal_names() -> None:
    items = happy_path("d")  # deal.created names no process: b2b-default
    decisions = redecide(stream(items), FAST_TRACK)
    assert [d.to for d in decisions] == [
        "connecting",
        "presenting",
        "negotiating",
        "closing",
        "won",
    ]
    assert {(d.process, d.process_version) for d in decisions} == {
        ("inbound-fast-track", 1)
    }


def test_an_override_to_a_stage_the_candidate_lacks_changes_nothing() -> None:
    items = [
        ev("c", "deal.created", 0, owner="rep-1"),
        ev("o", "stage.overridden", 1, to="researching", reason="by hand"),
    ]
    assert [d.to for d in redecide(stream(items), DEFAULT)] == [
        "prospecting",
        "researching",
    ]
    assert [d.to for d in redecide(stream(items), FAST_TRACK)] == ["connecting"]


def test_inputs_before_deal_created_wait_for_it() -> None:
    items = [
        ev("call", "discovery_call.agreed", 1),
        ev("c", "deal.created", 0, owner="rep-1"),
    ]
    decisions = redecide(stream(items), DEFAULT)
    assert [(d.from_stage, d.to) for d in decisions] == [
        (None, "prospecting"),
        ("prospecting", "connecting"),
    ]


# -- moments -----------------------------------------------------------------------


def test_moments_are_times_with_an_offset_or_dates() -> None:
    assert parse_moment("as_of", "2026-03-02T10:00:00+01:00") == datetime(
        2026, 3, 2, 9, tzinfo=UTC
    )
    assert parse_moment("as_of", "2026-03-02") == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_moment("to", "2026-03-02", end_of_day=True) == datetime(
        2026, 3, 3, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("2026-03-02T10:00:00", "needs an offset"),
        ("2026-02-30", "is not a date"),
        ("last tuesday", "neither an RFC 3339 time nor a date"),
    ],
)
def test_a_bad_moment_names_the_field_and_the_rule(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rf"^--as-of: .*{rule}"):
        parse_moment("--as-of", text)


# -- the generated history ---------------------------------------------------------


def test_a_history_is_the_same_for_the_same_seed() -> None:
    first = [json.dumps(e) for e in generate(50, seed=7)]
    assert first == [json.dumps(e) for e in generate(50, seed=7)]
    assert first != [json.dumps(e) for e in generate(50, seed=8)]
    # The first deals of a longer history are the shorter history.
    longer = [json.dumps(e) for e in generate(80, seed=7)]
    assert longer[: len(first)] == first


def test_a_history_is_valid_past_input_the_service_accepts() -> None:
    contract = Contract(SCHEMAS)
    now = datetime.now(UTC)
    events = list(generate(200, seed=1))
    for raw in events:
        contract.parse(raw, now=now)  # raises on any broken rule
    assert all(datetime.fromisoformat(e["occurred_at"]) < EPOCH for e in events)
    assert "stage.changed" not in {e["type"] for e in events}
    assert len({e["event_id"] for e in events}) == len(events)


def test_a_history_has_pricing_ready_leads_whose_budget_is_still_unknown() -> None:
    deals: dict[str, list[dict]] = defaultdict(list)
    for raw in generate(400, seed=7):
        deals[raw["deal_id"]].append(raw)

    def fast_track_material(events: list[dict]) -> bool:
        """At the first pain.shared: need confirmed, budget unknown, score 40+."""
        before: list[dict] = []
        for raw in sorted(events, key=lambda e: e["occurred_at"]):
            if raw["type"] == "pain.shared":
                break
            before.append(raw)
        facts = DealFacts.of(
            StreamEvent(
                e["event_id"],
                e["type"],
                datetime.fromisoformat(e["occurred_at"]),
                e["data"],
                n,
            ).as_fact()
            for n, e in enumerate(before)
        )
        status = {c: f.data["status"] for c, f in facts.qualification.items()}
        score, _ = facts.lead_score(FAST_TRACK.lead_score)
        return (
            len(before) < len(events)
            and status.get("need") == "confirmed"
            and status.get("budget") == "unknown"
            and score >= 40
        )

    ready = sum(fast_track_material(events) for events in deals.values())
    assert 0.05 * len(deals) < ready < 0.5 * len(deals)
