"""`metrics parked list|show|retry`: what an operator reads and the exit
status a script checks."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from metrics.cli import main
from metrics.settings import Settings
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.parking import deploy_stage_changed_v2, held_stream


@pytest.fixture(autouse=True)
def wide_output_and_logging_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """Tables as wide as their longest error (a terminal would wrap them), and
    the root logger as it was: `main` points it at this test's stderr."""
    monkeypatch.setenv("COLUMNS", "400")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def held(
    projected: Projected, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Projected:
    """The read models of `held_stream`: d1's events 1 to 7 parked, and the
    `metrics` command pointed at them."""
    projected.apply(held_stream()[0])
    monkeypatch.setenv("METRICS_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("METRICS_PROCESSES_DIR", str(settings.processes_dir))
    return projected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["parked", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_list_shows_the_parked_events_a_page_at_a_time(
    held: Projected, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "list", "--limit", "3")
    assert status == 0
    assert "3 of 7 parked events; the next page: --after 3" in out
    assert "newer than this projector knows" in out
    assert "stage.changed" in out and "d1" in out

    status, out, _ = run(capsys, "list", "--after", "3", "--json")
    answer = json.loads(out)
    assert status == 0
    assert [e["id"] for e in answer["events"]] == [4, 5, 6, 7]
    assert answer["count"] == 7 and answer["next_after"] is None
    assert all(e["error"].startswith("held behind") for e in answer["events"])


def test_show_names_what_holds_an_event_back_and_an_unknown_id(
    held: Projected, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "show", "2")
    assert status == 0
    assert "Held behind parked event 1: retry that one first" in out
    assert '"type": "meeting.held"' in out  # the raw value

    status, out, _ = run(capsys, "show", "1", "--json")
    shown = json.loads(out)
    assert (status, shown["id"], shown["held_behind"]) == (0, 1, None)
    assert shown["stream_version"] == 3

    status, out, err = run(capsys, "show", "99")
    assert (status, out) == (1, "")
    assert "metrics parked show: no parked event with id=99" in err


def test_retry_exits_1_while_an_event_stays_parked_and_0_once_all_applied(
    held: Projected,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, out, _ = run(capsys, "retry", "--all")
    assert status == 1
    assert "0 applied, 1 still parked, 6 held, 0 missing" in out

    deploy_stage_changed_v2(monkeypatch)
    status, out, _ = run(capsys, "retry", "2")
    assert status == 1
    assert "0 applied, 0 still parked, 1 held, 0 missing" in out

    status, out, _ = run(capsys, "retry", "--all", "--deal", "d1", "--json")
    answer = json.loads(out)
    assert status == 0
    assert [(e["id"], e["outcome"]) for e in answer["events"]] == [
        (i, "applied") for i in range(1, 8)
    ]
    assert held.rows("SELECT count(*) FROM parked_events") == [(0,)]
    assert held.rows("SELECT status, parked FROM deals WHERE deal_id = 'd1'") == [
        ("lost", 0)
    ]

    status, out, err = run(capsys, "retry", "1")
    assert status == 1
    assert "0 applied, 0 still parked, 0 held, 1 missing" in out
    assert "metrics parked retry: no parked event with id=1" in err


def test_retry_needs_ids_or_all_but_not_both(
    held: Projected, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["retry"], ["retry", "1", "--all"]):
        status, out, err = run(capsys, *argv)
        assert (status, out) == (2, "")
        assert "give the ids to retry, or --all (not both)" in err
    assert held.rows("SELECT count(*) FROM parked_events") == [(7,)]


def test_a_database_not_migrated_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere.db"
    monkeypatch.setenv("METRICS_DATABASE_URL", f"sqlite:///{missing}")
    status, _, err = run(capsys, "list")
    assert status == 1
    assert f"no read models at {missing}: run `metrics migrate`" in err
    assert not missing.exists()
