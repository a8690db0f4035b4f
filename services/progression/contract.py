"""The event contract: checking what a CRM posts against `schemas/`.

An event is checked in three steps: the envelope, then its `data` against
the schema of its type, then the rules a schema cannot state (the clock).
Every broken rule is reported with a JSON pointer to the field, so a CRM
admin can fix the mapping that produced it.
"""

from __future__ import annotations

__all__ = ["RESERVED_PREFIX", "Contract", "canonical_digest"]

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator, ValidationError

from .errors import ConfigurationError, InvalidEvent, Violation
from .eventlog import NewEvent

# Event ids the service gives its own decisions; a sender may not use them.
RESERVED_PREFIX = "dealledger:"
MAX_CLOCK_SKEW = timedelta(minutes=5)


def _pointer(parts: Iterable[Any]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _violations(errors: Iterable[ValidationError], prefix: str) -> list[Violation]:
    ordered = sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    return [Violation(prefix + _pointer(e.absolute_path), e.message) for e in ordered]


def _storable(value: Any) -> bool:
    """The fast check: a strict encoding fails on exactly what `_unstorable` finds."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return "\\u0000" not in text


def _unstorable(value: Any, pointer: str) -> list[Violation]:
    """Values JSON parsers let through that no database should keep.

    NaN and infinities (not JSON, though Python's parser reads them), lone
    UTF-16 surrogates and NUL characters (PostgreSQL's JSONB refuses them).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return [Violation(pointer, "must be a finite number")]
    if isinstance(value, str):
        if "\x00" in value:
            return [Violation(pointer, "must not contain a NUL character")]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [Violation(pointer, "must be valid Unicode (a lone surrogate)")]
        return []
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            found += _unstorable(key, pointer)
            found += _unstorable(item, f"{pointer}/{_pointer([key])[1:]}")
        return found
    if isinstance(value, list):
        return [
            v
            for i, item in enumerate(value)
            for v in _unstorable(item, f"{pointer}/{i}")
        ]
    return []


def _normalised(value: Any) -> Any:
    """The same number written as 12000 or 12000.0 compares equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def canonical_digest(content: Mapping[str, Any]) -> str:
    text = json.dumps(
        _normalised(content), sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Schema:
    """One schema, checked fast; explained in full only when it is broken.

    jsonschema-rs (compiled) answers whether an instance is valid in a few
    microseconds; the pure-Python jsonschema then lists every violation with
    its pointer, for the rare instance that is not. The two agree on every
    example of the contract tests.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        self.explain = Draft202012Validator(schema)
        self._fast = jsonschema_rs.validator_for(schema, validate_formats=False)

    def violations(self, instance: Any, prefix: str) -> list[Violation]:
        if self._fast.is_valid(instance):
            return []
        return _violations(self.explain.iter_errors(instance), prefix)


class Contract:
    """The schemas of `schemas/`, compiled once."""

    def __init__(self, schemas_dir: Path) -> None:
        self.schemas_dir = schemas_dir
        try:
            self._envelope = _Schema(self._load("envelope.schema.json"))
            self.process_schema: dict[str, Any] = self._load("process.schema.json")
            self._data: dict[tuple[str, int], _Schema] = {}
            events = schemas_dir / "events"
            for path in sorted(events.glob("*.schema.json")):
                self._add_data_schema(path.name.removesuffix(".schema.json"), path)
            for path in sorted((events / "previous").glob("*.schema.json")):
                type_ = path.name.removesuffix(".schema.json").rsplit(".v", 1)[0]
                self._add_data_schema(type_, path)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot read the event schemas in {schemas_dir}: {exc}"
            ) from exc

    def _add_data_schema(self, type_: str, path: Path) -> None:
        schema = json.loads(path.read_text(encoding="utf-8"))
        version = int(schema.get("x-dealledger-schema-version", 1))
        self._data[(type_, version)] = _Schema(schema)

    def versions(self, type_: str) -> list[int]:
        return sorted(v for t, v in self._data if t == type_)

    def _load(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.schemas_dir / name).read_text(encoding="utf-8")
        )
        return data

    @property
    def types(self) -> list[str]:
        return sorted({t for t, _ in self._data})

    def parse(self, raw: Any, *, now: datetime) -> NewEvent:
        """Check one posted event and return it normalised, or raise InvalidEvent."""
        event_id = raw.get("event_id") if isinstance(raw, dict) else None
        event_id = event_id if isinstance(event_id, str) else None
        violations = self._envelope.violations(raw, "")
        if violations:
            raise InvalidEvent(violations, event_id)
        assert isinstance(raw, dict) and event_id is not None

        type_ = raw["type"]
        version = int(raw.get("schema_version", 1))
        validator = self._data.get((type_, version))
        if validator is None:
            known = self.versions(type_)
            rule = (
                f"{type_} has schema versions {', '.join(map(str, known))}"
                if known
                else f"no schema for {type_!r}"
            )
            raise InvalidEvent([Violation("/schema_version", rule)], event_id)
        violations = validator.violations(raw["data"], "/data")

        if event_id.startswith(RESERVED_PREFIX):
            violations.append(
                Violation(
                    "/event_id",
                    f"ids starting with {RESERVED_PREFIX!r} are reserved for the "
                    "service's own decisions",
                )
            )
        if not _storable(raw):
            violations += _unstorable(raw, "")
        try:
            occurred_at = datetime.fromisoformat(raw["occurred_at"]).astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            violations.append(Violation("/occurred_at", f"not a real time: {exc}"))
            raise InvalidEvent(violations, event_id) from exc
        if occurred_at - now > MAX_CLOCK_SKEW:
            violations.append(
                Violation(
                    "/occurred_at",
                    f"{raw['occurred_at']} is more than 5 minutes ahead of the "
                    f"server's clock ({_utc_iso(now)})",
                )
            )
        if violations:
            raise InvalidEvent(violations, event_id)

        content = {
            "event_id": event_id,
            "type": type_,
            "deal_id": raw["deal_id"],
            "occurred_at": _utc_iso(occurred_at),
            "source": raw.get("source"),
            "actor": raw.get("actor"),
            "data": raw["data"],
            "schema_version": raw.get("schema_version", 1),
        }
        return NewEvent(
            event_id=event_id,
            type=type_,
            deal_id=raw["deal_id"],
            occurred_at=occurred_at,
            data=raw["data"],
            schema_version=int(content["schema_version"]),
            source=raw.get("source"),
            actor=raw.get("actor"),
            digest=canonical_digest(content),
        )
