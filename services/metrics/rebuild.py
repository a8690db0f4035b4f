"""Rebuilding the read models from the start of the history, without downtime.

A rebuild projects the whole history again into a staging area beside the
read models, with the same projection code and its own source progress:
on PostgreSQL the schema `metrics_rebuild` of the same database, on SQLite
a second file beside the first (`metrics.rebuild.db` for `metrics.db`).
Meanwhile the API goes on answering from the current read models and the
live projector goes on updating them; nothing of theirs is written.

Once the rebuild is within `CATCH_UP_WITHIN` events of the end of its
source, one transaction replaces the current read models (deals, stage
visits, source progress, parked events) with the staged ones: on
PostgreSQL the current tables are dropped and the staged ones moved into
their schema (the rename takes milliseconds, the API waits for it, never
sees half of it); on SQLite the staged rows are copied into the current
tables (readers go on reading the previous snapshot until it commits). The
live projector then finds that the stored progress is not the one it
expected, rereads it and goes on from where the rebuild stopped, so the
events that arrived in between are applied to the new read models too.

Crash safety: the staged read models and their progress are committed
together, batch by batch, exactly as the live ones are, so a rebuild that
is killed leaves the current read models untouched and the staging area
consistent; running the same command again resumes from the staged
progress. The state of the rebuild (for `GET /v1/projector/status`) is a
row of the `rebuilds` table, updated about once a second. One rebuild runs
at a time (a PostgreSQL advisory lock, or a lock on a file beside the
SQLite database).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import sqlalchemy as sa

from metrics.errors import MetricsError
from metrics.feed import FeedSource
from metrics.processes import Catalog, load_catalog
from metrics.progress import FEED_KEY, FeedProgress, KafkaOffsets
from metrics.projection import Projection, lock_batches
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from metrics.tables import (
    consumer_offsets,
    deals,
    feed_position,
    parked_events,
    rebuilds,
    stage_visits,
)

if TYPE_CHECKING:
    from metrics.consumer import KafkaSource

__all__ = [
    "CATCH_UP_WITHIN",
    "STAGING_SCHEMA",
    "Rebuild",
    "RebuildProgress",
    "RebuildRefused",
    "RebuildSummary",
    "abandon",
]

logger = logging.getLogger(__name__)

RebuildSource = Literal["feed", "kafka"]

STAGING_SCHEMA = "metrics_rebuild"
# The read models a switch replaces, in the order their locks are taken.
SWITCHED_TABLES = (deals, stage_visits, consumer_offsets, feed_position, parked_events)
# Switch once at most this many events are left: the live projector applies
# them after the switch (waiting for an exact end would never finish while
# events keep arriving).
CATCH_UP_WITHIN = 1_000
BUILDING, SWITCHED, ABANDONED = "building", "switched", "abandoned"

_ADVISORY_LOCK = 0x6D6574726963_7262  # "metric" "rb": one rebuild at a time
# How long the switch waits for the live projector's batch in flight, and
# then for each table (API queries hold their tables for milliseconds).
_BATCH_LOCK_TIMEOUT = "10s"
_TABLE_LOCK_TIMEOUT = "1s"
_RETRY_FIRST_S, _RETRY_MAX_S = 2.0, 30.0
# How long the switch waits, with the live projector held, for the staged
# read models to reach the live ones before it gives up and builds on.
_CATCH_UP_S = 30.0
_ROW_EVERY_S = 1.0
_LOG_EVERY_S = 10.0


class RebuildRefused(MetricsError):
    """The rebuild cannot start as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """How far a rebuild got. `done` and `total` count in the source's unit:
    offsets summed over the partitions (Kafka) or log positions (feed);
    `total` is None until the source has said where its end is."""

    done: int
    total: int | None
    events_applied: int
    last_position: int | None


@dataclass(frozen=True, slots=True)
class RebuildSummary:
    rebuild_id: int
    source: str
    state: str  # switched, or building when stopped before the switch
    runs: int
    started_from: int
    progress: RebuildProgress
    seconds: float
    events_this_run: int

    @property
    def events_per_s(self) -> float:
        return self.events_this_run / self.seconds if self.seconds > 0 else 0.0


Report = Callable[[RebuildProgress], None]


def _now_us() -> int:
    return time.time_ns() // 1000


# -- the staging area --------------------------------------------------------------


class _NotCaughtUp(Exception):
    """The staged read models did not reach the live ones in time: the
    switch's transaction is rolled back and the rebuild goes on."""


