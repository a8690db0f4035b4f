"""`metrics parked`: list, show and retry the parked events.

metrics parked list [--after ID] [--limit N] [--json]
metrics parked show ID [--json]
metrics parked retry (ID... | --all) [--deal D] [--json]

Results go to stdout (rich tables, or JSON with --json); logs and errors go
to stderr. The exit status is 0 when everything asked for was done, 1 when
an id is unknown or an event stays parked (or is held), 2 for arguments
that do not make sense together. `metrics.cli` registers the commands with
`add_commands` and hands the parsed arguments to `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from metrics.answers import ParkedAnswer, ParkedEventDetail, RetryAnswer
from metrics.errors import MetricsError
from metrics.settings import Settings

__all__ = ["EXIT_NOT_DONE", "EXIT_USAGE", "add_commands", "run"]

EXIT_NOT_DONE = 1
EXIT_USAGE = 2

# Width of tables written to a file or a pipe, where no terminal says.
PIPED_WIDTH = 120


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `parked` (list, show, retry) on the `metrics` command."""
    parked = commands.add_parser(
        "parked",
        help="list, show and retry the events the projection parked",
        description="The events the projection could not apply, and the "
        "later events of their deals held behind them (docs/metrics.md).",
    )
    actions = parked.add_subparsers(dest="parked_action", required=True)

    listing = actions.add_parser("list", help="the parked events, oldest first")
    listing.add_argument(
        "--after", type=int, default=0, metavar="ID", help="only ids above ID"
    )
    listing.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="answer in JSON")

    show = actions.add_parser("show", help="one parked event, raw value included")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="answer in JSON")

    retry = actions.add_parser(
        "retry",
        help="apply parked events again, after a fix",
        description="Apply the parked events again with the code and process "
        "files of now, each deal's in stream order; an event applied leaves "
        "the parking table, one that fails again stays with its new error and "
        "holds its deal's later events. Retrying an event while an earlier "
        "one of its deal is still parked is refused.",
    )
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument(
        "--all", action="store_true", help="every parked event (of --deal)"
    )
    retry.add_argument("--deal", metavar="D", help="only the events of deal D")
    retry.add_argument("--json", action="store_true", help="answer in JSON")


def run(arguments: argparse.Namespace, settings: Settings) -> int:
    """Run one `parked` action; the exit status."""
    action = arguments.parked_action
    if action == "list" and not 1 <= arguments.limit <= 10_000:
        return _usage(action, f"--limit must be 1 to 10000, not {arguments.limit}")
    if action == "retry" and bool(arguments.ids) == bool(arguments.all):
        return _usage(action, "give the ids to retry, or --all (not both)")
    engine = _open(settings)
    try:
        if action == "list":
            return _list(engine, arguments)
        if action == "show":
            return _show(engine, arguments)
        return _retry(engine, settings, arguments)
    finally:
        engine.dispose()


# -- the database ----------------------------------------------------------------


