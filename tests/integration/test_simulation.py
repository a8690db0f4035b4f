"""What-if simulations over a real event log: the figures, the CLI, the API."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from progression import ops
from progression.api import create_app
from progression.errors import UnknownDeal
from progression.history import generate
from progression.process import Process, parse_process
from progression.service import Service
from progression.settings import load_settings
from progression.simulation import DealFilter, parse_moment, simulate

from .progression_support import event, happy_path

PROCESSES = Path(__file__).resolve().parents[2] / "schemas" / "processes"
FAST_TRACK = PROCESSES / "inbound-fast-track.yaml"
DEFAULT = PROCESSES / "b2b-default.yaml"
HOUR = 1 / 24


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=database_url))
    yield service
    service.engine.dispose()


def load(service: Service, events: Any) -> None:
    iterator = iter(events)
    while batch := list(islice(iterator, 1000)):
        results = service.ingestion.submit(batch)
        assert {r.status for r in results} == {"created"}, results


def process_file(path: Path, service: Service, **changes: Any) -> Process:
    definition = yaml.safe_load(path.read_text())
    definition.update(changes)
    return parse_process(definition, service.contract.process_schema, str(path))


def run(service: Service, candidate: Process, **options: Any) -> dict[str, Any]:
    result = simulate(
        service.log,
        service.catalog,
        candidate,
        candidate_source="test",
        **options,
    )
    return result.data()


def row(data: dict[str, Any], stage: str) -> dict[str, Any]:
    [found] = [r for r in data["stages"] if r["stage"] == stage]
    return found


def small_history() -> list[dict[str, Any]]:
    """Four deals whose figures are worked out by hand in the test below."""
    won = happy_path("won")  # every step 10 hours after the last but one
    lost = [
        event("lost-created", "deal.created", "lost", 0, owner="rep-2"),
        event("lost-call", "discovery_call.agreed", "lost", 24),
        *[
            event(
                f"lost-{c}",
                "qualification.updated",
                "lost",
                48,
                criterion=c,
                status="confirmed",
            )
            for c in ("budget", "authority", "need", "timeline")
        ],
        event("lost-pain", "pain.shared", "lost", 72),
        event("lost-lost", "deal.lost", "lost", 120, reason="price"),
    ]
    disqualified = [
        event("dq-created", "deal.created", "dq", 0, owner="rep-2"),
        event("dq-why", "disqualifier.identified", "dq", 48, reason="no_budget"),
    ]
    stalled = [
        event("open-created", "deal.created", "open", -240, owner="rep-1"),
        event("open-call", "discovery_call.agreed", "open", -230),
    ]
    return won + lost + disqualified + stalled


def test_the_figures_are_the_ones_worked_out_by_hand(service: Service) -> None:
    load(service, small_history())
    data = run(
        service,
        process_file(FAST_TRACK, service),
        baseline="b2b-default",
    )

    # As of the latest input replayed: the loss, 120 hours after T0.
    assert data["as_of"] == "2026-03-07T09:00:00Z"
    assert data["deals"] == 4

    # b2b-default. Prospecting: 4 visits; "won" left after 10 h, "lost"
    # after 24 h, "open" after 10 h; "dq" was disqualified from it.
    prospecting = row(data, "prospecting")
    assert prospecting["candidate"] is None  # the fast track has no prospecting
    assert prospecting["difference"] is None
    baseline = prospecting["baseline"]
    assert (baseline["entered"], baseline["advanced"], baseline["dropped"]) == (4, 3, 1)
    assert baseline["conversion"] == 0.75
    # Days 10/24, 10/24, 1: the median is 10/24; p90 at rank 1.8.
    assert baseline["median_days"] == pytest.approx(10 * HOUR, abs=1e-6)
    assert baseline["p90_days"] == pytest.approx(
        10 * HOUR + 0.8 * (1 - 10 * HOUR), abs=1e-6
    )

    # Connecting: "won" 20 h, "lost" 48 h, "open" still in it.
    connecting = row(data, "connecting")
    baseline = connecting["baseline"]
    assert (baseline["entered"], baseline["advanced"]) == (3, 2)
    assert baseline["conversion"] == pytest.approx(2 / 3, abs=1e-6)
    assert baseline["median_days"] == pytest.approx(34 * HOUR, abs=1e-6)
    assert baseline["p90_days"] == pytest.approx((20 + 0.9 * 28) * HOUR, abs=1e-6)

    # The fast track: every deal starts in connecting; "won" leaves it on
    # pain.shared at 30 h, "lost" at 72 h, "dq" is disqualified from it.
    candidate = connecting["candidate"]
    assert (candidate["entered"], candidate["advanced"], candidate["dropped"]) == (
        4,
        2,
        1,
    )
    assert candidate["conversion"] == 0.5
    assert candidate["median_days"] == pytest.approx(51 * HOUR, abs=1e-6)
    assert connecting["difference"]["entered"] == 1
    assert connecting["difference"]["conversion"] == pytest.approx(-1 / 6, abs=1e-6)

    researching = row(data, "researching")
    assert researching["candidate"] is None
    assert researching["baseline"]["entered"] == 2
    assert researching["baseline"]["conversion"] == 0.5

    before, after = data["overall"]["baseline"], data["overall"]["candidate"]
    assert (before["won"], before["lost"], before["disqualified"], before["open"]) == (
        1,
        1,
        1,
        1,
    )
    assert before["win_rate"] == 0.5
    assert before["cycle_mean_days"] == pytest.approx(100 * HOUR, abs=1e-6)
    assert before["cycle_median_days"] == pytest.approx(100 * HOUR, abs=1e-6)
    # "open" sits in connecting since -230 h: 350 h at the as-of, over 7 days.
    assert before["stalled"] == 1
    assert after["won"] == 1 and after["stalled"] == 1
    assert data["overall"]["difference"]["won"] == 0
    assert data["deals_with_another_outcome"] == 0
    assert data["another_outcome_examples"] == []

    # Three days after the first call, the open deal is not yet stalled.
    early = run(
        service,
        process_file(FAST_TRACK, service),
        baseline="b2b-default",
        as_of=parse_moment("as_of", "2026-02-23T09:00:00Z"),
    )
    assert early["overall"]["baseline"]["stalled"] == 0


def test_a_candidate_equal_to_the_baseline_changes_nothing(service: Service) -> None:
    load(service, generate(120, seed=3))
    data = run(service, process_file(DEFAULT, service), baseline="b2b-default")

    assert data["deals"] == 120
    assert data["deals_with_another_outcome"] == 0
    for stage in data["stages"]:
        assert all(v == 0 for v in stage["difference"].values()), stage
    assert all(v == 0 for v in data["overall"]["difference"].values())
    assert data["overall"]["baseline"]["won"] > 0


def test_the_recorded_process_as_baseline_gives_back_what_was_recorded(
    service: Service,
) -> None:
    load(service, generate(150, seed=5))
    data = run(service, process_file(FAST_TRACK, service))

    recorded = Counter(d.status for d in service.log.deals(limit=1000))
    overall = data["overall"]["baseline"]
    assert {k: overall[k] for k in recorded} == dict(recorded)
    assert data["baseline"]["process"] is None
    assert data["baseline"]["processes"] == [
        {"process": "b2b-default", "version": 1, "deals": 150}
    ]
    assert "each deal's recorded process" in data["baseline"]["description"]


def test_dropping_a_criterion_converts_more(service: Service) -> None:
    load(service, generate(200, seed=11))
    definition = yaml.safe_load(DEFAULT.read_text())
    lenient = copy.deepcopy(definition)
    [connecting] = [s for s in lenient["stages"] if s["key"] == "connecting"]
    connecting["exit_criteria"] = [
        c for c in connecting["exit_criteria"] if c["key"] != "timeline_confirmed"
    ]
    lenient["version"] = 2
    candidate = parse_process(lenient, service.contract.process_schema, "lenient")

    data = run(service, candidate, baseline="b2b-default")

    examples = data["another_outcome_examples"]
    assert 0 < len(examples) <= min(20, data["deals_with_another_outcome"])
    assert [e["deal_id"] for e in examples] == sorted(e["deal_id"] for e in examples)
    assert all(e["baseline"] != e["candidate"] for e in examples)
    change = row(data, "connecting")["difference"]
    assert change["advanced"] > 0
    assert change["conversion"] > 0
    assert data["overall"]["difference"]["won"] >= 0
    assert row(data, "prospecting")["difference"]["conversion"] == 0


def test_stages_the_sides_do_not_share_are_listed_with_blanks(
    service: Service,
) -> None:
    load(service, small_history())
    five_step = process_file(PROCESSES / "five-step.yaml", service)
    triage = process_file(FAST_TRACK, service)
    triage.definition["stages"].insert(
        0,
        dict(triage.definition["stages"][0], key="triage", name="Triage"),
    )
    triage = parse_process(triage.definition, service.contract.process_schema, "t")

    apart = run(service, five_step, baseline="b2b-default")
    before = ["prospecting", "connecting", "researching", "presenting"]
    before += ["negotiating", "closing"]
    after = ["prospect", "qualify", "quote", "close"]
    assert [r["stage"] for r in apart["stages"]] == before + after
    assert all(r["candidate"] is None for r in apart["stages"][:6])
    assert all(r["baseline"] is None for r in apart["stages"][6:])
    assert row(apart, "prospect")["candidate"]["entered"] == 4

    # A new first stage goes before the first stage the two share.
    first = run(service, triage, baseline="b2b-default")
    assert [r["stage"] for r in first["stages"]][:3] == [
        "prospecting",
        "triage",
        "connecting",
    ]


def test_a_simulation_writes_nothing(service: Service) -> None:
    load(service, generate(40, seed=2))
    head = service.log.head_position()
    deals = service.log.deals(limit=1000)
    processes = service.log.processes()

    renamed = process_file(FAST_TRACK, service, key="what-if-only", version=9)
    run(service, renamed, baseline="b2b-default")
    run(service, renamed)

    assert service.log.head_position() == head
    assert service.log.deals(limit=1000) == deals
    assert service.log.processes() == processes


def test_filters_choose_the_deals_replayed(service: Service) -> None:
    load(service, small_history())
    candidate = process_file(FAST_TRACK, service)

    by_owner = run(service, candidate, selection=DealFilter(owner="rep-2"))
    assert by_owner["deals"] == 2  # "lost" and "dq"

    by_id = run(service, candidate, selection=DealFilter(deal_ids=("won", "open")))
    assert by_id["deals"] == 2
    assert by_id["overall"]["candidate"]["won"] == 1

    # Created before T0: only "open".
    early = DealFilter(created_to=parse_moment("to", "2026-03-01", end_of_day=True))
    assert run(service, candidate, selection=early)["deals"] == 1
    late = DealFilter(created_from=parse_moment("from", "2026-03-02T09:00:00Z"))
    assert run(service, candidate, selection=late)["deals"] == 3

    with pytest.raises(UnknownDeal):
        run(service, candidate, selection=DealFilter(deal_ids=("nope",)))


def test_worker_processes_give_the_same_figures(
    service: Service, database_url: str
) -> None:
    load(service, generate(450, seed=13))
    candidate = process_file(FAST_TRACK, service)
    alone = run(service, candidate, baseline="b2b-default")
    spread = run(
        service,
        candidate,
        baseline="b2b-default",
        workers=2,
        database_url=database_url,
    )
    assert spread == alone


# -- the command -------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[str]:
    """The command's settings; the logging it sets up is undone afterwards."""
    monkeypatch.setenv("PROGRESSION_DATABASE_URL", database_url)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield database_url
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_command_answers_the_same_json(
    service: Service, environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    load(service, small_history())
    status = ops.main(
        [
            "simulate",
            "--process",
            str(FAST_TRACK),
            "--baseline",
            "b2b-default",
            "--json",
        ]
    )
    assert status == 0
    answer = json.loads(capsys.readouterr().out)
    expected = run(service, process_file(FAST_TRACK, service), baseline="b2b-default")
    expected["candidate"]["source"] = str(FAST_TRACK)
    assert answer == expected


def test_the_command_shows_both_sides_in_tables(
    service: Service, environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    load(service, small_history())
    status = ops.main(
        ["simulate", "--process", str(FAST_TRACK), "--as-of", "2026-03-08"]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "Candidate: inbound-fast-track v1" in out
    assert "Baseline:  each deal's recorded process: b2b-default v1 (4 deals)" in out
    assert "As of:     2026-03-08T00:00:00Z" in out
    for stage in ("prospecting", "connecting", "researching", "closing"):
        assert stage in out
    assert "win rate" in out and "stalled" in out


def test_a_broken_candidate_file_is_refused_with_the_file_path_and_rule(
    service: Service,
    environment: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    definition = yaml.safe_load(FAST_TRACK.read_text())
    definition["stages"][1]["expected_days"] = -3
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(definition))

    status = ops.main(["simulate", "--process", str(broken)])

    assert status == 2
    err = capsys.readouterr().err
    assert str(broken) in err
    assert "/stages/1/expected_days: -3 is less than" in err
    assert "minimum of 0" in err


def test_a_bad_moment_is_refused_naming_the_option(
    service: Service, environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = ops.main(
        ["simulate", "--process", str(FAST_TRACK), "--created-from", "2026-13-01"]
    )
    assert status == 2
    assert "--created-from: '2026-13-01' is not a date" in capsys.readouterr().err


# -- the API -------------------------------------------------------------------------

OPS_TOKEN = "ops-token-0123456789"
READ_TOKEN = "read-token-0123456789"


def client_for(service: Service) -> TestClient:
    return TestClient(create_app(service), base_url="http://127.0.0.1:8000")


def fast_track_body(**extra: Any) -> dict[str, Any]:
    return {"process": yaml.safe_load(FAST_TRACK.read_text()), **extra}


def test_the_endpoint_answers_what_the_command_does(service: Service) -> None:
    load(service, small_history())
    with client_for(service) as client:
        response = client.post(
            "/v1/simulations",
            json=fast_track_body(
                baseline="b2b-default", filters={"owner": "rep-2"}, as_of="2026-03-08"
            ),
        )
    assert response.status_code == 200, response.text
    expected = run(
        service,
        process_file(FAST_TRACK, service),
        baseline="b2b-default",
        selection=DealFilter(owner="rep-2"),
        as_of=parse_moment("as_of", "2026-03-08"),
    )
    expected["candidate"]["source"] = "request body"
    assert response.json() == expected


def test_the_endpoint_names_what_is_wrong(service: Service) -> None:
    broken = fast_track_body()
    broken["process"]["stages"][0]["expected_days"] = -1
    with client_for(service) as client:
        invalid_process = client.post("/v1/simulations", json=broken)
        unknown_deal = client.post(
            "/v1/simulations", json=fast_track_body(filters={"deal_ids": ["nope"]})
        )
        bad_moment = client.post(
            "/v1/simulations", json=fast_track_body(as_of="yesterday")
        )
        unknown_field = client.post(
            "/v1/simulations", json=fast_track_body(baselne="b2b-default")
        )
        unknown_baseline = client.post(
            "/v1/simulations", json=fast_track_body(baseline="nope")
        )

    def pointers(response: Any) -> list[str]:
        assert response.status_code == 422, response.text
        return [e["pointer"] for e in response.json()["errors"]]

    assert pointers(invalid_process) == ["/process/stages/0/expected_days"]
    assert pointers(unknown_deal) == ["/filters/deal_ids/0"]
    assert pointers(bad_moment) == ["/as_of"]
    assert pointers(unknown_field) == ["/baselne"]
    assert pointers(unknown_baseline) == ["/baseline"]


def test_the_endpoint_needs_the_ops_scope_once_tokens_are_configured(
    database_url: str,
) -> None:
    tokens = f"ops={OPS_TOKEN}=ops;reader={READ_TOKEN}=read"
    service = Service.start(load_settings(database_url=database_url, tokens=tokens))
    try:
        with client_for(service) as client:
            anonymous = client.post("/v1/simulations", json=fast_track_body())
            reader = client.post(
                "/v1/simulations",
                json=fast_track_body(),
                headers={"Authorization": f"Bearer {READ_TOKEN}"},
            )
            operator = client.post(
                "/v1/simulations",
                json=fast_track_body(),
                headers={"Authorization": f"Bearer {OPS_TOKEN}"},
            )
    finally:
        service.engine.dispose()
    assert anonymous.status_code == 401
    assert reader.status_code == 403
    assert operator.status_code == 200, operator.text
    assert operator.json()["deals"] == 0


# -- the worked example ----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
WHAT_IF = REPO / "docs" / "what-if.md"
EXAMPLE_DEALS = 400  # the documented 2,000, made smaller


def documented_steps() -> list[tuple[str, list[str]]]:
    """The commands of the worked example, each with its documented output."""
    text = WHAT_IF.read_text(encoding="utf-8")
    block = text.split("```console\n", 1)[1].split("\n```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def shape(lines: list[str]) -> list[list[str]]:
    """What stays when the history is smaller: each line's words, without the
    numbers, the table rules and the deal ids given as examples."""
    found = []
    for line in lines:
        words = [
            word
            for word in re.split(r"[\s│┃]+", re.sub(r"[\d,.+-]+", "#", line))
            if re.search(r"[A-Za-z]", word)
        ]
        if words[:2] == ["for", "example"]:
            words = words[:2]
        if words:
            found.append(words)
    return found


@pytest.mark.slow
def test_the_worked_example_runs_as_written(tmp_path: Path) -> None:
    """The documented commands, run by bash with `progression` standing for
    `python -m progression.ops` (the same parser and handlers)."""
    steps = documented_steps()
    commands = [command for command, _ in steps]
    assert commands[1] == "progression generate --deals 2000 --seed 7 > history.jsonl"
    assert commands[-1].startswith("progression simulate --process schemas/")

    script = ['progression() { "$EXAMPLE_PYTHON" -m progression.ops "$@"; }']
    for number, command in enumerate(commands):
        script.append(f"echo '@@ {number}'")
        script.append(command.replace("--deals 2000", f"--deals {EXAMPLE_DEALS}"))
    (tmp_path / "schemas").symlink_to(REPO / "schemas")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROGRESSION_", "DEALLEDGER_")) and key != "COLUMNS"
    }
    env |= {"EXAMPLE_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr

    outputs = re.split(r"^@@ \d+\n", done.stdout, flags=re.MULTILINE)[1:]
    assert len(outputs) == len(steps)
    for (command, documented), output in zip(steps, outputs, strict=True):
        assert shape(output.splitlines()) == shape(documented), command
    assert f"{EXAMPLE_DEALS} (" in outputs[-1]  # "Deals:     400 (..."