# Called inside the switch's transaction, once the live projector can no
# longer write: wait for the staged read models to reach the live ones and
# stop the rebuild's source; their final progress.
CatchUp = Callable[[sa.Connection], RebuildProgress]
# Called last inside the switch's transaction: record the switch.
Finish = Callable[[sa.Connection, RebuildProgress], None]


class _Staging(Protocol):
    engine: sa.Engine  # the rebuild's projection writes through it
    reader: sa.Engine  # progress is read through it, without the write lock

    def exists(self) -> bool: ...

    def open(self) -> sa.Engine: ...

    def drop(self) -> None: ...

    def analyze(self) -> None: ...

    def switch(self, catch_up: CatchUp, finish: Finish) -> None: ...

    def lock(self) -> contextlib.AbstractContextManager[None]: ...


class _PostgresStaging:
    """A schema of the same database; the switch moves its tables.

    The switch first locks the current tables against writes only (EXCLUSIVE
    mode: the API goes on reading), waits for the staged tables to reach
    them, then takes the lock that readers wait for (ACCESS EXCLUSIVE) just
    for the drop and the move, which take milliseconds."""

    def __init__(self, settings: Settings, main: sa.Engine) -> None:
        self._settings = settings
        self._main = main
        self.engine = create_engine(settings, writer=True, schema=STAGING_SCHEMA)
        self.reader = self.engine

    def exists(self) -> bool:
        query = sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")
        with self._main.connect() as connection:
            found = connection.execute(query, {"name": STAGING_SCHEMA}).first()
        return found is not None

    def open(self) -> sa.Engine:
        with self._main.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {STAGING_SCHEMA}")
        migrate(self.engine)
        return self.engine

    def drop(self) -> None:
        self.engine.dispose()
        with self._main.begin() as connection:
            connection.exec_driver_sql(
                f"DROP SCHEMA IF EXISTS {STAGING_SCHEMA} CASCADE"
            )

    def analyze(self) -> None:
        # Fresh statistics, so that the first queries on the new tables are
        # planned as well as those on the old ones.
        with self.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            for table in SWITCHED_TABLES:
                connection.exec_driver_sql(f"ANALYZE {table.name}")

    def switch(self, catch_up: CatchUp, finish: Finish) -> None:
        quote = self._main.dialect.identifier_preparer.quote
        with self._main.begin() as connection:
            # First the projector batches' lock, exclusively: the batch in
            # flight ends, the next waits before it reads anything (a batch
            # that had read its deals from the old tables would otherwise
            # deadlock with the rename below, or write them into the new).
            connection.exec_driver_sql(
                f"SET LOCAL lock_timeout = '{_BATCH_LOCK_TIMEOUT}'"
            )
            lock_batches(connection, exclusive=True)
            connection.exec_driver_sql(
                f"SET LOCAL lock_timeout = '{_TABLE_LOCK_TIMEOUT}'"
            )
            target = quote(
                connection.exec_driver_sql("SELECT current_schema()").scalar_one()
            )
            names = ", ".join(f"{target}.{t.name}" for t in SWITCHED_TABLES)
            connection.exec_driver_sql(f"LOCK TABLE {names} IN EXCLUSIVE MODE")
            progress = catch_up(connection)
            self.engine.dispose()
            connection.exec_driver_sql(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE")
            for table in SWITCHED_TABLES:
                connection.exec_driver_sql(f"DROP TABLE {target}.{table.name}")
                connection.exec_driver_sql(
                    f"ALTER TABLE {STAGING_SCHEMA}.{table.name} SET SCHEMA {target}"
                )
            finish(connection, progress)
            connection.exec_driver_sql(f"DROP SCHEMA {STAGING_SCHEMA} CASCADE")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._main.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            taken = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_LOCK}
            ).scalar_one()
            if not taken:
                raise RebuildRefused("another rebuild of these read models is running")
            try:
                yield
            finally:
                connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_LOCK}
                )


