"""Export from one instance and import into another, over real databases."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from progression import ops
from progression.eventlog import EventLog
from progression.history import generate
from progression.service import Service
from progression.settings import load_settings
from progression.transfer import export, import_events
from tests.conftest import fresh_postgres_database

from .progression_support import event, happy_path

# -- helpers shared with the fault tests ---------------------------------------------


def another_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the same kind as `database_url`."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'other.db'}"
    else:
        yield from fresh_postgres_database()


def streams(log: EventLog) -> dict[str, list[dict[str, Any]]]:
    """Every deal's events in stream order, without what each log adds: the
    positions, the times of recording, and when each decision was made."""
    deal_ids: list[str] = []
    after: str | None = None
    while page := log.deals(after=after, limit=1000):
        deal_ids += [d.deal_id for d in page]
        after = page[-1].deal_id
    found: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(deal_ids), 500):
        for deal_id, events in log.read_streams(deal_ids[start : start + 500]).items():
            found[deal_id] = [
                {
                    key: value
                    for key, value in e.envelope().items()
                    if key not in ("position", "recorded_at")
                    and not (key == "occurred_at" and e.type == "stage.changed")
                }
                | {"digest": e.digest, "causation_id": e.causation_id}
                for e in events
            ]
    return found


def inputs(log: EventLog) -> dict[str, list[dict[str, Any]]]:
    """Every deal's inputs in arrival order, as they were sent."""
    return {
        deal_id: [
            {k: v for k, v in e.items() if k != "stream_version"}
            for e in events
            if e["type"] != "stage.changed"
        ]
        for deal_id, events in streams(log).items()
    }


def load(service: Service, events: Any) -> None:
    iterator = iter(events)
    while batch := list(islice(iterator, 1000)):
        results = service.ingestion.submit(batch)
        assert {r.status for r in results} == {"created"}, results


def with_override(deal_id: str) -> list[dict[str, Any]]:
    """A deal moved by hand, written by a CRM without source or actor."""
    created = event(f"{deal_id}-created", "deal.created", deal_id, 0, owner="rep-3")
    del created["source"]
    return [
        created,
        event(
            f"{deal_id}-moved",
            "stage.overridden",
            deal_id,
            5,
            to="presenting",
            reason="met the buying group at a trade fair",
        ),
    ]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def source(database_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=database_url))
    load(service, generate(60, seed=21))
    load(service, happy_path("by-hand") + with_override("moved"))
    yield service
    service.engine.dispose()


@pytest.fixture
def target_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    yield from another_database(database_url, tmp_path)


@pytest.fixture
def target(target_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=target_url))
    yield service
    service.engine.dispose()


