"""The metrics API: FastAPI, everything under `/v1`, errors as RFC 9457
problem details."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metrics import funnel as funnel_module
from metrics import outcomes as outcomes_module
from metrics import parked as parked_module
from metrics import pipeline as pipeline_module
from metrics import stalled as stalled_module
from metrics import status as status_module
from metrics import velocity as velocity_module
from metrics.answers import (
    FunnelAnswer,
    FunnelGroup,
    OutcomesAnswer,
    OutcomesGroup,
    ParkedAnswer,
    ParkedEventDetail,
    PipelineAnswer,
    PipelineGroup,
    ProjectorStatus,
    RetryAnswer,
    RetryRequest,
    StageDuration,
    StalledAnswer,
    StalledGroup,
    VelocityAnswer,
    VelocityFigures,
    VelocityGroup,
)
from metrics.envelope import to_micros
from metrics.errors import MetricsError, UnknownProcess
from metrics.filters import DealFilter
from metrics.processes import Catalog, load_catalog
from metrics.projector import SourceName, build_source
from metrics.settings import Settings
from metrics.statistics import EMPTY
from metrics.storage import MIGRATIONS_DIR, VERSION_TABLE, create_engine

__all__ = ["PROBLEM_JSON", "create_app"]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
DEFAULT_PROCESS = "b2b-default"
_PROBLEM_BASE = "urn:dealledger:metrics:problem:"
_WORK_MEM = "32MB"


# -- problems ---------------------------------------------------------------------


class BadParameter(MetricsError):
    """A query parameter breaks its rule."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail


def problem(
    status: int, title: str, detail: str, kind: str = "", **extra: Any
) -> JSONResponse:
    body = {
        "type": _PROBLEM_BASE + kind if kind else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    names = ", ".join(e["name"] for e in errors)
    return problem(
        400,
        "Invalid request parameters",
        f"invalid parameters: {names}",
        "invalid-parameters",
        errors=errors,
    )


def _install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> Any:
        errors = []
        for found in error.errors():
            location = [str(part) for part in found.get("loc", ())]
            where = location[0] if location else "query"
            name = ".".join(location[1:]) or where
            errors.append({"in": where, "name": name, "detail": found.get("msg", "")})
        return _invalid(errors)

    @app.exception_handler(BadParameter)
    async def _bad_parameter(_request: Request, error: BadParameter) -> Any:
        return _invalid([{"in": "query", "name": error.name, "detail": error.detail}])

    @app.exception_handler(UnknownProcess)
    async def _unknown_process(_request: Request, error: UnknownProcess) -> Any:
        return problem(404, "Unknown process", str(error), "unknown-process")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> Any:
        response = problem(
            error.status_code, _title(error.status_code), str(error.detail)
        )
        if error.headers:
            response.headers.update(error.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Any:
        logger.error(
            "request failed method=%s path=%s error=%r",
            request.method,
            request.url.path,
            error,
            exc_info=error,
        )
        return problem(500, "Internal error", "the request failed; see the service log")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# -- parameters ---------------------------------------------------------------------


def parse_moment(name: str, value: str, *, end_of_day: bool = False) -> int:
    """RFC 3339 with an offset, or a date (midnight UTC; with `end_of_day`,
    midnight of the next day, so that a date bound includes the whole day)."""
    text = value.strip()
    if len(text) == 10:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise BadParameter(name, f"{value!r} is not a date (YYYY-MM-DD)") from None
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if end_of_day:
            moment += timedelta(days=1)
        return to_micros(moment)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadParameter(
            name, f"{value!r} is not an RFC 3339 timestamp or a date"
        ) from None
    if moment.tzinfo is None:
        raise BadParameter(name, f"{value!r} has no UTC offset (RFC 3339 needs one)")
    return to_micros(moment)


@dataclass(frozen=True)
class MetricQuery:
    where: DealFilter
    by_owner: bool


ProcessParam = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=64,
        description="Only deals of this process (key of a process file).",
    ),
]


def metric_query(
    process: ProcessParam = None,
    created_from: Annotated[
        str | None,
        Query(description="Deals created at or after this moment (RFC 3339 or date)."),
    ] = None,
    created_to: Annotated[
        str | None,
        Query(
            description="Deals created before this moment (RFC 3339), or on or "
            "before this date."
        ),
    ] = None,
    currency: Annotated[
        str | None,
        Query(min_length=1, max_length=16, description="Only deals in this currency."),
    ] = None,
    group_by: Annotated[
        Literal["owner"] | None,
        Query(description="owner: add one group per deal owner."),
    ] = None,
) -> MetricQuery:
    from_us = parse_moment("created_from", created_from) if created_from else None
    to_us = (
        parse_moment("created_to", created_to, end_of_day=True) if created_to else None
    )
    if from_us is not None and to_us is not None and to_us <= from_us:
        raise BadParameter("created_to", "must be later than created_from")
    return MetricQuery(
        DealFilter(process, from_us, to_us, currency), group_by == "owner"
    )


