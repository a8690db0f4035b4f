"""The write path: how fast events get into the event log, against two yardsticks.

All figures come from one run on one machine, each phase in a fresh database
of the same PostgreSQL server:

1. API batch ingest: a real `progression serve` (uvicorn) takes 100,000 events
   of 5,000 deals through `POST /v1/events/batch`, 1,000 events a request,
   from two client threads. Every item must come back `created`, and the log
   must then hold exactly the 100,000 inputs.
2. The limit: the same rows, with the columns the event log writes, copied
   straight into a table of the log's shape with psycopg 3 (COPY, 1,000 rows
   and one transaction a batch). No checks, no decisions, no deal heads.
3. The peer: the `eventsourcing` library's PostgreSQL recorder appends the
   same events, one aggregate per deal, each deal's events of a batch in one
   append (one transaction).
4. Latency: single events through `POST /v1/events` at a fixed rate, sent
   open-loop (each at its scheduled time, whether or not earlier answers have
   come back), measured from the scheduled time to the full response.

Deals are split between the two clients (even and odd deals), so that each
client's events of a deal stay in order and the two never write the same
deal; the limit and the peer use the same two lanes of the same batches.

Needs DEALLEDGER_TEST_PG_URL (a SQLAlchemy URL of a PostgreSQL that allows
CREATE DATABASE); `make bench` starts a throwaway one.
"""

from __future__ import annotations

__all__ = ["main"]

import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import sqlalchemy as sa
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

from bench.histories import History, engagement_event, generate, interleave
from progression.contract import canonical_digest
from progression.tables import events as events_table

SEED = 20_260_105
DEALS = 5_000
EVENTS_PER_DEAL = 20
BATCH = 1_000
CLIENTS = 2
LATENCY_RATE = 50  # requests per second
LATENCY_SECONDS = 20
NEW_DEAL_SHARE = 5  # every fifth latency request is for a deal created then
SENDERS = 16  # sender threads of the latency phase
RAW_RUNS = 3  # the limit is the median of this many copies
# Before the run, wait up to QUIET_WAIT_S for the CPUs to be busy at most
# QUIET_BUSY (a service still starting, another job); then run anyway, warned.
QUIET_BUSY = 0.15
QUIET_WAIT_S = 90.0

GOAL_API_RATE = 10_000  # events per second
GOAL_API_OVER_RAW = 1 / 3
GOAL_API_OVER_PEER = 2.0
GOAL_P99_MS = 25.0

RESULTS = Path(__file__).resolve().parent / "results"
READY_TIMEOUT_S = 60.0
PEER_NAMESPACE = uuid.UUID("6c1e8d52-5a0b-4f7e-9a43-0d3c2b7e91a4")

# The columns the event log writes for each event (all but the position).
COLUMNS = (
    "event_id",
    "deal_id",
    "stream_version",
    "type",
    "occurred_at",
    "recorded_at",
    "source",
    "actor",
    "schema_version",
    "data",
    "causation_id",
    "digest",
)
COLUMN_TYPES = (
    "varchar",
    "varchar",
    "int4",
    "text",
    "timestamptz",
    "timestamptz",
    "text",
    "text",
    "int4",
    "jsonb",
    "varchar",
    "varchar",
)


def say(message: str) -> None:
    print(message, flush=True)


# -- the workload -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    histories: list[History]
    lanes: list[list[list[dict[str, Any]]]]  # per client: its batches, in order
    versions: dict[str, int]  # event_id -> its place in the deal's stream

    @property
    def event_count(self) -> int:
        return sum(len(batch) for lane in self.lanes for batch in lane)


def build_workload() -> Workload:
    histories = generate(SEED, DEALS, EVENTS_PER_DEAL)
    lanes = []
    for client in range(CLIENTS):
        stream = interleave(histories[client::CLIENTS])
        lanes.append([stream[i : i + BATCH] for i in range(0, len(stream), BATCH)])
    versions = {
        event["event_id"]: number
        for history in histories
        for number, event in enumerate(history.events, start=1)
    }
    return Workload(histories, lanes, versions)


