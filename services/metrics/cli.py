"""The `metrics` command: migrate, serve, project, run, rebuild, parked."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from metrics.errors import ConfigurationError, MetricsError
from metrics.logs import configure_logging
from metrics.settings import Settings, load_settings

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_CONFIGURATION = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metrics",
        description="The read side of dealledger: projects deal events into read "
        "models and serves the sales-process metrics. Settings come from "
        "METRICS_* environment variables (see docs/metrics.md).",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        help="a file of METRICS_*=value lines, read before the environment wins",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="bring the read-model schema up to date")
    commands.add_parser("serve", help="serve the metrics API (migrates first)")
    project = commands.add_parser(
        "project", help="run the projector until stopped (migrates first)"
    )
    project.add_argument("--source", choices=["kafka", "feed"], required=True)
    run = commands.add_parser(
        "run", help="the projector on a background thread and the API in one process"
    )
    run.add_argument("--source", choices=["kafka", "feed"], default="feed")
    rebuild = commands.add_parser(
        "rebuild",
        help="build the read models again from the start of the history, then "
        "switch to them; the API serves the current ones meanwhile",
        description="Projects the whole history into fresh tables beside the "
        "read models while the API and the live projector go on, then replaces "
        "the read models with them in one transaction. Stopped or killed, it "
        "leaves the read models as they were; run it again to resume.",
    )
    rebuild.add_argument(
        "--source",
        choices=["kafka", "feed"],
        default="feed",
        help="where the history is read from (default: feed, the progression "
        "service, which holds the whole log whatever Kafka's retention)",
    )
    choice = rebuild.add_mutually_exclusive_group()
    choice.add_argument(
        "--restart",
        action="store_true",
        help="drop a rebuild in progress and start from the beginning",
    )
    choice.add_argument(
        "--abandon",
        action="store_true",
        help="drop a rebuild in progress and do nothing else",
    )
    rebuild.add_argument(
        "--json", action="store_true", help="print the summary as JSON"
    )
    # metrics parked list|show|retry: see metrics.parked_cli
    from metrics import parked_cli

    parked_cli.add_commands(commands)
    return parser


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _serve(settings: Settings, source: str | None) -> None:
    import uvicorn

    from metrics.api import create_app
    from metrics.projector import SourceName
    from metrics.storage import create_engine, migrate

    engine = create_engine(settings)
    migrate(engine)
    engine.dispose()
    projector_source: SourceName | None = None
    if source == "feed":
        projector_source = "feed"
    elif source == "kafka":
        projector_source = "kafka"
    app = create_app(settings, projector_source=projector_source)
    logger.info("api listening host=%s port=%d", settings.host, settings.port)
    # The API logs one key=value line per request itself.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    configure_logging("INFO")
    try:
        settings = load_settings(env_file=arguments.env_file)
    except ConfigurationError as error:
        logger.error("%s", error)
        return EXIT_CONFIGURATION
    configure_logging(settings.log_level)

    try:
        if arguments.command == "migrate":
            from metrics.storage import create_engine, migrate

            engine = create_engine(settings)
            migrate(engine)
            engine.dispose()
        elif arguments.command == "serve":
            _serve(settings, None)
        elif arguments.command == "run":
            _serve(settings, arguments.source)
        elif arguments.command == "project":
            from metrics.projector import run_projector

            stop = threading.Event()
            _stop_on_signals(stop)
            run_projector(settings, arguments.source, stop)
        elif arguments.command == "rebuild":
            from metrics.rebuild_cli import rebuild_command

            stop = threading.Event()
            _stop_on_signals(stop)
            return rebuild_command(settings, arguments, stop)
        elif arguments.command == "parked":
            from metrics import parked_cli

            return parked_cli.run(arguments, settings)
    except ConfigurationError as error:
        logger.error("%s", error)
        return EXIT_CONFIGURATION
    except MetricsError as error:
        logger.error("giving up command=%s error=%s", arguments.command, error)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