Metric = Annotated[MetricQuery, Depends(metric_query)]


def _owner_order(keys: Any) -> list[Any]:
    return sorted(keys, key=lambda owner: (owner is None, owner or ""))


# -- parked events: the ops scope --------------------------------------------------


class _Problem(MetricsError):
    """An answer that is a problem, raised where a dependency or an endpoint
    finds it."""

    def __init__(self, status: int, title: str, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.kind = status, title, detail, kind


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_ops_token(settings: Settings, request: Request) -> bool:
    token = _bearer(request)
    if settings.ops_token is None or token is None:
        return False
    expected = settings.ops_token.get_secret_value().encode()
    return hmac.compare_digest(token.encode(), expected)


def _install_parked_endpoints(
    app: FastAPI, v1: APIRouter, settings: Settings, engine: sa.Engine
) -> None:
    """GET /v1/parked/{id} and the retries, which need the ops scope."""

    @app.exception_handler(_Problem)
    async def _problem(_request: Request, error: _Problem) -> Any:
        response = problem(error.status, error.title, error.detail, error.kind)
        if error.status == 401:
            response.headers["www-authenticate"] = "Bearer"
        return response

    def operator(request: Request) -> None:
        """The ops scope: the ops token, whenever any token is configured;
        with none, the API is loopback-only and everything is allowed."""
        if settings.api_token is None and settings.ops_token is None:
            return
        if settings.ops_token is None:
            raise _Problem(
                403,
                "Ops scope not configured",
                "retrying parked events needs the ops token, and "
                "METRICS_OPS_TOKEN is not configured",
                "ops-token-not-configured",
            )
        if _is_ops_token(settings, request):
            return
        if _bearer(request) is not None and settings.api_token is not None:
            # authorised() let it through: it is the API token, which reads.
            raise _Problem(
                403,
                "Ops scope required",
                "retrying parked events needs the ops token (METRICS_OPS_TOKEN); "
                "the API token only reads",
                "ops-scope-required",
            )
        raise _Problem(
            401,
            "Unauthorized",
            "the ops token is required as a bearer token",
            "ops-token-required",
        )

    def unknown(parked_id: int) -> _Problem:
        return _Problem(
            404,
            "Unknown parked event",
            f"no parked event with id={parked_id}",
            "unknown-parked-event",
        )

    def retrying(ids: list[int] | None, deal: str | None) -> RetryAnswer:
        # The process files are read again: a fix to one needs no restart.
        try:
            catalog_now = load_catalog(settings.processes_dir)
            return parked_module.retry(engine, catalog_now, ids, deal=deal)
        except MetricsError as error:
            if error.retriable:
                raise _Problem(
                    503, "Service unavailable", str(error), "storage-unavailable"
                ) from error
            raise _Problem(500, "Cannot retry", str(error), "retry-failed") from error

    @v1.get(
        "/parked/{parked_id}",
        response_model=ParkedEventDetail,
        tags=["operations"],
        responses={404: {"description": "No parked event has this id."}},
    )
    def get_parked_event(parked_id: int) -> ParkedEventDetail:
        """One parked event, with the earlier parked event of its deal that
        holds it back (`held_behind`)."""
        with engine.connect() as connection:
            event = status_module.parked_event(connection, parked_id)
        if event is None:
            raise unknown(parked_id)
        return event

    @v1.post(
        "/parked/{parked_id}/retry",
        response_model=RetryAnswer,
        tags=["operations"],
        dependencies=[Depends(operator)],
        responses={
            404: {"description": "No parked event has this id (any more)."},
            409: {
                "description": "An earlier parked event of its deal is still "
                "parked; nothing was done."
            },
        },
    )
    def retry_parked_event(parked_id: int) -> RetryAnswer:
        """Apply one parked event again (ops scope). `outcome` says what
        happened: applied, or still parked with the new error."""
        answer = retrying([parked_id], None)
        [event] = answer.events
        if event.outcome == "missing":
            raise unknown(parked_id)
        if event.outcome == "held":
            raise _Problem(
                409,
                "Held behind an earlier parked event",
                event.error or "held",
                "parked-event-held",
            )
        return answer

    @v1.post(
        "/parked/retry",
        response_model=RetryAnswer,
        tags=["operations"],
        dependencies=[Depends(operator)],
    )
    def retry_parked_events(
        body: RetryRequest | None = None,
        every: Annotated[
            bool | None,
            Query(alias="all", description="Must be true (or `all` in the body)."),
        ] = None,
        deal: Annotated[
            str | None,
            Query(min_length=1, max_length=128, description="Only this deal's."),
        ] = None,
    ) -> RetryAnswer:
        """Apply every parked event again, of one deal or of all (ops scope),
        each deal's in stream order; the body or the query say which."""
        if body is not None:
            every = body.all if body.all is not None else every
            deal = body.deal if body.deal is not None else deal
        if every is not True:
            raise BadParameter(
                "all", "must be true: every parked event (of `deal`) is retried"
            )
        return retrying(None, deal)


# -- the application ------------------------------------------------------------------


class _Projector:
    """The projector thread of `metrics run`."""

    def __init__(
        self, settings: Settings, source: SourceName, catalog: Catalog
    ) -> None:
        self._runner = build_source(settings, source, catalog)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"projector-{source}", daemon=True
        )
        self.source = source
        self.failed = False

    def _run(self) -> None:
        try:
            self._runner.run(self._stop)
        except Exception:
            self.failed = True
            logger.exception(
                "projector thread ended with an error source=%s", self.source
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def create_app(
    settings: Settings,
    catalog: Catalog | None = None,
    projector_source: SourceName | None = None,
) -> FastAPI:
    """The metrics API; with `projector_source`, the projector runs on a
    background thread of the same process (`metrics run`)."""
    catalog = catalog or load_catalog(settings.processes_dir)
    engine = create_engine(settings)
    is_postgres = engine.dialect.name == "postgresql"
    kafka_ends = status_module.KafkaEndOffsets(settings)
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    projector: list[_Projector] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if projector_source is not None:
            running = _Projector(settings, projector_source, catalog)
            running.start()
            projector.append(running)
        if settings.api_token is None:
            logger.info(
                "no METRICS_API_TOKEN configured: the API is open to anyone on "
                "loopback host=%s port=%d",
                settings.host,
                settings.port,
            )
        try:
            yield
        finally:
            for running in projector:
                running.stop()
            kafka_ends.close()
            engine.dispose()

    app = FastAPI(
        title="dealledger metrics",
        version="1",
        description="Sales-process metrics projected from the deal event log.",
        lifespan=lifespan,
    )
    _install_problem_handlers(app)

    @app.middleware("http")
    async def _log_request(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        logger.info(
            "request method=%s path=%s status=%d duration_ms=%.1f",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    @contextmanager
    def reading() -> Iterator[sa.Connection]:
        connection = engine.connect()
        if is_postgres:
            # One snapshot for all the statements of an answer.
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        try:
            with connection.begin():
                if is_postgres:
                    # The percentiles sort every duration a metric counts; at
                    # a million events that is more than the default 4 MB of
                    # work_mem, and a sort that spills to disk is slower.
                    connection.exec_driver_sql(f"SET LOCAL work_mem = '{_WORK_MEM}'")
                yield connection
        finally:
            connection.close()

    def authorised(request: Request) -> None:
        if settings.api_token is None:
            return
        expected = settings.api_token.get_secret_value().encode()
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not (
            hmac.compare_digest(token.strip().encode(), expected)
            or _is_ops_token(settings, request)
        ):
            raise StarletteHTTPException(
                401,
                "a valid bearer token is required",
                headers={"www-authenticate": "Bearer"},
            )

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], response_model=None)
    def readyz() -> Any:
        """The database answers, the read models are migrated and the
        projector thread (in `metrics run`) is running."""
        try:
            with engine.connect() as connection:
                version = connection.execute(
                    sa.text(f"SELECT version_num FROM {VERSION_TABLE}")
                ).scalar_one_or_none()
        except sa.exc.SQLAlchemyError as error:
            return problem(503, "Not ready", f"database unavailable: {error}")
        if version != head:
            return problem(
                503, "Not ready", f"read models at revision {version}, need {head}"
            )
        if projector and not projector[0].alive:
            return problem(503, "Not ready", "the projector thread has stopped")
        return {"status": "ready"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @v1.get("/metrics/funnel", response_model=FunnelAnswer, tags=["metrics"])
    def get_funnel(query: Metric) -> FunnelAnswer:
        """Per stage: visits entered, advanced, dropped by reason, open, and
        the conversions (defaults to the b2b-default process)."""
        process = query.where.process or DEFAULT_PROCESS
        if catalog.current(process) is None:
            raise UnknownProcess(process)
        where = DealFilter(
            process,
            query.where.created_from_us,
            query.where.created_to_us,
            query.where.currency,
        )
        with reading() as connection:
            overall = funnel_module.funnel(connection, catalog, where, False)[None]
            groups = (
                funnel_module.funnel(connection, catalog, where, True)
                if query.by_owner
                else None
            )
        return FunnelAnswer(
            process=process,
            stages=overall,
            groups=None
            if groups is None
            else [
                FunnelGroup(owner=owner, stages=groups[owner])
                for owner in _owner_order(groups)
            ],
        )

    def velocity_figures(
        connection: sa.Connection, where: DealFilter, by_owner: bool
    ) -> dict[Any, VelocityFigures]:
        stages = velocity_module.stage_durations(connection, catalog, where, by_owner)
        cycles = velocity_module.cycle_lengths(connection, where, by_owner)
        meetings = velocity_module.time_to_first_meeting(connection, where, by_owner)
        some = next(iter(stages.values()), [])
        empty_stages = [
            StageDuration(
                stage=s.stage, count=0, mean_days=None, median_days=None, p90_days=None
            )
            for s in some
        ]
        keys = set(stages) | set(cycles) | set(meetings)
        return {
            key: VelocityFigures(
                stages=stages.get(key, empty_stages),
                cycle_length=velocity_module.to_duration(cycles.get(key, EMPTY)),
                time_to_first_meeting=velocity_module.to_duration(
                    meetings.get(key, EMPTY)
                ),
            )
            for key in keys
        }

    @v1.get("/metrics/velocity", response_model=VelocityAnswer, tags=["metrics"])
    def get_velocity(query: Metric) -> VelocityAnswer:
        """Days in each stage, cycle length and time to first meeting."""
        with reading() as connection:
            overall = velocity_figures(connection, query.where, False)[None]
            groups = (
                velocity_figures(connection, query.where, True)
                if query.by_owner
                else None
            )
        return VelocityAnswer(
            **overall.model_dump(),
            groups=None
            if groups is None
            else [
                VelocityGroup(owner=owner, **groups[owner].model_dump())
                for owner in _owner_order(groups)
            ],
        )

    @v1.get("/metrics/outcomes", response_model=OutcomesAnswer, tags=["metrics"])
    def get_outcomes(query: Metric) -> OutcomesAnswer:
        """Won, lost and disqualified deals, win rate, meeting show rate and
        process adherence."""
        with reading() as connection:
            overall = outcomes_module.outcomes(connection, query.where, False)[None]
            groups = (
                outcomes_module.outcomes(connection, query.where, True)
                if query.by_owner
                else None
            )
        return OutcomesAnswer(
            **overall.model_dump(),
            groups=None
            if groups is None
            else [
                OutcomesGroup(owner=owner, **groups[owner].model_dump())
                for owner in _owner_order(groups)
            ],
        )

    @v1.get("/metrics/pipeline", response_model=PipelineAnswer, tags=["metrics"])
    def get_pipeline(query: Metric) -> PipelineAnswer:
        """Open deals, weighted pipeline and pipeline velocity (amounts are
        not converted between currencies)."""
        with reading() as connection:
            overall = pipeline_module.pipeline(connection, catalog, query.where, False)[
                None
            ]
            groups = (
                pipeline_module.pipeline(connection, catalog, query.where, True)
                if query.by_owner
                else None
            )
        return PipelineAnswer(
            **overall.model_dump(),
            groups=None
            if groups is None
            else [
                PipelineGroup(owner=owner, **groups[owner].model_dump())
                for owner in _owner_order(groups)
            ],
        )

    @v1.get("/metrics/stalled", response_model=StalledAnswer, tags=["metrics"])
    def get_stalled(
        query: Metric,
        as_of: Annotated[
            str | None,
            Query(description="The moment to measure ages at (default: now)."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> StalledAnswer:
        """Open deals older in their stage than its expected days, oldest first."""
        as_of_us = parse_moment("as_of", as_of) if as_of else time.time_ns() // 1000
        with reading() as connection:
            overall = stalled_module.stalled(
                connection, catalog, query.where, as_of_us, limit, False
            )[None]
            groups = (
                stalled_module.stalled(
                    connection, catalog, query.where, as_of_us, limit, True
                )
                if query.by_owner
                else None
            )
        return StalledAnswer(
            **overall.model_dump(),
            groups=None
            if groups is None
            else [
                StalledGroup(owner=owner, **groups[owner].model_dump())
                for owner in _owner_order(groups)
            ],
        )

    @v1.get("/projector/status", response_model=ProjectorStatus, tags=["operations"])
    def get_projector_status() -> ProjectorStatus:
        """How far the projector got: offsets and lag per partition, the last
        position applied, events applied and parked."""
        with reading() as connection:
            status = status_module.projector_status(
                connection, settings.kafka_topic, None
            )
        return status_module.with_lag(status, kafka_ends)

    @v1.get("/parked", response_model=ParkedAnswer, tags=["operations"])
    def get_parked(
        after: Annotated[int, Query(ge=0, description="Only ids above this.")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ParkedAnswer:
        """The events the projector could not apply, with their error."""
        with reading() as connection:
            return status_module.parked(connection, after, limit)

    _install_parked_endpoints(app, v1, settings, engine)
    app.include_router(v1)
    return app


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config
