"""What-if on the real past: recorded inputs decided again under another process.

A team that changes its process wants to know what the change would have
done to the deals it already has. `simulate` reads the selected deals from
the event log, takes their inputs (never the recorded `stage.changed`) and
feeds them, in their recorded arrival order, through the decision engine
exactly as ingestion does: each input appended to an in-memory stream, the
engine asked what is due, its decisions appended before the next input. It
does this twice, once under the candidate process and once under the
baseline, and writes nothing anywhere.

The figures follow the project's metric definitions (`docs/metrics.md`),
computed over the decisions each side made. The metrics service has its own
implementation over its read models; the services share no code.

Reading and deciding run in chunks of deals. With `workers` above 1 the
chunks go to worker processes, each reading its deals through its own
connection to the same database; the figures are the same either way.
"""

from __future__ import annotations

__all__ = [
    "EXAMPLES",
    "MEDIAN",
    "P90",
    "DealFilter",
    "SimulationError",
    "SimulationResult",
    "parse_moment",
    "percentile",
    "redecide",
    "simulate",
]

import logging
import multiprocessing
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

from .criteria import DealFacts
from .db import create_engine
from .decision import STAGE_CHANGED, Decision, StreamEvent, decide, process_ref
from .errors import ProgressionError, UnknownDeal
from .eventlog import DealSummary, EventLog, RecordedEvent
from .ingestion import stream_events
from .process import TERMINAL, Process, ProcessCatalog

log = logging.getLogger(__name__)

MEDIAN = Fraction(1, 2)
P90 = Fraction(9, 10)
SECONDS_PER_DAY = 86_400
DEALS_PER_PAGE = 1000  # deals listed per query
DEALS_PER_CHUNK = 200  # deals read and decided together
EXAMPLES = 20  # deals with another outcome named in a result, by deal id

# Called with the events read so far and the events to read in all.
Report = Callable[[int, int], None]


class SimulationError(ProgressionError):
    """A simulation could not be run; the message says why."""


# -- choosing the deals ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DealFilter:
    """Which deals a simulation replays; every given condition must hold.

    `process` is the process a deal is recorded under now; `owner` its
    current owner; the creation times compare the `occurred_at` of its
    `deal.created`, `created_from` inclusive and `created_to` exclusive.
    Deals whose `deal.created` has not arrived are never selected.
    """

    deal_ids: tuple[str, ...] = ()
    owner: str | None = None
    process: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def admits(self, deal: DealSummary) -> bool:
        if deal.created_at is None:
            return False
        if self.owner is not None and deal.owner != self.owner:
            return False
        if self.process is not None and deal.process != self.process:
            return False
        if self.created_from is not None and deal.created_at < self.created_from:
            return False
        return self.created_to is None or deal.created_at < self.created_to

    def data(self) -> dict[str, Any]:
        return {
            "deal_ids": list(self.deal_ids),
            "owner": self.owner,
            "process": self.process,
            "created_from": _iso(self.created_from),
            "created_to": _iso(self.created_to),
        }


def parse_moment(name: str, text: str, *, end_of_day: bool = False) -> datetime:
    """An RFC 3339 time with an offset, or a date (YYYY-MM-DD) in UTC.

    A date means the start of that day, or with `end_of_day` the start of
    the next one, so that an exclusive bound on a date includes the day.
    Raises ValueError naming `name` and the rule.
    """
    if len(text) == 10:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a date (YYYY-MM-DD)") from None
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return moment + timedelta(days=1) if end_of_day else moment
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name}: {text!r} is neither an RFC 3339 time nor a date (YYYY-MM-DD)"
        ) from None
    if moment.utcoffset() is None:
        raise ValueError(f"{name}: {text!r} needs an offset (Z or +hh:mm)")
    return moment.astimezone(UTC)


def _selected(log_: EventLog, selection: DealFilter) -> Iterator[DealSummary]:
    if selection.deal_ids:
        for deal_id in dict.fromkeys(selection.deal_ids):
            deal = log_.deal(deal_id)
            if deal is None:
                raise UnknownDeal(deal_id)
            if selection.admits(deal):
                yield deal
        return
    after: str | None = None
    while True:
        page = log_.deals(
            owner=selection.owner,
            process=selection.process,
            after=after,
            limit=DEALS_PER_PAGE,
        )
        yield from (deal for deal in page if selection.admits(deal))
        if len(page) < DEALS_PER_PAGE:
            return
        after = page[-1].deal_id


