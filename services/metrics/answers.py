"""The shapes of the metrics API's answers (also its OpenAPI schemas)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "Duration",
    "FunnelAnswer",
    "FunnelFigures",
    "FunnelGroup",
    "FunnelStage",
    "OutcomesAnswer",
    "OutcomesFigures",
    "OutcomesGroup",
    "ParkedAnswer",
    "ParkedEvent",
    "ParkedEventDetail",
    "PartitionStatus",
    "PipelineAnswer",
    "PipelineFigures",
    "PipelineGroup",
    "ProjectorStatus",
    "RetriedEvent",
    "RetryAnswer",
    "RetryOutcome",
    "RetryRequest",
    "StageDuration",
    "StalledAnswer",
    "StalledDeal",
    "StalledFigures",
    "StalledGroup",
    "VelocityAnswer",
    "VelocityFigures",
    "VelocityGroup",
]


class FunnelStage(BaseModel):
    stage: str
    entered: int = Field(description="Visits of the stage.")
    advanced: int = Field(description="Visits left for a later stage or won.")
    dropped: int = Field(description="Visits left for lost or disqualified.")
    dropped_by_reason: dict[str, int]
    moved_back: int = Field(
        description="Visits left by an override to the same or an earlier stage."
    )
    open: int = Field(description="Deals now in the stage.")
    conversion: float | None = Field(description="advanced / entered.")
    closed_conversion: float | None = Field(
        description="advanced / (advanced + dropped)."
    )


class FunnelFigures(BaseModel):
    stages: list[FunnelStage]


class FunnelGroup(FunnelFigures):
    owner: str | None


class FunnelAnswer(FunnelFigures):
    process: str
    groups: list[FunnelGroup] | None = None


class Duration(BaseModel):
    count: int
    mean_days: float | None
    median_days: float | None


class StageDuration(Duration):
    stage: str
    p90_days: float | None


class VelocityFigures(BaseModel):
    stages: list[StageDuration]
    cycle_length: Duration
    time_to_first_meeting: Duration


class VelocityGroup(VelocityFigures):
    owner: str | None


class VelocityAnswer(VelocityFigures):
    groups: list[VelocityGroup] | None = None


class OutcomesFigures(BaseModel):
    won: int
    lost: int
    disqualified: int
    lost_by_reason: dict[str, int]
    disqualified_by_reason: dict[str, int]
    win_rate: float | None = Field(description="won / (won + lost).")
    meetings_held: int
    meetings_no_show: int
    meeting_show_rate: float | None = Field(
        description="meeting.held / (meeting.held + meeting.no_show)."
    )
    stage_changes: int = Field(description="Stage changes other than created.")
    criteria_changes: int = Field(description="Stage changes caused by criteria.")
    process_adherence: float | None = Field(
        description="criteria changes / stage changes other than created."
    )


class OutcomesGroup(OutcomesFigures):
    owner: str | None


class OutcomesAnswer(OutcomesFigures):
    groups: list[OutcomesGroup] | None = None


class PipelineFigures(BaseModel):
    open_deals: int
    open_amount: float = Field(description="Sum of the open deals' amounts.")
    weighted_pipeline: float = Field(
        description="Sum of amount x the current stage's win probability."
    )
    deals_without_amount: int = Field(
        description="Open deals without an amount; they count 0."
    )
    deals_without_probability: int = Field(
        description="Open deals in a stage no process file declares; they count 0."
    )
    currencies: list[str] = Field(
        description="Currencies of the open deals; amounts are not converted."
    )
    win_rate: float | None
    mean_won_amount: float | None
    mean_cycle_days: float | None
    pipeline_velocity: float | None = Field(
        description="open deals x win rate x mean won amount / mean cycle days, "
        "per day."
    )


class PipelineGroup(PipelineFigures):
    owner: str | None


class PipelineAnswer(PipelineFigures):
    groups: list[PipelineGroup] | None = None


class StalledDeal(BaseModel):
    deal_id: str
    owner: str | None
    process: str | None
    stage: str
    stage_entered_at: str
    age_days: float
    expected_days: float


class StalledFigures(BaseModel):
    as_of: str
    count: int = Field(description="All stalled deals, beyond the limit too.")
    deals: list[StalledDeal]


class StalledGroup(StalledFigures):
    owner: str | None


class StalledAnswer(StalledFigures):
    groups: list[StalledGroup] | None = None


class PartitionStatus(BaseModel):
    partition: int
    next_offset: int
    end_offset: int | None
    lag: int | None = Field(
        description="end offset - next offset; null when the broker cannot be asked."
    )
    last_position: int | None
    events_applied: int
    events_skipped: int
    events_parked: int
    updated_at: str


class RebuildStatus(BaseModel):
    id: int
    source: str = Field(description="kafka or feed: where the rebuild reads.")
    state: str = Field(
        description="building (or stopped part way: see updated_at), switched "
        "or abandoned."
    )
    started_at: str
    updated_at: str
    finished_at: str | None
    runs: int = Field(description="How many times it was started; > 1: resumed.")
    done: int = Field(description="Offsets (Kafka) or positions (feed) read.")
    total: int | None = Field(description="The end of the source when last seen.")
    fraction_done: float | None
    events_applied: int
    last_position: int | None


class ProjectorStatus(BaseModel):
    source: str | None = Field(description="kafka or feed: the source that wrote last.")
    topic: str | None
    partitions: list[PartitionStatus]
    feed_url: str | None
    last_position: int | None
    events_applied: int
    events_skipped: int
    parked: int
    updated_at: str | None
    rebuild: RebuildStatus | None = Field(
        default=None, description="The latest rebuild of the read models, if any."
    )


class ParkedEvent(BaseModel):
    id: int
    parked_at: str
    source: str
    topic: str | None
    partition: int | None
    offset: int | None
    position: int | None
    event_id: str | None
    deal_id: str | None
    type: str | None
    error: str
    raw: str
    stream_version: int | None = Field(
        default=None,
        description="The event's version in its deal's stream when its envelope "
        "was read: its deal counts it and holds its later events behind it. Null "
        "when the envelope could not be read, or it was parked before deals were "
        "held (migration 0004): it holds nothing back.",
    )


class ParkedAnswer(BaseModel):
    count: int
    events: list[ParkedEvent]
    next_after: int | None = Field(description="Pass as `after` for the next page.")


class ParkedEventDetail(ParkedEvent):
    held_behind: int | None = Field(
        description="The id of the earliest parked event of the same deal when "
        "that is another one: this one is retried only after it."
    )


RetryOutcome = Literal["applied", "parked", "held", "missing"]


class RetriedEvent(BaseModel):
    id: int
    outcome: RetryOutcome = Field(
        description="applied: retried, applied and no longer parked; parked: "
        "retried and failed again, still parked with the new error; held: not "
        "retried, an earlier parked event of its deal is still parked; missing: "
        "no such parked event (unknown, or another retry took it)."
    )
    deal_id: str | None
    position: int | None
    event_id: str | None
    type: str | None
    error: str | None = Field(description="Why it was not applied.")


class RetryAnswer(BaseModel):
    applied: int
    parked: int
    held: int
    missing: int
    events: list[RetriedEvent] = Field(description="In the order they were tried.")


class RetryRequest(BaseModel):
    all: bool | None = Field(
        default=None, description="Must be true: retry every parked event."
    )
    deal: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Only the events of this deal.",
    )
