"""The decision engine, rule by rule, with each deal's history as evidence."""

from __future__ import annotations

from progression.criteria import DealFacts
from progression.decision import decide, evaluate

from .engine_support import DEFAULT, Deal, at, bant, ev, happy_path

ALL_BANT = dict(
    budget="confirmed", authority="confirmed", need="confirmed", timeline="confirmed"
)


def test_a_created_deal_enters_the_first_stage_at_its_creation_time() -> None:
    deal = Deal().post_all([ev("c", "deal.created", 5, owner="rep-1")])
    [created] = deal.decisions
    assert (created.from_stage, created.to, created.cause) == (
        None,
        "prospecting",
        "created",
    )
    assert created.effective_at == at(5)
    assert (created.process, created.process_version) == ("b2b-default", 1)


def test_the_happy_path_walks_every_stage_in_order_to_won() -> None:
    deal = Deal().post_all(happy_path())
    assert deal.path == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
        "won",
    ]
    assert [d.effective_at for d in deal.decisions] == [
        at(0),
        at(10),
        at(30),
        at(50),
        at(70),
        at(90),
        at(100),
    ]
    assert all(d.cause == "criteria" for d in deal.decisions[1:])


def test_an_advance_lists_each_criterion_with_the_event_that_proved_it() -> None:
    deal = Deal().post_all(happy_path())
    to_researching = deal.decisions[2]
    assert to_researching.action_event_id == "d-pain"
    assert {c.criterion: c.event_ids for c in to_researching.criteria} == {
        "budget_confirmed": ("d-q-budget",),
        "authority_confirmed": ("d-q-authority",),
        "need_confirmed": ("d-q-need",),
        "timeline_confirmed": ("d-q-timeline",),
    }


def test_rule_1_a_fact_from_an_earlier_stage_still_counts_later() -> None:
    # The next step was confirmed while the deal was still prospecting.
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev(
                "next",
                "next_step.confirmed",
                1,
                date="2026-03-10",
                agenda="Demo",
                attendees=["a@b.example"],
            ),
            ev("call", "discovery_call.agreed", 2),
            *bant(3, **ALL_BANT),
            ev("pain", "pain.shared", 4),
            ev("invite", "stakeholder.invited", 5),
        ]
    )
    assert deal.where == "presenting"
    into_presenting = deal.decisions[-1]
    assert into_presenting.criteria[0].event_ids == ("next",)
    assert into_presenting.effective_at == at(5)


def test_rule_1_an_action_that_came_early_counts_when_the_stage_is_reached() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("pain", "pain.shared", 1),  # before the discovery call was agreed
            ev("call", "discovery_call.agreed", 2),
            *bant(3, **ALL_BANT),
        ]
    )
    assert deal.where == "researching"
    assert deal.decisions[-1].effective_at == at(3)


def test_rule_2_the_latest_occurrence_wins_whatever_arrived_first() -> None:
    later_confirmed = ev(
        "b2", "qualification.updated", 10, criterion="budget", status="confirmed"
    )
    earlier_unknown = ev(
        "b1", "qualification.updated", 9, criterion="budget", status="unknown"
    )
    base = [
        ev("c", "deal.created", 0, owner="r"),
        ev("call", "discovery_call.agreed", 1),
        *bant(
            2,
            budget="unknown",
            authority="confirmed",
            need="confirmed",
            timeline="confirmed",
        ),
        ev("pain", "pain.shared", 3),
    ]
    one = Deal().post_all([*base, later_confirmed, earlier_unknown])
    other = Deal().post_all([*base, earlier_unknown, later_confirmed])
    assert one.where == other.where == "researching"
    assert one.decisions[-1].effective_at == other.decisions[-1].effective_at == at(10)


def test_rule_2_a_tie_in_time_goes_to_the_later_arrival() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("call", "discovery_call.agreed", 1),
            *bant(2, authority="confirmed", need="confirmed", timeline="confirmed"),
            ev(
                "b-yes",
                "qualification.updated",
                3,
                criterion="budget",
                status="confirmed",
            ),
            ev(
                "b-unknown",
                "qualification.updated",
                3,
                criterion="budget",
                status="unknown",
            ),
            ev("pain", "pain.shared", 4),
        ]
    )
    assert deal.where == "connecting"


def test_rule_3_one_event_can_move_a_deal_through_several_stages() -> None:
    inputs = happy_path()
    deal = Deal().post_all([inputs[0], *inputs[2:], inputs[1]])  # call comes last
    made_by_last = [d for d in deal.decisions if d.trigger_event_id == "d-call"]
    assert [d.to for d in made_by_last] == [
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
        "won",
    ]
    assert [d.from_stage for d in made_by_last] == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
    ]


