"""`metrics rebuild`: the progress bar, the summary and the exit status.

The progress bar goes to stderr when it is a terminal (otherwise the log
says how far the rebuild got every 10 seconds); the summary goes to stdout,
as a table or, with `--json`, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import Any

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

from metrics.rebuild import (
    SWITCHED,
    Rebuild,
    RebuildProgress,
    RebuildRefused,
    RebuildSummary,
    abandon,
)
from metrics.settings import Settings

__all__ = ["EXIT_INTERRUPTED", "EXIT_REFUSED", "rebuild_command"]

logger = logging.getLogger(__name__)

EXIT_REFUSED = 2  # another rebuild runs, or a different one is in progress
EXIT_INTERRUPTED = 130  # stopped before the switch: run again to resume


class _RateColumn(ProgressColumn):
    """Offsets or positions per second, from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = "? /s" if speed is None else f"{speed:,.0f}/s"
        return Text(text, style="progress.data.speed")


def _summary_dict(summary: RebuildSummary) -> dict[str, Any]:
    progress = summary.progress
    return {
        "rebuild_id": summary.rebuild_id,
        "source": summary.source,
        "state": summary.state,
        "runs": summary.runs,
        "started_from": summary.started_from,
        "done": progress.done,
        "total": progress.total,
        "events_applied": progress.events_applied,
        "last_position": progress.last_position,
        "seconds": round(summary.seconds, 3),
        "events_this_run": summary.events_this_run,
        "events_per_s": round(summary.events_per_s, 1),
    }


def _print_summary(console: Console, summary: RebuildSummary) -> None:
    table = Table(
        title=f"rebuild {summary.rebuild_id} from "
        + ("Kafka" if summary.source == "kafka" else "the feed"),
        show_header=False,
    )
    table.add_column("")
    table.add_column("", justify="right")
    progress = summary.progress
    state = (
        "switched: the API serves the rebuilt read models"
        if summary.state == SWITCHED
        else "stopped before the switch: run the same command to resume"
    )
    table.add_row("state", state)
    table.add_row("run", f"{summary.runs}" + (" (resumed)" if summary.runs > 1 else ""))
    table.add_row("events applied", f"{progress.events_applied:,}")
    table.add_row("of which in this run", f"{summary.events_this_run:,}")
    table.add_row("last position", f"{progress.last_position or 0:,}")
    table.add_row("seconds", f"{summary.seconds:,.1f}")
    table.add_row("events/s in this run", f"{summary.events_per_s:,.0f}")
    console.print(table)


def rebuild_command(
    settings: Settings, arguments: argparse.Namespace, stop: threading.Event
) -> int:
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if arguments.abandon:
        try:
            given_up = abandon(settings)
        except RebuildRefused as refused:
            err.print(f"metrics rebuild: {refused}", markup=False)
            return EXIT_REFUSED
        if arguments.json:
            out.print_json(json.dumps({"abandoned": given_up}))
        elif given_up is None:
            out.print("no rebuild was in progress")
        else:
            out.print(f"rebuild {given_up} abandoned; the read models are unchanged")
        return 0

    unit = "offsets" if arguments.source == "kafka" else "positions"
    bar = Progress(
        TextColumn("rebuild"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )
    with bar:
        task = bar.add_task("rebuild", total=None)

        def report(progress: RebuildProgress) -> None:
            bar.update(task, completed=progress.done, total=progress.total)

        try:
            summary = Rebuild(
                settings,
                arguments.source,
                restart=arguments.restart,
                report=report,
            ).run(stop)
        except RebuildRefused as refused:
            err.print(f"metrics rebuild: {refused}", markup=False)
            return EXIT_REFUSED
    if arguments.json:
        out.print_json(json.dumps(_summary_dict(summary)))
    else:
        _print_summary(out, summary)
    return 0 if summary.state == SWITCHED else EXIT_INTERRUPTED