def _open(settings: Settings) -> sa.Engine:
    """The existing, migrated read models (a missing SQLite file is not
    created)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from metrics.storage import (
        MIGRATIONS_DIR,
        VERSION_TABLE,
        create_engine,
        normalise_url,
    )

    url = normalise_url(settings.resolved_database_url)
    path = url.database if url.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not Path(path).is_file():
        raise MetricsError(
            f"no read models at {path}: run `metrics migrate`, or set "
            "METRICS_DATABASE_URL"
        )
    engine = create_engine(settings, writer=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    try:
        with engine.connect() as connection:
            version = connection.execute(
                sa.text(f"SELECT version_num FROM {VERSION_TABLE}")
            ).scalar_one_or_none()
    except sa.exc.SQLAlchemyError:
        version = None
    if version != head:
        engine.dispose()
        raise MetricsError(
            f"the read models are at revision {version}, not {head}: run "
            "`metrics migrate`"
        )
    return engine


# -- the actions -----------------------------------------------------------------


def _list(engine: sa.Engine, arguments: argparse.Namespace) -> int:
    from metrics.status import parked

    with engine.connect() as connection:
        answer = parked(connection, arguments.after, arguments.limit)
    if arguments.json:
        _json(answer)
    else:
        _show_list(answer, arguments.after)
    return 0


def _show(engine: sa.Engine, arguments: argparse.Namespace) -> int:
    from metrics.status import parked_event

    with engine.connect() as connection:
        event = parked_event(connection, arguments.id)
    if event is None:
        return _not_done("show", f"no parked event with id={arguments.id}")
    if arguments.json:
        _json(event)
    else:
        _show_event(event)
    return 0


def _retry(engine: sa.Engine, settings: Settings, arguments: argparse.Namespace) -> int:
    from metrics.parked import retry
    from metrics.processes import load_catalog

    catalog = load_catalog(settings.processes_dir)
    ids = None if arguments.all else list(arguments.ids)
    answer = retry(engine, catalog, ids, deal=arguments.deal)
    if arguments.json:
        _json(answer)
    else:
        _show_retry(answer)
    for event in answer.events:
        if event.outcome == "missing":
            _err().print(f"metrics parked retry: {event.error}", markup=False)
    if answer.parked or answer.held or answer.missing:
        return EXIT_NOT_DONE
    return 0


# -- output ----------------------------------------------------------------------


def _out() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _usage(action: str, message: str) -> int:
    _err().print(f"metrics parked {action}: {message}", markup=False)
    return EXIT_USAGE


def _not_done(action: str, message: str) -> int:
    _err().print(f"metrics parked {action}: {message}", markup=False)
    return EXIT_NOT_DONE


def _json(answer: BaseModel) -> None:
    sys.stdout.write(json.dumps(answer.model_dump(), indent=2) + "\n")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _show_list(answer: ParkedAnswer, after: int) -> None:
    console = _out()
    if not answer.events:
        where = f" after id {after}" if after else ""
        console.print(f"{answer.count} parked events; none{where}", markup=False)
        return
    table = Table()
    table.add_column("id", justify="right")
    table.add_column("parked at")
    table.add_column("deal")
    table.add_column("position", justify="right")
    table.add_column("type")
    table.add_column("error")
    for event in answer.events:
        table.add_row(
            str(event.id),
            event.parked_at,
            _text(event.deal_id),
            _text(event.position),
            _text(event.type),
            event.error,
        )
    console.print(table)
    more = (
        f"; the next page: --after {answer.next_after}"
        if answer.next_after is not None
        else ""
    )
    console.print(
        f"{len(answer.events)} of {answer.count} parked events{more}",
        markup=False,
        soft_wrap=True,
    )


def _show_event(event: ParkedEventDetail) -> None:
    console = _out()
    table = Table(show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [
        ("id", event.id),
        ("parked at", event.parked_at),
        ("source", event.source),
        ("topic", event.topic),
        ("partition", event.partition),
        ("offset", event.offset),
        ("position", event.position),
        ("event id", event.event_id),
        ("deal", event.deal_id),
        ("type", event.type),
        ("stream version", event.stream_version),
        ("held behind", event.held_behind),
        ("error", event.error),
    ]
    for name, value in rows:
        table.add_row(name, _text(value))
    console.print(table)
    if event.stream_version is None:
        console.print(
            "No stream version: its envelope could not be read when it was parked "
            "(or it was parked before migration 0004), so it holds nothing back, "
            "and a retry applies it only if its deal has not moved past it.",
            markup=False,
        )
    elif event.held_behind is not None:
        console.print(
            f"Held behind parked event {event.held_behind}: retry that one first "
            f"(or the whole deal: metrics parked retry --all --deal "
            f"{event.deal_id}).",
            markup=False,
        )
    try:
        raw = json.dumps(json.loads(event.raw), indent=2)
        console.print("raw (indented; --json shows it as stored):", markup=False)
    except ValueError:
        raw = event.raw
        console.print("raw (not JSON):", markup=False)
    console.print(raw, markup=False, soft_wrap=True)


def _show_retry(answer: RetryAnswer) -> None:
    console = _out()
    if not answer.events:
        console.print("no parked events to retry", markup=False)
        return
    table = Table()
    table.add_column("id", justify="right")
    table.add_column("deal")
    table.add_column("position", justify="right")
    table.add_column("type")
    table.add_column("outcome")
    table.add_column("error")
    for event in answer.events:
        table.add_row(
            str(event.id),
            _text(event.deal_id),
            _text(event.position),
            _text(event.type),
            event.outcome,
            _text(event.error),
        )
    console.print(table)
    console.print(
        f"{answer.applied} applied, {answer.parked} still parked, "
        f"{answer.held} held, {answer.missing} missing",
        markup=False,
    )
