"""An import killed half-way with SIGKILL, then run again, doubles nothing.

Each batch of an import is appended in one transaction, so a kill loses
at most the batch in flight; event ids make the rerun skip what is there.
Afterwards the log must hold exactly what a clean import of the same file
holds: the same inputs in the same order, and the same decisions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from progression.db import create_engine
from progression.errors import StorageUnavailable
from progression.eventlog import EventLog
from progression.history import generate
from progression.service import Service
from progression.settings import load_settings
from progression.transfer import import_events
from tests.integration.test_transfer import another_database, inputs, streams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEALS = 250  # about 3,900 inputs
BATCH = 50
START_S = 60


def command(history: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "progression.ops",
        "import",
        str(history),
        "--batch-size",
        str(BATCH),
    ]


def head(log: EventLog) -> int:
    try:
        return log.head_position()
    except StorageUnavailable:  # not migrated yet
        return 0


def test_an_import_killed_mid_way_completes_on_a_rerun(
    database_url: str, tmp_path: Path
) -> None:
    posted = list(generate(DEALS, seed=17))
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(e) + "\n" for e in posted))
    env = os.environ | {
        "PROGRESSION_DATABASE_URL": database_url,
        "PROGRESSION_LOG_LEVEL": "WARNING",
    }

    # Kill it once a quarter of the events are in, well before the end.
    engine = create_engine(database_url)
    log = EventLog(engine)
    killed = subprocess.Popen(
        command(history), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + START_S
    while head(log) < len(posted) // 4:
        assert killed.poll() is None, "the import ended before it could be killed"
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL

    half = sum(len(events) for events in inputs(log).values())
    assert 0 < half < len(posted)

    rerun = subprocess.run(
        command(history), env=env, capture_output=True, text=True, timeout=240
    )
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"created ([\d,]+), duplicate ([\d,]+)", rerun.stdout)
    assert counts is not None, rerun.stdout
    created, duplicate = (int(n.replace(",", "")) for n in counts.groups())
    assert duplicate >= half and created + duplicate == len(posted)

    # The reference: the same file imported once, without interruption.
    clean_urls = another_database(database_url, tmp_path)
    clean_url = next(clean_urls)
    clean = Service.start(load_settings(database_url=clean_url))
    try:
        lines = history.read_bytes().splitlines(keepends=True)
        assert import_events(clean.ingestion, lines).complete
        assert inputs(log) == inputs(clean.log)
        assert streams(log) == streams(clean.log)
        imported = [e["event_id"] for events in inputs(log).values() for e in events]
        assert len(imported) == len(set(imported)) == len(posted)
    finally:
        clean.engine.dispose()
        engine.dispose()
        clean_urls.close()
