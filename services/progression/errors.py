"""The progression service's errors.

Every error the service raises on purpose is a `ProgressionError`. Each
carries the identifiers support will ask for, and says whether trying the
same thing again can succeed (`retriable`), so retry loops ask the error
instead of guessing. Errors are mapped to HTTP problems only at the edge.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DuplicateEventId",
    "EventConflict",
    "InvalidEvent",
    "InvalidProcess",
    "ProcessUnavailable",
    "ProcessVersionChanged",
    "ProgressionError",
    "StorageUnavailable",
    "StreamConflict",
    "UnknownDeal",
    "UnknownProcess",
    "Violation",
]

from dataclasses import dataclass


class ProgressionError(Exception):
    """Base of every error the progression service raises on purpose."""

    retriable: bool = False


class ConfigurationError(ProgressionError, ValueError):
    """A setting is missing or wrong; the service refuses to start."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: where in the input (a JSON pointer) and what rule."""

    pointer: str
    rule: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.rule}"


class InvalidEvent(ProgressionError):
    """An event breaks the contract; nothing of it is written."""

    def __init__(self, violations: list[Violation], event_id: str | None = None):
        self.violations = violations
        self.event_id = event_id
        super().__init__("; ".join(str(v) for v in violations))


class InvalidProcess(ProgressionError):
    """A process file breaks the process schema or its own consistency."""

    def __init__(self, file: str, violations: list[Violation]):
        self.file = file
        self.violations = violations
        details = "; ".join(str(v) for v in violations)
        super().__init__(f"{file}: {details}")


class ProcessVersionChanged(ProgressionError):
    """A process file changed without a new version number."""

    def __init__(self, key: str, version: int):
        self.key = key
        self.version = version
        super().__init__(
            f"process {key!r} version {version} differs from the one already "
            "recorded; give the changed process a new version number"
        )


class UnknownProcess(ProgressionError):
    def __init__(self, key: str, version: int | None = None):
        self.key = key
        self.version = version
        which = f"{key!r}" if version is None else f"{key!r} version {version}"
        super().__init__(f"no process {which} is declared")


class ProcessUnavailable(ProgressionError):
    """A deal's recorded process version cannot be loaded on this instance."""

    def __init__(self, deal_id: str, key: str, version: int | None):
        self.deal_id = deal_id
        self.key = key
        self.version = version
        super().__init__(
            f"deal {deal_id!r} is decided by process {key!r} version {version}, "
            "which this instance cannot load"
        )


class UnknownDeal(ProgressionError):
    def __init__(self, deal_id: str):
        self.deal_id = deal_id
        super().__init__(f"no deal {deal_id!r} has been seen")


class EventConflict(ProgressionError):
    """The same event_id was already accepted with other content."""

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(
            f"event {event_id!r} was already accepted with different content"
        )


class StreamConflict(ProgressionError):
    """A deal stream moved on between reading it and appending to it."""

    retriable = True

    def __init__(self, deal_id: str, expected: int, actual: int | None = None):
        self.deal_id = deal_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"deal {deal_id!r} is no longer at version {expected}"
            + ("" if actual is None else f" (now {actual})")
        )


class DuplicateEventId(ProgressionError):
    """An event_id reached the log between the check and the insert."""

    retriable = True

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(f"event {event_id!r} is already in the log")


class StorageUnavailable(ProgressionError):
    """The database could not be reached or failed; the write did not happen."""

    retriable = True
