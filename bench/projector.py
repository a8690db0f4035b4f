"""The read side under load: Kafka into PostgreSQL read models, then the API.

    python -m bench projector      (DEALLEDGER_TEST_PG_URL, DEALLEDGER_TEST_KAFKA)

One run on one machine measures, in this order (the topic and the
database are deleted at the end):

1. a million recorded envelopes (generated deal histories, with the
   progression service's `stage.changed` decisions) are produced to a new
   topic of 6 partitions, keyed by deal id (not timed);
2. a bare kafka-python consumer reads the whole topic twice: once keeping
   the values as bytes, once decoding each value with the standard
   library's `json.loads`; the second is the baseline of the ratio;
3. `metrics project --source kafka`, as a subprocess, consumes the same
   topic from the beginning into a new PostgreSQL database until its stored
   offsets reach the end of every partition; its peak resident memory is
   the subprocess's VmHWM;
4. `metrics serve`, as a subprocess under uvicorn, answers every metrics
   endpoint (plain, grouped by owner, filtered by process and creation
   time) over those read models, requests sent one at a time.

Rates are counted from the first batch each consumer finished to the last,
so the start of the process and the group join are left out. The figures
go to bench/results/projector.json and are printed last.

Environment: BENCH_PROJECTOR_EVENTS (default 1000000) for a smaller run;
BENCH_PROJECTOR_PROFILE=1 to run the projection in this process under
cProfile instead (the profile goes to bench/results/projector.pstats).
"""

from __future__ import annotations

import cProfile
import hashlib
import heapq
import io
import json
import os
import platform
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from metrics.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
EVENTS = int(os.environ.get("BENCH_PROJECTOR_EVENTS", "1000000"))
PARTITIONS = 6
SEED = 20260105

# Goals.
GOAL_RATE = 30_000
GOAL_RATIO = 0.5
GOAL_RSS_MB = 250
GOAL_P99_MS = 50
REQUESTS = 200
# The projector's consumer settings (metrics.consumer), for the bare consumer.
PARTITION_FETCH_BYTES = 2 * 1024 * 1024
WARM_UP = 10

# -- the histories ---------------------------------------------------------------------

PROCESS, PROCESS_VERSION = "b2b-default", 1
START = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)
DEALS_PER_DAY = 200
DECIDER = "dealledger"
OWNERS = [f"rep-{n:02d}" for n in range(1, 31)]
CURRENCIES = ("EUR", "EUR", "EUR", "USD", "USD", "GBP")
LOST_REASONS = ("competitor", "budget moved", "no decision", "price")
DISQUALIFIERS = ("no_budget", "no_authority", "no_urgency", "no_fit")
ENGAGEMENT = (
    "email.sent",
    "email.sent",
    "email.opened",
    "email.opened",
    "email.replied",
    "link.clicked",
    "content.downloaded",
    "meeting.booked",
    "meeting.held",
    "meeting.held",
    "meeting.no_show",
)
BANT = ("budget", "authority", "need", "timeline")

# Each stage of b2b-default: the facts its exit criteria need (criterion key,
# description, fact type, fact data) and the prospect action that leaves it.
STAGES: tuple[
    tuple[str, tuple[tuple[str, str, str, dict[str, Any]], ...], str], ...
] = (
    ("prospecting", (), "discovery_call.agreed"),
    (
        "connecting",
        tuple(
            (
                f"{c}_confirmed",
                f"{c.capitalize()} confirmed",
                "qualification.updated",
                {"criterion": c, "status": "confirmed"},
            )
            for c in BANT
        ),
        "pain.shared",
    ),
    (
        "researching",
        (
            (
                "next_step_confirmed",
                "A next step is confirmed with a date, agenda and attendees",
                "next_step.confirmed",
                {},
            ),
        ),
        "stakeholder.invited",
    ),
    (
        "presenting",
        (("value_agreed", "Mutual value is agreed", "value.agreed", {}),),
        "proposal.requested",
    ),
    (
        "negotiating",
        (
            (
                "decision_process_mapped",
                "The prospect can explain how the decision gets made",
                "decision_process.mapped",
                {"note": "CFO signs above the VP's limit"},
            ),
        ),
        "procurement.introduced",
    ),
    ("closing", (), "contract.signed"),
)