def run_lanes(
    lanes: Sequence[Sequence[Any]], work: Callable[[int, Any], None]
) -> float:
    """Run `work(lane, batch)` for every batch, one thread per lane; seconds taken.

    The clock runs from just before the threads start to the end of the last
    batch. An error in a lane stops the run once every thread has ended.
    """
    errors: list[BaseException] = []
    ends: list[float] = []

    def lane(number: int) -> None:
        try:
            for batch in lanes[number]:
                work(number, batch)
        except BaseException as exc:
            errors.append(exc)
        finally:
            ends.append(time.perf_counter())

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(len(lanes))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(ends) - start


# -- PostgreSQL ---------------------------------------------------------------


class Postgres:
    """The server of DEALLEDGER_TEST_PG_URL: fresh databases, dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        self.created: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]

    def conninfo(self, database: str | None = None) -> dict[str, Any]:
        return {
            "host": self.url.host or "127.0.0.1",
            "port": self.url.port or 5432,
            "user": self.url.username or "postgres",
            "password": self.url.password or "",
            "dbname": database or self.url.database or "postgres",
        }

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.conninfo(), autocommit=True)

    def version(self) -> str:
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0]).split()[0]

    def fresh(self, purpose: str) -> str:
        """Create an empty database; its name."""
        name = f"bench_{purpose}_{self.run_id}"
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name

    def sqlalchemy_url(self, database: str) -> str:
        return self.url.set(database=database).render_as_string(hide_password=False)

    def connect(self, database: str) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.conninfo(database))

    def settle(self, database: str) -> None:
        """VACUUM ANALYZE a database, so its clean-up does not run into the next
        phase's measurement."""
        with psycopg.connect(**self.conninfo(database), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")

    def drop_all(self) -> None:
        with self.admin() as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


# -- the API server -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _progression_command() -> list[str]:
    script = Path(sys.executable).with_name("progression")
    if script.exists():
        return [str(script), "serve"]
    found = shutil.which("progression")
    if found:
        return [found, "serve"]
    return [sys.executable, "-m", "progression.cli", "serve"]


@dataclass
class Server:
    base_url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self.token}",
            "content-type": "application/json",
        }


@contextmanager
def progression_server(database_url: str) -> Iterator[Server]:
    """`progression serve` on its own port and database, ready; stopped after."""
    port = _free_port()
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "PROGRESSION_DATABASE_URL": database_url,
        "PROGRESSION_HOST": "127.0.0.1",
        "PROGRESSION_PORT": str(port),
        "PROGRESSION_LOG_LEVEL": "WARNING",
        "PROGRESSION_TOKENS": f"bench={token}=events:write read",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / "write_path-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _progression_command(), env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", token, process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"progression serve exited with {server.process.returncode}; "
                    f"see {server.log_path}"
                )
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"progression serve not ready in {READY_TIMEOUT_S:.0f} s")


# -- phase 1: the API ---------------------------------------------------------


