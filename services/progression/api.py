"""The progression HTTP API: webhooks in, deals, history and the feed out.

Routes are thin: they authenticate, hand the work to the service, and map
the service's errors to RFC 9457 problem details. Every problem about a
field names it with a JSON pointer in `errors[].pointer`.
"""

from __future__ import annotations

__all__ = ["app_from_environment", "create_app"]

import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .deal import view_of
from .decision import evaluate, process_ref
from .errors import (
    DuplicateEventId,
    EventConflict,
    InvalidEvent,
    ProcessUnavailable,
    ProgressionError,
    StorageUnavailable,
    StreamConflict,
    UnknownProcess,
    Violation,
)
from .eventlog import DealSummary, RecordedEvent
from .ingestion import ItemResult, stream_events
from .process import Process
from .security import (
    AuthenticationError,
    BodySizeLimit,
    PermissionDenied,
    Scope,
    SignatureError,
    verify_webhook,
)
from .service import Service
from .simulation_api import simulation_router

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
PROBLEM_BASE = "https://dealledger.dev/problems/"
SOURCE_HEADER = "x-dealledger-source"


class Problem(Exception):
    """An answer that is an RFC 9457 problem."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        errors: Sequence[Violation] = (),
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.errors, self.extra = list(errors), extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = [
                {"pointer": v.pointer, "detail": v.rule} for v in self.errors
            ]
        body.update(self.extra)
        return body

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if "retry_after_s" in self.extra:
            headers["Retry-After"] = str(self.extra["retry_after_s"])
        return JSONResponse(
            self.body(), status_code=self.status, media_type=PROBLEM, headers=headers
        )


def problem_of(error: ProgressionError) -> Problem:
    """The one place that decides what each refusal looks like to a caller."""
    if isinstance(error, InvalidEvent):
        return Problem(
            422,
            "invalid-event",
            "The event breaks the contract",
            str(error),
            error.violations,
            event_id=error.event_id,
        )
    if isinstance(error, EventConflict):
        return Problem(
            409,
            "event-id-conflict",
            "This event_id was already accepted with other content",
            str(error),
            [Violation("/event_id", "already accepted with different content")],
            event_id=error.event_id,
        )
    if isinstance(error, SignatureError):
        return Problem(
            401, "bad-signature", "The webhook signature is not valid", error.reason
        )
    if isinstance(error, AuthenticationError):
        return Problem(
            401, "unauthenticated", "A valid bearer token is required", error.reason
        )
    if isinstance(error, PermissionDenied):
        return Problem(
            403, "forbidden", "The token lacks the scope required", error.reason
        )
    if isinstance(error, ProcessUnavailable):
        return Problem(
            500, "process-unavailable", "The deal's process is not loadable", str(error)
        )
    if isinstance(error, UnknownProcess):
        return Problem(404, "unknown-process", "No such process", str(error))
    if isinstance(error, StreamConflict | DuplicateEventId):
        return Problem(
            503,
            "contended",
            "Too many concurrent writes to this deal",
            f"{error}; gave up after repeated retries, try again",
            retry_after_s=1,
        )
    if isinstance(error, StorageUnavailable):
        return Problem(
            503, "storage-unavailable", "The event log is unavailable", str(error)
        )
    return Problem(500, "internal", "Internal error", str(error))


def _result_item(
    index: int, event_id: str | None, result: ItemResult
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "index": index,
        "status": result.status,
        "event_id": event_id,
    }
    if result.event is not None:
        item["event"] = result.event.envelope()
        item["decisions"] = [d.envelope() for d in result.decisions]
    if result.error is not None:
        item["problem"] = problem_of(result.error).body()
    return item


def _summary(deal: DealSummary) -> dict[str, Any]:
    return {
        "deal_id": deal.deal_id,
        "status": deal.status,
        "stage": deal.stage,
        "stage_entered_at": _iso(deal.stage_entered_at),
        "process": deal.process,
        "process_version": deal.process_version,
        "owner": deal.owner,
        "amount": deal.amount,
        "currency": deal.currency,
        "lead_score": deal.lead_score,
        "created_at": _iso(deal.created_at),
        "version": deal.version,
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _process_summary(process: Process, current: bool) -> dict[str, Any]:
    return {
        "key": process.key,
        "version": process.version,
        "current": current,
        "name": process.name,
        "description": process.description,
        "digest": process.digest,
        "stages": [s.key for s in process.stages],
        "definition": process.definition,
    }


def create_app(service: Service) -> FastAPI:
    settings = service.settings
    app = FastAPI(
        title="dealledger progression",
        version="1",
        description="Deals advance on what the prospect did, decided from the "
        "declared process and recorded with the evidence.",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> Response:
        return exc.response()

    @app.exception_handler(ProgressionError)
    async def _refused(_: Request, exc: ProgressionError) -> Response:
        return problem_of(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> Response:
        violations = [
            Violation(
                "/" + "/".join(str(p) for p in e["loc"][1:]),
                f"{e['loc'][0]} parameter: {e['msg']}",
            )
            for e in exc.errors()
        ]
        return Problem(
            422,
            "invalid-request",
            "The request is not valid",
            "; ".join(str(v) for v in violations),
            violations,
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return Problem(
            exc.status_code, "http", str(exc.detail), str(exc.detail)
        ).response()

    def require(request: Request, scope: Scope) -> None:
        if len(service.tokens):
            service.tokens.authenticate(request.headers.get("authorization"), scope)
        elif service.credentials_configured:
            # Once any credential exists nothing is anonymous: with webhook
            # secrets alone, no caller can prove the right to read.
            raise AuthenticationError(
                "reads need a bearer token and none are configured (PROGRESSION_TOKENS)"
            )

    async def authorised_body(request: Request) -> bytes:
        """The raw body of a write, once its signature or token is accepted."""
        body = await request.body()
        source = request.query_params.get("source") or request.headers.get(
            SOURCE_HEADER
        )
        secret = service.webhook_secrets.get(source or "")
        if secret is not None:
            url = str(request.url)
            if settings.public_url:
                url = settings.public_url.rstrip("/") + request.url.path
                if request.url.query:
                    url += "?" + request.url.query
            verify_webhook(
                secret,
                headers=request.headers,
                method=request.method,
                url=url,
                body=body,
                now=time.time(),
                tolerance_s=settings.signature_tolerance_s,
            )
        elif service.credentials_configured:
            if not len(service.tokens):
                raise AuthenticationError(
                    f"no webhook secret is configured for source {source!r} and "
                    "no bearer tokens are configured"
                )
            service.tokens.authenticate(
                request.headers.get("authorization"), Scope.EVENTS_WRITE
            )
        return body

    def parse_json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Problem(
                400,
                "malformed-json",
                "The body is not JSON",
                f"not JSON: {exc}",
                [Violation("", "must be a JSON document")],
            ) from exc

    @app.post("/v1/events", status_code=201, tags=["events"])
    async def post_event(request: Request) -> Response:
        """Post one event: 201 with its decisions, 200 for a repeat."""
        raw = parse_json(await authorised_body(request))
        [result] = await run_in_threadpool(service.ingestion.submit, [raw])
        if result.error is not None:
            raise result.error
        assert result.event is not None
        body = {
            "event": result.event.envelope(),
            "decisions": [d.envelope() for d in result.decisions],
        }
        return JSONResponse(
            body, status_code=201 if result.status == "created" else 200
        )

    @app.post("/v1/events/batch", tags=["events"])
    async def post_batch(request: Request) -> Response:
        """Post up to 1,000 events, applied in order; one result per item."""
        raw = parse_json(await authorised_body(request))
        limit = settings.batch_max_events
        if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
            raise Problem(
                422,
                "invalid-batch",
                "The batch is not valid",
                'the body must be {"events": [...]}',
                [Violation("/events", "must be an array of events")],
            )
        events = raw["events"]
        if not 1 <= len(events) <= limit:
            raise Problem(
                422,
                "invalid-batch",
                "The batch is not valid",
                f"a batch holds 1 to {limit} events, this one {len(events)}",
                [Violation("/events", f"must hold 1 to {limit} events")],
            )
        results = await run_in_threadpool(service.ingestion.submit, events)
        items = []
        for index, (event, result) in enumerate(zip(events, results, strict=True)):
            event_id = event.get("event_id") if isinstance(event, dict) else None
            items.append(
                _result_item(
                    index, event_id if isinstance(event_id, str) else None, result
                )
            )
        return JSONResponse({"results": items})

    def stream_of(deal_id: str) -> list[RecordedEvent]:
        recorded = service.log.read_stream(deal_id)
        if not recorded:
            raise Problem(
                404,
                "unknown-deal",
                "No such deal",
                f"no event of deal {deal_id!r} has been received",
            )
        return recorded

    def process_for(recorded: list[RecordedEvent]) -> Process | None:
        ref = process_ref(stream_events(recorded))
        if ref is None:
            return None
        key, version = ref
        try:
            if version is None:
                return service.catalog.current(key)
            return service.catalog.get(key, version)
        except UnknownProcess as exc:
            raise ProcessUnavailable(recorded[0].deal_id, key, version) from exc

    @app.get("/v1/deals/{deal_id}", tags=["deals"])
    def get_deal(deal_id: str, request: Request) -> dict[str, Any]:
        """A deal: status, stage, owner, amount, lead score and facts."""
        require(request, Scope.READ)
        recorded = stream_of(deal_id)
        view = view_of(deal_id, stream_events(recorded), process_for(recorded))
        return {
            "deal_id": view.deal_id,
            "status": view.status,
            "stage": view.stage,
            "stage_entered_at": _iso(view.stage_entered_at),
            "process": view.process,
            "process_version": view.process_version,
            "owner": view.owner,
            "amount": view.amount,
            "currency": view.currency,
            "name": view.name,
            "lead_score": view.lead_score,
            "facts": view.facts,
            "created_at": _iso(view.created_at),
            "version": view.version,
        }

    @app.get("/v1/deals/{deal_id}/history", tags=["deals"])
    def get_history(deal_id: str, request: Request) -> dict[str, Any]:
        """The deal's stream in order: inputs and the decisions they caused."""
        require(request, Scope.READ)
        return {
            "deal_id": deal_id,
            "events": [e.envelope() for e in stream_of(deal_id)],
        }

    @app.get("/v1/deals/{deal_id}/evaluation", tags=["deals"])
    def get_evaluation(deal_id: str, request: Request) -> dict[str, Any]:
        """What the current stage asks for, what is there and what is missing."""
        require(request, Scope.READ)
        recorded = stream_of(deal_id)
        result = evaluate(stream_events(recorded), process_for(recorded))
        return {
            "deal_id": deal_id,
            "status": result.status,
            "stage": result.stage,
            "stage_entered_at": _iso(result.stage_entered_at),
            "advances_on": (
                None
                if result.advances_on is None
                else {
                    "action": result.advances_on,
                    "seen": result.action_seen,
                    "event_id": result.action_event_id,
                }
            ),
            "exit_criteria": [
                {
                    "criterion": c.key,
                    "description": c.description,
                    "rule": c.rule,
                    "holds": c.holds,
                    "event_ids": list(c.event_ids),
                    "occurred_at": _iso(c.occurred_at),
                }
                for c in result.criteria
            ],
            "next": result.next,
            "missing": result.missing,
        }

    @app.get("/v1/deals", tags=["deals"])
    def list_deals(
        request: Request,
        status: Annotated[
            str | None, Query(pattern="^(pending|open|won|lost|disqualified)$")
        ] = None,
        stage: str | None = None,
        owner: str | None = None,
        process: str | None = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Deals by status, stage, owner or process, ordered by deal_id."""
        require(request, Scope.READ)
        deals = service.log.deals(
            status=status,
            stage=stage,
            owner=owner,
            process=process,
            after=cursor,
            limit=limit + 1,
        )
        page = deals[:limit]
        return {
            "deals": [_summary(d) for d in page],
            "next_cursor": page[-1].deal_id if len(deals) > limit else None,
        }

    @app.get("/v1/processes", tags=["processes"])
    def list_processes(request: Request) -> dict[str, Any]:
        """Every declared process, in its current version."""
        require(request, Scope.READ)
        return {
            "processes": [
                _process_summary(service.catalog.current(key), True)
                for key in service.catalog.process_keys()
            ]
        }

    @app.get("/v1/processes/{key}", tags=["processes"])
    def get_process(key: str, request: Request) -> dict[str, Any]:
        """All versions of one process, the current one marked."""
        require(request, Scope.READ)
        current = service.catalog.current(key)
        return {
            "key": key,
            "current_version": current.version,
            "versions": [
                _process_summary(p, p.version == current.version)
                for p in service.catalog.versions(key)
            ],
        }

    @app.get("/v1/feed", tags=["feed"])
    def feed(
        request: Request,
        after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
        limit: Annotated[int, Query(ge=1)] = 1000,
    ) -> dict[str, Any]:
        """Every event of the log after a position, in position order."""
        require(request, Scope.READ)
        events = service.log.feed(after, min(limit, settings.feed_max_limit))
        return {
            "events": [e.envelope() for e in events],
            "next_after": events[-1].position if events else after,
            # Read after the page, so never below its last position: how far
            # a reader is from the end (a rebuild's progress bar).
            "head_position": service.log.head_position(),
        }

    app.include_router(simulation_router(service, require), tags=["operations"])

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        """The event log answers."""
        try:
            with service.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver failure means not ready
            log.warning("not ready error=%r", str(exc))
            return JSONResponse(
                {"status": "unavailable", "detail": str(exc)}, status_code=503
            )
        return JSONResponse(
            {"status": "ready", "head_position": service.log.head_position()}
        )

    return app


def app_from_environment() -> FastAPI:
    """The app of one worker process, built from the environment's settings."""
    from .logs import configure_logging
    from .settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(Service.start(settings))