class _SqliteStaging:
    """A second database file; the switch copies its rows.

    The switch's transaction takes the write lock of the current database
    only (readers go on reading the previous snapshot), waits for the
    staged file to reach it, then copies the staged rows over the current
    ones."""

    def __init__(self, settings: Settings, main: sa.Engine) -> None:
        database = main.url.database
        if not database or database == ":memory:":
            raise RebuildRefused(
                "METRICS_DATABASE_URL: an in-memory database cannot be rebuilt"
            )
        main_path = Path(database)
        self.path = main_path.with_name(f"{main_path.stem}.rebuild{main_path.suffix}")
        self.engine = create_engine(settings, writer=True, url=f"sqlite:///{self.path}")
        self.reader = create_engine(settings, url=f"sqlite:///{self.path}")
        # Transactions that begin deferred: the switch must not lock the
        # staged file, which the rebuild's source goes on writing meanwhile.
        self._switcher = create_engine(settings, url=main.url)

    def _files(self) -> list[Path]:
        # The WAL first: a WAL left beside a new file would be replayed into it.
        return [self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "")]

    def exists(self) -> bool:
        return any(path.exists() for path in self._files())

    def open(self) -> sa.Engine:
        migrate(self.engine)
        return self.engine

    def drop(self) -> None:
        self.engine.dispose()
        self.reader.dispose()
        for path in self._files():
            path.unlink(missing_ok=True)

    def analyze(self) -> None:
        pass  # SQLite plans without statistics unless ANALYZE was ever run

    def switch(self, catch_up: CatchUp, finish: Finish) -> None:
        try:
            with self._switcher.connect() as connection:
                raw: Any = connection.connection.dbapi_connection
                # ATTACH cannot run inside a transaction: before SQLAlchemy's.
                raw.execute("ATTACH DATABASE ? AS staged", (str(self.path),))
                try:
                    with connection.begin():
                        # The first statement writes, so the transaction holds
                        # the current database's write lock from here on.
                        connection.execute(
                            rebuilds.update()
                            .where(rebuilds.c.id == -1)
                            .values(updated_us=0)
                        )
                        progress = catch_up(connection)
                        self.engine.dispose()
                        self.reader.dispose()
                        for table in SWITCHED_TABLES:
                            columns = ", ".join(f'"{c.name}"' for c in table.columns)
                            connection.exec_driver_sql(f"DELETE FROM main.{table.name}")
                            connection.exec_driver_sql(
                                f"INSERT INTO main.{table.name} ({columns}) "
                                f"SELECT {columns} FROM staged.{table.name}"
                            )
                        finish(connection, progress)
                finally:
                    raw.execute("DETACH DATABASE staged")
        finally:
            self._switcher.dispose()
        self.drop()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "ab") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RebuildRefused(
                    "another rebuild of these read models is running"
                ) from None
            yield


def _staging(settings: Settings, main: sa.Engine) -> _Staging:
    if main.dialect.name == "postgresql":
        return _PostgresStaging(settings, main)
    return _SqliteStaging(settings, main)


# -- the rebuild -------------------------------------------------------------------


