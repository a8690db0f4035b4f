"""Old event versions read in today's shape, for the projection.

Events keep the `schema_version` they were written with; the projection
sees the current shape through one step per version. This is the read
side's own chain (the services share no code); the change notes are in
docs/schema-evolution.md. An event of a version newer than this chain
knows is refused, so it is parked rather than misread.
"""

from __future__ import annotations

__all__ = ["CURRENT_VERSIONS", "UnknownSchemaVersion", "upcast"]

from collections.abc import Callable, Mapping
from typing import Any

Data = Mapping[str, Any]


class UnknownSchemaVersion(ValueError):
    """An event written with a version newer than this projector knows."""


def _attendees_become_people(data: Data) -> dict[str, Any]:
    """next_step.confirmed 1 -> 2: an attendee with an @ is an email, else a name."""
    people = [
        {"email": who} if "@" in who else {"name": who}
        for who in data.get("attendees", [])
    ]
    return {**data, "attendees": people}


_STEPS: dict[tuple[str, int], Callable[[Data], dict[str, Any]]] = {
    ("next_step.confirmed", 1): _attendees_become_people,
}

CURRENT_VERSIONS: dict[str, int] = {"next_step.confirmed": 2}


def upcast(type_: str, schema_version: int, data: Data) -> Data:
    current = CURRENT_VERSIONS.get(type_, 1)
    if schema_version > current:
        raise UnknownSchemaVersion(
            f"schema_version {schema_version} of {type_} is newer than this "
            f"projector knows ({current})"
        )
    version = schema_version
    while version < current:
        data = _STEPS[(type_, version)](data)
        version += 1
    return data