# -- deciding again --------------------------------------------------------------


def redecide(inputs: Sequence[StreamEvent], process: Process) -> list[Decision]:
    """The decisions `process` makes over these inputs, fed as ingestion does.

    The inputs come in their arrival order. After each one the engine is
    asked what is due, and its decisions join the stream before the next
    input, so later decisions see earlier ones, as they did when recorded.
    The process replaces the one the deal's `deal.created` names.
    """
    stream: list[StreamEvent] = []
    facts = DealFacts()  # the inputs' facts, kept up to date as ingestion does
    decisions: list[Decision] = []
    for item in inputs:
        arrived = StreamEvent(
            item.event_id, item.type, item.occurred_at, item.data, len(stream) + 1
        )
        stream.append(arrived)
        facts.insert(arrived.as_fact())
        for decision in decide(stream, process, facts):
            decisions.append(decision)
            stream.append(
                StreamEvent(
                    f"simulated:{len(stream) + 1}",
                    STAGE_CHANGED,
                    decision.effective_at,
                    decision.data(),
                    len(stream) + 1,
                )
            )
    return decisions


def _days(delta: timedelta) -> float:
    return delta.total_seconds() / SECONDS_PER_DAY


@dataclass(slots=True)
class _StageTally:
    entered: int = 0
    advanced: int = 0
    dropped: int = 0
    days: list[float] = field(default_factory=list)  # of the visits that advanced

    def merge(self, other: _StageTally) -> None:
        self.entered += other.entered
        self.advanced += other.advanced
        self.dropped += other.dropped
        self.days.extend(other.days)


@dataclass(slots=True)
class _Tally:
    """What one side's decisions add up to over the deals seen so far."""

    stages: dict[str, _StageTally] = field(
        default_factory=lambda: defaultdict(_StageTally)
    )
    outcomes: Counter[str] = field(default_factory=Counter)
    cycle_days: list[float] = field(default_factory=list)
    # Open deals: when they entered their current stage, its expected days.
    open_deals: list[tuple[datetime, float]] = field(default_factory=list)
    processes: Counter[tuple[str, int]] = field(default_factory=Counter)

    def add(self, decisions: Sequence[Decision], process: Process) -> str | None:
        """Count one deal's visits and outcome; its outcome (won, lost,
        disqualified or open)."""
        if not decisions:
            return None
        self.processes[(process.key, process.version)] += 1
        visit: tuple[str, datetime] | None = None
        created_at: datetime | None = None
        won_at: datetime | None = None
        for decision in decisions:
            if decision.cause == "created" and created_at is None:
                created_at = decision.effective_at
            to = decision.to
            if visit is not None:
                stage, entered_at = visit
                later = to == "won" or (
                    process.has_stage(to)
                    and process.order_of(to) > process.order_of(stage)
                )
                if later:
                    self.stages[stage].advanced += 1
                    self.stages[stage].days.append(
                        _days(decision.effective_at - entered_at)
                    )
                elif to in ("lost", "disqualified"):
                    self.stages[stage].dropped += 1
                # else moved back: neither advanced nor dropped
            if to in TERMINAL:
                visit = None
                if to == "won":
                    won_at = decision.effective_at
            else:
                visit = (to, decision.effective_at)
                self.stages[to].entered += 1

        final = decisions[-1].to
        outcome = final if final in TERMINAL else "open"
        self.outcomes[outcome] += 1
        if final == "won" and won_at is not None and created_at is not None:
            self.cycle_days.append(_days(won_at - created_at))
        if visit is not None:
            stage, entered_at = visit
            self.open_deals.append((entered_at, process.stage(stage).expected_days))
        return outcome

    def merge(self, other: _Tally) -> None:
        for stage, tally in other.stages.items():
            self.stages[stage].merge(tally)
        self.outcomes.update(other.outcomes)
        self.cycle_days.extend(other.cycle_days)
        self.open_deals.extend(other.open_deals)
        self.processes.update(other.processes)


