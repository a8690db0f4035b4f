"""Operator commands of `progression`: simulate, export, import, generate, replay.

progression simulate   decide the recorded inputs again under a candidate process
progression export     write the log, or part of it, as JSON Lines
progression import     append an exported (or generated) file to this instance
progression generate   write a generated sales history as JSON Lines
progression replay     publish a range of the log to a Kafka topic, resumably

`progression.cli` registers them with `add_commands` and hands the parsed
arguments to `run`; `python -m progression.ops` runs them on their own.
Results go to stdout (rich tables, JSON or JSON Lines); progress bars, when
stderr is a terminal, and logs go to stderr.
"""

from __future__ import annotations

__all__ = ["COMMANDS", "add_commands", "main", "run"]

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .errors import ConfigurationError, ProgressionError, UnknownDeal
from .logs import configure_logging
from .settings import Settings, load_settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from .contract import Contract
    from .eventlog import EventLog
    from .process import ProcessCatalog
    from .replay import ReplayRefused, ReplaySummary

log = logging.getLogger("progression.ops")  # also when run as __main__

COMMANDS = frozenset({"simulate", "export", "import", "generate", "replay"})
EXIT_REFUSED = 2  # bad arguments, settings or files: nothing was done
EXIT_INCOMPLETE = 1  # an import left lines out; a replay gave up part way
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

Report = Callable[[int, int | None], None]


