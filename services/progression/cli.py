"""The `progression` command.

progression run        migrate, then serve the API (the embedded default)
progression serve      serve the API on an already migrated database
progression migrate    bring the event log's schema to the newest version
progression check      validate the settings and every process file
progression relay      publish the event log to Kafka (one active at a time)
progression simulate   decide recorded inputs again under a candidate process
progression export     write the log as JSON Lines
progression import     append an exported or generated JSON Lines file
progression generate   write a generated sales history as JSON Lines
progression replay     publish a range of the log to a topic, resumably
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import uvicorn

from . import ops
from .errors import ProgressionError
from .logs import configure_logging
from .security import refuse_open_bind
from .settings import Settings, load_settings

log = logging.getLogger("progression")


def _serve(settings: Settings) -> int:
    from .api import create_app
    from .service import Service

    service = Service.start(settings)
    refuse_open_bind(settings.host, service.credentials_configured)
    data = (
        str(settings.data_dir.resolve())
        if settings.database_url is None
        else "(external database)"
    )
    log.info(
        "progression listening url=http://%s:%d database=%s data_dir=%s processes=%s",
        settings.host,
        settings.port,
        service.engine.url.render_as_string(hide_password=True),
        data,
        ",".join(service.catalog.process_keys()),
    )
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers > 1:
        # Each worker process builds its own service from the environment;
        # the database arbitrates between them as between replicas.
        service.engine.dispose()
        log.info("progression workers=%d", settings.workers)
        uvicorn.run(
            "progression.api:app_from_environment",
            factory=True,
            workers=settings.workers,
            **options,  # type: ignore[arg-type]
        )
    else:
        app = create_app(service)
        config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
        uvicorn.Server(config).run()
        service.engine.dispose()
    log.info("progression stopped")
    return 0


def _migrate(settings: Settings) -> int:
    from .db import create_engine, migrate

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    migrate(engine)
    log.info(
        "event log migrated database=%s",
        engine.url.render_as_string(hide_password=True),
    )
    engine.dispose()
    return 0


def _check(settings: Settings) -> int:
    from .contract import Contract
    from .process import load_process_dir

    contract = Contract(settings.schemas_dir)
    for process in load_process_dir(
        settings.resolved_processes_dir, contract.process_schema
    ):
        log.info(
            "process valid key=%s version=%d stages=%s",
            process.key,
            process.version,
            ",".join(s.key for s in process.stages),
        )
    return 0


def _relay(settings: Settings) -> int:
    from .db import create_engine, migrate
    from .relay import Relay

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    migrate(engine)
    relay = Relay(engine, settings)

    # The relay runs in a thread of its own and the main thread only waits,
    # so that SIGTERM and SIGINT merely set the stop event, whatever the
    # relay is doing: it then finishes the batch in flight, records its
    # position and releases its lock.
    stop = threading.Event()
    failure: list[BaseException] = []

    def request_stop(signum: int, _frame: object) -> None:
        log.info("relay stop requested signal=%s", signal.Signals(signum).name)
        stop.set()

    def run() -> None:
        try:
            relay.run(stop)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    thread = threading.Thread(target=run, name="relay")
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    engine.dispose()
    if not failure:
        return 0
    [exc] = failure
    if isinstance(exc, ProgressionError):
        log.error("relay gave up topic=%s error=%r", relay.topic, str(exc))
    else:
        log.error("relay failed topic=%s", relay.topic, exc_info=exc)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="progression", description="Deal progression: the write side."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="migrate, then serve the API")
    commands.add_parser("serve", help="serve the API")
    commands.add_parser("migrate", help="migrate the event log's schema")
    commands.add_parser("check", help="validate settings and process files")
    commands.add_parser("relay", help="publish the event log to Kafka")
    ops.add_commands(commands)
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        if args.command in ("run", "serve"):
            return _serve(settings)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "relay":
            return _relay(settings)
        if args.command in ops.COMMANDS:
            return ops.run(args, settings)
        return _check(settings)
    except ProgressionError as exc:
        configure_logging()
        log.error("progression refused to start error=%r", str(exc))
        sys.stderr.write(f"progression: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