@dataclass(slots=True)
class _Partial:
    """The replay of some deals: both sides' tallies and what was read."""

    deals: int = 0
    events: int = 0
    inputs: int = 0
    latest: datetime | None = None
    another_outcome: int = 0
    # (deal_id, baseline outcome, candidate outcome), the first by deal id
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    baseline: _Tally = field(default_factory=_Tally)
    candidate: _Tally = field(default_factory=_Tally)

    def merge(self, other: _Partial) -> None:
        self.deals += other.deals
        self.events += other.events
        self.inputs += other.inputs
        if other.latest is not None and (
            self.latest is None or other.latest > self.latest
        ):
            self.latest = other.latest
        self.another_outcome += other.another_outcome
        self.examples = sorted(self.examples + other.examples)[:EXAMPLES]
        self.baseline.merge(other.baseline)
        self.candidate.merge(other.candidate)


@dataclass(frozen=True)
class _Replayer:
    """Reads chunks of deals and decides them on both sides."""

    log: EventLog
    catalog: ProcessCatalog
    candidate: Process
    baseline: str | None

    def replay(self, deal_ids: Sequence[str]) -> _Partial:
        partial = _Partial()
        fixed = self.catalog.current(self.baseline) if self.baseline else None
        streams = self.log.read_streams(deal_ids)
        for deal_id in deal_ids:
            recorded = sorted(streams.get(deal_id, ()), key=_stream_version)
            partial.events += len(recorded)
            baseline = fixed or self._recorded_process(recorded)
            if baseline is None:
                continue  # its deal.created is not there: nothing to decide
            inputs = stream_events([e for e in recorded if e.type != STAGE_CHANGED])
            partial.deals += 1
            partial.inputs += len(inputs)
            latest = max(e.occurred_at for e in inputs)
            if partial.latest is None or latest > partial.latest:
                partial.latest = latest
            before = partial.baseline.add(redecide(inputs, baseline), baseline)
            after = partial.candidate.add(
                redecide(inputs, self.candidate), self.candidate
            )
            if before != after and before is not None and after is not None:
                partial.another_outcome += 1
                partial.examples.append((deal_id, before, after))
        partial.examples = sorted(partial.examples)[:EXAMPLES]
        return partial

    def _recorded_process(self, recorded: Sequence[RecordedEvent]) -> Process | None:
        ref = process_ref(stream_events(recorded))
        if ref is None:
            return None
        key, version = ref
        if version is None:
            return self.catalog.current(key)
        return self.catalog.get(key, version)


def _stream_version(event: RecordedEvent) -> int:
    return event.stream_version


# The replayer of a worker process, set up once by `_start_worker`.
_worker: _Replayer | None = None


def _start_worker(
    database_url: str,
    catalog: ProcessCatalog,
    candidate: Process,
    baseline: str | None,
) -> None:
    global _worker
    _worker = _Replayer(
        EventLog(create_engine(database_url)), catalog, candidate, baseline
    )


def _portable(catalog: ProcessCatalog) -> ProcessCatalog:
    """The catalog's versions in a catalog a worker process can receive.

    A version recorded by another replica after this copy was made is not
    in it; a worker that meets one fails the simulation, naming it.
    """
    portable = ProcessCatalog()
    for key in catalog.process_keys():
        for process in catalog.versions(key):
            portable.add(process)
        portable.add(catalog.current(key), current=True)
    return portable


def _replay_in_worker(deal_ids: Sequence[str]) -> _Partial:
    assert _worker is not None
    try:
        return _worker.replay(deal_ids)
    except ProgressionError as exc:
        # Our errors' constructors take ids, not a message: send the message.
        raise SimulationError(str(exc)) from None


