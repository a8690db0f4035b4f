"""Helpers of the end-to-end tests: the whole pipeline as real processes, and
the metrics computed again, independently of the metrics service.

The pipeline is the four commands a deployment runs, each a subprocess on a
free port with its log in the test's folder: `progression serve` on a
PostgreSQL database of its own, `progression relay` to a topic of the
test's own, `metrics project --source kafka` in a consumer group of the
test's own, and `metrics serve` on the metrics' own PostgreSQL database.

The expected figures are computed here from what the progression API says:
its feed (`GET /v1/feed`) holds every recorded event, the service's
decisions (`stage.changed` with their `effective_at`) among them, and the
process files give the stage order, the expected days and the win
probabilities. Nothing of the metrics package is used for that.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml

from progression.history import EPOCH, generate
from tests.conftest import fresh_postgres_database
from tests.integration.test_relay import delete_topic

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python's own
    from kafka.admin import KafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROCESSES_DIR = REPO / "schemas" / "processes"

START_S = 60  # the longest a service may take to start
CATCH_UP_S = 120  # the longest the projector may take to catch up
STOP_S = 30  # the longest a service may take to stop
# The metrics status asks the broker for the log-end offsets, and waits up
# to 31 s for an answer while the broker is away.
HTTP_TIMEOUT_S = 45
POLL_S = 0.1

# Generated histories end before this moment; stalled deals are counted
# as of then, and overrides are dated just before.
AS_OF = EPOCH
AS_OF_TEXT = "2026-07-01T00:00:00Z"
DAY_S = 86_400.0
TERMINAL = ("won", "lost", "disqualified")
UNSPECIFIED = "unspecified"
DEFAULT_PROCESS = "b2b-default"
METRICS = ("funnel", "velocity", "outcomes", "pipeline", "stalled")


# -- the processes -------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """What the metrics read from a process file."""

    key: str
    stages: tuple[str, ...]
    expected_days: dict[str, float]
    win_probability: dict[str, float]

    def is_later(self, stage: str, than: str) -> bool:
        if stage not in self.stages or than not in self.stages:
            return False
        return self.stages.index(stage) > self.stages.index(than)


def load_processes(folder: Path = PROCESSES_DIR) -> dict[str, Process]:
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        stages = spec["stages"]
        found[spec["key"]] = Process(
            key=spec["key"],
            stages=tuple(s["key"] for s in stages),
            expected_days={s["key"]: float(s["expected_days"]) for s in stages},
            win_probability={s["key"]: float(s["win_probability"]) for s in stages},
        )
    return found


# -- the history ------------------------------------------------------------------


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def history(deals: int, seed: int) -> list[dict[str, Any]]:
    """A generated history (progression.history) with more variety: a third
    of the deals are created under `inbound-fast-track` and a few under
    `five-step`, and every 20th deal is handed to another owner with a new
    amount a day after it was created."""
    events = []
    index = -1
    for envelope in generate(deals, seed):
        if envelope["type"] != "deal.created":
            events.append(envelope)
            continue
        index += 1
        data = envelope["data"]
        if index % 3 == 1:
            data["process"] = "inbound-fast-track"
        elif index % 11 == 0:
            data["process"] = "five-step"
        events.append(envelope)
        if index % 20 == 5:
            events.append(
                {
                    "event_id": f"{envelope['deal_id']}.handover",
                    "type": "deal.updated",
                    "deal_id": envelope["deal_id"],
                    "occurred_at": rfc3339(
                        moment(envelope["occurred_at"]) + timedelta(days=1)
                    ),
                    "source": "crm",
                    "data": {"owner": "ivan", "amount": data["amount"] + 500},
                }
            )
    return events


def overrides(deals: dict[str, Deal], processes: dict[str, Process]) -> list[dict]:
    """Stage overrides a person might post, chosen from the deals as they
    stand: some open deals moved back to their first stage, some lost deals
    reopened, some open deals marked won or lost by hand, and some moved
    forward past a stage."""
    at = rfc3339(AS_OF - timedelta(hours=1))
    chosen: list[tuple[Deal, str, str]] = []
    taken: set[str] = set()

    def pick(
        count: int, wanted: Callable[[Deal], bool], to: Callable[[Deal], str], why: str
    ) -> None:
        found = [
            d for d in sorted(deals.values(), key=lambda d: d.deal_id) if wanted(d)
        ]
        for deal in [d for d in found if d.deal_id not in taken][:count]:
            taken.add(deal.deal_id)
            chosen.append((deal, to(deal), why))

    def stages(deal: Deal) -> tuple[str, ...]:
        return processes[deal.process].stages

    pick(
        4,
        lambda d: d.status == "open" and d.stage in stages(d)[1:],
        lambda d: stages(d)[0],
        "back to the start after a reorganisation",
    )
    pick(
        2,
        lambda d: d.status == "lost",
        lambda d: stages(d)[0],
        "the prospect came back",
    )
    pick(3, lambda d: d.status == "open", lambda d: "won", "signed on paper")
    pick(3, lambda d: d.status == "open", lambda d: "lost", "budget frozen")
    pick(
        2,
        lambda d: d.status == "open" and d.stage == stages(d)[0],
        lambda d: stages(d)[2],
        "met the buying group at an event",
    )
    return [
        {
            "event_id": f"{deal.deal_id}.override",
            "type": "stage.overridden",
            "deal_id": deal.deal_id,
            "occurred_at": at,
            "source": "crm",
            "actor": "sales-ops",
            "data": {"to": to, "reason": why},
        }
        for deal, to, why in chosen
    ]


# -- the services -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    """One command of the pipeline, running as a process of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        text = self.log().splitlines()[-lines:]
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish anything."""
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(STOP_S) == -signal.SIGKILL

    def terminate(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float,
    services: Sequence[Service] = (),
) -> None:
    """Poll until `condition` holds; fail after `timeout_s`, or as soon as
    one of `services` has exited, with the end of their logs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [s for s in services if not s.alive()]
        if dead or time.monotonic() > deadline:
            cause = f"{dead[0].name} exited" if dead else f"not within {timeout_s} s"
            logs = "\n".join(s.tail() for s in services)
            raise AssertionError(f"waiting for {what}: {cause}\n{logs}")
        time.sleep(POLL_S)


