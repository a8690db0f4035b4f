"""The decision engine: where a deal stands and which stage changes are due.

`decide` is a pure function of a deal's stream (its inputs and the stage
changes already recorded, in arrival order) and the process version the
deal was created under. It returns the `stage.changed` decisions that the
stream calls for now, each with its effective time and its evidence. The
numbered rules cited below are those of "How decisions are made" in
`docs/decisions.md`.
"""

from __future__ import annotations

__all__ = [
    "ACTION_PHRASES",
    "CriterionEvidence",
    "CriterionStatus",
    "DealPosition",
    "Decision",
    "Evaluation",
    "StreamEvent",
    "decide",
    "evaluate",
    "position_of",
    "process_ref",
]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .criteria import Check, DealFacts, Fact, describe
from .process import TERMINAL, Process, Stage

DEFAULT_PROCESS = "b2b-default"
STAGE_CHANGED = "stage.changed"

ACTION_PHRASES = {
    "discovery_call.agreed": "the prospect to agree to a discovery call",
    "pain.shared": "the prospect to share their pain",
    "stakeholder.invited": "the prospect to invite stakeholders",
    "proposal.requested": "the prospect to request a formal proposal",
    "procurement.introduced": "the prospect to introduce procurement",
    "contract.signed": "the prospect to sign the contract",
}


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a deal's stream, in the engine's terms."""

    event_id: str
    type: str
    occurred_at: datetime
    data: Mapping[str, Any]
    arrival: int  # the stream version: arrival order within the deal

    def as_fact(self) -> Fact:
        return Fact(self.event_id, self.type, self.occurred_at, self.arrival, self.data)


@dataclass(frozen=True, slots=True)
class CriterionEvidence:
    criterion: str
    description: str
    event_ids: tuple[str, ...]
    occurred_at: datetime | None

    def data(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "description": self.description,
            "event_ids": list(self.event_ids),
            "occurred_at": None if self.occurred_at is None else _iso(self.occurred_at),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """A `stage.changed` the engine calls for."""

    from_stage: str | None
    to: str
    cause: str
    effective_at: datetime
    trigger_event_id: str
    process: str
    process_version: int
    action_event_id: str | None = None
    reason: str | None = None
    criteria: tuple[CriterionEvidence, ...] = ()

    def data(self) -> dict[str, Any]:
        """The decision as the `data` of a `stage.changed` event."""
        return {
            "from": self.from_stage,
            "to": self.to,
            "cause": self.cause,
            "effective_at": _iso(self.effective_at),
            "trigger_event_id": self.trigger_event_id,
            "action_event_id": self.action_event_id,
            "reason": self.reason,
            "criteria": [c.data() for c in self.criteria],
            "process": self.process,
            "process_version": self.process_version,
        }


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass(slots=True)
class DealPosition:
    """Where a deal stands after the stage changes recorded in its stream."""

    created: StreamEvent | None = None
    status: str = "pending"
    stage: str | None = None
    entered_at: datetime | None = None
    process: str | None = None
    process_version: int | None = None
    # Evidence dated at or before the latest override is set aside (see _cut).
    override_cut: datetime | None = None
    overrides_applied: set[str] = field(default_factory=set)

    def apply(self, decision: Decision) -> None:
        self.apply_data(
            decision.to,
            decision.cause,
            decision.effective_at,
            decision.trigger_event_id,
        )
        self.process = decision.process
        self.process_version = decision.process_version

    def apply_data(
        self, to: str, cause: str, effective_at: datetime, trigger: str
    ) -> None:
        if to in TERMINAL:
            self.status, self.stage = to, None
        else:
            self.status, self.stage = "open", to
        self.entered_at = effective_at
        if cause == "override":
            self.overrides_applied.add(trigger)
            self.override_cut = effective_at

    @property
    def where(self) -> str | None:
        """The current stage, or the terminal state."""
        if self.status == "open":
            return self.stage
        return None if self.status == "pending" else self.status


def position_of(stream: Sequence[StreamEvent]) -> DealPosition:
    position = DealPosition()
    for event in stream:
        if event.type == "deal.created" and position.created is None:
            position.created = event
        elif event.type == STAGE_CHANGED:
            data = event.data
            position.apply_data(
                data["to"],
                data["cause"],
                _parse(data["effective_at"]),
                data["trigger_event_id"],
            )
            position.process = data["process"]
            position.process_version = int(data["process_version"])
    return position


def process_ref(stream: Sequence[StreamEvent]) -> tuple[str, int | None] | None:
    """The process a deal is decided by: its key, and its version once created.

    None while the deal has no `deal.created`. The version is None until the
    creation has been decided; the caller then uses the key's current version.
    """
    position = position_of(stream)
    if position.created is None:
        return None
    if position.process is not None:
        return position.process, position.process_version
    return str(position.created.data.get("process") or DEFAULT_PROCESS), None


def _inputs(stream: Sequence[StreamEvent]) -> list[StreamEvent]:
    return [e for e in stream if e.type != STAGE_CHANGED]


def decide(
    stream: Sequence[StreamEvent], process: Process, facts: DealFacts | None = None
) -> list[Decision]:
    """The stage changes the stream calls for now, in the order they happen.

    Deciding again over the stream with these decisions appended returns
    nothing: the engine is idempotent over its own output. `facts`, when
    given, must index exactly the stream's inputs; a caller that extends a
    stream event by event keeps one up to date instead of rebuilding it.
    """
    position = position_of(stream)
    if position.created is None:
        return []  # rule 4: kept, nothing decided until deal.created
    inputs = _inputs(stream)
    trigger = inputs[-1]
    decisions: list[Decision] = []

    def record(decision: Decision) -> None:
        decisions.append(decision)
        position.apply(decision)

    creating = position.status == "pending"
    if creating:
        created = position.created
        record(
            Decision(
                from_stage=None,
                to=process.first_stage.key,
                cause="created",
                effective_at=created.occurred_at,  # rule 6
                trigger_event_id=created.event_id,
                process=process.key,
                process_version=process.version,
            )
        )

    for override in _due_overrides(inputs, position, trigger, creating=creating):
        decision = _override(override, position, process)
        if decision is not None:
            record(decision)

    if facts is None:
        facts = DealFacts.of(e.as_fact() for e in inputs)
    # Rule 3: terminal outcomes first, then one hop at a time while due. An
    # advance that took effect before the loss or disqualification was even
    # evidenced comes first, so the drop is counted in the stage it left.
    for _ in range(len(process.stages) + 1):
        if position.status != "open":
            break  # rule 5
        terminal = _terminal_due(facts, position, process, trigger)
        advance = _advance_due(facts, position, process, trigger)
        if terminal is not None and advance is not None:
            evidenced_at = terminal.criteria[0].occurred_at or terminal.effective_at
            decision = advance if advance.effective_at < evidenced_at else terminal
        else:
            decision = terminal or advance
        if decision is None:
            break
        record(decision)
    return decisions


def _due_overrides(
    inputs: Sequence[StreamEvent],
    position: DealPosition,
    trigger: StreamEvent,
    *,
    creating: bool,
) -> list[StreamEvent]:
    """The overrides to apply now, each considered exactly once.

    An override is applied when it arrives, if the deal exists; one that
    arrived earlier is applied when `deal.created` arrives, in the order they
    occurred, unless it is dated before the creation (it moved a deal that
    did not exist yet: kept, and it changes nothing).
    """
    assert position.created is not None
    if creating:
        since = position.created.occurred_at
        early = [
            e for e in inputs if e.type == "stage.overridden" and e.occurred_at >= since
        ]
        return sorted(early, key=lambda e: (e.occurred_at, e.arrival))
    if (
        trigger.type == "stage.overridden"
        and trigger.event_id not in position.overrides_applied
    ):
        return [trigger]
    return []


def _override(
    event: StreamEvent, position: DealPosition, process: Process
) -> Decision | None:
    where = position.where
    to = str(event.data.get("to"))
    if to == where or not (to in TERMINAL or process.has_stage(to)):
        return None  # already there, or not a place of this process
    entered_at = position.entered_at or event.occurred_at
    return Decision(
        from_stage=where,
        to=to,
        cause="override",
        effective_at=max(event.occurred_at, entered_at),  # rule 6
        trigger_event_id=event.event_id,
        reason=str(event.data.get("reason", "")) or None,
        process=process.key,
        process_version=process.version,
    )


def _not_set_aside(facts: list[Fact], position: DealPosition) -> list[Fact]:
    """Actions, losses and disqualifiers an override has not set aside.

    A person's override is a judgement as of its effective time: the prospect
    actions and the loss or disqualification evidence dated at or before it
    no longer move the deal. Exit-criteria facts still count.
    """
    cut = position.override_cut
    if cut is None:
        return facts
    return [f for f in facts if f.occurred_at > cut]


def _terminal_due(
    facts: DealFacts, position: DealPosition, process: Process, trigger: StreamEvent
) -> Decision | None:
    assert position.entered_at is not None
    candidates: list[tuple[datetime, int, str, str, Check, str]] = []
    for fact in _not_set_aside(facts.of_type("disqualifier.identified"), position)[:1]:
        reason = str(fact.data.get("reason"))
        check = Check(True, (fact,))
        candidates.append(
            (
                fact.occurred_at,
                0,
                "disqualified",
                reason,
                check,
                "disqualifier identified",
            )
        )
    for rule in process.disqualify_when:
        check = rule.rule.check(facts, process.lead_score)
        if not check.holds:
            continue
        proved_at = check.proved_at or trigger.occurred_at
        cut = position.override_cut
        if cut is not None and proved_at <= cut:
            continue
        candidates.append(
            (proved_at, 1, "disqualified", rule.reason, check, describe(rule.rule))
        )
    for fact in _not_set_aside(facts.of_type("deal.lost"), position)[:1]:
        check = Check(True, (fact,))
        candidates.append(
            (fact.occurred_at, 2, "lost", str(fact.data.get("reason")), check, "lost")
        )
    if not candidates:
        return None

    # Of several, the earliest-dated outcome wins; disqualification on a tie.
    occurred_at, _, to, reason, check, description = min(
        candidates, key=lambda c: (c[0], c[1])
    )
    return Decision(
        from_stage=position.stage,
        to=to,
        cause=to if to == "lost" else "disqualified",
        effective_at=max(occurred_at, position.entered_at),  # rule 6
        trigger_event_id=trigger.event_id,
        reason=reason,
        criteria=(
            CriterionEvidence(
                reason,
                description,
                tuple(f.event_id for f in check.evidence),
                check.proved_at,
            ),
        ),
        process=process.key,
        process_version=process.version,
    )


def _advance_due(
    facts: DealFacts, position: DealPosition, process: Process, trigger: StreamEvent
) -> Decision | None:
    assert position.stage is not None and position.entered_at is not None
    stage = process.stage(position.stage)
    actions = _not_set_aside(facts.of_type(stage.advances_on), position)
    if not actions:
        return None
    checks = _criteria_checks(stage, facts, process)
    if not all(check.holds for _, check in checks):
        return None

    # Rule 1 and 6: the earliest occurrence of the action counts, and the
    # advance takes effect when the last of action, facts and entry was true.
    action = actions[0]
    moments = [position.entered_at, action.occurred_at]
    moments += [c.proved_at for _, c in checks if c.proved_at is not None]
    return Decision(
        from_stage=stage.key,
        to=process.next_after(stage.key),
        cause="criteria",
        effective_at=max(moments),
        trigger_event_id=trigger.event_id,
        action_event_id=action.event_id,
        criteria=tuple(
            CriterionEvidence(
                criterion.key,
                criterion.description,
                tuple(f.event_id for f in check.evidence),
                check.proved_at,
            )
            for criterion, check in checks
        ),
        process=process.key,
        process_version=process.version,
    )


def _criteria_checks(
    stage: Stage, facts: DealFacts, process: Process
) -> list[tuple[Any, Check]]:
    return [
        (criterion, criterion.rule.check(facts, process.lead_score))
        for criterion in stage.exit_criteria
    ]


@dataclass(frozen=True, slots=True)
class CriterionStatus:
    key: str
    description: str
    rule: str
    holds: bool
    event_ids: tuple[str, ...]
    occurred_at: datetime | None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the current stage asks for, what is there and what is missing."""

    status: str
    stage: str | None
    stage_entered_at: datetime | None
    advances_on: str | None
    action_seen: bool
    action_event_id: str | None
    criteria: tuple[CriterionStatus, ...]
    next: str | None
    missing: str


