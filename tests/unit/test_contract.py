"""The event and process contract under `schemas/`.

The write side and the read side share nothing but these files, so these
tests check them as a CRM, a consumer and a sales-operations lead would:
the schemas are valid, the catalogue is complete, real payloads pass and
broken ones fail at the field that is wrong, and the declared processes say
what the product says they say.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
EVENTS = SCHEMAS / "events"
PROCESSES = SCHEMAS / "processes"
BASE_ID = "https://dealledger.dev/schemas/"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

LIFECYCLE = ["deal.created", "deal.updated", "deal.lost", "stage.overridden"]
PROSPECT_ACTIONS = [
    "discovery_call.agreed",
    "pain.shared",
    "stakeholder.invited",
    "proposal.requested",
    "procurement.introduced",
    "contract.signed",
]
FACTS = [
    "qualification.updated",
    "next_step.confirmed",
    "value.agreed",
    "decision_process.mapped",
    "disqualifier.identified",
]
ENGAGEMENT_SIGNALS = [
    "email.sent",
    "email.opened",
    "email.replied",
    "link.clicked",
    "content.downloaded",
    "meeting.booked",
    "meeting.held",
    "meeting.no_show",
]
POSTABLE = LIFECYCLE + PROSPECT_ACTIONS + FACTS + ENGAGEMENT_SIGNALS
CATALOGUE = [*POSTABLE, "stage.changed"]
DISQUALIFIER_REASONS = [
    "no_budget",
    "no_authority",
    "no_urgency",
    "no_fit",
    "no_process",
]

SCHEMA_FILES = sorted(SCHEMAS.rglob("*.schema.json"))
PROCESS_FILES = sorted(PROCESSES.glob("*.yaml"))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def registry() -> Registry:
    resources = [
        (
            schema["$id"],
            Resource.from_contents(schema, default_specification=DRAFT202012),
        )
        for schema in map(load_json, SCHEMA_FILES)
    ]
    return Registry().with_resources(resources)


def validator_for(schema_id: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": schema_id}, registry=registry())


def data_validator(event_type: str) -> Draft202012Validator:
    return validator_for(f"{BASE_ID}events/{event_type}.schema.json")


def pointer(error: ValidationError) -> str:
    """The JSON pointer of the value that failed."""
    return "".join(f"/{part}" for part in error.absolute_path)


def failures(validator: Draft202012Validator, instance: Any) -> set[tuple[str, str]]:
    """Each error as (JSON pointer of the failing value, keyword that failed)."""
    return {
        (pointer(error), str(error.validator))
        for error in validator.iter_errors(instance)
    }


def enum_of(schema: dict[str, Any], *path: str) -> list[str]:
    node: Any = schema
    for part in path:
        node = node[part]
    return list(node["enum"])


# -- the schema files themselves -------------------------------------------


@pytest.mark.parametrize(
    "path", SCHEMA_FILES, ids=lambda p: str(p.relative_to(SCHEMAS))
)
def test_schema_file_is_a_valid_draft_2020_12_schema(path: Path) -> None:
    schema = load_json(path)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == DRAFT_2020_12
    assert schema["title"].strip()
    assert schema["description"].strip()


@pytest.mark.parametrize(
    "path", SCHEMA_FILES, ids=lambda p: str(p.relative_to(SCHEMAS))
)
def test_schema_id_is_its_path_under_schemas(path: Path) -> None:
    assert load_json(path)["$id"] == BASE_ID + path.relative_to(SCHEMAS).as_posix()


def test_there_is_one_data_schema_per_event_type_of_the_catalogue() -> None:
    files = {path.name.removesuffix(".schema.json") for path in EVENTS.glob("*.json")}
    assert files == set(CATALOGUE)


def test_a_crm_may_post_every_type_but_stage_changed() -> None:
    posted = enum_of(load_json(SCHEMAS / "envelope.schema.json"), "properties", "type")
    assert sorted(posted) == sorted(POSTABLE)


def test_the_recorded_envelope_carries_every_type_of_the_catalogue() -> None:
    recorded = load_json(SCHEMAS / "recorded-envelope.schema.json")
    assert sorted(enum_of(recorded, "properties", "type")) == sorted(CATALOGUE)


def test_process_schema_lists_the_same_types_as_the_event_catalogue() -> None:
    process = load_json(SCHEMAS / "process.schema.json")
    defs = process["$defs"]
    assert enum_of(defs, "stage", "properties", "advances_on") == PROSPECT_ACTIONS
    assert sorted(enum_of(defs, "event_rule", "properties", "event")) == sorted(
        POSTABLE
    )
    assert sorted(process["properties"]["lead_score"]["properties"]) == sorted(
        ENGAGEMENT_SIGNALS
    )
    disqualifier = load_json(EVENTS / "disqualifier.identified.schema.json")
    assert enum_of(disqualifier, "properties", "reason") == DISQUALIFIER_REASONS
    assert enum_of(defs, "disqualification", "properties", "reason") == (
        DISQUALIFIER_REASONS
    )


# -- the envelope -----------------------------------------------------------


def posted_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "hubspot:evt-0001",
        "type": "deal.created",
        "deal_id": "deal-42",
        "occurred_at": "2024-03-01T09:30:00+01:00",
        "source": "hubspot",
        "actor": "rep-7",
        "data": {"owner": "rep-7"},
        "schema_version": 1,
    }
    event.update(changes)
    return {key: value for key, value in event.items() if value is not ...}


def recorded_event(**changes: Any) -> dict[str, Any]:
    event = posted_event(
        recorded_at="2024-03-01T08:30:01.123456Z", stream_version=1, position=17
    )
    event.update(changes)
    return {key: value for key, value in event.items() if value is not ...}


@pytest.mark.parametrize(
    "event",
    [
        posted_event(),
        posted_event(source=..., actor=..., schema_version=...),
        posted_event(occurred_at="2024-03-01T08:30:00Z"),
        posted_event(occurred_at="2024-03-01T08:30:00.123456789-05:30"),
        posted_event(event_id="A" * 128, deal_id="a.b_c:d-e"),
    ],
)
def test_envelope_accepts_what_a_crm_posts(event: dict[str, Any]) -> None:
    assert failures(validator_for(BASE_ID + "envelope.schema.json"), event) == set()


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (posted_event(occurred_at="2024-03-01T09:30:00"), ("/occurred_at", "pattern")),
        (posted_event(occurred_at="2024-03-01 09:30:00Z"), ("/occurred_at", "pattern")),
        (posted_event(occurred_at="2024-03-01T09:30Z"), ("/occurred_at", "pattern")),
        (posted_event(occurred_at="2024-13-01T09:30:00Z"), ("/occurred_at", "pattern")),
        (posted_event(occurred_at="2024-03-01"), ("/occurred_at", "pattern")),
        (posted_event(event_id="evt 1"), ("/event_id", "pattern")),
        (posted_event(event_id=""), ("/event_id", "pattern")),
        (posted_event(event_id="A" * 129), ("/event_id", "pattern")),
        (posted_event(event_id="evt-1\n"), ("/event_id", "pattern")),
        (posted_event(deal_id="deal/42"), ("/deal_id", "pattern")),
        (posted_event(type="stage.changed"), ("/type", "enum")),
        (posted_event(type="deal.won"), ("/type", "enum")),
        (posted_event(data=[]), ("/data", "type")),
        (posted_event(data=...), ("", "required")),
        (posted_event(occurred_at=...), ("", "required")),
        (posted_event(schema_version=0), ("/schema_version", "minimum")),
        (posted_event(source="x" * 129), ("/source", "maxLength")),
        (posted_event(actor="  "), ("/actor", "pattern")),
        (posted_event(actor=None), ("/actor", "type")),
        (posted_event(position=1), ("", "additionalProperties")),
    ],
)
def test_envelope_refuses_a_malformed_event_at_the_faulty_field(
    event: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert failures(validator_for(BASE_ID + "envelope.schema.json"), event) == {
        expected
    }


def test_recorded_envelope_carries_decisions_and_missing_origins() -> None:
    decision = recorded_event(
        type="stage.changed", source=None, actor=None, stream_version=2, position=18
    )
    validator = validator_for(BASE_ID + "recorded-envelope.schema.json")
    assert failures(validator, decision) == set()


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (recorded_event(position=...), ("", "required")),
        (recorded_event(schema_version=...), ("", "required")),
        (recorded_event(stream_version=0), ("/stream_version", "minimum")),
        (recorded_event(recorded_at="yesterday"), ("/recorded_at", "pattern")),
    ],
)
def test_recorded_envelope_requires_what_the_log_adds(
    event: dict[str, Any], expected: tuple[str, str]
) -> None:
    validator = validator_for(BASE_ID + "recorded-envelope.schema.json")
    assert failures(validator, event) == {expected}


def test_a_whole_posted_event_validates_with_its_data_schema() -> None:
    def whole_event(event_type: str) -> Draft202012Validator:
        return Draft202012Validator(
            {
                "$ref": BASE_ID + "envelope.schema.json",
                "properties": {
                    "data": {"$ref": f"{BASE_ID}events/{event_type}.schema.json"}
                },
            },
            registry=registry(),
        )

    event = posted_event(type="deal.lost", data={"reason": "Chose a competitor"})
    assert failures(whole_event("deal.lost"), event) == set()
    event = posted_event(type="deal.lost", data={})
    assert failures(whole_event("deal.lost"), event) == {("/data", "required")}


# -- the data of each event type --------------------------------------------

STAGE_CHANGED = {
    "from": "connecting",
    "to": "researching",
    "cause": "criteria",
    "effective_at": "2024-03-04T10:00:00Z",
    "trigger_event_id": "evt-9",
    "action_event_id": "evt-8",
    "reason": None,
    "criteria": [
        {
            "criterion": "budget_confirmed",
            "description": "Budget confirmed",
            "event_ids": ["evt-5"],
            "occurred_at": "2024-03-03T15:00:00+01:00",
        }
    ],
    "process": "b2b-default",
    "process_version": 1,
}

VALID_DATA: list[tuple[str, dict[str, Any]]] = [
    ("deal.created", {"owner": "rep-7"}),
    (
        "deal.created",
        {
            "process": "inbound-fast-track",
            "owner": "rep-7",
            "amount": 48000.5,
            "currency": "EUR",
            "name": "Acme renewal",
        },
    ),
    ("deal.updated", {"amount": 0}),
    ("deal.updated", {"owner": "rep-9", "currency": "USD", "name": "Acme"}),
    ("deal.lost", {"reason": "Went with a competitor"}),
    ("stage.overridden", {"to": "negotiating", "reason": "Signed NDA by phone"}),
    ("stage.overridden", {"to": "won", "reason": "Signed on paper"}),
    ("qualification.updated", {"criterion": "budget", "status": "confirmed"}),
    (
        "qualification.updated",
        {"criterion": "authority", "status": "none", "path": True},
    ),
    (
        "next_step.confirmed",
        {
            "date": "2024-03-12",
            "agenda": "Demo for the finance team",
            "attendees": [{"email": "cfo@acme.example", "name": "Dana", "role": "CFO"}],
        },
    ),
    ("value.agreed", {}),
    ("value.agreed", {"note": "Saves two days of month-end close"}),
    ("decision_process.mapped", {}),
    ("disqualifier.identified", {"reason": "no_process"}),
    ("stage.changed", STAGE_CHANGED),
    (
        "stage.changed",
        {
            **STAGE_CHANGED,
            "from": None,
            "to": "prospecting",
            "cause": "created",
            "action_event_id": None,
            "criteria": [],
        },
    ),
    (
        "stage.changed",
        {
            **STAGE_CHANGED,
            "to": "disqualified",
            "cause": "disqualified",
            "action_event_id": None,
            "reason": "no_budget",
            "criteria": [],
        },
    ),
    (
        "stage.changed",
        {
            **STAGE_CHANGED,
            "criteria": [
                {
                    "criterion": "budget_still_in_place",
                    "description": "Budget not gone",
                    "event_ids": [],
                    "occurred_at": None,
                }
            ],
        },
    ),
    *[(action, {}) for action in PROSPECT_ACTIONS],
    *[(signal, {}) for signal in ENGAGEMENT_SIGNALS],
    ("pain.shared", {"note": "Month-end close takes nine days", "crm": {"id": 3}}),
    ("email.opened", {"campaign": "q1-webinar", "opened_count": 3}),
]

INVALID_DATA: list[tuple[str, dict[str, Any], set[tuple[str, str]]]] = [
    ("deal.created", {}, {("", "required")}),
    ("deal.created", {"owner": ""}, {("/owner", "minLength"), ("/owner", "pattern")}),
    ("deal.created", {"owner": "rep-7", "amount": -1}, {("/amount", "minimum")}),
    ("deal.created", {"owner": "rep-7", "currency": "eur"}, {("/currency", "pattern")}),
    ("deal.created", {"owner": "rep-7", "process": "B2B"}, {("/process", "pattern")}),
    ("deal.created", {"owner": "rep-7", "stage": "x"}, {("", "additionalProperties")}),
    ("deal.updated", {}, {("", "minProperties")}),
    ("deal.updated", {"process": "five-step"}, {("", "additionalProperties")}),
    ("deal.updated", {"amount": "lots"}, {("/amount", "type")}),
    ("deal.lost", {}, {("", "required")}),
    ("deal.lost", {"reason": "x" * 501}, {("/reason", "maxLength")}),
    ("deal.lost", {"reason": "   "}, {("/reason", "pattern")}),
    ("stage.overridden", {"to": "won"}, {("", "required")}),
    ("stage.overridden", {"to": "Won!", "reason": "x"}, {("/to", "pattern")}),
    ("pain.shared", {"note": 42}, {("/note", "type")}),
    ("meeting.held", {"note": "x" * 2001}, {("/note", "maxLength")}),
    ("contract.signed", [], {("", "type")}),
    (
        "qualification.updated",
        {"criterion": "budget", "status": "maybe"},
        {("/status", "enum")},
    ),
    (
        "qualification.updated",
        {"criterion": "champion", "status": "confirmed"},
        {("/criterion", "enum")},
    ),
    (
        "qualification.updated",
        {"criterion": "budget", "status": "none", "path": "yes"},
        {("/path", "type")},
    ),
    ("qualification.updated", {"criterion": "need"}, {("", "required")}),
    (
        "next_step.confirmed",
        {"date": "2024-03-12", "agenda": "Demo", "attendees": []},
        {("/attendees", "minItems")},
    ),
    (
        "next_step.confirmed",
        {"date": "12/03/2024", "agenda": "Demo", "attendees": [{"name": "cfo"}]},
        {("/date", "pattern")},
    ),
    (
        "next_step.confirmed",
        {"date": "2024-03-12", "agenda": "", "attendees": [{"name": "cfo"}]},
        {("/agenda", "minLength"), ("/agenda", "pattern")},
    ),
    (
        "next_step.confirmed",
        {"date": "2024-03-12", "agenda": "Demo", "attendees": [{"name": "cfo"}, {}]},
        {("/attendees/1", "anyOf")},
    ),
    (
        "next_step.confirmed",
        {"date": "2024-03-12", "agenda": "Demo", "attendees": ["cfo@acme.example"]},
        {("/attendees/0", "type")},
    ),
    ("next_step.confirmed", {"date": "2024-03-12"}, {("", "required")}),
    ("value.agreed", {"amount": 10}, {("", "additionalProperties")}),
    ("decision_process.mapped", {"note": ["a"]}, {("/note", "type")}),
    ("disqualifier.identified", {}, {("", "required")}),
    ("disqualifier.identified", {"reason": "too_small"}, {("/reason", "enum")}),
    ("stage.changed", {**STAGE_CHANGED, "cause": "manual"}, {("/cause", "enum")}),
    (
        "stage.changed",
        {**STAGE_CHANGED, "effective_at": "2024-03-04T10:00:00"},
        {("/effective_at", "pattern")},
    ),
    (
        "stage.changed",
        {**STAGE_CHANGED, "process_version": 0},
        {("/process_version", "minimum")},
    ),
    (
        "stage.changed",
        {key: value for key, value in STAGE_CHANGED.items() if key != "from"},
        {("", "required")},
    ),
    (
        "stage.changed",
        {
            **STAGE_CHANGED,
            "criteria": [{**STAGE_CHANGED["criteria"][0], "event_ids": ["bad id"]}],
        },
        {("/criteria/0/event_ids/0", "pattern")},
    ),
    (
        "stage.changed",
        {**STAGE_CHANGED, "trigger_event_id": None},
        {("/trigger_event_id", "type")},
    ),
]


@pytest.mark.parametrize(("event_type", "data"), VALID_DATA)
def test_event_data_accepts_a_representative_payload(
    event_type: str, data: dict[str, Any]
) -> None:
    assert failures(data_validator(event_type), data) == set()


@pytest.mark.parametrize(("event_type", "data", "expected"), INVALID_DATA)
def test_event_data_refuses_a_bad_payload_at_the_faulty_field(
    event_type: str, data: Any, expected: set[tuple[str, str]]
) -> None:
    assert failures(data_validator(event_type), data) == expected


def test_every_event_type_has_valid_and_invalid_examples() -> None:
    assert {event_type for event_type, _ in VALID_DATA} == set(CATALOGUE)
    refused = {event_type for event_type, _, _ in INVALID_DATA}
    assert set(LIFECYCLE + FACTS + ["stage.changed"]) <= refused


@pytest.mark.parametrize("event_type", PROSPECT_ACTIONS + ENGAGEMENT_SIGNALS)
def test_actions_and_signals_keep_the_crm_context_but_check_the_note(
    event_type: str,
) -> None:
    validator = data_validator(event_type)
    assert failures(validator, {"hubspot": {"engagement": 991}, "note": "ok"}) == set()
    assert failures(validator, {"note": None}) == {("/note", "type")}
    assert load_json(EVENTS / f"{event_type}.schema.json")["description"].strip()


# -- the process files ------------------------------------------------------


def process_validator() -> Draft202012Validator:
    return validator_for(BASE_ID + "process.schema.json")


@pytest.mark.parametrize("path", PROCESS_FILES, ids=lambda p: p.name)
def test_process_file_validates_against_the_process_schema(path: Path) -> None:
    process = load_yaml(path)
    assert failures(process_validator(), process) == set()
    assert process["key"] == path.stem


@pytest.mark.parametrize("path", PROCESS_FILES, ids=lambda p: p.name)
def test_process_file_has_unique_stage_and_criterion_keys(path: Path) -> None:
    stages = load_yaml(path)["stages"]
    stage_keys = [stage["key"] for stage in stages]
    assert len(stage_keys) == len(set(stage_keys))
    for stage in stages:
        criteria = [criterion["key"] for criterion in stage["exit_criteria"]]
        assert len(criteria) == len(set(criteria)), stage["key"]


@pytest.mark.parametrize("path", PROCESS_FILES, ids=lambda p: p.name)
def test_process_ends_with_the_signed_contract(path: Path) -> None:
    assert load_yaml(path)["stages"][-1]["advances_on"] == "contract.signed"


def test_the_shipped_processes_are_the_default_and_two_alternatives() -> None:
    assert sorted(path.stem for path in PROCESS_FILES) == [
        "b2b-default",
        "five-step",
        "inbound-fast-track",
    ]


def test_b2b_default_follows_the_default_process_table() -> None:
    process = load_yaml(PROCESSES / "b2b-default.yaml")
    assert process["key"] == "b2b-default"
    assert process["version"] == 1
    columns = ("key", "advances_on", "expected_days", "win_probability")
    table = [tuple(stage[column] for column in columns) for stage in process["stages"]]
    assert table == [
        ("prospecting", "discovery_call.agreed", 3, 0.05),
        ("connecting", "pain.shared", 7, 0.15),
        ("researching", "stakeholder.invited", 21, 0.30),
        ("presenting", "proposal.requested", 14, 0.50),
        ("negotiating", "procurement.introduced", 14, 0.70),
        ("closing", "contract.signed", 14, 0.90),
    ]
    criteria = {
        stage["key"]: [(c["key"], c["rule"]) for c in stage["exit_criteria"]]
        for stage in process["stages"]
    }
    assert criteria == {
        "prospecting": [],
        "connecting": [
            ("budget_confirmed", {"qualification": "budget", "status": "confirmed"}),
            (
                "authority_confirmed",
                {"qualification": "authority", "status": "confirmed"},
            ),
            ("need_confirmed", {"qualification": "need", "status": "confirmed"}),
            (
                "timeline_confirmed",
                {"qualification": "timeline", "status": "confirmed"},
            ),
        ],
        "researching": [("next_step_confirmed", {"event": "next_step.confirmed"})],
        "presenting": [("value_agreed", {"event": "value.agreed"})],
        "negotiating": [
            ("decision_process_mapped", {"event": "decision_process.mapped"})
        ],
        "closing": [],
    }


def test_b2b_default_disqualifies_on_bant_none_as_the_product_says() -> None:
    process = load_yaml(PROCESSES / "b2b-default.yaml")
    assert process["disqualify_when"] == [
        {
            "reason": "no_budget",
            "rule": {"qualification": "budget", "status": "none", "path": False},
        },
        {
            "reason": "no_authority",
            "rule": {"qualification": "authority", "status": "none", "path": False},
        },
        {
            "reason": "no_urgency",
            "rule": {"qualification": "timeline", "status": "none"},
        },
        {"reason": "no_fit", "rule": {"qualification": "need", "status": "none"}},
    ]


def test_b2b_default_lead_score_weights_the_signals_as_the_product_says() -> None:
    process = load_yaml(PROCESSES / "b2b-default.yaml")
    assert process["lead_score"] == {
        "email.opened": {"points": 5, "max_count": 2},
        "email.replied": {"points": 10},
        "link.clicked": {"points": 10},
        "content.downloaded": {"points": 10},
        "meeting.held": {"points": 20},
    }


def test_fast_track_is_shorter_and_comparable_stage_by_stage() -> None:
    default = load_yaml(PROCESSES / "b2b-default.yaml")
    fast = load_yaml(PROCESSES / "inbound-fast-track.yaml")
    default_days = {stage["key"]: stage["expected_days"] for stage in default["stages"]}
    fast_keys = [stage["key"] for stage in fast["stages"]]
    assert fast_keys == ["connecting", "presenting", "negotiating", "closing"]
    for stage in fast["stages"]:
        assert stage["expected_days"] <= default_days[stage["key"]], stage["key"]
    total = sum(stage["expected_days"] for stage in fast["stages"])
    assert total < sum(default_days.values())
    assert fast["disqualify_when"] == default["disqualify_when"]
    assert fast["lead_score"] == default["lead_score"]
    connecting = fast["stages"][0]
    assert connecting["advances_on"] == "pain.shared"
    assert connecting["exit_criteria"][0]["rule"] == {
        "any": [
            {
                "all": [
                    {"qualification": "need", "status": "confirmed"},
                    {"qualification": "budget", "status": "confirmed"},
                ]
            },
            {
                "all": [
                    {"lead_score": {"at_least": 40}},
                    {"qualification": "need", "status": "confirmed"},
                ]
            },
        ]
    }


def test_five_step_needs_two_stakeholders_and_guards_with_not() -> None:
    process = load_yaml(PROCESSES / "five-step.yaml")
    assert [stage["key"] for stage in process["stages"]] == [
        "prospect",
        "qualify",
        "quote",
        "close",
    ]
    rules = {
        criterion["key"]: criterion["rule"]
        for stage in process["stages"]
        for criterion in stage["exit_criteria"]
    }
    assert rules["buying_group_involved"] == {
        "event": "stakeholder.invited",
        "at_least": 2,
    }
    assert rules["budget_still_in_place"] == {
        "not": {"qualification": "budget", "status": "none"}
    }


# -- a broken process file --------------------------------------------------


def broken(change: str, value: Any) -> dict[str, Any]:
    """b2b-default with the value at a slash-separated path replaced."""
    process = copy.deepcopy(load_yaml(PROCESSES / "b2b-default.yaml"))
    *parents, last = change.strip("/").split("/")
    node: Any = process
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    return process


def first_error(process: dict[str, Any]) -> ValidationError:
    error = best_match(process_validator().iter_errors(process))
    assert error is not None
    return error


@pytest.mark.parametrize(
    ("change", "value", "expected_pointer"),
    [
        (
            "/stages/1/exit_criteria/0/rule",
            {"qualification": "budgett", "status": "confirmed"},
            "/stages/1/exit_criteria/0/rule/qualification",
        ),
        (
            "/stages/1/exit_criteria/0/rule",
            {"qualification": "budget", "status": "maybe"},
            "/stages/1/exit_criteria/0/rule/status",
        ),
        (
            "/stages/2/exit_criteria/0/rule",
            {"event": "stage.changed"},
            "/stages/2/exit_criteria/0/rule/event",
        ),
        (
            "/stages/2/exit_criteria/0/rule",
            {"event": "next_step.confirmed", "at_least": 0},
            "/stages/2/exit_criteria/0/rule/at_least",
        ),
        (
            "/stages/3/exit_criteria/0/rule",
            {"all": [{"event": "value.agreed"}, {"lead_score": {"at_least": "40"}}]},
            "/stages/3/exit_criteria/0/rule/all/1/lead_score/at_least",
        ),
        (
            "/stages/3/exit_criteria/0/rule",
            {"any": []},
            "/stages/3/exit_criteria/0/rule/any",
        ),
        (
            "/stages/4/exit_criteria/0/rule",
            {"not": {"event": "value.agreed", "at_least": 2, "extra": True}},
            "/stages/4/exit_criteria/0/rule/not",
        ),
    ],
)
def test_process_with_a_broken_rule_points_inside_the_stage(
    change: str, value: Any, expected_pointer: str
) -> None:
    assert pointer(first_error(broken(change, value))) == expected_pointer


def test_a_rule_of_two_kinds_at_once_is_refused() -> None:
    rule = {"event": "value.agreed", "qualification": "need", "status": "confirmed"}
    error = first_error(broken("/stages/3/exit_criteria/0/rule", rule))
    assert pointer(error).startswith("/stages/3/exit_criteria/0/rule")


@pytest.mark.parametrize(
    ("change", "value", "expected"),
    [
        (
            "/stages/2/expected_days",
            -3,
            ("/stages/2/expected_days", "exclusiveMinimum"),
        ),
        ("/stages/2/expected_days", 0, ("/stages/2/expected_days", "exclusiveMinimum")),
        ("/stages/1/win_probability", 1.5, ("/stages/1/win_probability", "maximum")),
        ("/stages/0/advances_on", "email.opened", ("/stages/0/advances_on", "enum")),
        ("/stages/5/key", "won", ("/stages/5/key", "not")),
        ("/stages/5/key", "Closing", ("/stages/5/key", "pattern")),
        ("/stages", [], ("/stages", "minItems")),
        ("/version", 0, ("/version", "minimum")),
        ("/key", "B2B default", ("/key", "pattern")),
        ("/disqualify_when/0/reason", "broke", ("/disqualify_when/0/reason", "enum")),
        (
            "/lead_score/email.sent",
            {"points": 1.5},
            ("/lead_score/email.sent/points", "type"),
        ),
        (
            "/lead_score/pain.shared",
            {"points": 5},
            ("/lead_score", "additionalProperties"),
        ),
        ("/stages/0/owner", "rep-7", ("/stages/0", "additionalProperties")),
    ],
)
def test_process_with_a_bad_value_is_refused_at_that_value(
    change: str, value: Any, expected: tuple[str, str]
) -> None:
    assert failures(process_validator(), broken(change, value)) == {expected}


def test_version_1_of_next_step_confirmed_still_takes_plain_attendees() -> None:
    validator = validator_for(
        BASE_ID + "events/previous/next_step.confirmed.v1.schema.json"
    )
    good = {"date": "2024-03-12", "agenda": "Demo", "attendees": ["cfo@acme.example"]}
    assert failures(validator, good) == set()
    bad = {"date": "2024-03-12", "agenda": "Demo", "attendees": ["cfo", ""]}
    assert failures(validator, bad) == {
        ("/attendees/1", "minLength"),
        ("/attendees/1", "pattern"),
    }
