"""Operator commands at scale: replay, rebuild and simulate, beside what
bounds them.

    python -m bench operations     (DEALLEDGER_TEST_PG_URL, DEALLEDGER_TEST_KAFKA)

One run on one machine, on PostgreSQL and Kafka. Each log gets a fresh
database of the same server; databases and topics are dropped at the end.

1. A log of about a million events: seeded deal histories (bench.histories,
   20 inputs a deal) in the order they happened, each input followed by the
   stage changes the decision engine makes of it, as ingestion records
   them. Loaded with `EventLog.append`, 10,000 inputs an append (not a
   figure).
2. Reading the log bare, the limit of any reader: every page of 1,000 of
   the first million events through `EventLog.feed`, and the same keyset
   pages through a raw psycopg 3 cursor (rows as tuples, nothing decoded
   beyond what the driver does).
3. `progression replay --to-position 1000000` to a new topic, the installed
   command as a subprocess; its figure is the rate it reports itself (JSON
   log line `replay done`). Beside it, the kafka-python producer alone: the
   same million messages, encoded before the clock starts, sent with the
   relay's producer options, which is what the replay's rate really meets.
4. A bare kafka-python consumer reads the replayed topic back, decoding
   each value; it must find a million messages. `metrics rebuild --source
   kafka` is timed over that topic into a fresh database, the installed
   command as a subprocess from start to exit: what it is bounded by is
   that consumer's rate (rebuild/consumer), and its own summary must say
   it read every offset of the topic.
5. `progression simulate` over 10,000 deals (200,000 inputs, in a log of
   their own) with the b2b-default process as candidate, the installed
   command as a subprocess timed from start to exit; beside it, the bare
   read of those deals' streams (`EventLog.read_streams`, 200 deals a
   query, as the simulation reads them), in one process.

The figures go to bench/results/operations.json and are printed last.
BENCH_OPERATIONS_EVENTS (default 1000000) and BENCH_OPERATIONS_DEALS
(default 10000) make a smaller run.
"""

from __future__ import annotations

__all__ = ["main"]

import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from bench.histories import generate, interleave
from progression.contract import canonical_digest
from progression.criteria import DealFacts
from progression.deal import view_of
from progression.decision import STAGE_CHANGED, StreamEvent, decide
from progression.eventlog import DealSummary, EventLog, NewEvent, StreamWrite
from progression.ingestion import decision_event_id
from progression.process import Process
from progression.relay import PRODUCER_OPTIONS, encode_key, encode_value
from progression.service import Service
from progression.settings import load_settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import UnknownTopicOrPartitionError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
EVENTS = int(os.environ.get("BENCH_OPERATIONS_EVENTS", "1000000"))
SIMULATED_DEALS = int(os.environ.get("BENCH_OPERATIONS_DEALS", "10000"))
EVENTS_PER_DEAL = 20
# Stage changes add about a quarter to the inputs (write_path: 25,691 of
# 100,000); a little more than needed is generated and the rest not replayed.
ROWS_PER_DEAL = 25
APPEND_INPUTS = 10_000
FEED_PAGE = 1_000
STREAMS_PER_QUERY = 200  # deals read together, as progression.simulation does
PARTITIONS = 6
SEED = 20_260_301
CANDIDATE = ROOT / "schemas" / "processes" / "b2b-default.yaml"
PROCESS_KEY = "b2b-default"

GOAL_SIMULATE_S = 10.0
GOAL_REBUILD_S = 60.0


def say(text: str) -> None:
    print(text, flush=True)


# -- the log ---------------------------------------------------------------------


@dataclass(slots=True)
class _Deal:
    stream: list[StreamEvent] = field(default_factory=list)
    facts: DealFacts = field(default_factory=DealFacts)


@dataclass(frozen=True, slots=True)
class Loaded:
    deals: int
    inputs: int
    decisions: int
    seconds: float

    @property
    def rows(self) -> int:
        return self.inputs + self.decisions


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _input(raw: dict[str, Any]) -> NewEvent:
    """A posted envelope as ingestion records it, digest included."""
    content = {
        "event_id": raw["event_id"],
        "type": raw["type"],
        "deal_id": raw["deal_id"],
        "occurred_at": raw["occurred_at"],
        "source": raw.get("source"),
        "actor": raw.get("actor"),
        "data": raw["data"],
        "schema_version": 1,
    }
    return NewEvent(
        event_id=raw["event_id"],
        type=raw["type"],
        deal_id=raw["deal_id"],
        occurred_at=_moment(raw["occurred_at"]),
        data=raw["data"],
        source=raw.get("source"),
        actor=raw.get("actor"),
        digest=canonical_digest(content),
    )