# -- figures ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: Fraction) -> float | None:
    """Linear interpolation between the closest ranks (NumPy's default).

    For n sorted values, h = (n - 1) q and the answer is v[floor h] +
    (h - floor h) (v[floor h + 1] - v[floor h]). None for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    low = h.numerator // h.denominator
    fraction = float(h - low)
    if not fraction:
        return ordered[low]
    return ordered[low] + fraction * (ordered[low + 1] - ordered[low])


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True, slots=True)
class StageFigures:
    entered: int
    advanced: int
    dropped: int
    conversion: float | None
    median_days: float | None
    p90_days: float | None


@dataclass(frozen=True, slots=True)
class OverallFigures:
    deals: int
    won: int
    lost: int
    disqualified: int
    open: int
    win_rate: float | None
    cycle_mean_days: float | None
    cycle_median_days: float | None
    stalled: int


def _stage_figures(tally: _StageTally) -> StageFigures:
    return StageFigures(
        entered=tally.entered,
        advanced=tally.advanced,
        dropped=tally.dropped,
        conversion=_ratio(tally.advanced, tally.entered),
        median_days=percentile(tally.days, MEDIAN),
        p90_days=percentile(tally.days, P90),
    )


def _overall(tally: _Tally, as_of: datetime | None) -> OverallFigures:
    won, lost = tally.outcomes["won"], tally.outcomes["lost"]
    stalled = 0
    if as_of is not None:
        stalled = sum(
            1
            for entered_at, expected in tally.open_deals
            if _days(as_of - entered_at) > expected
        )
    return OverallFigures(
        deals=sum(tally.outcomes.values()),
        won=won,
        lost=lost,
        disqualified=tally.outcomes["disqualified"],
        open=tally.outcomes["open"],
        win_rate=_ratio(won, won + lost),
        cycle_mean_days=_mean(tally.cycle_days),
        cycle_median_days=percentile(tally.cycle_days, MEDIAN),
        stalled=stalled,
    )


def _difference(before: Any, after: Any) -> dict[str, Any] | None:
    """Candidate minus baseline, field by field; None where either is None."""
    if before is None or after is None:
        return None
    difference: dict[str, Any] = {}
    for item in fields(before):
        b, a = getattr(before, item.name), getattr(after, item.name)
        difference[item.name] = None if b is None or a is None else a - b
    return difference


def _row_order(baseline: Sequence[Process], candidate: Process) -> list[str]:
    """The baseline's stages in order, with each stage only the candidate has
    placed after the candidate stage before it; one with none before it goes
    before the first stage the two share, or else after all the rest."""
    order: list[str] = []
    for process in baseline:
        order.extend(s.key for s in process.stages if s.key not in order)
    shared = [s.key for s in candidate.stages if s.key in order]
    previous: str | None = None
    for stage in candidate.stages:
        if stage.key not in order:
            if previous is not None:
                index = order.index(previous) + 1
            else:
                index = order.index(shared[0]) if shared else len(order)
            order.insert(index, stage.key)
        previous = stage.key
    return order


@dataclass(frozen=True)
class StageRow:
    stage: str
    baseline: StageFigures | None  # None: no baseline process has the stage
    candidate: StageFigures | None

    @property
    def difference(self) -> dict[str, Any] | None:
        return _difference(self.baseline, self.candidate)


@dataclass(frozen=True)
class SimulationResult:
    candidate: Process
    candidate_source: str
    baseline_key: str | None  # None: each deal's recorded process
    baseline_processes: tuple[tuple[str, int, int], ...]  # key, version, deals
    selection: DealFilter
    as_of: datetime | None
    deals: int
    events: int
    inputs: int
    another_outcome: int
    examples: tuple[tuple[str, str, str], ...]
    stages: tuple[StageRow, ...]
    baseline_overall: OverallFigures
    candidate_overall: OverallFigures
    seconds: float

    @property
    def baseline_description(self) -> str:
        used = ", ".join(
            f"{key} v{version} ({deals:,} deals)"
            for key, version, deals in self.baseline_processes
        )
        if self.baseline_key is None:
            return "each deal's recorded process" + (f": {used}" if used else "")
        version = self.baseline_processes[0][1] if self.baseline_processes else "?"
        return f"{self.baseline_key} v{version}, its current version, for every deal"

    def data(self) -> dict[str, Any]:
        """The result as JSON-ready data: the CLI's --json and the API's answer."""
        return {
            "candidate": {
                "process": self.candidate.key,
                "version": self.candidate.version,
                "source": self.candidate_source,
            },
            "baseline": {
                "process": self.baseline_key,
                "description": self.baseline_description,
                "processes": [
                    {"process": key, "version": version, "deals": deals}
                    for key, version, deals in self.baseline_processes
                ],
            },
            "filters": self.selection.data(),
            "as_of": _iso(self.as_of),
            "deals": self.deals,
            "events_read": self.events,
            "inputs_replayed": self.inputs,
            "deals_with_another_outcome": self.another_outcome,
            "another_outcome_examples": [
                {"deal_id": deal_id, "baseline": before, "candidate": after}
                for deal_id, before, after in self.examples
            ],
            "stages": [
                {
                    "stage": row.stage,
                    "baseline": _figures(row.baseline),
                    "candidate": _figures(row.candidate),
                    "difference": _rounded(row.difference),
                }
                for row in self.stages
            ],
            "overall": {
                "baseline": _figures(self.baseline_overall),
                "candidate": _figures(self.candidate_overall),
                "difference": _rounded(
                    _difference(self.baseline_overall, self.candidate_overall)
                ),
            },
        }


def _rounded(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _figures(figures: Any) -> dict[str, Any] | None:
    if figures is None:
        return None
    return _rounded(
        {item.name: getattr(figures, item.name) for item in fields(figures)}
    )


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


# -- running a simulation --------------------------------------------------------


def simulate(
    log_: EventLog,
    catalog: ProcessCatalog,
    candidate: Process,
    *,
    candidate_source: str,
    baseline: str | None = None,
    selection: DealFilter | None = None,
    as_of: datetime | None = None,
    report: Report | None = None,
    workers: int = 1,
    database_url: str | None = None,
) -> SimulationResult:
    """Replay the selected deals under `candidate` and under the baseline.

    The baseline is the current version of the process `baseline` names,
    or, without one, each deal's recorded process version. `as_of` dates
    the stalled count; by default the latest `occurred_at` of the inputs
    replayed, so that the same history always gives the same figures.
    `workers` above 1 needs `database_url`, which the workers connect to.
    """
    started = time.perf_counter()
    selection = selection or DealFilter()
    fixed = catalog.current(baseline) if baseline else None

    deals = [(d.deal_id, d.version) for d in _selected(log_, selection)]
    total = sum(version for _, version in deals)
    chunks = [
        [deal_id for deal_id, _ in deals[i : i + DEALS_PER_CHUNK]]
        for i in range(0, len(deals), DEALS_PER_CHUNK)
    ]
    if report is not None:
        report(0, total)

    merged = _Partial()
    replayer = _Replayer(log_, catalog, candidate, baseline)
    spread = workers > 1 and len(chunks) > 1 and database_url is not None
    workers = min(workers, len(chunks)) if spread else 1
    if spread:
        assert database_url is not None
        # Spawned, not forked: the caller may run threads (a progress bar,
        # a web server) whose locks a forked child would inherit.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(database_url, _portable(catalog), candidate, baseline),
        ) as pool:
            futures = [pool.submit(_replay_in_worker, chunk) for chunk in chunks]
            for future in as_completed(futures):
                merged.merge(future.result())
                if report is not None:
                    report(merged.events, max(total, merged.events))
    else:
        for chunk in chunks:
            merged.merge(replayer.replay(chunk))
            if report is not None:
                report(merged.events, max(total, merged.events))

    as_of = as_of or merged.latest
    used = sorted(merged.baseline.processes.items())
    baseline_processes = [catalog.get(key, version) for (key, version), _ in used]
    if fixed is not None and not baseline_processes:
        baseline_processes = [fixed]
    baseline_stages = {s.key for p in baseline_processes for s in p.stages}
    candidate_stages = {s.key for s in candidate.stages}
    rows = tuple(
        StageRow(
            stage,
            _stage_figures(merged.baseline.stages.get(stage, _StageTally()))
            if stage in baseline_stages
            else None,
            _stage_figures(merged.candidate.stages.get(stage, _StageTally()))
            if stage in candidate_stages
            else None,
        )
        for stage in _row_order(baseline_processes, candidate)
    )
    result = SimulationResult(
        candidate=candidate,
        candidate_source=candidate_source,
        baseline_key=baseline,
        baseline_processes=tuple(
            (key, version, count) for (key, version), count in used
        )
        or (((fixed.key, fixed.version, 0),) if fixed is not None else ()),
        selection=selection,
        as_of=as_of,
        deals=merged.deals,
        events=merged.events,
        inputs=merged.inputs,
        another_outcome=merged.another_outcome,
        examples=tuple(merged.examples),
        stages=rows,
        baseline_overall=_overall(merged.baseline, as_of),
        candidate_overall=_overall(merged.candidate, as_of),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "simulation done candidate=%s version=%d baseline=%s deals=%d events=%d "
        "inputs=%d workers=%d seconds=%.2f",
        candidate.key,
        candidate.version,
        baseline or "recorded",
        result.deals,
        result.events,
        result.inputs,
        workers,
        result.seconds,
    )
    return result