def test_rule_3_stages_are_never_skipped_when_an_exit_criterion_is_missing() -> None:
    # Everything but the next step: the deal stops in researching.
    deal = Deal().post_all([i for i in happy_path() if i.type != "next_step.confirmed"])
    assert deal.where == "researching"
    result = evaluate(deal.stream, DEFAULT)
    assert result.stage == "researching" and result.action_seen
    assert [c.holds for c in result.criteria] == [False]
    assert "a confirmed next step" in result.missing.lower() or "next step" in (
        result.missing.lower()
    )


def test_rule_3_disqualification_comes_before_advancing() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("dq", "disqualifier.identified", 1, reason="no_fit"),
            ev("call", "discovery_call.agreed", 2),
        ]
    )
    assert deal.path == ["prospecting", "disqualified"]
    assert deal.decisions[-1].reason == "no_fit"


def test_rule_4_events_before_creation_are_kept_and_decide_nothing() -> None:
    deal = Deal()
    for item in happy_path()[1:]:
        assert deal.post(item) == []
    assert evaluate(deal.stream, None).status == "pending"
    made = deal.post(happy_path()[0])
    assert [d.to for d in made] == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
        "won",
    ]


def test_rule_5_a_terminal_deal_ignores_later_events() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("lost", "deal.lost", 1, reason="chose a competitor"),
            ev("call", "discovery_call.agreed", 2),
            ev("dq", "disqualifier.identified", 3, reason="no_budget"),
        ]
    )
    assert deal.path == ["prospecting", "lost"]
    assert deal.decisions[-1].reason == "chose a competitor"


def test_rule_5_an_override_reopens_a_terminal_deal() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("lost", "deal.lost", 1, reason="went quiet"),
            ev(
                "back",
                "stage.overridden",
                5,
                to="connecting",
                reason="they called back",
            ),
        ]
    )
    assert deal.path == ["prospecting", "lost", "connecting"]
    override = deal.decisions[-1]
    assert (override.cause, override.from_stage, override.reason) == (
        "override",
        "lost",
        "they called back",
    )
    # The loss it reversed does not close the deal again.
    deal.post(ev("call", "discovery_call.agreed", 6))
    assert deal.where == "connecting"


def test_an_override_sets_aside_older_actions_but_keeps_facts() -> None:
    deal = Deal().post_all(
        [
            *happy_path()[:8],  # up to the stakeholder invite: presenting
            ev("back", "stage.overridden", 55, to="researching", reason="premature"),
        ]
    )
    assert deal.where == "researching"  # the old invite does not move it again
    deal.post(ev("invite-2", "stakeholder.invited", 56))
    assert deal.where == "presenting"  # the confirmed next step still counts
    assert deal.decisions[-1].effective_at == at(56)


def test_rule_6_effective_at_is_the_latest_of_action_facts_and_entry() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("call", "discovery_call.agreed", 1),
            ev("pain", "pain.shared", 2),
            *bant(3, authority="confirmed", need="confirmed", timeline="confirmed"),
            ev("b", "qualification.updated", 7, criterion="budget", status="confirmed"),
        ]
    )
    assert deal.decisions[-1].to == "researching"
    assert deal.decisions[-1].effective_at == at(7)


def test_rule_6_an_advance_never_takes_effect_before_the_stage_was_entered() -> None:
    deal = Deal().post_all(
        [
            ev("call", "discovery_call.agreed", 1),
            ev("c", "deal.created", 4, owner="r"),
        ]
    )
    assert [d.effective_at for d in deal.decisions] == [at(4), at(4)]


def test_rule_6_a_disqualification_takes_effect_when_its_evidence_occurred() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("call", "discovery_call.agreed", 1),
            ev("t", "qualification.updated", 3, criterion="timeline", status="none"),
        ]
    )
    assert deal.path == ["prospecting", "connecting", "disqualified"]
    assert deal.decisions[-1].effective_at == at(3)
    assert deal.decisions[-1].reason == "no_urgency"


def test_budget_none_disqualifies_unless_there_is_a_path_to_it() -> None:
    base = [ev("c", "deal.created", 0, owner="r")]
    with_path = Deal().post_all(
        [
            *base,
            ev(
                "b",
                "qualification.updated",
                1,
                criterion="budget",
                status="none",
                path=True,
            ),
        ]
    )
    without = Deal().post_all(
        [
            *base,
            ev("b", "qualification.updated", 1, criterion="budget", status="none"),
        ]
    )
    assert with_path.where == "prospecting"
    assert without.where == "disqualified" and without.decisions[-1].reason == (
        "no_budget"
    )


def test_each_bant_none_has_its_reason() -> None:
    reasons = {}
    for criterion in ("budget", "authority", "need", "timeline"):
        deal = Deal().post_all(
            [
                ev("c", "deal.created", 0, owner="r"),
                ev("x", "qualification.updated", 1, criterion=criterion, status="none"),
            ]
        )
        reasons[criterion] = deal.decisions[-1].reason
    assert reasons == {
        "budget": "no_budget",
        "authority": "no_authority",
        "need": "no_fit",
        "timeline": "no_urgency",
    }