def load_log(log: EventLog, process: Process, deals: int, prefix: str) -> Loaded:
    """Seeded histories in time order, each input followed by its decisions."""
    started = time.perf_counter()
    inputs = interleave(generate(SEED, deals, EVENTS_PER_DEAL, prefix))
    state: dict[str, _Deal] = {}
    decisions = 0
    recorded_at = datetime.now(UTC)
    for start in range(0, len(inputs), APPEND_INPUTS):
        new: dict[str, list[NewEvent]] = {}
        versions: dict[str, int] = {}
        for raw in inputs[start : start + APPEND_INPUTS]:
            event = _input(raw)
            deal = state.setdefault(event.deal_id, _Deal())
            versions.setdefault(event.deal_id, len(deal.stream))
            batch = new.setdefault(event.deal_id, [])
            batch.append(event)
            arrived = StreamEvent(
                event.event_id,
                event.type,
                event.occurred_at,
                event.data,
                len(deal.stream) + 1,
            )
            deal.stream.append(arrived)
            deal.facts.insert(arrived.as_fact())
            for decision in decide(deal.stream, process, deal.facts):
                version = len(deal.stream) + 1
                data = decision.data()
                change = NewEvent(
                    event_id=decision_event_id(event.deal_id, version),
                    type=STAGE_CHANGED,
                    deal_id=event.deal_id,
                    occurred_at=recorded_at,
                    data=data,
                    source="dealledger",
                    causation_id=event.event_id,
                )
                batch.append(change)
                deal.stream.append(
                    StreamEvent(
                        change.event_id, STAGE_CHANGED, recorded_at, data, version
                    )
                )
                decisions += 1
        writes = [
            StreamWrite(
                deal_id,
                versions[deal_id],
                events,
                _summary(deal_id, state[deal_id].stream, process),
            )
            for deal_id, events in new.items()
        ]
        log.append(writes)
    return Loaded(deals, len(inputs), decisions, time.perf_counter() - started)


def _summary(
    deal_id: str, stream: Sequence[StreamEvent], process: Process
) -> DealSummary:
    view = view_of(deal_id, stream, process)
    return DealSummary(
        deal_id=deal_id,
        version=view.version,
        status=view.status,
        stage=view.stage,
        stage_entered_at=view.stage_entered_at,
        process=view.process,
        process_version=view.process_version,
        owner=view.owner,
        amount=view.amount,
        currency=view.currency,
        lead_score=view.lead_score,
        created_at=view.created_at,
        updated_at=None,
    )


# -- reading the log bare ----------------------------------------------------------


def read_feed(log: EventLog, last: int) -> tuple[int, float]:
    """Every event up to `last` through EventLog.feed, in pages; (events, s)."""
    started = time.perf_counter()
    after = count = 0
    while after < last:
        page = log.feed(after, FEED_PAGE)
        if not page:
            break
        kept = [e for e in page if e.position <= last]
        count += len(kept)
        after = page[-1].position
    return count, time.perf_counter() - started


RAW_PAGE = (
    "SELECT position, event_id, deal_id, stream_version, type, occurred_at, "
    "recorded_at, source, actor, schema_version, data, causation_id, digest "
    "FROM events WHERE position > %s AND position <= %s ORDER BY position LIMIT %s"
)


def read_raw(conninfo: str, last: int) -> tuple[int, float]:
    """The same pages through a psycopg 3 cursor, rows as tuples; (events, s)."""
    with psycopg.connect(conninfo) as connection:
        started = time.perf_counter()
        after = count = 0
        while True:
            rows = connection.execute(RAW_PAGE, (after, last, FEED_PAGE)).fetchall()
            if not rows:
                break
            count += len(rows)
            after = rows[-1][0]
        seconds = time.perf_counter() - started
    return count, seconds


def read_streams(log: EventLog, deal_ids: Sequence[str]) -> tuple[int, float]:
    """The deals' streams, STREAMS_PER_QUERY deals a query; (events, s)."""
    started = time.perf_counter()
    count = 0
    for start in range(0, len(deal_ids), STREAMS_PER_QUERY):
        streams = log.read_streams(deal_ids[start : start + STREAMS_PER_QUERY])
        count += sum(len(stream) for stream in streams.values())
    return count, time.perf_counter() - started


