"""`POST /v1/simulations`: the what-if of `progression simulate`, over HTTP.

The body carries the candidate process as a JSON object (the content of a
process file), and optionally the baseline's key, the deal filters and the
moment that dates the stalled count. The answer is the JSON of `progression
simulate --json`. Nothing is written. The replay runs in the request, in
one process: a large history is better simulated with the command, which
spreads it over worker processes.
"""

from __future__ import annotations

__all__ = ["simulation_router"]

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .errors import InvalidProcess, UnknownDeal, UnknownProcess, Violation
from .process import parse_process
from .security import Scope
from .service import Service
from .simulation import DealFilter, parse_moment, simulate

log = logging.getLogger(__name__)

Require = Callable[[Request, Scope], None]


class SimulationFilters(BaseModel):
    """Which deals to replay; every given condition must hold."""

    model_config = ConfigDict(extra="forbid")

    deal_ids: list[str] = Field(default_factory=list, max_length=10_000)
    owner: str | None = None
    process: str | None = None
    created_from: str | None = None
    created_to: str | None = None


class SimulationRequest(BaseModel):
    """A candidate process, the baseline to compare with, and the deals."""

    model_config = ConfigDict(extra="forbid")

    process: dict[str, Any]
    baseline: str | None = None
    filters: SimulationFilters = Field(default_factory=SimulationFilters)
    as_of: str | None = None


def simulation_router(service: Service, require: Require) -> APIRouter:
    """The router of `POST /v1/simulations`; `require` checks the token."""
    # Imported here: the API module includes this router while it loads.
    from .api import Problem

    router = APIRouter()

    def invalid(pointer: str, rule: str) -> Problem:
        return Problem(
            422,
            "invalid-simulation",
            "The simulation request is not valid",
            f"{pointer}: {rule}",
            [Violation(pointer, rule)],
        )

    def parsed(body: bytes) -> SimulationRequest:
        try:
            raw = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Problem(
                400,
                "malformed-json",
                "The body is not JSON",
                f"not JSON: {exc}",
                [Violation("", "must be a JSON document")],
            ) from exc
        try:
            return SimulationRequest.model_validate(raw)
        except ValidationError as exc:
            violations = [
                Violation("".join(f"/{part}" for part in e["loc"]), e["msg"])
                for e in exc.errors()
            ]
            raise Problem(
                422,
                "invalid-simulation",
                "The simulation request is not valid",
                "; ".join(str(v) for v in violations),
                violations,
            ) from exc

    def moment(pointer: str, text: str | None, *, end_of_day: bool = False) -> Any:
        if text is None:
            return None
        try:
            return parse_moment(pointer, text, end_of_day=end_of_day)
        except ValueError as exc:
            rule = str(exc).removeprefix(f"{pointer}: ")
            raise invalid(pointer, rule) from exc

    @router.post("/v1/simulations", tags=["simulations"])
    async def post_simulation(request: Request) -> Response:
        """Decide the recorded inputs again under a candidate process; compare."""
        require(request, Scope.OPS)
        body = parsed(await request.body())
        try:
            candidate = parse_process(
                body.process, service.contract.process_schema, "the request"
            )
        except InvalidProcess as exc:
            violations = [
                Violation(f"/process{v.pointer}", v.rule) for v in exc.violations
            ]
            raise Problem(
                422,
                "invalid-process",
                "The candidate process is not valid",
                "; ".join(str(v) for v in violations),
                violations,
            ) from exc
        filters = body.filters
        selection = DealFilter(
            deal_ids=tuple(filters.deal_ids),
            owner=filters.owner,
            process=filters.process,
            created_from=moment("/filters/created_from", filters.created_from),
            created_to=moment(
                "/filters/created_to", filters.created_to, end_of_day=True
            ),
        )
        as_of = moment("/as_of", body.as_of)
        if body.baseline is not None and not service.catalog.knows(body.baseline):
            known = ", ".join(service.catalog.process_keys())
            raise invalid("/baseline", f"no process {body.baseline!r}; known: {known}")

        try:
            result = await run_in_threadpool(
                simulate,
                service.log,
                service.catalog,
                candidate,
                candidate_source="request body",
                baseline=body.baseline,
                selection=selection,
                as_of=as_of,
            )
        except UnknownDeal as exc:
            index = filters.deal_ids.index(exc.deal_id)
            raise invalid(f"/filters/deal_ids/{index}", str(exc)) from exc
        except UnknownProcess as exc:
            raise Problem(404, "unknown-process", "No such process", str(exc)) from exc
        return JSONResponse(result.data())

    return router