@dataclass
class Pipeline:
    """The four services of a deployment, for one test."""

    folder: Path
    progression_db: str
    metrics_db: str
    bootstrap: str
    client: httpx.Client
    topic: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:12]}")
    group: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:12]}")
    partitions: int = 3
    relay_batch_size: int = 1000
    projector_batch_size: int = 2000
    # METRICS_KAFKA_SESSION_TIMEOUT_MS of the projectors (None: the default)
    projector_session_timeout_ms: int | None = None
    progression_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)

    @property
    def progression_url(self) -> str:
        return f"http://127.0.0.1:{self.progression_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    # -- starting -------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PROGRESSION_", "METRICS_"))
        }
        env["DEALLEDGER_DATA_DIR"] = str(self.folder / "data")
        return env

    def progression_env(self) -> dict[str, str]:
        return {
            **self._env(),
            "PROGRESSION_DATABASE_URL": self.progression_db,
            "PROGRESSION_PORT": str(self.progression_port),
            "PROGRESSION_KAFKA_BOOTSTRAP": self.bootstrap,
            "PROGRESSION_KAFKA_TOPIC": self.topic,
            "PROGRESSION_KAFKA_PARTITIONS": str(self.partitions),
            "PROGRESSION_RELAY_BATCH_SIZE": str(self.relay_batch_size),
            "PROGRESSION_RELAY_POLL_INTERVAL_MS": "50",
        }

    def metrics_env(self) -> dict[str, str]:
        env = {
            **self._env(),
            "METRICS_DATABASE_URL": self.metrics_db,
            "METRICS_PORT": str(self.metrics_port),
            "METRICS_KAFKA_BOOTSTRAP": self.bootstrap,
            "METRICS_KAFKA_TOPIC": self.topic,
            "METRICS_KAFKA_GROUP": self.group,
            "METRICS_BATCH_MAX_EVENTS": str(self.projector_batch_size),
        }
        if self.projector_session_timeout_ms is not None:
            timeout = str(self.projector_session_timeout_ms)
            env["METRICS_KAFKA_SESSION_TIMEOUT_MS"] = timeout
        return env

    def _launch(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        log_path = self.folder / f"{name}.log"
        executable = BIN / command[0]
        assert executable.exists(), f"{executable} is missing: install the project"
        with log_path.open("ab") as output:
            process = subprocess.Popen(
                [str(executable), *command[1:]],
                env=env,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def _ready(self, url: str) -> bool:
        try:
            return self.client.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_relay(self, name: str = "relay") -> Service:
        return self._launch(name, ["progression", "relay"], self.progression_env())

    def start_projector(self, name: str = "projector") -> Service:
        return self._launch(
            name, ["metrics", "project", "--source", "kafka"], self.metrics_env()
        )

    def start(self, *, relay: bool = True, projector: bool = True) -> None:
        """Start the services (the relay and the projector unless told
        otherwise) and wait until both APIs answer.

        The progression commands migrate their database under a lock; the
        metrics commands migrate too, but without one, so the read models
        are migrated first, once, while the progression side starts."""
        self.folder.mkdir(parents=True, exist_ok=True)
        migrating = self._launch(
            "metrics-migrate", ["metrics", "migrate"], self.metrics_env()
        )
        progression = self._launch(
            "progression", ["progression", "serve"], self.progression_env()
        )
        if relay:
            self.start_relay()
        assert migrating.process.wait(START_S) == 0, migrating.tail()
        self.services.remove(migrating)
        if projector:
            self.start_projector()
        metrics = self._launch("metrics", ["metrics", "serve"], self.metrics_env())
        wait_for(
            lambda: (
                self._ready(f"{self.progression_url}/readyz")
                and self._ready(f"{self.metrics_url}/readyz")
            ),
            "the progression and metrics APIs",
            START_S,
            [progression, metrics],
        )

    def service(self, name: str) -> Service:
        [found] = [s for s in self.services if s.name == name]
        return found

    def running(self) -> list[Service]:
        return [s for s in self.services if s.alive()]

    # -- the progression API ---------------------------------------------------

    def post(self, events: Sequence[dict[str, Any]], batch_size: int = 500) -> None:
        """POST /v1/events/batch, a batch at a time; every event must be
        accepted (a 503 means nothing was written: the batch is sent again)."""
        for start in range(0, len(events), batch_size):
            chunk = list(events[start : start + batch_size])
            deadline = time.monotonic() + START_S
            while True:
                answer = self.client.post(
                    f"{self.progression_url}/v1/events/batch", json={"events": chunk}
                )
                if answer.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(float(answer.headers.get("retry-after", "0.2")))
            assert answer.status_code == 200, answer.text
            refused = [r for r in answer.json()["results"] if r["status"] != "created"]
            assert refused == [], refused[:3]

    def head(self) -> int:
        answer = self.client.get(f"{self.progression_url}/readyz")
        assert answer.status_code == 200, answer.text
        return int(answer.json()["head_position"] or 0)

    def feed(self) -> list[dict[str, Any]]:
        """Every recorded event, from GET /v1/feed, page after page."""
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            answer = self.client.get(
                f"{self.progression_url}/v1/feed",
                params={"after": after, "limit": 5000},
            )
            assert answer.status_code == 200, answer.text
            page = answer.json()
            if not page["events"]:
                return events
            events.extend(page["events"])
            after = page["next_after"]

    def relay_position(self) -> int:
        """How far the relay got (relay_progress, as an operator reads it)."""
        engine = sa.create_engine(self.progression_db)
        try:
            with engine.connect() as connection:
                found = connection.execute(
                    sa.text("SELECT position FROM relay_progress WHERE topic = :t"),
                    {"t": self.topic},
                ).scalar_one_or_none()
        except sa.exc.ProgrammingError:
            found = None  # the relay has not created its table yet
        finally:
            engine.dispose()
        return int(found or 0)

    # -- the metrics API ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        answer = self.client.get(f"{self.metrics_url}/v1/projector/status")
        assert answer.status_code == 200, answer.text
        status: dict[str, Any] = answer.json()
        return status

    def applied(self) -> int:
        return int(self.status()["events_applied"])

    def wait_caught_up(self, timeout_s: float = CATCH_UP_S) -> list[dict[str, Any]]:
        """Wait until the projector has applied every recorded event: the last
        position applied is the log's head and the events applied (or parked)
        are as many as the log holds, never more. Returns the feed."""
        head = self.head()
        recorded = self.feed()
        assert recorded and recorded[-1]["position"] == head
        last: dict[str, Any] = {}

        def caught_up() -> bool:
            last.update(self.status())
            counted = last["events_applied"] + last["parked"]
            assert counted <= len(recorded), f"counted twice: {last}"
            return bool(last["last_position"] == head and counted == len(recorded))

        try:
            wait_for(caught_up, "the projector to catch up", timeout_s, self.running())
        except AssertionError as failure:
            raise AssertionError(f"{failure}\nstatus: {last}") from None
        return recorded

    def metrics(self, query: dict[str, str]) -> dict[str, Any]:
        """Every metric endpoint's answer to one query."""
        answers = {}
        for name in METRICS:
            params = dict(query)
            if name == "stalled":
                params.update(as_of=AS_OF_TEXT, limit="1000")
            answer = self.client.get(
                f"{self.metrics_url}/v1/metrics/{name}", params=params
            )
            assert answer.status_code == 200, f"{name}: {answer.text}"
            answers[name] = answer.json()
        return answers


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


@contextlib.contextmanager
def pipeline(folder: Path, bootstrap: str, **options: Any) -> Iterator[Pipeline]:
    """A pipeline with two fresh databases, a fresh topic and group; every
    service is stopped and the topic deleted afterwards.

    The topic is created first, as a deployment provisions it: a projector
    that subscribes while the topic does not exist yet can miss its
    creation and stay without partitions (seen about once in 20 starts)."""
    with contextlib.ExitStack() as stack:
        progression_db = stack.enter_context(
            contextlib.contextmanager(fresh_postgres_database)()
        )
        metrics_db = stack.enter_context(
            contextlib.contextmanager(fresh_postgres_database)()
        )
        client = stack.enter_context(httpx.Client(timeout=HTTP_TIMEOUT_S))
        running = Pipeline(
            folder, progression_db, metrics_db, bootstrap, client, **options
        )
        create_topic(bootstrap, running.topic, running.partitions)
        try:
            yield running
        finally:
            for service in running.services:
                service.terminate()
            for service in running.services:
                if service.alive():
                    try:
                        service.process.wait(STOP_S)
                    except subprocess.TimeoutExpired:
                        service.process.kill()
                        service.process.wait(STOP_S)
            with contextlib.suppress(Exception):
                delete_topic(bootstrap, running.topic)


def _post_from_thread(
    running: Pipeline, events: Sequence[dict[str, Any]], errors: list[BaseException]
) -> None:
    """Post with a client of the thread's own; a failure goes to `errors`."""
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            own = Pipeline(
                running.folder,
                running.progression_db,
                running.metrics_db,
                running.bootstrap,
                client,
                progression_port=running.progression_port,
            )
            own.post(events, batch_size=50)
    except BaseException as error:  # reported by the caller's thread
        errors.append(error)


def _join(threads: Sequence[threading.Thread], errors: list[BaseException]) -> None:
    deadline = time.monotonic() + CATCH_UP_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a writer did not finish"
    assert errors == [], errors


def post_concurrently(
    running: Pipeline, events: Sequence[dict[str, Any]], writers: int
) -> None:
    """Post from several threads at once, each with its own deals (a deal's
    events stay in their order) in batches of 50."""
    shares: list[list[dict[str, Any]]] = [[] for _ in range(writers)]
    share_of: dict[str, int] = {}
    for event in events:
        share = share_of.setdefault(event["deal_id"], len(share_of) % writers)
        shares[share].append(event)
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_post_from_thread, args=(running, share, errors))
        for share in shares
    ]
    for thread in threads:
        thread.start()
    _join(threads, errors)


