"""The FastAPI application: health, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(frozen=True, slots=True)
class Readiness:
    """Each dependency's problem, or None when it is reachable."""

    problems: dict[str, str | None]

    @property
    def ready(self) -> bool:
        return not any(self.problems.values())


def create_app(*, registry: CollectorRegistry, readiness: Callable[[], Readiness]) -> FastAPI:
    app = FastAPI(title="smartcover", version="0.1.0")

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """Broker and stores reachable; otherwise 503 naming what is not."""
        state = readiness()
        body = {
            "status": "ready" if state.ready else "not ready",
            "checks": {name: problem or "ok" for name, problem in state.problems.items()},
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