@dataclass
class ApiResult:
    seconds: float
    events: int
    decisions: int
    inputs_in_log: int
    rows_in_log: int
    head_position: int
    first_batches_ms: float  # median answer time of each lane's first tenth
    last_batches_ms: float  # and of its last tenth

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def api_ingest(server: Server, workload: Workload, pg: Postgres, db: str) -> ApiResult:
    """Post every batch; the clock stops at the last response, checks come after."""
    bodies = [
        [json.dumps({"events": batch}).encode() for batch in lane]
        for lane in workload.lanes
    ]
    responses: list[list[tuple[int, bytes]]] = [[] for _ in bodies]
    clients = [
        httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120.0)
        for _ in bodies
    ]

    took: list[list[float]] = [[] for _ in bodies]

    def post(lane: int, body: bytes) -> None:
        sent = time.perf_counter()
        response = clients[lane].post("/v1/events/batch", content=body)
        took[lane].append(time.perf_counter() - sent)
        responses[lane].append((response.status_code, response.content))

    try:
        seconds = run_lanes(bodies, post)
    finally:
        for client in clients:
            client.close()

    events = decisions = 0
    for lane, answers in zip(workload.lanes, responses, strict=True):
        for batch, (status, content) in zip(lane, answers, strict=True):
            if status != 200:
                raise RuntimeError(f"batch refused with {status}: {content[:500]!r}")
            results = json.loads(content)["results"]
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} events")
            for sent, item in zip(batch, results, strict=True):
                if item["status"] != "created" or item["event_id"] != sent["event_id"]:
                    raise RuntimeError(f"event not created: {json.dumps(item)[:500]}")
                decisions += len(item["decisions"])
            events += len(results)

    with pg.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE causation_id IS NULL), count(*) FROM events"
        ).fetchone()
    assert row is not None
    inputs, rows = int(row[0]), int(row[1])
    head = httpx.get(f"{server.base_url}/readyz").json()["head_position"]
    if inputs != workload.event_count or rows != inputs + decisions:
        raise RuntimeError(
            f"the log holds {inputs} inputs and {rows} rows; expected "
            f"{workload.event_count} inputs and {workload.event_count + decisions}"
        )
    # Whether a batch gets slower as the log grows: the first and last tenth.
    tenth = max(1, min(len(t) for t in took) // 10)
    first = statistics.median(x for t in took for x in t[:tenth])
    last = statistics.median(x for t in took for x in t[-tenth:])
    return ApiResult(
        seconds, events, decisions, inputs, rows, int(head), first * 1000, last * 1000
    )


# -- phase 2: the limit -------------------------------------------------------


def _log_rows(
    workload: Workload,
) -> list[list[list[tuple[Any, ...]]]]:
    """Each batch as the log's rows, without recorded_at (set at insert)."""
    lanes = []
    for lane in workload.lanes:
        batches = []
        for batch in lane:
            rows = []
            for event in batch:
                occurred_at = datetime.fromisoformat(event["occurred_at"])
                content = {
                    "event_id": event["event_id"],
                    "type": event["type"],
                    "deal_id": event["deal_id"],
                    "occurred_at": event["occurred_at"],
                    "source": event.get("source"),
                    "actor": event.get("actor"),
                    "data": event["data"],
                    "schema_version": 1,
                }
                rows.append(
                    (
                        event["event_id"],
                        event["deal_id"],
                        workload.versions[event["event_id"]],
                        event["type"],
                        occurred_at,
                        event.get("source"),
                        event.get("actor"),
                        1,
                        event["data"],
                        None,
                        canonical_digest(content),
                    )
                )
            batches.append(rows)
        lanes.append(batches)
    return lanes


@dataclass
class RawResult:
    seconds: float  # the median of the runs
    events: int
    runs_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def raw_insert(workload: Workload, pg: Postgres, db: str) -> RawResult:
    engine = sa.create_engine(pg.sqlalchemy_url(db))
    events_table.create(engine)  # the log's table: identity, unique keys, index
    engine.dispose()
    lanes = _log_rows(workload)
    columns = ", ".join(COLUMNS)
    connections = [pg.connect(db) for _ in lanes]

    def copy(lane: int, rows: list[tuple[Any, ...]]) -> None:
        conn = connections[lane]
        recorded_at = datetime.now(UTC)
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY events ({columns}) FROM STDIN (FORMAT BINARY)") as cp,
        ):
            cp.set_types(list(COLUMN_TYPES))
            for row in rows:
                data = json.dumps(row[8])
                cp.write_row((*row[:5], recorded_at, *row[5:8], data, *row[9:]))

    try:
        seconds = run_lanes(lanes, copy)
        row = connections[0].execute("SELECT count(*) FROM events").fetchone()
    finally:
        for conn in connections:
            conn.close()
    assert row is not None
    if int(row[0]) != workload.event_count:
        raise RuntimeError(f"the raw table holds {row[0]} rows")
    return RawResult(seconds, workload.event_count)


# -- phase 3: the peer --------------------------------------------------------


@dataclass
class PeerResult:
    seconds: float
    events: int
    appends: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def peer_append(workload: Workload, pg: Postgres, db: str) -> PeerResult:
    info = pg.conninfo(db)
    datastore = PostgresDatastore(
        dbname=info["dbname"],
        host=info["host"],
        port=info["port"],
        user=info["user"],
        password=info["password"],
        pool_size=CLIENTS,
    )
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()

    # Per batch, each deal's events in order, with the aggregate's id and the
    # versions they take; the events are encoded inside the timed append.
    lanes: list[list[list[tuple[uuid.UUID, list[tuple[int, dict[str, Any]]]]]]] = []
    appends = 0
    for lane in workload.lanes:
        batches = []
        for batch in lane:
            per_deal: dict[str, list[tuple[int, dict[str, Any]]]] = {}
            for event in batch:
                version = workload.versions[event["event_id"]]
                per_deal.setdefault(event["deal_id"], []).append((version, event))
            batches.append(
                [(uuid.uuid5(PEER_NAMESPACE, d), e) for d, e in per_deal.items()]
            )
            appends += len(per_deal)
        lanes.append(batches)

    def append(_lane: int, batch: list[Any]) -> None:
        for aggregate_id, deal_events in batch:
            recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=aggregate_id,
                        originator_version=version,
                        topic=f"dealledger.events:{event['type']}",
                        state=json.dumps(event).encode(),
                    )
                    for version, event in deal_events
                ]
            )

    try:
        seconds = run_lanes(lanes, append)
        count = recorder.max_notification_id()
    finally:
        datastore.close()
    if count != workload.event_count:
        raise RuntimeError(f"the peer's table holds {count} events")
    return PeerResult(seconds, workload.event_count, appends)