def _iso(micros: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    return moment.isoformat().replace("+00:00", "Z")


class _Deal:
    """One deal's history being written: stream versions, times, decisions."""

    def __init__(self, rng: random.Random, index: int, start_us: int) -> None:
        self.rng = rng
        self.deal_id = f"deal-{index:07d}"
        self.index = index
        self.owner = rng.choice(OWNERS)
        self.clock_us = start_us
        self.events: list[tuple[int, int, int, dict[str, Any]]] = []
        self.stage: str | None = None
        self.sent = 0

    def _append(
        self, kind: str, data: dict[str, Any], occurred_us: int, recorded_us: int
    ) -> dict[str, Any]:
        version = len(self.events) + 1
        if kind == "stage.changed":
            digest = hashlib.sha256(f"{self.deal_id}\x00{version}".encode())
            event_id = "dealledger:" + digest.hexdigest()[:40]
            source, actor = DECIDER, None
        else:
            self.sent += 1
            event_id = f"crm-{self.deal_id}-{self.sent:03d}"
            source = "hubspot"
            actor = None if kind in ENGAGEMENT else self.owner
        event = {
            "event_id": event_id,
            "type": kind,
            "deal_id": self.deal_id,
            "occurred_at": _iso(occurred_us),
            "recorded_at": _iso(recorded_us),
            "source": source,
            "actor": actor,
            "data": data,
            "schema_version": 1,
            "stream_version": version,
        }
        self.events.append((recorded_us, self.index, version, event))
        return event

    def post(self, kind: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """A CRM event some time after the previous one."""
        self.clock_us += int(self.rng.expovariate(1 / 30) * 3600 * 10**6) + 60 * 10**6
        recorded_us = self.clock_us + self.rng.randrange(50_000, 2_000_000)
        return self._append(kind, data or {}, self.clock_us, recorded_us)

    def decide(
        self,
        trigger: dict[str, Any],
        to: str,
        cause: str,
        reason: str | None = None,
        action: dict[str, Any] | None = None,
        criteria: list[dict[str, Any]] | None = None,
    ) -> None:
        """The service's stage.changed, recorded just after its trigger."""
        recorded_us = self.events[-1][0] + 1500
        data = {
            "from": self.stage,
            "to": to,
            "cause": cause,
            "effective_at": trigger["occurred_at"],
            "trigger_event_id": trigger["event_id"],
            "action_event_id": action["event_id"] if action else None,
            "reason": reason,
            "criteria": criteria or [],
            "process": PROCESS,
            "process_version": PROCESS_VERSION,
        }
        self._append("stage.changed", data, recorded_us, recorded_us)
        self.stage = to

    def engage(self, count: int) -> None:
        for _ in range(count):
            if self.rng.random() < 0.07:
                self.post("deal.updated", {"amount": self.rng.randrange(5, 400) * 500})
            else:
                self.post(self.rng.choice(ENGAGEMENT))


def _history(rng: random.Random, index: int, start_us: int) -> _Deal:
    deal = _Deal(rng, index, start_us)
    draw = rng.random()
    outcome = (
        "won"
        if draw < 0.30
        else "open"
        if draw < 0.72
        else "lost"
        if draw < 0.88
        else "disqualified"
    )
    # How far the deal gets: won deals through closing; the others stop in
    # some stage (0 = prospecting).
    reach = len(STAGES) if outcome == "won" else rng.randrange(0, len(STAGES))
    length = rng.randint(14, 26)
    core = 2 + sum(len(s[1]) + 2 for s in STAGES[:reach]) + (outcome != "open") * 2
    spare = max(0, length - core)

    created = deal.post(
        "deal.created",
        {
            "process": PROCESS,
            "owner": deal.owner,
            "amount": rng.randrange(5, 400) * 500,
            "currency": rng.choice(CURRENCIES),
            "name": f"Account {index % 997} platform",
        },
    )
    deal.decide(created, "prospecting", "created")
    for number, (_stage, facts, action_type) in enumerate(STAGES[:reach]):
        if spare and rng.random() < 0.6:
            used = rng.randint(1, min(spare, 3))
            deal.engage(used)
            spare -= used
        evidence = []
        for key, description, fact_type, fact_data in facts:
            fact = deal.post(fact_type, dict(fact_data))
            evidence.append(
                {
                    "criterion": key,
                    "description": description,
                    "event_ids": [fact["event_id"]],
                    "occurred_at": fact["occurred_at"],
                }
            )
        action = deal.post(action_type)
        following = STAGES[number + 1][0] if number + 1 < len(STAGES) else "won"
        deal.decide(action, following, "criteria", action=action, criteria=evidence)
        # Now and then a rep moves a deal back by hand, and it goes on again.
        if following != "won" and number and rng.random() < 0.03:
            back = STAGES[number - 1][0]
            override = deal.post(
                "stage.overridden", {"to": back, "reason": "Buyer reopened scope"}
            )
            deal.decide(override, back, "override", reason="Buyer reopened scope")
            redo = deal.post(STAGES[number - 1][2])
            deal.decide(redo, following, "criteria", action=redo)
    deal.engage(spare)
    if outcome == "lost":
        reason = rng.choice(LOST_REASONS)
        lost = deal.post("deal.lost", {"reason": reason})
        deal.decide(lost, "lost", "lost", reason=reason)
    elif outcome == "disqualified":
        reason = rng.choice(DISQUALIFIERS)
        found = deal.post("disqualifier.identified", {"reason": reason})
        deal.decide(found, "disqualified", "disqualified", reason=reason)
    return deal


class Histories:
    """The recorded log of many deals, in position order, generated lazily:
    deals start one after another and their events interleave by time."""

    def __init__(self, total: int, seed: int = SEED) -> None:
        self.total = total
        self.seed = seed
        self.deals = 0
        self.types: Counter[str] = Counter()
        self.first_us = int(START.timestamp() * 10**6)
        self.last_us = self.first_us

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        rng = random.Random(self.seed)
        pending: list[tuple[int, int, int, dict[str, Any]]] = []
        next_start_us = self.first_us
        mean_gap_us = 86_400 * 10**6 / DEALS_PER_DAY
        for position in range(1, self.total + 1):
            while not pending or next_start_us <= pending[0][0]:
                for item in _history(rng, self.deals, next_start_us).events:
                    heapq.heappush(pending, item)
                self.deals += 1
                next_start_us += int(rng.expovariate(1 / mean_gap_us))
            recorded_us, _deal, _version, event = heapq.heappop(pending)
            event["position"] = position
            self.types[event["type"]] += 1
            self.last_us = recorded_us
            yield event["deal_id"].encode(), orjson.dumps(event)


# -- Kafka -----------------------------------------------------------------------------


def _produce(bootstrap: str, topic: str, histories: Histories) -> dict[str, Any]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics(
        [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
    )
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=50,
        batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
        compression_type=None,
    )
    started = time.perf_counter()
    size = 0
    for key, value in histories:
        size += len(value)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    seconds = time.perf_counter() - started
    return {
        "events": histories.total,
        "deals": histories.deals,
        "bytes": size,
        "mean_value_bytes": round(size / histories.total),
        "seconds": round(seconds, 1),
        "types": dict(histories.types.most_common()),
    }


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    found = consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    consumer.close()
    return {tp.partition: int(offset) for tp, offset in found.items()}


def _bare(bootstrap: str, topic: str, total: int, decode: bool) -> dict[str, Any]:
    """Read the whole topic with kafka-python as the projector configures it,
    optionally decoding every value with json.loads."""
    batch = Settings().batch_max_events
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        check_crcs=False,
        max_poll_records=batch,
        max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    consumer.seek_to_beginning()
    seen = first_batch = 0
    first_at = 0.0
    loads = json.loads
    while seen < total:
        records = consumer.poll(timeout_ms=1000, max_records=batch)
        for part in records.values():
            if decode:
                for record in part:
                    loads(record.value)
            seen += len(part)
        if records and not first_at:
            first_at, first_batch = time.perf_counter(), seen
    seconds = time.perf_counter() - first_at
    consumer.close()
    return {
        "decode": "json.loads" if decode else "none (bytes)",
        "events": seen,
        "seconds": round(seconds, 2),
        "events_per_s": round((seen - first_batch) / seconds),
    }


# -- the projector ---------------------------------------------------------------------


def _database(admin_url: str, name: str) -> str:
    url = sa.make_url(admin_url)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _cpu_busy(seconds: float = 2.0) -> float:
    """How busy the machine's CPUs were over the next seconds, in percent."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        idle = ticks[3] + ticks[4]
        return sum(ticks) - idle, sum(ticks)

    busy, total = sample()
    time.sleep(seconds)
    busy_after, total_after = sample()
    return round(100 * (busy_after - busy) / max(1, total_after - total), 1)


def _quiet(phase: str, busy: dict[str, float], most: float = 20.0) -> None:
    """Wait up to a minute for the machine to calm down before a phase, and
    record how busy it was when the phase started."""
    deadline = time.monotonic() + 60
    while (found := _cpu_busy()) > most and time.monotonic() < deadline:
        pass
    busy[phase] = found
    if found > most:
        print(f"projector: the machine is {found:.0f} % busy before {phase}")


def _drop_database(admin_url: str, name: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()


def _status(pid: int) -> dict[str, int]:
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                found[name] = int(value.split()[0])
    return found


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics_env(database_url: str, bootstrap: str, topic: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICS_")}
    env.update(
        METRICS_DATABASE_URL=database_url,
        METRICS_KAFKA_BOOTSTRAP=bootstrap,
        METRICS_KAFKA_TOPIC=topic,
        METRICS_KAFKA_GROUP=f"bench-{topic}",
        METRICS_LOG_LEVEL="INFO",
    )
    return env


def _project(
    database_url: str, bootstrap: str, topic: str, ends: dict[int, int]
) -> dict[str, Any]:
    """Run `metrics project --source kafka` until its stored offsets reach
    the ends, sampling the stored offsets and the process's memory."""
    total = sum(ends.values())
    log_path = RESULTS / "projector-project.log"
    engine = sa.create_engine(database_url)
    offsets = sa.text(
        "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE topic = :t"
    )
    with log_path.open("w") as log:
        launched = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "metrics.cli", "project", "--source", "kafka"],
            env=_metrics_env(database_url, bootstrap, topic),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        done = first = 0
        first_at = done_at = 0.0
        memory: dict[str, int] = {}
        try:
            while done < total:
                if process.poll() is not None:
                    raise RuntimeError(f"the projector exited, see {log_path}")
                memory = _status(process.pid)
                try:
                    with engine.connect() as connection:
                        done = int(connection.execute(offsets, {"t": topic}).scalar())
                except sa.exc.ProgrammingError:  # not migrated yet
                    done = 0
                if done and not first_at:
                    first_at, first = time.perf_counter(), done
                done_at = time.perf_counter()
                time.sleep(0.05)
            memory = _status(process.pid)
            cpu_s = _cpu_s(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    with engine.connect() as connection:
        deals = connection.execute(sa.text("SELECT count(*) FROM deals")).scalar()
        visits = connection.execute(
            sa.text("SELECT count(*) FROM stage_visits")
        ).scalar()
        parked = connection.execute(
            sa.text("SELECT count(*) FROM parked_events")
        ).scalar()
        applied = connection.execute(
            sa.text("SELECT sum(events_applied) FROM consumer_offsets")
        ).scalar()
    engine.dispose()
    seconds = done_at - first_at
    return {
        "how": "metrics project --source kafka, a subprocess",
        "events": total,
        "events_applied": int(applied or 0),
        "parked": int(parked or 0),
        "deals": int(deals or 0),
        "stage_visits": int(visits or 0),
        "seconds": round(seconds, 2),
        "seconds_from_launch": round(done_at - launched, 2),
        "events_per_s": round((total - first) / seconds),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mb": round(memory.get("VmHWM", 0) / 1024, 1),
        "exit_code": process.returncode,
    }


def _profile(
    database_url: str, bootstrap: str, topic: str, ends: dict[int, int]
) -> None:
    """The projector in this process under cProfile, until caught up."""
    from metrics.consumer import KafkaSource
    from metrics.logs import configure_logging
    from metrics.processes import load_catalog
    from metrics.progress import KafkaOffsets
    from metrics.projection import Projection
    from metrics.settings import Settings
    from metrics.storage import create_engine, migrate

    configure_logging("WARNING")
    settings = Settings(
        database_url=database_url,
        kafka_bootstrap=bootstrap,
        kafka_topic=topic,
        kafka_group=f"bench-profile-{topic}",
    )
    engine = create_engine(settings, writer=True)
    migrate(engine)
    offsets = KafkaOffsets(engine, topic)
    source = KafkaSource(
        settings, Projection(engine, load_catalog(settings.processes_dir)), offsets
    )
    stop = threading.Event()

    def watch() -> None:
        while sum(offsets.stored(range(PARTITIONS)).values()) < sum(ends.values()):
            time.sleep(0.2)
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(source.run, stop)
    seconds = time.perf_counter() - started
    path = RESULTS / "projector.pstats"
    profiler.dump_stats(path)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(30)
    print(out.getvalue())
    print(f"profiled {sum(ends.values()):,} events in {seconds:.1f} s -> {path}")


# -- the API ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _latencies(
    database_url: str, bootstrap: str, topic: str, histories: Histories
) -> dict[str, Any]:
    port = _free_port()
    env = _metrics_env(database_url, bootstrap, topic)
    env.update(METRICS_PORT=str(port), METRICS_LOG_LEVEL="WARNING")
    log_path = RESULTS / "projector-serve.log"
    middle = _iso((histories.first_us + histories.last_us) // 2)[:10]
    as_of = _iso(histories.last_us)
    variants: dict[str, dict[str, str]] = {}
    for name in ("funnel", "velocity", "outcomes", "pipeline", "stalled"):
        base = {"as_of": as_of} if name == "stalled" else {}
        variants[name] = base
        variants[f"{name}?group_by=owner"] = {**base, "group_by": "owner"}
        variants[f"{name}?process&created_from"] = {
            **base,
            "process": PROCESS,
            "created_from": middle,
        }
    found: dict[str, Any] = {}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "metrics.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=30
            ) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"the API did not start, see {log_path}")
                    time.sleep(0.2)
                for name, params in variants.items():
                    path = "/v1/metrics/" + name.split("?")[0]
                    for _ in range(WARM_UP):
                        client.get(path, params=params).raise_for_status()
                    times = []
                    for _ in range(REQUESTS):
                        started = time.perf_counter()
                        response = client.get(path, params=params)
                        times.append((time.perf_counter() - started) * 1000)
                        response.raise_for_status()
                    times.sort()
                    found[name] = {
                        "requests": len(times),
                        "p50_ms": round(statistics.median(times), 2),
                        "p99_ms": round(times[int(0.99 * len(times)) - 1], 2),
                        "max_ms": round(times[-1], 2),
                        "bytes": len(response.content),
                    }
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return found


