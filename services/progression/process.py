"""Declared sales processes: stages, their advancing actions and exit criteria.

A process is data a sales-operations lead writes in YAML (see
`docs/processes.md`). It is validated against `schemas/process.schema.json`
and for consistency the schema cannot express, then frozen into a `Process`.
A deal is decided by the process version it was created under, so every
version ever used stays loadable (the event log keeps them).
"""

from __future__ import annotations

__all__ = [
    "TERMINAL",
    "ExitCriterion",
    "Process",
    "ProcessCatalog",
    "Stage",
    "digest_of",
    "load_process_dir",
    "load_process_file",
    "parse_process",
]

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from .criteria import LeadScoreWeight, Rule, parse_rule
from .errors import InvalidProcess, UnknownProcess, Violation

log = logging.getLogger(__name__)

TERMINAL = ("won", "lost", "disqualified")


@dataclass(frozen=True, slots=True)
class ExitCriterion:
    key: str
    description: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Stage:
    key: str
    name: str
    goal: str
    key_activities: tuple[str, ...]
    advances_on: str
    exit_criteria: tuple[ExitCriterion, ...]
    expected_days: float
    win_probability: float


@dataclass(frozen=True, slots=True)
class Disqualification:
    reason: str
    rule: Rule


@dataclass(frozen=True)
class Process:
    key: str
    version: int
    name: str
    description: str
    stages: tuple[Stage, ...]
    disqualify_when: tuple[Disqualification, ...]
    lead_score: Mapping[str, LeadScoreWeight]
    definition: Mapping[str, Any]

    @cached_property
    def digest(self) -> str:
        return digest_of(self.definition)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {stage.key: i for i, stage in enumerate(self.stages)}

    @property
    def first_stage(self) -> Stage:
        return self.stages[0]

    def stage(self, key: str) -> Stage:
        return self.stages[self._index[key]]

    def has_stage(self, key: str) -> bool:
        return key in self._index

    def order_of(self, key: str) -> int:
        """Position of a stage (0-based); terminal states come after all."""
        return self._index.get(key, len(self.stages))

    def next_after(self, key: str) -> str:
        """Where the stage's action leads: the next stage, or `won` after the last."""
        index = self._index[key] + 1
        return self.stages[index].key if index < len(self.stages) else "won"


def digest_of(definition: Mapping[str, Any]) -> str:
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pointer(path: Iterable[Any]) -> str:
    return "".join(f"/{part}" for part in path)


def parse_process(
    definition: Mapping[str, Any], schema: Mapping[str, Any], source: str
) -> Process:
    """Validate a process definition and freeze it; `source` names it in errors."""
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(definition), key=lambda e: list(e.path))
    if errors:
        raise InvalidProcess(
            source, [Violation(_pointer(e.absolute_path), e.message) for e in errors]
        )

    stages = tuple(
        Stage(
            key=s["key"],
            name=s["name"],
            goal=s["goal"],
            key_activities=tuple(s.get("key_activities", ())),
            advances_on=s["advances_on"],
            exit_criteria=tuple(
                ExitCriterion(c["key"], c["description"], parse_rule(c["rule"]))
                for c in s.get("exit_criteria") or ()
            ),
            expected_days=float(s["expected_days"]),
            win_probability=float(s["win_probability"]),
        )
        for s in definition["stages"]
    )
    violations = _consistency(stages)
    if violations:
        raise InvalidProcess(source, violations)

    return Process(
        key=definition["key"],
        version=int(definition["version"]),
        name=definition["name"],
        description=definition.get("description", ""),
        stages=stages,
        disqualify_when=tuple(
            Disqualification(d["reason"], parse_rule(d["rule"]))
            for d in definition.get("disqualify_when") or ()
        ),
        lead_score={
            type_: LeadScoreWeight(int(w["points"]), w.get("max_count"))
            for type_, w in (definition.get("lead_score") or {}).items()
        },
        definition=definition,
    )


def _consistency(stages: tuple[Stage, ...]) -> list[Violation]:
    """Rules the JSON Schema cannot state: unique keys within the process."""
    violations = []
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if stage.key in seen:
            violations.append(
                Violation(f"/stages/{i}/key", f"stage key {stage.key!r} is repeated")
            )
        seen.add(stage.key)
        names: set[str] = set()
        for j, criterion in enumerate(stage.exit_criteria):
            if criterion.key in names:
                violations.append(
                    Violation(
                        f"/stages/{i}/exit_criteria/{j}/key",
                        f"criterion key {criterion.key!r} is repeated in the stage",
                    )
                )
            names.add(criterion.key)
    return violations


def load_process_file(path: Path, schema: Mapping[str, Any]) -> Process:
    try:
        definition = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidProcess(
            str(path), [Violation("", f"not valid YAML: {exc}")]
        ) from exc
    if not isinstance(definition, dict):
        raise InvalidProcess(str(path), [Violation("", "must be a mapping")])
    return parse_process(definition, schema, str(path))


def load_process_dir(directory: Path, schema: Mapping[str, Any]) -> list[Process]:
    """Every `*.yaml` process in a folder; the first broken file stops it all."""
    processes = [
        load_process_file(path, schema) for path in sorted(directory.glob("*.yaml"))
    ]
    keys: dict[str, str] = {}
    for process, path in zip(processes, sorted(directory.glob("*.yaml")), strict=True):
        if process.key in keys:
            raise InvalidProcess(
                str(path),
                [
                    Violation(
                        "/key",
                        f"key {process.key!r} is also used by {keys[process.key]}",
                    )
                ],
            )
        keys[process.key] = str(path)
    if not processes:
        raise InvalidProcess(str(directory), [Violation("", "no *.yaml process files")])
    return processes


class ProcessCatalog:
    """All known process versions of every key.

    The current version of a key is the one its file declares now; without a
    file, the highest version recorded.
    """

    def __init__(
        self,
        processes: Iterable[Process] = (),
        *,
        reload: Callable[[], Iterable[Process]] | None = None,
    ) -> None:
        self._versions: dict[str, dict[int, Process]] = {}
        self._current: dict[str, int] = {}
        self._reload = reload
        for process in processes:
            self.add(process, current=True)

    def add(self, process: Process, *, current: bool = False) -> None:
        """Know a version; `current` marks the one new deals are created under."""
        self._versions.setdefault(process.key, {})[process.version] = process
        if current:
            self._current[process.key] = process.version

    def current(self, key: str) -> Process:
        versions = self._versions.get(key)
        if not versions:
            raise UnknownProcess(key)
        return versions[self._current.get(key, max(versions))]

    def get(self, key: str, version: int) -> Process:
        """One version; one missing here is looked for again where versions live.

        Another replica may have recorded a version this one has not loaded.
        """
        if version not in self._versions.get(key, {}) and self._reload is not None:
            for process in self._reload():
                self._versions.setdefault(process.key, {})[process.version] = process
        try:
            return self._versions[key][version]
        except KeyError:
            raise UnknownProcess(key, version) from None

    def knows(self, key: str) -> bool:
        return key in self._versions

    def process_keys(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, key: str) -> list[Process]:
        if key not in self._versions:
            raise UnknownProcess(key)
        return [self._versions[key][v] for v in sorted(self._versions[key])]