# -- phase 4: latency ---------------------------------------------------------


@dataclass
class LatencyResult:
    requests: int
    rate: float
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    late_sends: int  # sent more than 5 ms after their scheduled time
    new_deal_requests: int


def latency_events(workload: Workload) -> list[dict[str, Any]]:
    """The single events: signals for stalled deals, and new deals' first events.

    Every fifth request belongs to one of the new deals, in turn, so each new
    deal's requests are 4 s apart and no two requests for one deal are ever
    in flight together; the signals go each to another stalled deal.
    """
    count = LATENCY_RATE * LATENCY_SECONDS
    rng = random.Random(SEED + 1)
    open_deals = [h.deal_id for h in workload.histories if h.outcome == "open"]
    rng.shuffle(open_deals)
    new_slots = count // NEW_DEAL_SHARE
    new_deals = generate(SEED + 2, new_slots // 5, EVENTS_PER_DEAL, prefix="new")
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)

    sent_of: dict[str, int] = {}
    events = []
    for slot in range(count):
        moment = now + timedelta(milliseconds=slot)
        if slot % NEW_DEAL_SHARE == 0:
            k = slot // NEW_DEAL_SHARE
            history = new_deals[k % len(new_deals)]
            event = dict(history.events[sent_of.get(history.deal_id, 0)])
            sent_of[history.deal_id] = sent_of.get(history.deal_id, 0) + 1
            event["occurred_at"] = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        else:
            deal_id = open_deals[slot % len(open_deals)]
            event = engagement_event(rng, deal_id, f"{deal_id}-live-{slot:04d}", moment)
            event["occurred_at"] = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        events.append(event)
    return events


def _open_loop(
    server: Server, bodies: list[bytes]
) -> tuple[list[float], list[float], list[int]]:
    """Send each body at its scheduled time; (latency, send lag, status) lists.

    A scheduling thread sleeps until each send time and hands the request to
    a pool of sender threads, so a slow answer never delays the next send;
    both times are measured from the scheduled moment.
    """
    local = threading.local()
    clients: list[httpx.Client] = []
    guard = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(
                base_url=server.base_url, headers=server.headers, timeout=30.0
            )
            with guard:
                clients.append(local.client)
        return local.client  # type: ignore[no-any-return]

    def send(at: float, body: bytes) -> tuple[float, float, int]:
        lag = time.perf_counter() - at
        response = client().post("/v1/events", content=body)
        return time.perf_counter() - at, lag, response.status_code

    try:
        with ThreadPoolExecutor(max_workers=SENDERS) as pool:
            # Connect every sender first, so no request pays for a connection.
            list(pool.map(lambda _: client().get("/healthz"), range(SENDERS * 4)))
            start = time.perf_counter() + 0.2
            futures = []
            for number, body in enumerate(bodies):
                at = start + number / LATENCY_RATE
                delay = at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(send, at, body))
            answers = [future.result() for future in futures]
    finally:
        for each in clients:
            each.close()
    return [a[0] for a in answers], [a[1] for a in answers], [a[2] for a in answers]


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def latency(server: Server, workload: Workload) -> LatencyResult:
    events = latency_events(workload)
    bodies = [json.dumps(event).encode() for event in events]
    started = time.perf_counter()
    times, lags, statuses = _open_loop(server, bodies)
    seconds = time.perf_counter() - started
    refused = [s for s in statuses if s != 201]
    if refused:
        raise RuntimeError(f"{len(refused)} single events not created: {refused[:5]}")
    ms = [t * 1000 for t in times]
    return LatencyResult(
        requests=len(ms),
        rate=LATENCY_RATE,
        seconds=seconds,
        p50_ms=_percentile(ms, 0.50),
        p99_ms=_percentile(ms, 0.99),
        max_ms=max(ms),
        mean_ms=statistics.fmean(ms),
        late_sends=sum(1 for lag in lags if lag > 0.005),
        new_deal_requests=sum(1 for e in events if e["deal_id"].startswith("new-")),
    )


