"""Reading old events in today's shape.

Events keep the `schema_version` they were written with; no stored event is
ever rewritten. Readers (the decision engine, the deal view, simulations)
ask `upcast` for the current shape, which applies one step per version, in
order. A new version of a type means: a new schema file (the old one moves
to `schemas/events/previous/`), one step here, and its note in
`docs/schema-evolution.md`.
"""

from __future__ import annotations

__all__ = ["CURRENT_VERSIONS", "current_version", "upcast"]

from collections.abc import Callable, Mapping
from typing import Any

Data = Mapping[str, Any]


def _attendees_become_people(data: Data) -> dict[str, Any]:
    """next_step.confirmed 1 -> 2: each attendee string becomes a person.

    A string with an `@` is taken as an email address, anything else as a
    name; nothing else changes.
    """
    people = [
        {"email": who} if "@" in who else {"name": who}
        for who in data.get("attendees", [])
    ]
    return {**data, "attendees": people}


# (type, version) -> the step that turns that version into the next one.
_STEPS: dict[tuple[str, int], Callable[[Data], dict[str, Any]]] = {
    ("next_step.confirmed", 1): _attendees_become_people,
}

CURRENT_VERSIONS: dict[str, int] = {"next_step.confirmed": 2}


def current_version(type_: str) -> int:
    return CURRENT_VERSIONS.get(type_, 1)


def upcast(type_: str, schema_version: int, data: Data) -> Data:
    """The data of an event written at `schema_version`, in the current shape."""
    version = schema_version
    while version < current_version(type_):
        data = _STEPS[(type_, version)](data)
        version += 1
    return data