@contextlib.contextmanager
def posting_in_background(
    running: Pipeline, events: Sequence[dict[str, Any]]
) -> Iterator[None]:
    """Post `events` in batches of 50 from a thread while the block runs;
    the block's end waits for every batch to be accepted."""
    errors: list[BaseException] = []
    thread = threading.Thread(target=_post_from_thread, args=(running, events, errors))
    thread.start()
    try:
        yield
    finally:
        _join([thread], errors)


# -- the expected figures, from the progression feed ----------------------------


@dataclass
class Visit:
    stage: str
    entered: datetime
    left: datetime | None = None
    outcome: str | None = None  # advanced, dropped or moved_back; None: open
    reason: str | None = None


@dataclass
class Deal:
    deal_id: str
    created: datetime | None = None
    process: str = DEFAULT_PROCESS
    owner: str | None = None
    amount: float | None = None
    currency: str | None = None
    status: str = "pending"
    stage: str | None = None
    entered: datetime | None = None
    closed: datetime | None = None
    reason: str | None = None
    visits: list[Visit] = field(default_factory=list)
    first_meeting: datetime | None = None
    held: int = 0
    no_show: int = 0
    criteria_changes: int = 0
    other_changes: int = 0


def deals_from_feed(
    events: Iterable[dict[str, Any]], processes: dict[str, Process]
) -> dict[str, Deal]:
    """Each deal as the recorded events say, in stream order."""
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        streams[event["deal_id"]].append(event)
    deals = {}
    for deal_id, stream in streams.items():
        deal = deals[deal_id] = Deal(deal_id)
        stream.sort(key=lambda e: e["stream_version"])
        assert [e["stream_version"] for e in stream] == list(
            range(1, len(stream) + 1)
        ), f"{deal_id}: the stream has gaps"
        for event in stream:
            _apply(deal, event, processes)
    return deals


