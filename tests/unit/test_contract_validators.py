"""The compiled validator and the explaining one agree on the contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from jsonschema import Draft202012Validator

from .test_contract import INVALID_DATA, VALID_DATA, posted_event

EVENTS = Path(__file__).resolve().parents[2] / "schemas" / "events"
ENVELOPE = EVENTS.parent / "envelope.schema.json"


def both(schema_path: Path) -> tuple[Any, Draft202012Validator]:
    schema = json.loads(schema_path.read_text())
    fast = jsonschema_rs.validator_for(schema, validate_formats=False)
    return fast, Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("event_type", "data"),
    [(t, d) for t, d in VALID_DATA] + [(t, d) for t, d, _ in INVALID_DATA],
)
def test_both_validators_judge_every_data_example_alike(
    event_type: str, data: dict[str, Any]
) -> None:
    fast, explaining = both(EVENTS / f"{event_type}.schema.json")
    assert fast.is_valid(data) == explaining.is_valid(data)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"occurred_at": "2024-03-01T09:30:00"},
        {"occurred_at": "2024-13-01T09:30:00Z"},
        {"occurred_at": "2024-03-01T08:30:00.123456789-05:30"},
        {"event_id": "evt-1\n"},
        {"event_id": "A" * 129},
        {"deal_id": "deal/42"},
        {"actor": "  "},
        {"type": "stage.changed"},
        {"schema_version": 0},
        {"owner": "ü"},
    ],
)
def test_both_validators_judge_every_envelope_example_alike(
    changes: dict[str, Any],
) -> None:
    fast, explaining = both(ENVELOPE)
    event = posted_event(**changes)
    assert fast.is_valid(event) == explaining.is_valid(event)