# -- the run ---------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> int:
    pg_url = os.environ.get("DEALLEDGER_TEST_PG_URL")
    bootstrap = os.environ.get("DEALLEDGER_TEST_KAFKA")
    if not pg_url or not bootstrap:
        print("projector: needs DEALLEDGER_TEST_PG_URL and DEALLEDGER_TEST_KAFKA")
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    topic = f"bench-deal-events-{run}"
    database = f"bench_projector_{run}"
    try:
        return _run(pg_url, bootstrap, topic, database)
    finally:
        _drop_database(pg_url, database)
        _delete_topic(bootstrap, topic)


def _run(pg_url: str, bootstrap: str, topic: str, database: str) -> int:
    histories = Histories(EVENTS)
    print(f"projector: producing {EVENTS:,} envelopes to {topic} ...", flush=True)
    produced = _produce(bootstrap, topic, histories)
    ends = _end_offsets(bootstrap, topic)
    if sum(ends.values()) != EVENTS:
        print(f"projector: the topic holds {sum(ends.values())} events, not {EVENTS}")
        return 1
    database_url = _database(pg_url, database)

    if os.environ.get("BENCH_PROJECTOR_PROFILE") == "1":
        _profile(database_url, bootstrap, topic, ends)
        return 0

    busy: dict[str, float] = {}
    print("projector: bare consumers ...", flush=True)
    _quiet("bare consumers", busy)
    bare_bytes = _bare(bootstrap, topic, EVENTS, decode=False)
    bare = _bare(bootstrap, topic, EVENTS, decode=True)
    print("projector: metrics project --source kafka ...", flush=True)
    _quiet("projector", busy)
    projected = _project(database_url, bootstrap, topic, ends)
    checks = {
        "every event applied once": projected["events_applied"] == EVENTS,
        "no event parked": projected["parked"] == 0,
        "one row per deal": projected["deals"] == histories.types["deal.created"],
        "every bare read saw every event": bare["events"] == EVENTS
        and bare_bytes["events"] == EVENTS,
    }
    # Kept in case the API phase fails, so that the consumers' figures are not lost.
    partial = {"bare_consumer": bare, "projector": projected, "checks": checks}
    (RESULTS / "projector.json").write_text(json.dumps(partial, indent=2) + "\n")
    print("projector: metrics serve, latencies ...", flush=True)
    _quiet("API", busy)
    latencies = _latencies(database_url, bootstrap, topic, histories)

    ratio = projected["events_per_s"] / bare["events_per_s"]
    worst_p99 = max(v["p99_ms"] for v in latencies.values())
    goals = {
        "projector_events_per_s": projected["events_per_s"] >= GOAL_RATE,
        "ratio": ratio >= GOAL_RATIO,
        "peak_rss_mb": projected["peak_rss_mb"] < GOAL_RSS_MB,
        "api_p99_ms": worst_p99 < GOAL_P99_MS,
    }
    results = {
        "benchmark": "projector",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_busy_before_phase_percent": busy,
        },
        "topic": {"name": topic, "partitions": PARTITIONS, **produced},
        "bare_consumer_bytes": bare_bytes,
        "bare_consumer": bare,
        "projector": projected,
        "ratio": round(ratio, 3),
        "api": latencies,
        "goals": {
            "projector_events_per_s": GOAL_RATE,
            "ratio": GOAL_RATIO,
            "peak_rss_mb": GOAL_RSS_MB,
            "api_p99_ms": GOAL_P99_MS,
        },
        "met": goals,
        "checks": checks,
    }
    (RESULTS / "projector.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(
        f"projector benchmark: {EVENTS:,} events of "
        f"{histories.types['deal.created']:,} deals, {PARTITIONS} partitions, "
        f"{produced['mean_value_bytes']} bytes a value"
    )
    print(
        "CPU busy before each phase: "
        + ", ".join(f"{phase} {value:.0f} %" for phase, value in busy.items())
    )
    print(
        f"bare consumer {bare_bytes['events_per_s']:,} ev/s bytes only, "
        f"{bare['events_per_s']:,} ev/s with json.loads (the baseline)"
    )
    print(
        f"projector {projected['events_per_s']:,} ev/s  "
        f"bare {bare['events_per_s']:,} ev/s  "
        f"ratio {ratio:.2f} (goal >= {GOAL_RATIO}) {_verdict(goals['ratio'])}"
    )
    print(
        f"projector {projected['events_per_s']:,} ev/s (goal >= {GOAL_RATE:,}) "
        f"{_verdict(goals['projector_events_per_s'])}"
    )
    print(
        f"projector peak RSS {projected['peak_rss_mb']:.0f} MB "
        f"(goal < {GOAL_RSS_MB} MB) {_verdict(goals['peak_rss_mb'])}"
    )
    print(f"{'endpoint':<34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, figures in latencies.items():
        print(
            f"{name:<34} {figures['p50_ms']:>8.1f} {figures['p99_ms']:>8.1f} "
            f"{figures['max_ms']:>8.1f}"
        )
    print(
        f"API worst p99 {worst_p99:.1f} ms (goal < {GOAL_P99_MS} ms) "
        f"{_verdict(goals['api_p99_ms'])}"
    )
    failed = [name for name, held in checks.items() if not held]
    if failed:
        print(f"projector: CHECK FAILED: {', '.join(failed)}")
        return 1
    return 0