def _apply(deal: Deal, event: dict[str, Any], processes: dict[str, Process]) -> None:
    kind, data = event["type"], event["data"]
    if kind == "deal.created":
        if deal.created is None:
            deal.created = moment(event["occurred_at"])
            deal.process = data.get("process", DEFAULT_PROCESS)
        deal.owner = data["owner"]
        deal.amount = data.get("amount")
        deal.currency = data.get("currency")
    elif kind == "deal.updated":
        for name in ("owner", "amount", "currency"):
            if name in data:
                setattr(deal, name, data[name])
    elif kind == "meeting.held":
        deal.held += 1
        held = moment(event["occurred_at"])
        if deal.first_meeting is None or held < deal.first_meeting:
            deal.first_meeting = held
    elif kind == "meeting.no_show":
        deal.no_show += 1
    elif kind == "stage.changed":
        _stage_changed(deal, data, processes)


def _stage_changed(
    deal: Deal, data: dict[str, Any], processes: dict[str, Process]
) -> None:
    at = moment(data["effective_at"])
    to = data["to"]
    if deal.status == "open":
        visit = deal.visits[-1]
        visit.left = at
        visit.reason = data.get("reason")
        if to == "won":
            visit.outcome = "advanced"
        elif to in TERMINAL:
            visit.outcome = "dropped"
        elif processes[data["process"]].is_later(to, visit.stage):
            visit.outcome = "advanced"
        else:
            visit.outcome = "moved_back"
    if to in TERMINAL:
        deal.status, deal.closed, deal.reason = to, at, data.get("reason")
    else:
        deal.visits.append(Visit(to, at))
        deal.status, deal.stage, deal.entered = "open", to, at
        deal.closed = deal.reason = None
    deal.process = data["process"]
    if data["cause"] == "criteria":
        deal.criteria_changes += 1
    elif data["cause"] != "created":
        deal.other_changes += 1