# -- Kafka -----------------------------------------------------------------------


def produce_bare(
    bootstrap: str, topic: str, log: EventLog, last: int
) -> dict[str, Any]:
    """The million messages, encoded first, sent with the relay's options."""
    messages: list[tuple[bytes, bytes]] = []
    after = 0
    while after < last:
        page = [e for e in log.feed(after, 10_000) if e.position <= last]
        if not page:
            break
        messages.extend((encode_key(e), encode_value(e)) for e in page)
        after = page[-1].position
    _create_topic(bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **PRODUCER_OPTIONS)
    try:
        producer.partitions_for(topic)  # metadata before the clock starts
        started = time.perf_counter()
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush()
        seconds = time.perf_counter() - started
    finally:
        producer.close()
    return {
        "how": "kafka-python KafkaProducer, the relay's options, values encoded "
        "before the clock",
        "events": len(messages),
        "seconds": round(seconds, 2),
        "events_per_s": round(len(messages) / seconds),
    }


def consume_bare(bootstrap: str, topic: str) -> dict[str, Any]:
    """Every message of the topic, each value decoded with json.loads."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        check_crcs=False,
        fetch_max_bytes=50 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        partitions = [
            TopicPartition(topic, p)
            for p in sorted(consumer.partitions_for_topic(topic))
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        count = 0
        started = time.perf_counter()
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                for record in records:
                    json.loads(record.value)
                count += len(records)
        seconds = time.perf_counter() - started
    finally:
        consumer.close()
    return {
        "how": "kafka-python KafkaConsumer, assigned every partition, json.loads "
        "of each value",
        "events": count,
        "seconds": round(seconds, 2),
        "events_per_s": round(count / seconds) if seconds else None,
    }


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        admin.close()


def _delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        for topic in topics:
            with suppress(UnknownTopicOrPartitionError):
                admin.delete_topics([topic])
    finally:
        admin.close()


# -- the commands ----------------------------------------------------------------


def _command(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install the project (make venv)")
    return str(path)


def _progression_env(database_url: str, bootstrap: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESSION_")}
    env.update(
        PROGRESSION_DATABASE_URL=database_url,
        PROGRESSION_KAFKA_BOOTSTRAP=bootstrap,
        PROGRESSION_KAFKA_PARTITIONS=str(PARTITIONS),
        PROGRESSION_LOG_FORMAT="json",
        PROGRESSION_LOG_LEVEL="INFO",
    )
    return env


def replay(database_url: str, bootstrap: str, topic: str, last: int) -> dict[str, Any]:
    """`progression replay` of positions 1 to `last`; the rate it reports."""
    log_path = RESULTS / "operations-replay.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(
            [
                _command("progression"),
                "replay",
                "--to-topic",
                topic,
                "--to-position",
                str(last),
            ],
            env=_progression_env(database_url, bootstrap),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=1800,
        )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"progression replay failed ({done.returncode}), see {log_path}"
        )
    figures = _logged(log_path, "replay done")
    return {
        "how": "progression replay --to-topic T --to-position Q, a subprocess",
        "events": int(figures["events"]),
        "seconds": float(figures["seconds"]),
        "events_per_s": round(float(figures["events_per_s"])),
        "seconds_from_launch": round(wall_s, 2),
        "summary": done.stdout.strip(),
    }


def _logged(path: Path, message: str) -> dict[str, str]:
    """The key=value pairs of the JSON log line whose msg starts with `message`."""
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        text = str(entry.get("msg", ""))
        if text.startswith(message):
            return dict(re.findall(r"(\w+)=(\S+)", text))
    raise RuntimeError(f"no {message!r} line in {path}")


def simulate(database_url: str, workers: int) -> dict[str, Any]:
    """`progression simulate` over every deal of the log, start to exit."""
    log_path = RESULTS / "operations-simulate.log"
    env = _progression_env(database_url, "127.0.0.1:1")
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(
            [
                _command("progression"),
                "simulate",
                "--process",
                str(CANDIDATE),
                "--json",
                "--workers",
                str(workers),
            ],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=600,
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"progression simulate failed ({done.returncode}), see {log_path}"
        )
    result = json.loads(done.stdout)
    own = _logged(log_path, "simulation done")
    return {
        "how": "progression simulate --process b2b-default.yaml --json, a "
        "subprocess, from start to exit",
        "workers": workers,
        "deals": result["deals"],
        "events_read": result["events_read"],
        "inputs_replayed": result["inputs_replayed"],
        "deals_with_another_outcome": result["deals_with_another_outcome"],
        "seconds": round(seconds, 2),
        "seconds_reported": float(own["seconds"]),  # its own, start-up excluded
        "events_per_s": round(result["events_read"] / seconds),
    }


def rebuild(database_url: str, bootstrap: str, topic: str) -> dict[str, Any]:
    """`metrics rebuild --source kafka` over the replayed topic into a fresh
    database, timed from start to exit; its own summary says how many events
    it applied and how long the building took."""
    log_path = RESULTS / "operations-rebuild.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICS_")}
    env.update(
        METRICS_DATABASE_URL=database_url,
        METRICS_KAFKA_BOOTSTRAP=bootstrap,
        METRICS_KAFKA_TOPIC=topic,
        METRICS_LOG_LEVEL="INFO",
    )
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(
            [_command("metrics"), "rebuild", "--source", "kafka", "--json"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=1800,
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}, see {log_path}"}
    summary = json.loads(done.stdout)
    return {
        "how": "metrics rebuild --source kafka, a subprocess, from start to exit",
        "seconds": round(seconds, 2),
        "events": summary["events_applied"],
        "offsets_read": summary["done"],
        "events_per_s": round(summary["events_applied"] / seconds),
        "seconds_reported": summary["seconds"],  # its own, start-up excluded
    }


# -- databases -------------------------------------------------------------------


class Postgres:
    """Fresh databases of one PostgreSQL server, dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self._admin_url = sa.make_url(admin_url)
        self._admin = sa.create_engine(self._admin_url, isolation_level="AUTOCOMMIT")
        self._names: list[str] = []

    def fresh(self, role: str) -> str:
        name = f"bench_ops_{role}_{uuid.uuid4().hex[:8]}"
        with self._admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self._names.append(name)
        return self._admin_url.set(database=name).render_as_string(hide_password=False)

    def version(self) -> str:
        with self._admin.connect() as connection:
            return str(connection.execute(sa.text("SHOW server_version")).scalar_one())

    def drop_all(self) -> None:
        with self._admin.connect() as connection:
            for name in self._names:
                connection.execute(
                    sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                )
        self._admin.dispose()


