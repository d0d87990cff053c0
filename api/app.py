"""The FastAPI application: operations endpoints, and the API of DESIGN §7 under /api/v1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import CasePolicy
from api.deps import ApiContext, nothing_to_refresh, refuse_control_characters
from api.errors import install_error_handlers
from api.headers import NoSniff
from api.heavy import HeavyLimiter, HeavyLimits
from api.limits import ApiLimits, RequestLimits, document_limits
from api.readings import ReadingQuery
from api.routes import cases as case_routes
from api.routes import dashboard as dashboard_routes
from api.routes import ledgers as ledger_routes
from api.routes import notifications as notification_routes
from api.routes import push as push_routes
from api.routes import readings as reading_routes
from api.routes import registry as registry_routes
from api.routes import stats as stats_routes
from api.routes import stream as stream_routes
from api.stream import OutboxSignal, StreamConfig
from core.clock import wall_clock_ms
from core.outbound import OutboundPolicy
from core.registry_cache import RegistryChange
from ingest.push.handler import PushIngress

DOCS_ASSETS = "/docs/assets"  # Swagger UI's and ReDoc's scripts and styles
# Swagger UI would send the schema's URL to its public validator for a badge: no badge.
_SWAGGER_UI: dict[str, Any] = {"validatorUrl": None}


@dataclass(frozen=True, slots=True)
class Readiness:
    """Each dependency's problem, or None when it is reachable."""

    problems: dict[str, str | None]
    role: str | None = None  # active or standby (core.leadership); None: not applicable

    @property
    def ready(self) -> bool:
        return not any(self.problems.values())


def create_app(
    *,
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness],
    sessions: async_sessionmaker[AsyncSession] | None = None,
    readings: ReadingQuery | None = None,
    admin_key: SecretStr | str = "",
    case_policy: CasePolicy | None = None,
    outbox_signal: OutboxSignal | None = None,
    stream_config: StreamConfig | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
    registry_changed: Callable[[RegistryChange], Awaitable[object]] = nothing_to_refresh,
    limits: ApiLimits | None = None,
    heavy_limits: HeavyLimits | None = None,
    outbound: OutboundPolicy | None = None,
    push: PushIngress | None = None,
) -> FastAPI:
    """The app. Without `sessions` only /healthz, /readyz and /metrics are served (an
    ingest-only process); with them, the whole API. `readings` None: the readings
    endpoint answers 503. `outbox_signal`: call its `notify()` after writing the outbox
    to wake the live streams at once, and `close()` at shutdown to end them. `limits`:
    body sizes, and each key's request rate and live streams (None: body sizes only).
    `outbound`: the non-public networks a unit's webhook URL may name (None: none).
    `push`: platforms' HTTP pushes (`/ingest/v1/{source}`) and the sources' list."""
    # Swagger UI and ReDoc from the package's own files: pilots run without the internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        swagger_ui_parameters=_SWAGGER_UI,
        title="smartcover",
        version="0.1.0",
        description="Sensor-equipped manhole covers: registry, readings, alerts, dispatch"
        " cases, ledgers and progress. Authenticate with `Authorization: Bearer <key>`.",
        dependencies=[Depends(refuse_control_characters)],
    )
    install_error_handlers(app)
    if sessions is not None:  # added before NoSniff, so that its refusals carry it too
        app.add_middleware(
            RequestLimits,
            sessions=sessions,
            admin_key=admin_key,
            limits=limits or ApiLimits(),
        )
        document_limits(app)
    app.add_middleware(NoSniff)
    _operations(app, registry, readiness)
    if sessions is not None:
        key = admin_key.get_secret_value() if isinstance(admin_key, SecretStr) else admin_key
        app.state.context = ApiContext(
            sessions=sessions,
            readings=readings,
            admin_key=key,
            case_policy=case_policy or CasePolicy(),
            signal=outbox_signal or OutboxSignal(),
            stream=stream_config or StreamConfig(),
            clock_ms=clock_ms,
            registry_changed=registry_changed,
            outbound=outbound or OutboundPolicy(),
        )
        app.state.heavy = HeavyLimiter(heavy_limits or HeavyLimits())
        for module in (
            registry_routes,
            reading_routes,
            case_routes,
            ledger_routes,
            stats_routes,
            stream_routes,
            dashboard_routes,
            notification_routes,
        ):
            app.include_router(module.router)
        app.mount("/dashboard", dashboard_routes.DashboardFiles(), name="dashboard")
    if push is not None:
        app.state.push = push
        app.include_router(push_routes.router)
    return app


class ReadinessOut(BaseModel):
    status: str  # "ready" or "not ready"
    checks: dict[str, str]  # each dependency: "ok" or what is wrong
    # "active" (consumes, evaluates, notifies) or "standby" (serves the API, waits)
    role: str | None = None


_METRICS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}
_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ReadinessOut, "description": "Something is unreachable"}
}


def _operations(
    app: FastAPI, registry: CollectorRegistry, readiness: Callable[[], Readiness]
) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], response_model=ReadinessOut, responses=_NOT_READY)
    async def readyz() -> JSONResponse:
        """Broker and stores reachable; otherwise 503 naming what is not."""
        state = readiness()
        body = ReadinessOut(
            status="ready" if state.ready else "not ready",
            checks={name: problem or "ok" for name, problem in state.problems.items()},
            role=state.role,
        )
        return JSONResponse(body.model_dump(), status_code=200 if state.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response, responses=_METRICS)
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