# -- the report ---------------------------------------------------------------


@dataclass
class Report:
    started_at: str
    machine: dict[str, Any]
    workload: dict[str, Any]
    api: ApiResult
    raw: RawResult
    peer: PeerResult
    latency: LatencyResult
    phases_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0

    @property
    def api_over_raw(self) -> float:
        return self.api.rate / self.raw.rate

    @property
    def api_over_peer(self) -> float:
        return self.api.rate / self.peer.rate

    def goals(self) -> dict[str, bool]:
        return {
            "api_rate": self.api.rate >= GOAL_API_RATE,
            "api_over_raw": self.api_over_raw >= GOAL_API_OVER_RAW,
            "api_over_peer": self.api_over_peer >= GOAL_API_OVER_PEER,
            "p99": self.latency.p99_ms < GOAL_P99_MS,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": "write_path",
            "started_at": self.started_at,
            "machine": self.machine,
            "code": _code(),
            "workload": self.workload,
            "api_batch": {**asdict(self.api), "events_per_s": self.api.rate},
            "raw_copy": {**asdict(self.raw), "events_per_s": self.raw.rate},
            "eventsourcing_peer": {**asdict(self.peer), "events_per_s": self.peer.rate},
            "single_post": asdict(self.latency),
            "ratios": {
                "api_over_raw": self.api_over_raw,
                "api_over_peer": self.api_over_peer,
            },
            "goals": {
                "api_events_per_s": GOAL_API_RATE,
                "api_over_raw": GOAL_API_OVER_RAW,
                "api_over_peer": GOAL_API_OVER_PEER,
                "p99_ms_below": GOAL_P99_MS,
            },
            "goals_met": self.goals(),
            "phases_s": self.phases_s,
            "total_s": self.total_s,
        }

    def table(self) -> str:
        met = {k: "ok" if v else "MISSED" for k, v in self.goals().items()}
        lat = self.latency
        rows = [
            (
                "API batch ingest",
                f"{self.api.rate:,.0f} ev/s",
                "",
                f"goal >= {GOAL_API_RATE:,}",
                met["api_rate"],
            ),
            (
                "raw psycopg COPY",
                f"{self.raw.rate:,.0f} ev/s",
                f"API/raw  {self.api_over_raw:.2f}",
                f"goal >= {GOAL_API_OVER_RAW:.2f}",
                met["api_over_raw"],
            ),
            (
                "eventsourcing peer",
                f"{self.peer.rate:,.0f} ev/s",
                f"API/peer {self.api_over_peer:.2f}",
                f"goal >= {GOAL_API_OVER_PEER:g}",
                met["api_over_peer"],
            ),
            (
                f"single POST @{lat.rate:g}/s",
                f"p50 {lat.p50_ms:.1f} ms",
                f"p99 {lat.p99_ms:.1f} ms",
                f"goal p99 < {GOAL_P99_MS:g} ms",
                met["p99"],
            ),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            f"write path ({self.workload['events']:,} events, "
            f"{self.workload['deals']:,} deals, PostgreSQL "
            f"{self.machine['postgres'].split('.')[0]}, {self.machine['cores']} cores)"
        ]
        for label, figure, ratio, goal, verdict in rows:
            lines.append(
                f"  {label:<{widths[0]}}  {figure:>{widths[1]}}   "
                f"{ratio:<{widths[2]}}   {goal:<{widths[3]}}   {verdict}"
            )
        return "\n".join(lines)


def _machine(pg: Postgres) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgres": pg.version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _cpu_busy(seconds: float = 2.0) -> float | None:
    """The share of all CPUs busy over a short wait (this process is idle)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
        idle = fields[3] + fields[4]  # idle, iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy_0, total_0 = sample()
        time.sleep(seconds)
        busy_1, total_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy_1 - busy_0) / max(1, total_1 - total_0)


def _wait_quiet() -> float | None:
    """Wait a while for the other work on the machine to calm down.

    Returns the share of the CPUs busy in the last sample.
    """
    deadline = time.monotonic() + QUIET_WAIT_S
    busy = _cpu_busy()
    if busy is not None and busy > QUIET_BUSY:
        say(f"write_path: {busy:.0%} of the CPUs busy; waiting for quiet")
    while busy is not None and busy > QUIET_BUSY and time.monotonic() < deadline:
        busy = _cpu_busy()
    return busy


def _code() -> dict[str, Any]:
    """The commit measured, and whether the service code had local changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "services_changed": bool(git("status", "--porcelain", "--", "services")),
    }