def select(deals: Iterable[Deal], query: dict[str, str]) -> list[Deal]:
    """The deals a metric counts: created, narrowed as the query says."""
    chosen = [d for d in deals if d.created is not None]
    if "process" in query:
        chosen = [d for d in chosen if d.process == query["process"]]
    if "created_from" in query:
        start = _day(query["created_from"])
        chosen = [d for d in chosen if d.created and d.created >= start]
    if "created_to" in query:
        end = _day(query["created_to"]) + timedelta(days=1)  # the whole day
        chosen = [d for d in chosen if d.created and d.created < end]
    return chosen


def _day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def days(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / DAY_S


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def duration(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "mean_days": mean(values),
        "median_days": quantile(values, 0.5),
    }


def funnel(deals: Sequence[Deal], process: Process) -> dict[str, Any]:
    stages = []
    for stage in process.stages:
        visits = [v for d in deals for v in d.visits if v.stage == stage]
        advanced = sum(v.outcome == "advanced" for v in visits)
        dropped = [v for v in visits if v.outcome == "dropped"]
        reasons: dict[str, int] = defaultdict(int)
        for visit in dropped:
            reasons[visit.reason or UNSPECIFIED] += 1
        stages.append(
            {
                "stage": stage,
                "entered": len(visits),
                "advanced": advanced,
                "dropped": len(dropped),
                "dropped_by_reason": dict(reasons),
                "moved_back": sum(v.outcome == "moved_back" for v in visits),
                "open": sum(d.status == "open" and d.stage == stage for d in deals),
                "conversion": ratio(advanced, len(visits)),
                "closed_conversion": ratio(advanced, advanced + len(dropped)),
            }
        )
    return {"stages": stages}


def velocity(
    deals: Sequence[Deal], stages: Sequence[str], ordered: bool
) -> dict[str, Any]:
    """Days in stage, cycle length and time to first meeting; the stages in
    the given order, or (not `ordered`) keyed by stage."""
    per_stage = {}
    for stage in stages:
        spent = [
            days(v.entered, v.left)
            for d in deals
            for v in d.visits
            if v.stage == stage and v.outcome == "advanced" and v.left
        ]
        per_stage[stage] = {
            "stage": stage,
            **duration(spent),
            "p90_days": quantile(spent, 0.9),
        }
    return {
        "stages": list(per_stage.values()) if ordered else per_stage,
        "cycle_length": duration(_cycles(deals)),
        "time_to_first_meeting": duration(
            [
                max(0.0, days(d.created, d.first_meeting))
                for d in deals
                if d.first_meeting and d.created
            ]
        ),
    }


def _cycles(deals: Sequence[Deal]) -> list[float]:
    return [
        days(d.created, d.closed)
        for d in deals
        if d.status == "won" and d.created and d.closed
    ]


def outcomes(deals: Sequence[Deal]) -> dict[str, Any]:
    by_reason: dict[str, dict[str, int]] = {"lost": {}, "disqualified": {}}
    for deal in deals:
        if deal.status in by_reason:
            reasons = by_reason[deal.status]
            reason = deal.reason or UNSPECIFIED
            reasons[reason] = reasons.get(reason, 0) + 1
    won = sum(d.status == "won" for d in deals)
    lost = sum(d.status == "lost" for d in deals)
    held = sum(d.held for d in deals)
    no_show = sum(d.no_show for d in deals)
    criteria = sum(d.criteria_changes for d in deals)
    changes = criteria + sum(d.other_changes for d in deals)
    return {
        "won": won,
        "lost": lost,
        "disqualified": sum(d.status == "disqualified" for d in deals),
        "lost_by_reason": by_reason["lost"],
        "disqualified_by_reason": by_reason["disqualified"],
        "win_rate": ratio(won, won + lost),
        "meetings_held": held,
        "meetings_no_show": no_show,
        "meeting_show_rate": ratio(held, held + no_show),
        "stage_changes": changes,
        "criteria_changes": criteria,
        "process_adherence": ratio(criteria, changes),
    }


def pipeline_figures(
    deals: Sequence[Deal], processes: dict[str, Process]
) -> dict[str, Any]:
    open_deals = [d for d in deals if d.status == "open"]
    weighted = 0.0
    without_probability = 0
    for deal in open_deals:
        probability = processes[deal.process].win_probability.get(deal.stage or "")
        if probability is None:
            without_probability += 1
        else:
            weighted += (deal.amount or 0) * probability
    won = [d for d in deals if d.status == "won"]
    lost = [d for d in deals if d.status == "lost"]
    win_rate = ratio(len(won), len(won) + len(lost))
    mean_won = mean([d.amount for d in won if d.amount is not None])
    mean_cycle = mean(_cycles(deals))
    velocity_per_day = (
        len(open_deals) * win_rate * mean_won / mean_cycle
        if win_rate is not None and mean_won is not None and mean_cycle
        else None
    )
    return {
        "open_deals": len(open_deals),
        "open_amount": float(sum(d.amount or 0 for d in open_deals)),
        "weighted_pipeline": weighted,
        "deals_without_amount": sum(d.amount is None for d in open_deals),
        "deals_without_probability": without_probability,
        "currencies": sorted({d.currency for d in open_deals if d.currency}),
        "win_rate": win_rate,
        "mean_won_amount": mean_won,
        "mean_cycle_days": mean_cycle,
        "pipeline_velocity": velocity_per_day,
    }


def stalled(
    deals: Sequence[Deal], processes: dict[str, Process], as_of: datetime
) -> dict[str, Any]:
    found = []
    for deal in deals:
        if deal.status != "open" or deal.entered is None:
            continue
        expected = processes[deal.process].expected_days.get(deal.stage or "")
        age = days(deal.entered, as_of)
        if expected is not None and age > expected:
            found.append(
                {
                    "deal_id": deal.deal_id,
                    "owner": deal.owner,
                    "process": deal.process,
                    "stage": deal.stage,
                    "stage_entered_at": deal.entered,
                    "age_days": age,
                    "expected_days": expected,
                }
            )
    found.sort(key=lambda s: (s["stage_entered_at"], s["deal_id"]))
    return {"as_of": as_of, "count": len(found), "deals": found}


def expected_metrics(
    deals: Iterable[Deal], processes: dict[str, Process], query: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Every metric endpoint's answer to `query`, computed from the deals."""
    chosen = select(deals, query)
    funnel_process = processes[query.get("process", DEFAULT_PROCESS)]
    if "process" in query:
        stages: list[str] = list(funnel_process.stages)
    else:
        stages = []
        for key in sorted(processes):
            stages.extend(s for s in processes[key].stages if s not in stages)

    def figures(group: Sequence[Deal]) -> dict[str, dict[str, Any]]:
        return {
            "funnel": funnel(
                [d for d in group if d.process == funnel_process.key], funnel_process
            ),
            "velocity": velocity(group, stages, "process" in query),
            "outcomes": outcomes(group),
            "pipeline": pipeline_figures(group, processes),
            "stalled": stalled(group, processes, AS_OF),
        }

    answers = figures(chosen)
    answers["funnel"]["process"] = funnel_process.key
    if query.get("group_by") == "owner":
        owners: dict[str | None, list[Deal]] = defaultdict(list)
        for deal in chosen:
            owners[deal.owner].append(deal)
        grouped = {owner: figures(group) for owner, group in owners.items()}
        empty = figures([])
        for name in METRICS:
            answers[name]["groups"] = {
                "by_owner": {owner: f[name] for owner, f in grouped.items()},
                "empty": empty[name],
            }
    else:
        for name in METRICS:
            answers[name]["groups"] = None
    return answers


# -- the comparison ------------------------------------------------------------------


def differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where an answer differs from the expected one; numbers that are not
    both integers are compared with a tolerance, moments as instants."""
    where = path or "the answer"
    if isinstance(expected, datetime):
        if not isinstance(actual, str) or moment(actual) != expected:
            return [f"{where}: {actual!r} != {rfc3339(expected)}"]
        return []
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]
    if isinstance(expected, int | float):
        if isinstance(expected, int) and isinstance(actual, int):
            same = actual == expected
        else:
            same = isinstance(actual, int | float) and math.isclose(
                actual, expected, rel_tol=1e-6, abs_tol=1e-6
            )
        return [] if same else [f"{where}: {actual!r} != {expected!r}"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not an object"]
        found = []
        for key in sorted(set(actual) | set(expected), key=str):
            if key not in expected:
                found.append(f"{path}.{key}: unexpected")
            elif key not in actual:
                found.append(f"{path}.{key}: missing")
            else:
                found.extend(differences(actual[key], expected[key], f"{path}.{key}"))
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            size = len(actual) if isinstance(actual, list) else actual
            return [f"{where}: {size} items, expected {len(expected)}"]
        found = []
        for n, (a, e) in enumerate(zip(actual, expected, strict=True)):
            found.extend(differences(a, e, f"{path}[{n}]"))
        return found
    raise TypeError(f"cannot compare {type(expected)}")


def _by_stage(answer: dict[str, Any]) -> dict[str, Any]:
    """A velocity answer with its stages keyed by stage."""
    stages = answer["stages"]
    if isinstance(stages, list):
        stages = {s["stage"]: s for s in stages}
    return {**answer, "stages": stages}


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def metric_differences(
    name: str, actual: dict[str, Any], expected: dict[str, Any]
) -> list[str]:
    # For one process the stages are in its order; over every process the
    # order of the stages of different processes is left open.
    keyed = name == "velocity" and isinstance(expected["stages"], dict)
    shape = _by_stage if keyed else _as_is
    groups = expected["groups"]
    found = differences(
        shape({**actual, "groups": None}), shape({**expected, "groups": None}), name
    )
    if groups is None:
        return found + differences(actual.get("groups"), None, f"{name}.groups")
    listed = {
        g["owner"]: {k: v for k, v in g.items() if k != "owner"}
        for g in actual.get("groups") or []
    }
    for owner in sorted(set(listed) | set(groups["by_owner"]), key=str):
        want = groups["by_owner"].get(owner)
        path = f"{name}.groups[{owner}]"
        if want is None:
            found.append(f"{path}: an owner of no selected deal")
        elif owner not in listed:
            # An owner may be left out where all its figures are empty.
            found.extend(
                f"{path} is missing: {d}"
                for d in differences(shape(groups["empty"]), shape(want), path)
            )
        else:
            found.extend(differences(shape(listed[owner]), shape(want), path))
    return found


def check_metrics(
    running: Pipeline,
    deals: dict[str, Deal],
    processes: dict[str, Process],
    query: dict[str, str],
) -> None:
    """Every metric of the metrics API equals the one computed here."""
    expected = expected_metrics(deals.values(), processes, query)
    answers = running.metrics(query)
    found = []
    for name in METRICS:
        found.extend(metric_differences(name, answers[name], expected[name]))
    shown = "\n".join(found[:30])
    assert not found, f"{len(found)} differences for {query}:\n{shown}"


def check_every_metric(
    running: Pipeline,
    recorded: list[dict[str, Any]],
    queries: Sequence[dict[str, str]] = ({}, {"group_by": "owner"}),
) -> dict[str, Deal]:
    """The read models hold every recorded event once: nothing parked, every
    metric as the recorded decisions say, for each query."""
    status = running.status()
    assert status["parked"] == 0, status
    assert status["events_applied"] == len(recorded), status
    processes = load_processes()
    deals = deals_from_feed(recorded, processes)
    for query in queries:
        check_metrics(running, deals, processes, query)
    return deals