@pytest.fixture
def command_logging() -> Iterator[None]:
    """Undo the logging set-up of the commands run in a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def exported(service: Service, **options: Any) -> str:
    out = io.StringIO()
    export(service.log, out, **options)
    return out.getvalue()


def lines_of(text: str) -> list[bytes]:
    return [line.encode() + b"\n" for line in text.splitlines()]


# -- export ----------------------------------------------------------------------------


def test_export_writes_every_recorded_envelope_in_position_order(
    source: Service,
) -> None:
    text = exported(source)
    envelopes = [json.loads(line) for line in text.splitlines()]
    assert len(envelopes) == source.log.head_position()
    positions = [e["position"] for e in envelopes]
    assert positions == sorted(positions)
    assert envelopes == [e.envelope() for e in source.log.feed(0, 100_000)]


def test_export_filters_by_position_and_deal(source: Service) -> None:
    middle = [
        json.loads(line)
        for line in exported(source, from_position=5, to_position=9).splitlines()
    ]
    assert [e["position"] for e in middle] == [5, 6, 7, 8, 9]

    text = exported(source, deal_ids=["by-hand", "moved"])
    mine = [json.loads(line) for line in text.splitlines()]
    assert {e["deal_id"] for e in mine} == {"by-hand", "moved"}
    recorded = source.log.read_stream("by-hand") + source.log.read_stream("moved")
    assert [e["position"] for e in mine] == sorted(e.position for e in recorded)

    beyond = exported(source, from_position=source.log.head_position() + 1)
    assert beyond == ""
    with pytest.raises(ValueError, match="to_position"):
        exported(source, from_position=9, to_position=5)


# -- import ----------------------------------------------------------------------------


def test_an_export_imported_twice_gives_the_source_inputs_and_decisions(
    source: Service, target: Service
) -> None:
    lines = lines_of(exported(source))
    decisions = sum(json.loads(line)["type"] == "stage.changed" for line in lines)

    first = import_events(target.ingestion, lines, batch_size=250)
    again = import_events(target.ingestion, lines, batch_size=250)

    assert first.decisions_skipped == decisions == again.decisions_skipped
    assert first.inputs == len(lines) - decisions
    assert (first.created, first.duplicate, first.conflict, first.invalid) == (
        first.inputs,
        0,
        0,
        0,
    )
    assert (again.created, again.duplicate) == (0, first.inputs)
    assert first.complete and again.complete

    assert inputs(target.log) == inputs(source.log)
    # The same process versions on both sides: the same decisions.
    assert first.decisions_made == decisions
    assert streams(target.log) == streams(source.log)


def test_a_file_of_posted_envelopes_imports_like_an_export(target: Service) -> None:
    posted = list(generate(30, seed=4))
    lines = [json.dumps(e).encode() + b"\n" for e in posted]

    first = import_events(target.ingestion, lines)
    again = import_events(target.ingestion, lines)

    assert first.created == again.duplicate == len(posted)
    assert again.created == 0
    imported = [e for events in inputs(target.log).values() for e in events]
    assert sorted(e["event_id"] for e in imported) == sorted(
        e["event_id"] for e in posted
    )


def test_conflicts_and_broken_lines_are_counted_and_named(
    source: Service, target: Service
) -> None:
    load(target, [happy_path("by-hand")[0] | {"data": {"owner": "somebody-else"}}])
    lines = [*lines_of(exported(source, deal_ids=["by-hand"])), b"{not json\n"]

    summary = import_events(target.ingestion, lines)

    assert summary.conflict == 1 and summary.invalid == 1
    assert not summary.complete
    conflict, broken = summary.problems
    assert (conflict.line, conflict.event_id, conflict.status) == (
        1,
        "by-hand-created",
        "conflict",
    )
    assert "already accepted with different content" in conflict.detail
    assert (broken.line, broken.status) == (len(lines), "invalid")
    assert broken.detail.startswith("not JSON")


# -- the commands ----------------------------------------------------------------------


def test_the_commands_round_trip_and_report(
    source: Service,
    target: Service,
    database_url: str,
    target_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command_logging: None,
) -> None:
    dump = tmp_path / "log.jsonl"
    monkeypatch.setenv("PROGRESSION_DATABASE_URL", database_url)
    assert ops.main(["export", "--out", str(dump)]) == 0
    out = capsys.readouterr().out
    head = source.log.head_position()
    assert f"exported {head:,} events (positions 1 to {head}" in out
    assert not (tmp_path / "log.jsonl.partial").exists()

    monkeypatch.setenv("PROGRESSION_DATABASE_URL", target_url)
    assert ops.main(["import", str(dump)]) == 0
    first = capsys.readouterr().out
    assert ops.main(["import", str(dump)]) == 0
    second = capsys.readouterr().out

    count = sum(len(v) for v in inputs(source.log).values())
    assert f"created {count:,}, duplicate 0, conflict 0, invalid 0" in first
    assert f"created 0, duplicate {count:,}, conflict 0, invalid 0" in second
    assert inputs(target.log) == inputs(source.log)


def test_export_to_stdout_keeps_the_summary_off_the_data(
    source: Service,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command_logging: None,
) -> None:
    monkeypatch.setenv("PROGRESSION_DATABASE_URL", database_url)
    assert ops.main(["export", "--deal", "moved"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["type"] for e in lines] == [
        "deal.created",
        "stage.changed",
        "stage.overridden",
        "stage.changed",
    ]
    assert "exported 4 events" in captured.err


def test_an_import_with_a_conflict_exits_non_zero(
    source: Service,
    target: Service,
    target_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command_logging: None,
) -> None:
    load(target, [with_override("moved")[0] | {"data": {"owner": "rep-9"}}])
    dump = tmp_path / "moved.jsonl"
    dump.write_text(exported(source, deal_ids=["moved"]))
    monkeypatch.setenv("PROGRESSION_DATABASE_URL", target_url)

    assert ops.main(["import", str(dump)]) == 1
    out = capsys.readouterr().out
    assert "conflict 1" in out
    assert "line 1: conflict moved-created" in out