def main() -> int:
    url = os.environ.get("DEALLEDGER_TEST_PG_URL")
    if not url:
        sys.stderr.write(
            "write_path: DEALLEDGER_TEST_PG_URL is not set; run `make bench`, or "
            "deploy/local/with-services -- .venv/bin/python -m bench write_path\n"
        )
        return 2
    begun = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    pg = Postgres(url)
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> None:
        phases[name] = round(time.perf_counter() - since, 2)

    try:
        machine = _machine(pg)
        busy = machine["cpu_busy_before_run"] = _wait_quiet()
        if busy is not None and busy > QUIET_BUSY:
            say(
                f"write_path: warning: {busy:.0%} of the CPUs were busy with other "
                "work just before the run; the figures will be lower than on an "
                "idle machine"
            )
        say(
            f"write_path: {DEALS:,} deals x {EVENTS_PER_DEAL} events, "
            f"batches of {BATCH:,}, {CLIENTS} lanes; PostgreSQL "
            f"{machine['postgres']}, {machine['cores']} cores"
        )
        mark = time.perf_counter()
        workload = build_workload()
        phase("generate", mark)
        say(f"  generated {workload.event_count:,} events in {phases['generate']} s")

        api_db = pg.fresh("api")
        with progression_server(pg.sqlalchemy_url(api_db)) as server:
            mark = time.perf_counter()
            api = api_ingest(server, workload, pg, api_db)
            phase("api", mark)
            say(
                f"  API: {api.events:,} events in {api.seconds:.1f} s, "
                f"{api.decisions:,} decisions, {api.rows_in_log:,} rows in the log; "
                f"a batch took {api.first_batches_ms:.0f} ms at first, "
                f"{api.last_batches_ms:.0f} ms at the end"
            )
            pg.settle(api_db)

            # The copy takes about a second: the median of a few runs, each
            # into a fresh database, is steadier than one.
            mark = time.perf_counter()
            runs = []
            for run in range(RAW_RUNS):
                raw_db = pg.fresh(f"raw{run}")
                runs.append(raw_insert(workload, pg, raw_db).seconds)
                pg.settle(raw_db)
            raw = RawResult(statistics.median(runs), workload.event_count, runs)
            phase("raw", mark)
            say(
                f"  raw COPY: {raw.events:,} rows in "
                f"{', '.join(f'{r:.2f}' for r in runs)} s (median {raw.seconds:.2f})"
            )

            mark = time.perf_counter()
            peer_db = pg.fresh("peer")
            peer = peer_append(workload, pg, peer_db)
            phase("peer", mark)
            say(
                f"  eventsourcing: {peer.events:,} events in {peer.appends:,} "
                f"appends, {peer.seconds:.1f} s"
            )
            pg.settle(peer_db)

            mark = time.perf_counter()
            lat = latency(server, workload)
            phase("latency", mark)
            say(
                f"  single POST: {lat.requests:,} requests in {lat.seconds:.1f} s, "
                f"max {lat.max_ms:.1f} ms, {lat.late_sends} sent late"
            )
    finally:
        pg.drop_all()

    report = Report(
        started_at=started_at,
        machine=machine,
        workload={
            "seed": SEED,
            "deals": DEALS,
            "events_per_deal": EVENTS_PER_DEAL,
            "events": workload.event_count,
            "batch": BATCH,
            "clients": CLIENTS,
            # `progression serve` inherits the environment, PROGRESSION_WORKERS too
            "server_workers": int(os.environ.get("PROGRESSION_WORKERS") or 1),
            "outcomes": {
                o: sum(1 for h in workload.histories if h.outcome == o)
                for o in ("won", "open", "lost", "disqualified")
            },
        },
        api=api,
        raw=raw,
        peer=peer,
        latency=lat,
        phases_s=phases,
        total_s=round(time.perf_counter() - begun, 1),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "write_path.json"
    out.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    say(f"  took {report.total_s:.0f} s; figures in {out}")
    say("")
    say(report.table())
    return 0