def evaluate(stream: Sequence[StreamEvent], process: Process | None) -> Evaluation:
    """Explain the current stage of a deal to a rep, in plain words."""
    position = position_of(stream)
    if position.created is None or process is None:
        return Evaluation(
            "pending",
            None,
            None,
            None,
            False,
            None,
            (),
            None,
            "The deal has no deal.created yet: its events are kept and nothing is "
            "decided until it arrives.",
        )
    if position.status != "open":
        return Evaluation(
            position.status,
            None,
            position.entered_at,
            None,
            False,
            None,
            (),
            None,
            f"The deal is {position.status}; later events change nothing unless a "
            "person overrides its stage.",
        )
    assert position.stage is not None
    stage = process.stage(position.stage)
    facts = DealFacts.of(e.as_fact() for e in _inputs(stream))
    actions = _not_set_aside(facts.of_type(stage.advances_on), position)
    statuses = tuple(
        CriterionStatus(
            criterion.key,
            criterion.description,
            describe(criterion.rule),
            check.holds,
            tuple(f.event_id for f in check.evidence),
            check.proved_at,
        )
        for criterion, check in _criteria_checks(stage, facts, process)
    )
    missing = [
        s.description[:1].lower() + s.description[1:] for s in statuses if not s.holds
    ]
    target = process.next_after(stage.key)
    parts = []
    if not actions:
        parts.append(
            f"Waiting for {ACTION_PHRASES.get(stage.advances_on, stage.advances_on)}"
            f" ({stage.advances_on})"
        )
    if missing:
        parts.append("still missing: " + ", ".join(missing))
    sentence = (
        "; ".join(parts) + f" before the deal moves to {target}."
        if parts
        else f"Everything {stage.name} asks for is there; the deal moves to "
        f"{target} on its next event."
    )
    return Evaluation(
        "open",
        stage.key,
        position.entered_at,
        stage.advances_on,
        bool(actions),
        actions[0].event_id if actions else None,
        statuses,
        target,
        sentence[0].upper() + sentence[1:],
    )
