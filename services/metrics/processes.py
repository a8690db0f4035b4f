"""The declared sales processes, as far as the metrics need them: the order
of the stages, each stage's expected days and win probability.

The process files (`schemas/processes/*.yaml`, format in docs/processes.md)
belong to the contract; this module reads only the fields above and leaves
the full validation to the progression service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metrics.errors import ProcessFileError

__all__ = ["TERMINAL_STATES", "Catalog", "Process", "Stage", "load_catalog"]

logger = logging.getLogger(__name__)

TERMINAL_STATES = frozenset({"won", "lost", "disqualified"})


class _StageFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str = Field(min_length=1)
    expected_days: float = Field(ge=0)
    win_probability: float = Field(ge=0, le=1)


class _ProcessFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    stages: list[_StageFile] = Field(min_length=1)


@dataclass(frozen=True)
class Stage:
    key: str
    order: int
    expected_days: float
    win_probability: float


@dataclass(frozen=True)
class Process:
    key: str
    version: int
    stages: tuple[Stage, ...]
    _by_key: dict[str, Stage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {s.key: s for s in self.stages})

    @property
    def stage_keys(self) -> list[str]:
        return [stage.key for stage in self.stages]

    def stage(self, key: str) -> Stage | None:
        return self._by_key.get(key)


class Catalog:
    """Every declared process, by key and version."""

    def __init__(self, processes: Iterable[Process]) -> None:
        self._versions: dict[str, dict[int, Process]] = {}
        for process in processes:
            self._versions.setdefault(process.key, {})[process.version] = process

    @property
    def keys(self) -> list[str]:
        return sorted(self._versions)

    def current(self, key: str) -> Process | None:
        """The highest version declared for the process key."""
        versions = self._versions.get(key)
        if not versions:
            return None
        return versions[max(versions)]

    def version(self, key: str, version: int | None) -> Process | None:
        """The named version of a process, or else its current version.

        Known shortcoming: the process files hold the versions that are
        declared now. A deal decided under a version no file holds any more
        is measured against the current version's expected days and win
        probabilities, which may differ from the ones it was decided under.
        """
        versions = self._versions.get(key)
        if not versions:
            return None
        if version is not None and version in versions:
            return versions[version]
        return versions[max(versions)]

    def is_later(
        self, process: str | None, version: int | None, a: str, b: str
    ) -> bool | None:
        """Whether stage `b` comes after stage `a` in the process; None when
        the process files do not order the two stages."""
        declared = self.version(process, version) if process else None
        if declared is None:
            return None
        first, second = declared.stage(a), declared.stage(b)
        if first is None or second is None:
            return None
        return second.order > first.order


def _read(path: Path) -> Process:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ProcessFileError(f"{path}: cannot be read: {error}") from None
    try:
        parsed = _ProcessFile.model_validate(content)
    except ValidationError as error:
        first = error.errors()[0]
        pointer = "/" + "/".join(str(part) for part in first["loc"])
        raise ProcessFileError(f"{path}: {pointer}: {first['msg']}") from None
    stages = tuple(
        Stage(s.key, order, s.expected_days, s.win_probability)
        for order, s in enumerate(parsed.stages)
    )
    return Process(parsed.key, parsed.version, stages)


def load_catalog(directory: Path) -> Catalog:
    """Read every `*.yaml` process file of the folder."""
    if not directory.is_dir():
        raise ProcessFileError(
            f"METRICS_PROCESSES_DIR={directory}: not a folder of process files"
        )
    processes = [_read(path) for path in sorted(directory.glob("*.yaml"))]
    if not processes:
        raise ProcessFileError(
            f"METRICS_PROCESSES_DIR={directory}: holds no *.yaml process file"
        )
    seen: set[tuple[str, int]] = set()
    for process in processes:
        if (process.key, process.version) in seen:
            raise ProcessFileError(
                f"METRICS_PROCESSES_DIR={directory}: process={process.key} "
                f"version={process.version} is declared twice"
            )
        seen.add((process.key, process.version))
    logger.info(
        "processes loaded dir=%s processes=%s",
        directory,
        ",".join(f"{p.key}@{p.version}" for p in processes),
    )
    return Catalog(processes)
