"""Declared processes at start-up: validation, versions, and old versions kept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from progression.errors import InvalidProcess, ProcessVersionChanged
from progression.service import Service
from progression.settings import load_settings

from .progression_support import happy_path, progression_client

PROCESSES = Path(__file__).resolve().parents[2] / "schemas" / "processes"


def copy_processes(tmp_path: Path) -> Path:
    target = tmp_path / "processes"
    shutil.copytree(PROCESSES, target)
    return target


def edit(path: Path, change) -> None:
    definition = yaml.safe_load(path.read_text())
    change(definition)
    path.write_text(yaml.safe_dump(definition, sort_keys=False))


def test_a_broken_process_file_stops_the_start_naming_file_path_and_rule(
    tmp_path: Path,
) -> None:
    processes = copy_processes(tmp_path)
    edit(
        processes / "b2b-default.yaml",
        lambda d: d["stages"][2].__setitem__("expected_days", -3),
    )
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", processes_dir=processes
    )
    with pytest.raises(InvalidProcess) as refused:
        Service.start(settings)
    message = str(refused.value)
    assert "b2b-default.yaml" in message
    assert "/stages/2/expected_days" in message
    assert "minimum" in message


def test_the_check_command_reports_a_broken_file(tmp_path: Path) -> None:
    processes = copy_processes(tmp_path)
    edit(processes / "five-step.yaml", lambda d: d["stages"][0].pop("advances_on"))
    result = subprocess.run(
        [sys.executable, "-m", "progression.cli", "check"],
        env={"PROGRESSION_PROCESSES_DIR": str(processes), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "five-step.yaml" in result.stderr and "/stages/0" in result.stderr
    assert "advances_on" in result.stderr


def test_a_changed_process_needs_a_new_version(
    database_url: str, tmp_path: Path
) -> None:
    processes = copy_processes(tmp_path)
    Service.start(
        load_settings(database_url=database_url, processes_dir=processes)
    ).engine.dispose()
    edit(
        processes / "b2b-default.yaml",
        lambda d: d["stages"][0].__setitem__("expected_days", 5),
    )
    with pytest.raises(ProcessVersionChanged) as refused:
        Service.start(load_settings(database_url=database_url, processes_dir=processes))
    assert "b2b-default" in str(refused.value) and "version 1" in str(refused.value)


def test_deals_keep_the_version_they_were_created_under(
    database_url: str, tmp_path: Path
) -> None:
    processes = copy_processes(tmp_path)
    items = happy_path("old-deal")
    with progression_client(database_url, processes_dir=processes) as client:
        for item in items[:2]:
            client.post("/v1/events", json=item)

    # Version 2 drops the BANT criteria of connecting.
    def version_2(d: dict) -> None:
        d["version"] = 2
        d["stages"][1]["exit_criteria"] = []

    edit(processes / "b2b-default.yaml", version_2)
    with progression_client(database_url, processes_dir=processes) as client:
        versions = client.get("/v1/processes/b2b-default").json()
        assert versions["current_version"] == 2
        assert [v["version"] for v in versions["versions"]] == [1, 2]

        pain = next(i for i in items if i["type"] == "pain.shared")
        old = client.post("/v1/events", json=pain).json()["decisions"]
        assert old == []  # version 1 still wants BANT confirmed
        assert client.get("/v1/deals/old-deal").json()["process_version"] == 1

        new_items = happy_path("new-deal")
        client.post("/v1/events", json=new_items[0])
        client.post("/v1/events", json=new_items[1])
        new_pain = next(i for i in new_items if i["type"] == "pain.shared")
        moved = client.post("/v1/events", json=new_pain).json()["decisions"]
        assert [d["data"]["to"] for d in moved] == ["researching"]
        assert moved[0]["data"]["process_version"] == 2


def test_a_version_recorded_by_another_replica_is_loaded_on_demand(
    database_url: str, tmp_path: Path
) -> None:
    old_files = copy_processes(tmp_path / "a")
    replica_a = Service.start(
        load_settings(database_url=database_url, processes_dir=old_files)
    )
    new_files = copy_processes(tmp_path / "b")
    edit(new_files / "b2b-default.yaml", lambda d: d.__setitem__("version", 2))
    replica_b = Service.start(
        load_settings(database_url=database_url, processes_dir=new_files)
    )
    try:
        created, call = happy_path("cross-1")[:2]
        [made] = replica_b.ingestion.submit([created])
        assert made.decisions[0].data["process_version"] == 2
        [moved] = replica_a.ingestion.submit([call])
        assert moved.status == "created"
        assert [d.data["to"] for d in moved.decisions] == ["connecting"]
        assert moved.decisions[0].data["process_version"] == 2
    finally:
        replica_a.engine.dispose()
        replica_b.engine.dispose()