# -- the commands' arguments -----------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register simulate, export, import, generate and replay on `progression`."""
    simulate = subparsers.add_parser(
        "simulate",
        help="decide the recorded inputs again under a candidate process",
        description="Decide the selected deals' recorded inputs again under a "
        "candidate process file and compare with the baseline. Writes nothing.",
    )
    simulate.add_argument(
        "--process", required=True, type=Path, metavar="FILE", help="candidate file"
    )
    simulate.add_argument(
        "--baseline",
        metavar="KEY",
        help="compare with this process's current version (default: each "
        "deal's recorded process)",
    )
    simulate.add_argument(
        "--deal",
        action="append",
        default=[],
        dest="deals",
        metavar="D",
        help="only this deal (repeatable)",
    )
    simulate.add_argument("--owner", metavar="O", help="only deals owned by O")
    simulate.add_argument(
        "--deal-process", metavar="KEY", help="only deals recorded under KEY"
    )
    simulate.add_argument(
        "--created-from", metavar="T", help="deals created at or after T"
    )
    simulate.add_argument(
        "--created-to", metavar="T", help="deals created before T (a date: through)"
    )
    simulate.add_argument(
        "--as-of",
        metavar="T",
        help="date the stalled count (default: the latest occurred_at replayed)",
    )
    simulate.add_argument("--json", action="store_true", help="answer in JSON")
    simulate.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        metavar="N",
        help="worker processes (default: the CPUs, at most 4)",
    )

    export = subparsers.add_parser(
        "export",
        help="write the event log as JSON Lines",
        description="Write recorded envelopes, one a line, in position order.",
    )
    export.add_argument(
        "--from-position",
        type=int,
        default=1,
        metavar="P",
        help="the first position (default 1)",
    )
    export.add_argument(
        "--to-position",
        type=int,
        metavar="Q",
        help="the last position (default: the head when the export starts)",
    )
    export.add_argument(
        "--deal",
        action="append",
        default=[],
        dest="deals",
        metavar="D",
        help="only this deal's events (repeatable)",
    )
    export.add_argument("--out", default="-", metavar="FILE", help="default: stdout")

    import_ = subparsers.add_parser(
        "import",
        help="append an exported or generated JSON Lines file",
        description="Submit the file's inputs to this instance, which decides "
        "them again; stage.changed lines are skipped. Idempotent.",
    )
    import_.add_argument("file", metavar="FILE", help="a JSON Lines file, or -")
    import_.add_argument(
        "--batch-size", type=int, default=1000, metavar="N", help="default 1000"
    )

    generate = subparsers.add_parser(
        "generate",
        help="write a generated sales history as JSON Lines",
        description="Posted envelopes of a generated history, deterministic by "
        "seed, every event before a fixed moment in the past.",
    )
    generate.add_argument("--deals", type=int, required=True, metavar="N")
    generate.add_argument("--seed", type=int, default=0, metavar="S")

    replay = subparsers.add_parser(
        "replay",
        help="publish a range of the event log to a Kafka topic",
        description="Publish the events between two positions (both included), "
        "of every deal or of the deals named, in position order to a topic, "
        "keyed and encoded as the relay does. Run again with the same "
        "arguments it resumes where it stopped, and once complete it publishes "
        "nothing more, unless --restart. SIGINT or SIGTERM stops it cleanly.",
    )
    replay.add_argument("--to-topic", required=True, metavar="T", help="the topic")
    replay.add_argument(
        "--from-position",
        type=int,
        default=1,
        metavar="P",
        help="the first position (default 1)",
    )
    replay.add_argument(
        "--to-position",
        type=int,
        metavar="Q",
        help="the last position (default: the head when the replay starts)",
    )
    replay.add_argument(
        "--deal",
        action="append",
        default=[],
        dest="deals",
        metavar="D",
        help="only this deal's events (repeatable)",
    )
    replay.add_argument(
        "--restart",
        action="store_true",
        help="start over, even if this replay stopped part way or completed",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of `COMMANDS`; the exit status."""
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "simulate": _simulate,
        "export": _export,
        "import": _import,
        "generate": _generate,
        "replay": _replay,
    }
    try:
        return handlers[args.command](args, settings)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, and keep
        # the interpreter's last flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        log.warning("%s interrupted", args.command)
        again = " (run it again to complete it)" if args.command == "import" else ""
        _err().print(f"progression {args.command}: interrupted{again}", markup=False)
        return EXIT_INTERRUPTED
    except (ProgressionError, ValueError, OSError) as exc:
        log.error("%s refused error=%r", args.command, str(exc))
        _err().print(f"progression {args.command}: {exc}", markup=False, soft_wrap=True)
        return EXIT_REFUSED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="progression", description="Deal progression: operator commands."
    )
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        configure_logging()
        _err().print(f"progression: {exc}", markup=False, soft_wrap=True)
        return EXIT_REFUSED
    configure_logging(settings.log_level, settings.log_format)
    return run(args, settings)


# -- output ----------------------------------------------------------------------


# Width of tables written to a file or a pipe, where no terminal says.
PIPED_WIDTH = 100


def _out() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False)


class _RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


@contextmanager
def _progress(description: str, unit: str) -> Iterator[Report]:
    """A progress bar on stderr when it is a terminal; a no-op otherwise."""
    console = _err()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(unit),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=None)

        def report(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield report


# -- opening the log -------------------------------------------------------------


def _open_engine(settings: Settings) -> sa.Engine:
    """The existing, migrated event log, opened without writing to it."""
    from .db import create_engine, current_revision

    if settings.database_url is None:
        path = settings.data_dir.resolve() / "progression.db"
        if not path.exists():
            raise ConfigurationError(
                f"no event log at {path}: set DEALLEDGER_DATA_DIR or "
                "PROGRESSION_DATABASE_URL"
            )
    engine = create_engine(settings.resolved_database_url)
    if current_revision(engine) is None:
        engine.dispose()
        raise ConfigurationError(
            "the database holds no event log yet: run `progression migrate`"
        )
    return engine


def _catalog(
    settings: Settings, event_log: EventLog, contract: Contract
) -> ProcessCatalog:
    """Every process version the log recorded, the files' versions current."""
    from .process import ProcessCatalog, load_process_dir, parse_process

    catalog = ProcessCatalog()
    for stored in event_log.processes():
        catalog.add(
            parse_process(
                stored.definition,
                contract.process_schema,
                f"recorded process {stored.key} v{stored.version}",
            )
        )
    for process in load_process_dir(
        settings.resolved_processes_dir, contract.process_schema
    ):
        catalog.add(process, current=True)
    return catalog


# -- simulate --------------------------------------------------------------------


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from .contract import Contract
    from .eventlog import EventLog
    from .process import load_process_file
    from .simulation import DealFilter, simulate

    if not args.process.is_file():
        raise ValueError(f"--process: {args.process} is not a file")
    contract = Contract(settings.schemas_dir)
    candidate = load_process_file(args.process, contract.process_schema)
    selection = DealFilter(
        deal_ids=tuple(args.deals),
        owner=args.owner,
        process=args.deal_process,
        created_from=_moment("--created-from", args.created_from),
        created_to=_moment("--created-to", args.created_to, end_of_day=True),
    )
    as_of = _moment("--as-of", args.as_of)
    if args.workers < 1:
        raise ValueError(f"--workers: must be 1 or more, not {args.workers}")

    engine = _open_engine(settings)
    try:
        event_log = EventLog(engine)
        catalog = _catalog(settings, event_log, contract)
        if args.baseline is not None and not catalog.knows(args.baseline):
            known = ", ".join(catalog.process_keys())
            raise ValueError(
                f"--baseline: no process {args.baseline!r}; known: {known}"
            )
        with _progress("replaying", "events") as report:
            result = simulate(
                event_log,
                catalog,
                candidate,
                candidate_source=str(args.process),
                baseline=args.baseline,
                selection=selection,
                as_of=as_of,
                report=report,
                workers=args.workers if _shareable(engine) else 1,
                database_url=engine.url.render_as_string(hide_password=False),
            )
    except UnknownDeal as exc:
        raise ValueError(f"--deal: {exc}") from exc
    finally:
        engine.dispose()

    if args.json:
        sys.stdout.write(json.dumps(result.data(), indent=2) + "\n")
    else:
        _show_simulation(result.data())
    return 0


def _moment(
    name: str, text: str | None, *, end_of_day: bool = False
) -> datetime | None:
    from .simulation import parse_moment

    return None if text is None else parse_moment(name, text, end_of_day=end_of_day)


def _shareable(engine: sa.Engine) -> bool:
    """Whether worker processes can open the same database."""
    database = engine.url.database or ""
    return not (
        engine.dialect.name == "sqlite"
        and (database in ("", ":memory:") or engine.url.query.get("mode") == "memory")
    )


def _count(value: Any) -> str:
    return "n/a" if value is None else f"{value:,}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _days(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _signed_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:+,}" if value else "0"


def _points(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:+.1f} pts" if round(value * 1000) else "0.0 pts"


def _signed_days(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if round(value * 10) else "0.0"


def _show_simulation(data: dict[str, Any]) -> None:
    from .simulation import EXAMPLES

    console = _out()
    candidate, baseline = data["candidate"], data["baseline"]
    console.print(
        f"Candidate: {candidate['process']} v{candidate['version']} "
        f"({candidate['source']})",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"Baseline:  {baseline['description']}; the same inputs decided again",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"Deals:     {data['deals']:,} ({data['inputs_replayed']:,} inputs of "
        f"{data['events_read']:,} recorded events); "
        f"{data['deals_with_another_outcome']:,} end with another outcome",
        markup=False,
        soft_wrap=True,
    )
    examples = data["another_outcome_examples"][:3]
    if examples:
        named = ", ".join(
            f"{e['deal_id']} {e['baseline']} -> {e['candidate']}" for e in examples
        )
        console.print(
            f"           for example {named} (--json lists {EXAMPLES})",
            markup=False,
            soft_wrap=True,
        )
    console.print(
        f"As of:     {data['as_of'] or 'n/a'} (stalled count)",
        markup=False,
        soft_wrap=True,
    )

    console.print()
    console.print("Stage visits")
    stages = Table()
    stages.add_column("stage")
    stages.add_column("side")
    for name in ("entered", "advanced", "conversion", "median days", "p90 days"):
        stages.add_column(name, justify="right")
    for row in data["stages"]:
        for label, figures in (
            ("baseline", row["baseline"]),
            ("candidate", row["candidate"]),
        ):
            cells = ["", "", "", "", ""]
            if figures is not None:
                cells = [
                    _count(figures["entered"]),
                    _count(figures["advanced"]),
                    _percent(figures["conversion"]),
                    _days(figures["median_days"]),
                    _days(figures["p90_days"]),
                ]
            stages.add_row(row["stage"] if label == "baseline" else "", label, *cells)
        change = row["difference"]
        cells = ["", "", "", "", ""]
        if change is not None:
            cells = [
                _signed_count(change["entered"]),
                _signed_count(change["advanced"]),
                _points(change["conversion"]),
                _signed_days(change["median_days"]),
                _signed_days(change["p90_days"]),
            ]
        stages.add_row("", "difference", *cells, end_section=True)
    console.print(stages)

    overall = data["overall"]
    before, after, change = (
        overall["baseline"],
        overall["candidate"],
        overall["difference"],
    )
    console.print()
    console.print("Overall")
    table = Table()
    table.add_column("metric")
    for name in ("baseline", "candidate", "difference"):
        table.add_column(name, justify="right")
    rows: list[tuple[str, str, Callable[[Any], str], Callable[[Any], str]]] = [
        ("deals", "deals", _count, _signed_count),
        ("won", "won", _count, _signed_count),
        ("lost", "lost", _count, _signed_count),
        ("disqualified", "disqualified", _count, _signed_count),
        ("open", "open", _count, _signed_count),
        ("win rate, won / (won + lost)", "win_rate", _percent, _points),
        ("cycle length, mean days", "cycle_mean_days", _days, _signed_days),
        ("cycle length, median days", "cycle_median_days", _days, _signed_days),
        ("stalled", "stalled", _count, _signed_count),
    ]
    for label, key, plain, signed in rows:
        table.add_row(label, plain(before[key]), plain(after[key]), signed(change[key]))
    console.print(table)


# -- export and import -----------------------------------------------------------


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from .eventlog import EventLog
    from .transfer import export

    if args.from_position < 1:
        raise ValueError(
            f"--from-position: must be 1 or more, not {args.from_position}"
        )
    if args.to_position is not None and args.to_position < args.from_position:
        raise ValueError(
            f"--to-position: must be at least --from-position ({args.from_position}), "
            f"not {args.to_position}"
        )
    engine = _open_engine(settings)
    to_stdout = args.out == "-"
    target = Path(args.out)
    partial = target.with_name(target.name + ".partial")
    try:
        with (
            _open_out(to_stdout, partial) as out,
            _progress("exporting", "positions") as report,
        ):
            summary = export(
                EventLog(engine),
                out,
                from_position=args.from_position,
                to_position=args.to_position,
                deal_ids=args.deals,
                report=report,
            )
    except BaseException:
        if not to_stdout:
            partial.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    if not to_stdout:
        # Written under another name first: a crash never leaves a half
        # file under the name asked for.
        partial.replace(target)

    where = "stdout" if to_stdout else str(target)
    span = (
        f"positions {summary.first_position} to {summary.last_position}"
        if summary.events
        else "no events"
    )
    console = _err() if to_stdout else _out()
    console.print(
        f"exported {summary.events:,} events ({span}; log head "
        f"{summary.head_position}) to {where} in {summary.seconds:.1f} s",
        markup=False,
        soft_wrap=True,
    )
    return 0


@contextmanager
def _open_out(to_stdout: bool, path: Path) -> Iterator[TextIO]:
    if to_stdout:
        yield sys.stdout
        sys.stdout.flush()
        return
    with path.open("w", encoding="utf-8") as out:
        yield out


def _import(args: argparse.Namespace, settings: Settings) -> int:
    from .service import Service
    from .transfer import import_events

    if not 1 <= args.batch_size <= settings.batch_max_events:
        raise ValueError(
            f"--batch-size: must be 1 to {settings.batch_max_events} "
            f"(PROGRESSION_BATCH_MAX_EVENTS), not {args.batch_size}"
        )
    source, total = _open_in(args.file)
    service = Service.start(settings)
    try:
        with source, _progress("importing", "bytes") as report:
            summary = import_events(
                service.ingestion,
                source,
                batch_size=args.batch_size,
                total_bytes=total,
                report=report,
            )
    finally:
        service.engine.dispose()

    where = "stdin" if args.file == "-" else args.file
    console = _out()
    console.print(
        f"imported {where}: {summary.lines:,} lines, {summary.inputs:,} inputs "
        f"in {summary.seconds:.1f} s",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"  created {summary.created:,}, duplicate {summary.duplicate:,}, "
        f"conflict {summary.conflict:,}, invalid {summary.invalid:,}",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"  stage.changed lines skipped {summary.decisions_skipped:,}; stage "
        f"changes decided here for the created inputs {summary.decisions_made:,}",
        markup=False,
        soft_wrap=True,
    )
    for problem in summary.problems:
        console.print(
            f"  line {problem.line}: {problem.status} "
            f"{problem.event_id or '(no event_id)'}: {problem.detail}",
            markup=False,
            soft_wrap=True,
        )
    refused = summary.conflict + summary.invalid
    if refused > len(summary.problems):
        console.print(
            f"  ... {refused - len(summary.problems):,} more in the log",
            markup=False,
            soft_wrap=True,
        )
    return 0 if summary.complete else EXIT_INCOMPLETE


def _open_in(name: str) -> tuple[BinaryIO, int | None]:
    """The file's bytes and its size, or stdin's (size unknown)."""
    if name == "-":
        return sys.stdin.buffer, None
    path = Path(name)
    return path.open("rb"), path.stat().st_size


# -- generate --------------------------------------------------------------------


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from .history import generate

    if args.deals < 0:
        raise ValueError(f"--deals: must be 0 or more, not {args.deals}")
    started = time.perf_counter()
    count = 0
    write = sys.stdout.write
    for envelope in generate(args.deals, args.seed):
        write(json.dumps(envelope, separators=(",", ":")) + "\n")
        count += 1
    sys.stdout.flush()
    log.info(
        "history generated deals=%d seed=%d events=%d seconds=%.2f",
        args.deals,
        args.seed,
        count,
        time.perf_counter() - started,
    )
    return 0


# -- replay ----------------------------------------------------------------------

# The option of `progression replay` behind each field of a ReplayRange.
_REPLAY_OPTIONS = {
    "topic": "--to-topic",
    "from_position": "--from-position",
    "to_position": "--to-position",
    "deal_ids": "--deal",
}


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from .db import migrate
    from .replay import ReplayFailed, ReplayRange, ReplayRefused, replay

    try:
        wanted = ReplayRange(
            args.to_topic, args.from_position, args.to_position, tuple(args.deals)
        )
    except ReplayRefused as exc:
        raise ValueError(_replay_option(exc)) from None
    engine = _open_engine(settings)
    stop = threading.Event()
    signalled: list[int] = []
    try:
        migrate(engine)  # replay_progress may be newer than the log's schema
        with (
            _stop_on_signals(stop, signalled),
            _progress("replaying", "events") as report,
        ):
            summary = replay(
                engine,
                settings,
                wanted,
                restart=args.restart,
                stop=stop,
                report=report,
            )
    except ReplayRefused as exc:
        raise ValueError(_replay_option(exc)) from None
    except ReplayFailed as exc:
        _show_replay(exc.summary)
        _err().print(
            f"progression replay: gave up: {exc}; run the same command again to resume",
            markup=False,
            soft_wrap=True,
        )
        return EXIT_INCOMPLETE
    finally:
        engine.dispose()

    _show_replay(summary)
    if signalled and not summary.complete:
        return 128 + signalled[0]
    return 0


def _replay_option(refused: ReplayRefused) -> str:
    option = _REPLAY_OPTIONS.get(refused.argument, refused.argument)
    return f"{option}: {refused.rule}"


@contextmanager
def _stop_on_signals(stop: threading.Event, signalled: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop`; a second one does what it did before."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {
        signum: signal.getsignal(signum) or signal.SIG_DFL
        for signum in (signal.SIGINT, signal.SIGTERM)
    }

    def request_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum)
        log.info("replay stop requested signal=%s", name.name)
        signalled.append(signum)
        stop.set()
        signal.signal(name, previous[name])

    for signum in previous:
        signal.signal(signum, request_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _show_replay(summary: ReplaySummary) -> None:
    console = _out()
    deals = ""
    if summary.deal_ids:
        noun = "deal" if len(summary.deal_ids) == 1 else "deals"
        deals = f" of {noun} {', '.join(summary.deal_ids)}"
    span = f"positions {summary.from_position:,} to {summary.to_position:,}{deals}"
    if summary.already_complete:
        console.print(
            f"published 0 events to {summary.topic}: replay {summary.replay_id} "
            f"was already complete ({summary.published:,} events, {span}); "
            "--restart publishes them again",
            markup=False,
            soft_wrap=True,
        )
        return
    sent = (
        f"positions {summary.first_position:,} to {summary.last_position:,}"
        if summary.first_position is not None and summary.last_position is not None
        else "no positions"
    )
    rate = summary.events_per_s
    console.print(
        f"published {summary.events:,} events to {summary.topic} ({sent}) in "
        f"{summary.seconds:.1f} s, {0 if rate is None else rate:,.0f} events/s",
        markup=False,
        soft_wrap=True,
    )
    resumed = (
        ""
        if summary.resumed_after is None
        else f", resumed after position {summary.resumed_after:,}"
    )
    if summary.complete:
        state = (
            f"complete{resumed}: all {summary.total:,} events of {span} are on the "
            "topic"
        )
    else:
        state = (
            f"stopped at position {summary.position:,}{resumed}: "
            f"{summary.published:,} of the {summary.total:,} events of {span} are "
            "on the topic; run the same command again to resume (--restart "
            "starts over)"
        )
    console.print(f"replay {summary.replay_id} {state}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
