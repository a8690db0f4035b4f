"""The recorded event envelope and the event data the projection reads.

The contract is the JSON Schema under `schemas/`. The progression service
validates every event fully before it records it; this module checks the
envelope and, for the types the read models use, the data fields they read,
so that an event the projection cannot make sense of is parked with a clear
reason instead of corrupting a read model. Other data fields are not checked
here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from metrics.errors import EventRejected
from metrics.upcasting import UnknownSchemaVersion, upcast

__all__ = [
    "EVENT_TYPES",
    "DealCreated",
    "DealUpdated",
    "Envelope",
    "StageChanged",
    "amount_micros",
    "parse_data",
    "parse_envelope",
    "to_micros",
]

EVENT_TYPES = frozenset(
    {
        "deal.created",
        "deal.updated",
        "deal.lost",
        "stage.overridden",
        "stage.changed",
        "discovery_call.agreed",
        "pain.shared",
        "stakeholder.invited",
        "proposal.requested",
        "procurement.introduced",
        "contract.signed",
        "qualification.updated",
        "next_step.confirmed",
        "value.agreed",
        "decision_process.mapped",
        "disqualifier.identified",
        "email.sent",
        "email.opened",
        "email.replied",
        "link.clicked",
        "content.downloaded",
        "meeting.booked",
        "meeting.held",
        "meeting.no_show",
    }
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)
_MAX_AMOUNT = Decimal(10) ** 12

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch, the unit every read model stores."""
    return (moment - _EPOCH) // _ONE_MICROSECOND


class Envelope(BaseModel):
    """A recorded event as the progression service publishes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Identifier
    type: str = Field(min_length=1, max_length=64)
    deal_id: Identifier
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime | None = None
    source: str | None = None
    actor: str | None = None
    data: dict[str, Any]
    schema_version: int = Field(default=1, ge=1)
    position: int = Field(ge=1)
    stream_version: int = Field(ge=1)


Amount = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Currency = Annotated[str, Field(min_length=1, max_length=16)]
Owner = Annotated[str, Field(min_length=1, max_length=200)]
StageKey = Annotated[str, Field(min_length=1, max_length=64)]


class DealCreated(BaseModel):
    model_config = ConfigDict(extra="ignore")

    process: StageKey = "b2b-default"
    owner: Owner
    amount: Amount | None = None
    currency: Currency | None = None


class DealUpdated(BaseModel):
    model_config = ConfigDict(extra="ignore")

    owner: Owner | None = None
    amount: Amount | None = None
    currency: Currency | None = None


class StageChanged(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    from_: StageKey | None = Field(alias="from")
    to: StageKey
    cause: Literal["created", "criteria", "disqualified", "lost", "override"]
    effective_at: AwareDatetime
    reason: Annotated[str, Field(max_length=500)] | None = None
    process: StageKey
    process_version: int = Field(ge=1)


_DATA_MODELS: dict[str, type[BaseModel]] = {
    "deal.created": DealCreated,
    "deal.updated": DealUpdated,
    "stage.changed": StageChanged,
}


def _explain(error: ValidationError, prefix: str) -> str:
    problems = []
    for problem in error.errors()[:3]:
        pointer = prefix + "/" + "/".join(str(part) for part in problem["loc"])
        problems.append(f"{pointer}: {problem['msg']}")
    return "; ".join(problems)


def parse_envelope(raw: bytes | str | dict[str, Any]) -> Envelope:
    """Validate a recorded envelope, or raise `EventRejected` saying why.

    The type is not checked here: an event of an unknown type still belongs
    to its deal's stream, so it is rejected after the stream-version check
    (a second delivery of it is then skipped, not parked again)."""
    try:
        if isinstance(raw, dict):
            envelope = Envelope.model_validate(raw)
        else:
            envelope = Envelope.model_validate_json(raw)
    except ValidationError as error:
        raise EventRejected(
            "envelope breaks its schema: " + _explain(error, "")
        ) from None
    return envelope


def parse_data(envelope: Envelope) -> BaseModel | None:
    """The event's data as the projection reads it; None for the types whose
    data no read model uses. An unknown type raises `EventRejected`."""
    if envelope.type not in EVENT_TYPES:
        raise EventRejected(f"unknown event type={envelope.type!r}")
    try:
        data = upcast(envelope.type, envelope.schema_version, envelope.data)
    except UnknownSchemaVersion as error:
        raise EventRejected(str(error)) from None
    model = _DATA_MODELS.get(envelope.type)
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise EventRejected(
            f"data of type={envelope.type} breaks its schema: "
            + _explain(error, "/data")
        ) from None


def amount_micros(amount: float | None) -> int | None:
    """An amount in millionths of its currency unit, stored as an integer so
    that sums are exact and the same on every database."""
    if amount is None:
        return None
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise EventRejected(f"amount={amount!r} is not a number") from None
    if abs(value) > _MAX_AMOUNT:
        raise EventRejected(f"amount={amount!r} is larger than {_MAX_AMOUNT}")
    return int((value * 1_000_000).to_integral_value())