def test_a_later_confirmation_outweighs_an_earlier_none() -> None:
    # budget confirmed at 10:00 beats budget none at 09:00, whichever arrived first
    deal = Deal().post_all(
        [
            ev(
                "b-yes",
                "qualification.updated",
                10,
                criterion="budget",
                status="confirmed",
            ),
            ev("b-none", "qualification.updated", 9, criterion="budget", status="none"),
            ev("c", "deal.created", 0, owner="r"),
        ]
    )
    assert deal.where == "prospecting"


def test_deciding_again_over_its_own_decisions_decides_nothing() -> None:
    deal = Deal().post_all(happy_path())
    assert decide(deal.stream, DEFAULT) == []


def test_the_lead_score_counts_capped_signals() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            *[ev(f"open-{i}", "email.opened", i) for i in range(1, 6)],
            ev("reply", "email.replied", 7),
        ]
    )
    facts = DealFacts.of(e.as_fact() for e in deal.stream if e.type != "stage.changed")
    score, _ = facts.lead_score(DEFAULT.lead_score)
    assert score == 5 * 2 + 10  # only two opens count


def test_a_lead_score_criterion_takes_effect_when_the_score_is_reached() -> None:
    # The fast track lets a hot inbound lead with a need skip the budget talk.
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r", process="inbound-fast-track"),
            ev(
                "need", "qualification.updated", 1, criterion="need", status="confirmed"
            ),
            ev("pain", "pain.shared", 2),
            ev("meeting", "meeting.held", 3),
            ev("download", "content.downloaded", 4),
            ev("click", "link.clicked", 5),
            ev("open", "email.opened", 6),
        ]
    )
    assert deal.path == ["connecting", "presenting"]
    ready = deal.decisions[-1]
    assert ready.effective_at == at(5)  # 20 + 10 + 10 reached 40 at the click
    assert set(ready.criteria[-1].event_ids) >= {"meeting", "download", "click"}


def test_an_override_to_the_current_stage_is_not_applied_later() -> None:
    deal = Deal().post_all(
        [
            ev("c", "deal.created", 0, owner="r"),
            ev("call", "discovery_call.agreed", 1),
            ev("stay", "stage.overridden", 2, to="connecting", reason="no-op"),
            *bant(3, **ALL_BANT),
            ev("pain", "pain.shared", 4),
            ev("open", "email.opened", 5),
        ]
    )
    assert deal.path == ["prospecting", "connecting", "researching"]
    assert all(d.cause != "override" for d in deal.decisions)


def test_an_override_that_arrived_before_the_creation_applies_when_it_arrives() -> None:
    created = ev("c", "deal.created", 0, owner="r")
    override = ev("jump", "stage.overridden", 5, to="presenting", reason="inbound")
    early = Deal().post_all([override, created])
    late = Deal().post_all([created, override])
    assert early.path == late.path == ["prospecting", "presenting"]
    assert early.decisions[-1].effective_at == late.decisions[-1].effective_at == at(5)

    dated_before = ev("old", "stage.overridden", -1, to="presenting", reason="x")
    assert Deal().post_all([dated_before, created]).path == ["prospecting"]


def test_a_loss_after_the_last_advance_is_counted_in_the_stage_it_left() -> None:
    inputs = [i for i in happy_path() if i.type != "contract.signed"]
    lost = ev("lost", "deal.lost", 300, reason="budget frozen")
    in_order = Deal().post_all([*inputs, lost])
    created_last = Deal().post_all([*inputs[1:], lost, inputs[0]])
    assert in_order.path == created_last.path
    assert created_last.decisions[-1].from_stage == "closing"
    assert created_last.decisions[-1].effective_at == at(300)


def test_any_takes_the_alternative_that_held_first() -> None:
    # need at 10, score 40 at 11:30, pain at 12, budget at 14: the score
    # path held first, whichever of the two arrived before the pain.
    base = [
        ev("c", "deal.created", 0, owner="r", process="inbound-fast-track"),
        ev("need", "qualification.updated", 10, criterion="need", status="confirmed"),
        ev("m1", "meeting.held", 11),
        ev("m2", "meeting.held", 11.5),
    ]
    pain = ev("pain", "pain.shared", 12)
    budget = ev(
        "budget", "qualification.updated", 14, criterion="budget", status="confirmed"
    )
    one = Deal().post_all([*base, pain, budget])
    other = Deal().post_all([*base, budget, pain])
    assert one.decisions[-1].to == other.decisions[-1].to == "presenting"
    assert one.decisions[-1].effective_at == other.decisions[-1].effective_at == at(12)
