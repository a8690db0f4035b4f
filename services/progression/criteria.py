"""Exit criteria: the rules a process declares, and whether a deal meets them.

A rule reads the deal's accumulated facts (`DealFacts`) and answers with a
`Check`: whether it holds and the events that prove it. Nothing here knows
about storage or HTTP; the process file's rule syntax is documented in
`docs/processes.md`.
"""

from __future__ import annotations

__all__ = [
    "AllOf",
    "AnyOf",
    "Check",
    "DealFacts",
    "EventCount",
    "Fact",
    "LeadScoreAtLeast",
    "LeadScoreWeight",
    "Not",
    "Qualification",
    "Rule",
    "describe",
    "parse_rule",
]

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

BANT = ("budget", "authority", "need", "timeline")
_EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Fact:
    """One input event as the rules see it."""

    event_id: str
    type: str
    occurred_at: datetime
    arrival: int
    data: Mapping[str, Any]

    @property
    def order(self) -> tuple[datetime, int]:
        """Effective order: by occurrence, ties to the later arrival (rule 2)."""
        return (self.occurred_at, self.arrival)


@dataclass(frozen=True, slots=True)
class LeadScoreWeight:
    points: int
    max_count: int | None = None


@dataclass(slots=True)
class DealFacts:
    """Every input a deal has accumulated, indexed the way the rules ask."""

    by_type: dict[str, list[Fact]] = field(default_factory=lambda: defaultdict(list))
    qualification: dict[str, Fact] = field(default_factory=dict)

    @classmethod
    def of(cls, facts: Iterable[Fact]) -> DealFacts:
        deal = cls()
        for fact in facts:
            deal.add(fact)
        for events in deal.by_type.values():
            events.sort(key=lambda f: f.order)
        return deal

    def add(self, fact: Fact) -> None:
        """Add a fact while building; `of` puts each type in order after."""
        self.by_type[fact.type].append(fact)
        self._note_qualification(fact)

    def insert(self, fact: Fact) -> None:
        """Add one fact to an index already built, keeping each type in order."""
        bisect.insort(self.by_type[fact.type], fact, key=lambda f: f.order)
        self._note_qualification(fact)

    def _note_qualification(self, fact: Fact) -> None:
        if fact.type == "qualification.updated":
            criterion = str(fact.data.get("criterion"))
            current = self.qualification.get(criterion)
            if current is None or fact.order > current.order:
                self.qualification[criterion] = fact

    def of_type(self, type_: str) -> list[Fact]:
        """Events of one type, earliest first."""
        return self.by_type.get(type_, [])

    def lead_score(
        self, weights: Mapping[str, LeadScoreWeight]
    ) -> tuple[int, list[tuple[int, Fact]]]:
        """The score and the running total after each counted signal."""
        counted: list[Fact] = []
        for type_, weight in weights.items():
            events = self.of_type(type_)
            if weight.max_count is not None:
                events = events[: weight.max_count]
            counted.extend(events)
        counted.sort(key=lambda f: f.order)
        total = 0
        running: list[tuple[int, Fact]] = []
        for fact in counted:
            total += weights[fact.type].points
            running.append((total, fact))
        return total, running


@dataclass(frozen=True, slots=True)
class Check:
    holds: bool
    evidence: tuple[Fact, ...] = ()

    @property
    def proved_at(self) -> datetime | None:
        """When the last piece of evidence occurred (rule 6)."""
        return max((f.occurred_at for f in self.evidence), default=None)


@dataclass(frozen=True, slots=True)
class Qualification:
    """The current value of a BANT criterion has a given status."""

    criterion: str
    status: str
    path: bool | None = None

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        current = facts.qualification.get(self.criterion)
        if current is None or current.data.get("status") != self.status:
            return Check(False)
        if self.path is not None and bool(current.data.get("path")) != self.path:
            return Check(False)
        return Check(True, (current,))


@dataclass(frozen=True, slots=True)
class EventCount:
    """At least `at_least` events of a type are in the history."""

    type: str
    at_least: int = 1

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        events = facts.of_type(self.type)
        if len(events) < self.at_least:
            return Check(False)
        return Check(True, tuple(events[: self.at_least]))


@dataclass(frozen=True, slots=True)
class LeadScoreAtLeast:
    at_least: int

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        _, running = facts.lead_score(weights)
        for index, (total, _) in enumerate(running):
            if total >= self.at_least:
                return Check(True, tuple(f for _, f in running[: index + 1]))
        return Check(self.at_least <= 0)


@dataclass(frozen=True, slots=True)
class AllOf:
    rules: tuple[Rule, ...]

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        evidence: list[Fact] = []
        for rule in self.rules:
            result = rule.check(facts, weights)
            if not result.holds:
                return Check(False)
            evidence.extend(result.evidence)
        return Check(True, _unique(evidence))


@dataclass(frozen=True, slots=True)
class AnyOf:
    rules: tuple[Rule, ...]

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        # The alternative that has held the longest, so that the effective
        # time does not depend on which evidence arrived first (rule 7).
        holding = [
            r for r in (rule.check(facts, weights) for rule in self.rules) if r.holds
        ]
        if not holding:
            return Check(False)
        return min(holding, key=lambda r: r.proved_at or _EARLIEST)


@dataclass(frozen=True, slots=True)
class Not:
    rule: Rule

    def check(self, facts: DealFacts, weights: Mapping[str, LeadScoreWeight]) -> Check:
        return Check(not self.rule.check(facts, weights).holds)


Rule = Qualification | EventCount | LeadScoreAtLeast | AllOf | AnyOf | Not


def _unique(facts: Sequence[Fact]) -> tuple[Fact, ...]:
    seen: dict[str, Fact] = {}
    for fact in facts:
        seen.setdefault(fact.event_id, fact)
    return tuple(seen.values())


def parse_rule(spec: Mapping[str, Any]) -> Rule:
    """Build a rule from its process-file form (already schema-validated)."""
    if "all" in spec:
        return AllOf(tuple(parse_rule(r) for r in spec["all"]))
    if "any" in spec:
        return AnyOf(tuple(parse_rule(r) for r in spec["any"]))
    if "not" in spec:
        return Not(parse_rule(spec["not"]))
    if "qualification" in spec:
        path = spec.get("path")
        return Qualification(
            spec["qualification"], spec["status"], None if path is None else bool(path)
        )
    if "event" in spec:
        return EventCount(spec["event"], int(spec.get("at_least", 1)))
    if "lead_score" in spec:
        return LeadScoreAtLeast(int(spec["lead_score"]["at_least"]))
    raise ValueError(f"not a rule: {dict(spec)!r}")


def describe(rule: Rule) -> str:
    """The rule in plain words, for explanations to a rep."""
    match rule:
        case Qualification(criterion, status, path):
            words = f"{criterion} {status}"
            if path is False:
                words += " with no path to get it"
            elif path is True:
                words += " with a path to get it"
            return words
        case EventCount(type_, 1):
            return f"a {type_}"
        case EventCount(type_, n):
            return f"at least {n} {type_}"
        case LeadScoreAtLeast(n):
            return f"a lead score of at least {n}"
        case AllOf(rules):
            return " and ".join(describe(r) for r in rules)
        case AnyOf(rules):
            return "either " + " or ".join(describe(r) for r in rules)
        case Not(inner):
            return f"not {describe(inner)}"
    raise AssertionError(rule)