def _conninfo(database_url: str) -> str:
    url = sa.make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _analyse(database_url: str) -> None:
    """VACUUM ANALYZE after the load, as autovacuum would get to in time."""
    with psycopg.connect(_conninfo(database_url), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


@contextmanager
def _service(database_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=database_url))
    try:
        yield service
    finally:
        service.engine.dispose()


# -- the report ------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else 0.0


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _machine(pg: Postgres) -> dict[str, Any]:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        # Other work on the machine lowers every figure; this says how much
        # there was when the run began (1-, 5- and 15-minute averages).
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "cpu": cpu,
        "python": platform.python_version(),
        "postgres": pg.version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or None


def _table(report: dict[str, Any]) -> str:
    rep, feed, raw = report["replay"], report["read_feed"], report["read_raw"]
    producer, consumer = report["bare_producer"], report["bare_consumer"]
    sim, streams = report["simulate"], report["read_streams"]
    ratios = report["ratios"]
    rows = [
        ("replay", f"{rep['events_per_s']:,} ev/s", f"{rep['events']:,} events", ""),
        (
            "  EventLog.feed pages",
            f"{feed['events_per_s']:,} ev/s",
            f"replay/feed {ratios['replay_over_feed']:.3f}",
            "",
        ),
        (
            "  raw psycopg SELECT",
            f"{raw['events_per_s']:,} ev/s",
            f"replay/raw {ratios['replay_over_raw']:.3f}",
            "",
        ),
        (
            "  bare kafka-python producer",
            f"{producer['events_per_s']:,} ev/s",
            f"replay/producer {ratios['replay_over_producer']:.3f}",
            "",
        ),
        (
            "  bare kafka-python consumer",
            f"{consumer['events_per_s']:,} ev/s",
            f"{consumer['events']:,} on the topic",
            "",
        ),
        (
            f"simulate {sim['deals']:,} deals",
            f"{sim['seconds']:.1f} s",
            f"{sim['events_read']:,} events, {sim['events_per_s']:,} ev/s",
            f"goal < {GOAL_SIMULATE_S:g} s  "
            f"{_verdict(sim['seconds'] < GOAL_SIMULATE_S)}",
        ),
        (
            "  read_streams of those deals",
            f"{streams['events_per_s']:,} ev/s",
            f"simulate/read {ratios['simulate_over_read_streams']:.3f}",
            "",
        ),
    ]
    built = report["rebuild"]
    if "failed" in built:
        rows.append(("metrics rebuild", "failed", built["failed"], ""))
    else:
        ok = built["seconds"] < GOAL_REBUILD_S
        rows.append(
            (
                f"metrics rebuild {built['events']:,} events",
                f"{built['seconds']:.1f} s",
                f"{built['events_per_s']:,} ev/s, rebuild/consumer "
                f"{ratios['rebuild_over_consumer']:.3f}",
                f"goal < {GOAL_REBUILD_S:g} s  {_verdict(ok)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    machine = report["machine"]
    lines = [
        f"operations (PostgreSQL {machine['postgres'].split(' ')[0]}, Kafka, "
        f"{machine['cores']} cores)"
    ]
    for label, figure, detail, goal in rows:
        lines.append(
            f"  {label:<{widths[0]}}  {figure:>{widths[1]}}   "
            f"{detail:<{widths[2]}}   {goal}".rstrip()
        )
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------


def main() -> int:
    pg_url = os.environ.get("DEALLEDGER_TEST_PG_URL")
    bootstrap = os.environ.get("DEALLEDGER_TEST_KAFKA")
    if not pg_url or not bootstrap:
        sys.stderr.write(
            "operations: DEALLEDGER_TEST_PG_URL and DEALLEDGER_TEST_KAFKA must be "
            "set; run `make bench`, or deploy/local/with-services --kafka -- "
            ".venv/bin/python -m bench operations\n"
        )
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    pg = Postgres(pg_url)
    suffix = uuid.uuid4().hex[:8]
    replay_topic, bare_topic = f"bench-replay-{suffix}", f"bench-producer-{suffix}"
    begun = time.perf_counter()
    try:
        report = _run(pg, bootstrap, replay_topic, bare_topic)
    finally:
        _delete_topics(bootstrap, [replay_topic, bare_topic])
        pg.drop_all()
    report["total_s"] = round(time.perf_counter() - begun, 1)
    out = RESULTS / "operations.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    say(f"  took {report['total_s']:.0f} s; figures in {out}")
    say("")
    say(_table(report))
    return 0 if report["checks_passed"] else 1


def _run(
    pg: Postgres, bootstrap: str, replay_topic: str, bare_topic: str
) -> dict[str, Any]:
    machine = _machine(pg)
    say(f"operations: PostgreSQL {machine['postgres']}, {machine['cores']} cores")
    checks: dict[str, bool] = {}

    # 1. The million-event log.
    big_url = pg.fresh("log")
    deals = -(-EVENTS // ROWS_PER_DEAL)
    with _service(big_url) as service:
        process = service.catalog.current(PROCESS_KEY)
        loaded = load_log(service.log, process, deals, "deal")
        say(
            f"  loaded {loaded.rows:,} events ({loaded.inputs:,} inputs of "
            f"{deals:,} deals, {loaded.decisions:,} stage changes) in "
            f"{loaded.seconds:.0f} s"
        )
        _analyse(big_url)
        head = service.log.head_position()
        checks["log_holds_the_events"] = head == loaded.rows and head >= EVENTS
        last = EVENTS

        # 2. Reading it bare.
        events, seconds = read_feed(service.log, last)
        feed = {"events": events, "seconds": round(seconds, 2)}
        feed["events_per_s"] = round(events / seconds)
        say(f"  EventLog.feed: {events:,} events in {seconds:.1f} s")
        events, seconds = read_raw(_conninfo(big_url), last)
        raw = {"events": events, "seconds": round(seconds, 2)}
        raw["events_per_s"] = round(events / seconds)
        say(f"  raw psycopg: {events:,} events in {seconds:.1f} s")
        checks["reads_saw_every_event"] = feed["events"] == raw["events"] == EVENTS

        # 3. The replay, and the producer alone.
        replayed = replay(big_url, bootstrap, replay_topic, last)
        say(
            f"  replay: {replayed['events']:,} events in {replayed['seconds']:.1f} s "
            f"({replayed['seconds_from_launch']:.1f} s from launch)"
        )
        checks["replay_published_the_range"] = replayed["events"] == EVENTS
        producer = produce_bare(bootstrap, bare_topic, service.log, last)
        say(
            f"  bare producer: {producer['events']:,} events in "
            f"{producer['seconds']:.1f} s"
        )

    # 4. The topic read back, and the rebuild if there is one.
    consumer = consume_bare(bootstrap, replay_topic)
    say(
        f"  bare consumer: {consumer['events']:,} events in {consumer['seconds']:.1f} s"
    )
    checks["topic_holds_the_range"] = consumer["events"] == EVENTS
    built = rebuild(pg.fresh("metrics"), bootstrap, replay_topic)
    say(f"  metrics rebuild: {built}")
    checks["rebuild_applied_the_topic"] = built.get("offsets_read") == EVENTS

    # 5. Simulate, in a log of its own.
    small_url = pg.fresh("simulate")
    with _service(small_url) as service:
        process = service.catalog.current(PROCESS_KEY)
        small = load_log(service.log, process, SIMULATED_DEALS, "sim")
        _analyse(small_url)
        say(f"  loaded {small.rows:,} events of {SIMULATED_DEALS:,} deals for simulate")
        workers = min(os.cpu_count() or 1, 4)
        simulated = simulate(small_url, workers)
        say(
            f"  simulate: {simulated['deals']:,} deals in {simulated['seconds']:.1f} s "
            f"({simulated['seconds_reported']:.1f} s by its own count)"
        )
        deal_ids = [f"sim-{n:06d}" for n in range(SIMULATED_DEALS)]
        events, seconds = read_streams(service.log, deal_ids)
        streams = {"events": events, "seconds": round(seconds, 2)}
        streams["events_per_s"] = round(events / seconds)
        say(f"  read_streams: {events:,} events in {seconds:.1f} s")
        checks["simulate_saw_every_deal"] = (
            simulated["deals"] == SIMULATED_DEALS and simulated["events_read"] == events
        )

    return {
        "benchmark": "operations",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "commit": _commit(),
        "workload": {
            "seed": SEED,
            "log": {
                "deals": deals,
                "inputs": loaded.inputs,
                "stage_changes": loaded.decisions,
                "events": loaded.rows,
                "replayed": EVENTS,
                "load_s": round(loaded.seconds, 1),
            },
            "simulate": {
                "deals": SIMULATED_DEALS,
                "inputs": small.inputs,
                "stage_changes": small.decisions,
                "events": small.rows,
            },
            "partitions": PARTITIONS,
        },
        "replay": replayed,
        "read_feed": {"how": f"EventLog.feed, pages of {FEED_PAGE:,}", **feed},
        "read_raw": {
            "how": f"psycopg 3 keyset pages of {FEED_PAGE:,}, rows as tuples",
            **raw,
        },
        "bare_producer": producer,
        "bare_consumer": consumer,
        "rebuild": built,
        "simulate": simulated,
        "read_streams": {
            "how": f"EventLog.read_streams, {STREAMS_PER_QUERY} deals a query, one "
            "process",
            **streams,
        },
        "ratios": {
            "replay_over_feed": _ratio(replayed["events_per_s"], feed["events_per_s"]),
            "replay_over_raw": _ratio(replayed["events_per_s"], raw["events_per_s"]),
            "replay_over_producer": _ratio(
                replayed["events_per_s"], producer["events_per_s"]
            ),
            "simulate_over_read_streams": _ratio(
                simulated["events_per_s"], streams["events_per_s"]
            ),
            "rebuild_over_consumer": _ratio(
                built.get("events_per_s", 0), consumer["events_per_s"]
            ),
        },
        "goals": {
            "simulate_s_below": GOAL_SIMULATE_S,
            "rebuild_s_below": GOAL_REBUILD_S,
        },
        "goals_met": {
            "simulate": simulated["seconds"] < GOAL_SIMULATE_S,
            "rebuild": built.get("seconds", float("inf")) < GOAL_REBUILD_S,
        },
        "checks": checks,
        "checks_passed": all(checks.values()),
    }


if __name__ == "__main__":
    sys.exit(main())
