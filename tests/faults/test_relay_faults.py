"""The relay under faults: killed mid-publish, and a broker that goes away.

Delivery is at least once, so afterwards the topic may hold an event twice;
deduplicated by (deal_id, stream_version), as the projector does, it must be
exactly the log, and each deal's events must arrive in stream order.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from progression import relay as relay_module
from progression.eventlog import (
    EventLog,
    RecordedEvent,
)
from progression.relay import Relay
from tests.conftest import IN_CI
from tests.eventlog_support import LogWriter
from tests.integration.test_relay import (
    JOIN_S,
    Message,
    RelayThread,
    delete_topic,
    head_position,
    new_topic,
    read_topic,
    recorded_position,
    relay_settings,
    wait_for,
    wait_until_published,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "deploy" / "local" / "kafka.sh"
BROKER_START_S = 90


# -- helpers -------------------------------------------------------------------


def check_at_least_once(
    messages: Sequence[Message], logged: Sequence[RecordedEvent]
) -> None:
    """The topic, deduplicated by (deal_id, stream_version), is the log."""
    envelopes = {(e.deal_id, e.stream_version): e.envelope() for e in logged}
    for message in messages:
        identity = (message.value["deal_id"], message.value["stream_version"])
        assert message.key == identity[0].encode("utf-8")
        assert message.value == envelopes[identity]  # a repeat is the same event
    on_topic = {(m.value["deal_id"], m.value["stream_version"]) for m in messages}
    assert len(on_topic) == len(envelopes)
    assert on_topic == set(envelopes)

    # A consumer that skips what it has already applied gets every deal's
    # events in stream order, without a gap.
    applied: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        versions = applied[message.value["deal_id"]]
        version = message.value["stream_version"]
        if version > (versions[-1] if versions else 0):
            versions.append(version)
    for deal_id, versions in applied.items():
        assert versions == list(range(1, len(versions) + 1)), deal_id


def relay_env(database_url: str, bootstrap: str, topic: str, folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESSION_")}
    env.update(
        PROGRESSION_DATABASE_URL=database_url,
        PROGRESSION_KAFKA_BOOTSTRAP=bootstrap,
        PROGRESSION_KAFKA_TOPIC=topic,
        PROGRESSION_KAFKA_PARTITIONS="3",
        PROGRESSION_LOG_LEVEL="INFO",
        DEALLEDGER_DATA_DIR=str(folder / "data"),
    )
    return env


def start_relay(env: dict, log_file: Path) -> subprocess.Popen[bytes]:
    """`progression relay`, the installed command, as a process of its own."""
    command = Path(sys.executable).with_name("progression")
    assert command.exists(), f"{command} is missing: install the project"
    with log_file.open("ab") as output:
        return subprocess.Popen(
            [str(command), "relay"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(JOIN_S)


class Broker:
    """A broker of the test's own (deploy/local/kafka.sh), in its own folder.

    The script removes a stopped broker's data on the next start, so
    `start_again` runs the same command line itself, keeping the data.
    """

    def __init__(self, folder: Path) -> None:
        self.dir = folder / "kafka"
        outer = Path(os.environ.get("DEALLEDGER_LOCAL_DIR") or REPO / ".local")
        self.env = {
            **os.environ,
            "DEALLEDGER_LOCAL_DIR": str(folder),
            "KAFKA_DIR": str(self.dir),
            # The jars the other services were started from, when there are
            # some: the script fetches them otherwise.
            "KAFKA_LIBS_DIR": os.environ.get("KAFKA_LIBS_DIR")
            or str(outer / "kafka-libs"),
        }
        for variable in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT"):
            self.env.pop(variable, None)
        self.command: list[str] = []
        self.bootstrap = ""
        self._pid = 0
        self._child: subprocess.Popen[bytes] | None = None

    def _script(self, *args: str, timeout_s: float) -> str:
        done = subprocess.run(
            [str(KAFKA_SCRIPT), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self) -> None:
        self._script("start", timeout_s=BROKER_START_S + 60)
        self._pid = int((self.dir / "pid").read_text())
        cmdline = Path(f"/proc/{self._pid}/cmdline").read_bytes()
        self.command = [part.decode() for part in cmdline.split(b"\0") if part]
        self.bootstrap = self._script("bootstrap", timeout_s=30).strip()

    def stop(self) -> None:
        os.kill(self._pid, signal.SIGTERM)
        if self._child is not None:
            self._child.wait(60)
            self._child = None
            return
        deadline = time.monotonic() + 60
        while _alive(self._pid):
            assert time.monotonic() < deadline, "the broker did not stop"
            time.sleep(0.1)

    def start_again(self) -> None:
        log = self.dir / "server.log"
        started = log.read_text(errors="replace").count("Kafka Server started")
        with log.open("ab") as output:
            self._child = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pid = self._child.pid
        (self.dir / "pid").write_text(f"{self._pid}\n")
        deadline = time.monotonic() + BROKER_START_S
        while log.read_text(errors="replace").count("Kafka Server started") == started:
            assert self._child.poll() is None, "the broker exited while starting"
            assert time.monotonic() < deadline, "the broker did not start again"
            time.sleep(0.2)

    def remove(self) -> None:
        if self._child is not None:
            self.stop()
        self._script("stop", timeout_s=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    # The rule of every broker test: without the local services (which
    # fetched Kafka's jars), fail in CI and skip elsewhere.
    if not os.environ.get("DEALLEDGER_TEST_KAFKA"):
        message = "Apache Kafka is not available: DEALLEDGER_TEST_KAFKA is not set"
        if IN_CI:
            pytest.fail(f"{message} (in CI a missing service is a failure)")
        pytest.skip(message)
    own = Broker(tmp_path_factory.mktemp("broker"))
    own.start()
    yield own
    own.remove()


# -- tests ---------------------------------------------------------------------


def test_a_relay_killed_mid_publish_and_restarted_leaves_every_event_on_the_topic(
    engine: sa.Engine, database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = new_topic()
    writer = LogWriter(EventLog(engine), deals=200)
    for _ in range(15):
        writer.append_round(10)  # 30,000 events, deals interleaved
    head = head_position(engine)
    env = relay_env(database_url, kafka_bootstrap, topic, tmp_path)

    first = start_relay(env, tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: (recorded_position(engine, topic) or 0) > 0,
            "the first relay to record a position",
        )
        first.send_signal(signal.SIGKILL)
        assert first.wait(JOIN_S) == -signal.SIGKILL
        killed_at = recorded_position(engine, topic)
        assert killed_at is not None and 0 < killed_at < head, "not mid-publish"

        # Events keep arriving while no relay runs and while the next starts.
        writer.append_round(10)
        second = start_relay(env, tmp_path / "second.log")
        writer.append_round(10)
        wait_until_published(engine, topic, "the restarted relay to catch up")
        second.send_signal(signal.SIGTERM)
        assert second.wait(JOIN_S) == 0
    finally:
        for process in (first, second):
            if process is not None:
                end(process)

    try:
        second_log = (tmp_path / "second.log").read_text()
        assert "relay active" in second_log
        assert "relay stopped" in second_log
        if engine.dialect.name == "sqlite":
            # The killed relay's lease had to expire first.
            assert "relay standing by" in second_log
            assert "expired relay lease taken over" in second_log
        messages = read_topic(kafka_bootstrap, topic)
        logged = EventLog(engine).feed(0, 1_000_000)
        assert len(logged) == 34_000
        check_at_least_once(messages, logged)
    finally:
        delete_topic(kafka_bootstrap, topic)


# kafka-python 3.0 does not close a socket whose connect was refused; the
# garbage collector does, with a ResourceWarning, which this suite makes an
# error. Only this test sees refused connections, and it collects them itself.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_the_relay_catches_up_after_the_broker_is_stopped_and_started(
    engine: sa.Engine,
    database_url: str,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # kafka-python's own lines would keep its connections (and their leaked
    # sockets, see above) alive in the captured records.
    caplog.set_level(logging.CRITICAL, logger="kafka")
    caplog.set_level(logging.INFO, logger="progression.relay")
    # Short producer timeouts, so that the outage outlasts the delivery
    # timeout: the relay must give up on its producer, start a fresh one and
    # send again from the recorded position.
    monkeypatch.setitem(relay_module.PRODUCER_OPTIONS, "delivery_timeout_ms", 4_000)
    monkeypatch.setitem(relay_module.PRODUCER_OPTIONS, "request_timeout_ms", 2_000)
    topic = new_topic()
    writer = LogWriter(EventLog(engine), deals=20)
    writer.append_round(5)
    settings = relay_settings(database_url, broker.bootstrap, topic)
    running = RelayThread(Relay(engine, settings)).start()

    writing = threading.Event()
    writing.set()
    write_errors: list[BaseException] = []

    def keep_writing() -> None:
        try:
            while writing.is_set():
                writer.append_round(1)
                time.sleep(0.1)
        except BaseException as error:  # reported by the test's thread
            write_errors.append(error)

    thread = threading.Thread(target=keep_writing, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: (recorded_position(engine, topic) or 0) > 0,
            "the relay to publish before the outage",
        )
        broker.stop()
        stopped_at = recorded_position(engine, topic)
        time.sleep(8)
        assert head_position(engine) > (stopped_at or 0)
        assert recorded_position(engine, topic) == stopped_at

        broker.start_again()
        writing.clear()
        thread.join(JOIN_S)
        assert write_errors == []
        wait_until_published(engine, topic, "the relay to catch up after the outage")
    finally:
        writing.clear()
        running.stop()
        gc.collect()

    relay_lines = [r for r in caplog.records if r.name == "progression.relay"]
    retries = [r for r in relay_lines if r.levelno == logging.WARNING]
    assert any("kafka unavailable, retrying" in r.getMessage() for r in retries)
    assert all(f"topic={topic}" in r.getMessage() for r in retries)
    assert [r.getMessage() for r in relay_lines if r.levelno >= logging.ERROR] == []
    check_at_least_once(
        read_topic(broker.bootstrap, topic), EventLog(engine).feed(0, 1_000_000)
    )