class Rebuild:
    """One `metrics rebuild`: prepare or resume, build, catch up, switch."""

    def __init__(
        self,
        settings: Settings,
        source: RebuildSource,
        *,
        catalog: Catalog | None = None,
        restart: bool = False,
        report: Report | None = None,
        on_caught_up: Callable[[], None] | None = None,
    ) -> None:
        """`report` is called about twice a second with the progress;
        `on_caught_up` just before the switch."""
        self._settings = settings
        self._source_name = source
        self._catalog = catalog
        self._restart = restart
        self._report = report
        self._on_caught_up = on_caught_up

    def run(self, stop: threading.Event) -> RebuildSummary:
        """Rebuild and switch, or stop when `stop` is set (resumable).

        Raises `RebuildRefused` when another rebuild runs or a different one
        is in progress, and the source's or the database's errors when they
        give up; the current read models are untouched in every case."""
        main = create_engine(self._settings, writer=True)
        # Reads of the live read models that must not take SQLite's write
        # lock (the writer engine begins every transaction with it).
        self._reader = create_engine(self._settings)
        try:
            migrate(main)
            staging = _staging(self._settings, main)
            with staging.lock():
                return self._run(main, staging, stop)
        finally:
            self._reader.dispose()
            main.dispose()

    def _run(
        self, main: sa.Engine, staging: _Staging, stop: threading.Event
    ) -> RebuildSummary:
        row = self._begin(main, staging)
        rebuild_id, runs = row["id"], row["runs"]
        engine = staging.open()
        started = time.monotonic()
        try:
            runner = self._runner(engine)
            first = self._measure(staging.reader, runner.source)
            logger.info(
                "rebuild %s id=%d source=%s staged_done=%d events_applied=%d",
                "resumed" if runs > 1 else "started",
                rebuild_id,
                self._source_name,
                first.done,
                first.events_applied,
            )
            progress, switched = self._build_and_switch(
                main, staging, runner, rebuild_id, stop
            )
        finally:
            staging.engine.dispose()
            staging.reader.dispose()
        seconds = time.monotonic() - started
        summary = RebuildSummary(
            rebuild_id=rebuild_id,
            source=self._source_name,
            state=SWITCHED if switched else BUILDING,
            runs=runs,
            started_from=first.done,
            progress=progress,
            seconds=seconds,
            events_this_run=progress.events_applied - first.events_applied,
        )
        logger.info(
            "rebuild %s id=%d source=%s events_applied=%d last_position=%s "
            "seconds=%.1f events_per_s=%.0f",
            "switched" if switched else "stopped before the switch",
            rebuild_id,
            self._source_name,
            progress.events_applied,
            progress.last_position,
            seconds,
            summary.events_per_s,
        )
        return summary

    def _build_and_switch(
        self,
        main: sa.Engine,
        staging: _Staging,
        runner: _Runner,
        rebuild_id: int,
        stop: threading.Event,
    ) -> tuple[RebuildProgress, bool]:
        """Build until caught up, then switch; build on when the switch is
        not possible yet. The final progress, and whether it switched."""
        ticker = _Ticker(self, main, staging.reader, rebuild_id)
        retry_s = _RETRY_FIRST_S
        runner.start()
        try:
            while True:
                while runner.alive() and not (stop.is_set() or runner.caught_up()):
                    ticker.tick(runner.source, wait_s=0.5)
                runner.raise_failure()
                if stop.is_set():
                    runner.halt()
                    runner.raise_failure()
                    return ticker.tick(runner.source, force=True), False
                if not runner.alive():
                    # The source stopped by itself, which it only does when
                    # stopped: start it again.
                    runner = self._runner(staging.engine)
                    runner.start()
                    continue
                ticker.tick(runner.source, force=True)
                behind = self._behind_live(staging.reader)
                if behind > CATCH_UP_WITHIN:
                    # Caught up with its source, not yet with the live read
                    # models (a live projector ahead, or a source of the
                    # rebuild's that stalls): no lock for that, read on.
                    logger.info(
                        "rebuild behind the live read models id=%d behind=%d",
                        rebuild_id,
                        behind,
                    )
                    runner.source.caught_up.clear()
                    ticker.tick(runner.source, wait_s=retry_s)
                    retry_s = min(_RETRY_MAX_S, retry_s * 2)
                    continue
                if self._on_caught_up is not None:
                    self._on_caught_up()
                    if stop.is_set():
                        continue
                staging.analyze()
                try:
                    progress = self._switch(staging, runner, ticker, rebuild_id)
                except (_NotCaughtUp, sa.exc.OperationalError) as error:
                    # A lock wait that timed out, a deadlock, or a live
                    # projector that got far ahead: nothing was changed;
                    # build on and try again, less and less often.
                    logger.warning(
                        "switch not possible yet, building on id=%d "
                        "retry_in_s=%.0f error=%s",
                        rebuild_id,
                        retry_s,
                        error,
                    )
                    if not runner.alive():
                        runner = self._runner(staging.engine)
                        runner.start()
                    runner.source.caught_up.clear()
                    ticker.tick(runner.source, wait_s=retry_s)
                    retry_s = min(_RETRY_MAX_S, retry_s * 2)
                    continue
                return progress, True
        finally:
            runner.halt()

    # -- the rebuilds row ------------------------------------------------------------

    def _begin(self, main: sa.Engine, staging: _Staging) -> dict[str, Any]:
        """The row of the rebuild in progress, resumed, or of a new one."""
        r = rebuilds.c
        with main.connect() as connection:
            active = connection.execute(
                sa.select(rebuilds)
                .where(r.state == BUILDING)
                .order_by(r.id.desc())
                .limit(1)
            ).first()
        if active is not None and not self._restart:
            if active.source != self._source_name:
                raise RebuildRefused(
                    f"rebuild {active.id} from the {active.source} is in progress: "
                    f"resume it with --source {active.source}, or start over "
                    "with --restart"
                )
            with main.begin() as connection:
                connection.execute(
                    rebuilds.update()
                    .where(r.id == active.id)
                    .values(runs=r.runs + 1, updated_us=_now_us())
                )
            return {"id": active.id, "runs": active.runs + 1}
        if active is not None:
            _mark(main, active.id, ABANDONED, "started over with --restart")
            logger.info("rebuild abandoned id=%d reason=restart", active.id)
        if staging.exists():
            # What a switched, abandoned or crashed-at-the-end rebuild left.
            staging.drop()
        now = _now_us()
        with main.begin() as connection:
            rebuild_id = connection.execute(
                rebuilds.insert()
                .values(
                    source=self._source_name,
                    state=BUILDING,
                    started_us=now,
                    updated_us=now,
                    runs=1,
                    done=0,
                    events_applied=0,
                )
                .returning(r.id)
            ).scalar_one()
        return {"id": rebuild_id, "runs": 1}

    @staticmethod
    def _write_row(
        connection: sa.Connection, rebuild_id: int, progress: RebuildProgress
    ) -> None:
        connection.execute(
            rebuilds.update()
            .where(rebuilds.c.id == rebuild_id)
            .values(
                done=progress.done,
                total=progress.total,
                events_applied=progress.events_applied,
                last_position=progress.last_position,
                updated_us=_now_us(),
            )
        )

    # -- building --------------------------------------------------------------------

    def _runner(self, engine: sa.Engine) -> _Runner:
        settings = self._settings
        if self._catalog is None:
            # Read once a run: every batch of a run sees the same processes.
            self._catalog = load_catalog(settings.processes_dir)
        projection = Projection(engine, self._catalog, batch_lock=False)
        source: FeedSource | KafkaSource
        if self._source_name == "feed":
            source = FeedSource(
                settings, projection, FeedProgress(engine, settings.feed_url)
            )
        else:
            from metrics.consumer import KafkaSource

            source = KafkaSource(
                settings,
                projection,
                KafkaOffsets(engine, settings.kafka_topic),
                group=False,
                catch_up_within=CATCH_UP_WITHIN,
            )
        return _Runner(source)

    def _measure(
        self, engine: sa.Engine, source: FeedSource | KafkaSource
    ) -> RebuildProgress:
        """The staged progress, as committed."""
        with engine.connect() as connection:
            if isinstance(source, FeedSource):
                f = feed_position.c
                row = connection.execute(
                    sa.select(f.last_position, f.events_applied).where(
                        f.feed == FEED_KEY
                    )
                ).first()
                done = row.last_position if row is not None else 0
                return RebuildProgress(
                    done=done,
                    total=max(done, source.head_position)
                    if source.head_position is not None
                    else None,
                    events_applied=row.events_applied if row is not None else 0,
                    last_position=row.last_position if row is not None else None,
                )
            o = consumer_offsets.c
            totals = connection.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(o.next_offset), 0),
                    sa.func.coalesce(sa.func.sum(o.events_applied), 0),
                    sa.func.max(o.last_position),
                ).where(o.topic == self._settings.kafka_topic)
            ).one()
        ends = source.end_offsets
        done = int(totals[0])
        return RebuildProgress(
            done=done,
            total=max(done, sum(ends.values())) if ends else None,
            events_applied=int(totals[1]),
            last_position=totals[2],
        )

    def _marks(self, connection: sa.Connection) -> dict[int | None, int]:
        """How far this rebuild's source got in the read models `connection`
        sees: the feed position (key None), or the next offset of each
        partition of the topic."""
        if self._source_name == "feed":
            f = feed_position.c
            found = connection.execute(
                sa.select(f.last_position).where(f.feed == FEED_KEY)
            ).scalar_one_or_none()
            return {} if found is None else {None: found}
        o = consumer_offsets.c
        rows = connection.execute(
            sa.select(o.partition, o.next_offset).where(
                o.topic == self._settings.kafka_topic
            )
        ).all()
        return {row.partition: row.next_offset for row in rows}

    def _behind_live(self, staged: sa.Engine) -> int:
        """How many events (or positions) the staged read models are behind
        the live ones in this rebuild's source, read without a lock."""
        with self._reader.connect() as connection:
            live = self._marks(connection)
        with staged.connect() as connection:
            have = self._marks(connection)
        return sum(max(0, mark - have.get(key, 0)) for key, mark in live.items())

    # -- the switch ------------------------------------------------------------------

    def _switch(
        self, staging: _Staging, runner: _Runner, ticker: _Ticker, rebuild_id: int
    ) -> RebuildProgress:
        def catch_up(connection: sa.Connection) -> RebuildProgress:
            # The live projector cannot write now: where it got is final.
            live = self._marks(connection)
            deadline = time.monotonic() + _CATCH_UP_S
            while True:
                with staging.reader.connect() as staged_connection:
                    staged = self._marks(staged_connection)
                if all(staged.get(key, 0) >= mark for key, mark in live.items()):
                    break
                runner.raise_failure()
                if not runner.alive() or time.monotonic() > deadline:
                    raise _NotCaughtUp(
                        f"the live read models are at {live}, the staged ones "
                        f"at {staged}"
                    )
                ticker.tick(runner.source, wait_s=0.1, record=False)
            runner.halt()
            runner.raise_failure()
            return ticker.tick(runner.source, record=False)

        def finish(connection: sa.Connection, progress: RebuildProgress) -> None:
            self._write_row(connection, rebuild_id, progress)
            connection.execute(
                rebuilds.update()
                .where(rebuilds.c.id == rebuild_id)
                .values(state=SWITCHED, finished_us=_now_us())
            )
            final.append(progress)

        final: list[RebuildProgress] = []
        started = time.monotonic()
        staging.switch(catch_up, finish)
        logger.info(
            "read models switched id=%d source=%s switch_ms=%.0f",
            rebuild_id,
            self._source_name,
            (time.monotonic() - started) * 1000,
        )
        return final[0]


class _Runner:
    """The rebuild's source, on a thread of its own."""

    def __init__(self, source: FeedSource | KafkaSource) -> None:
        self.source = source
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="rebuild-source", daemon=True
        )

    def _run(self) -> None:
        try:
            self.source.run(self._stop)
        except BaseException as error:  # handed to the rebuild's thread
            self._failure = error

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def caught_up(self) -> bool:
        return self.source.caught_up.is_set()

    def halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class _Ticker:
    """Reports the progress, writes it to the rebuilds row about once a
    second and logs it every ten."""

    def __init__(
        self, rebuild: Rebuild, main: sa.Engine, engine: sa.Engine, rebuild_id: int
    ) -> None:
        self._rebuild = rebuild
        self._main = main
        self._engine = engine
        self._id = rebuild_id
        self._written = self._logged = time.monotonic()

    def tick(
        self,
        source: FeedSource | KafkaSource,
        *,
        wait_s: float = 0.0,
        force: bool = False,
        record: bool = True,
    ) -> RebuildProgress:
        """`force`: write the row now; `record=False`: not at all (inside
        the switch, which holds the write lock the row needs)."""
        if wait_s:
            time.sleep(wait_s)
        progress = self._rebuild._measure(self._engine, source)
        if self._rebuild._report is not None:
            self._rebuild._report(progress)
        now = time.monotonic()
        if record and (force or now - self._written >= _ROW_EVERY_S):
            try:
                with self._main.begin() as connection:
                    self._rebuild._write_row(connection, self._id, progress)
            except sa.exc.OperationalError as error:
                # The row is what the status shows, not the rebuild's state:
                # a database busy for longer than its timeout delays it.
                logger.warning(
                    "rebuild progress not recorded, later id=%d error=%s",
                    self._id,
                    error,
                )
            self._written = now
        if now - self._logged >= _LOG_EVERY_S:
            logger.info(
                "rebuild progress id=%d done=%d total=%s events_applied=%d",
                self._id,
                progress.done,
                progress.total,
                progress.events_applied,
            )
            self._logged = now
        return progress


def _mark(main: sa.Engine, rebuild_id: int, state: str, detail: str) -> None:
    with main.begin() as connection:
        connection.execute(
            rebuilds.update()
            .where(rebuilds.c.id == rebuild_id)
            .values(
                state=state, detail=detail, finished_us=_now_us(), updated_us=_now_us()
            )
        )


def abandon(settings: Settings) -> int | None:
    """Give up the rebuild in progress: drop its staging area and mark it
    abandoned. The id of the rebuild given up, or None when none was."""
    main = create_engine(settings, writer=True)
    try:
        migrate(main)
        staging = _staging(settings, main)
        with staging.lock():
            r = rebuilds.c
            with main.connect() as connection:
                active = (
                    connection.execute(
                        sa.select(r.id).where(r.state == BUILDING).order_by(r.id.desc())
                    )
                    .scalars()
                    .all()
                )
            if staging.exists():
                staging.drop()
            for rebuild_id in active:
                _mark(main, rebuild_id, ABANDONED, "abandoned with --abandon")
                logger.info("rebuild abandoned id=%d reason=asked", rebuild_id)
            return active[0] if active else None
    finally:
        main.dispose()
