"""The dashboard: its page at /, its files under /dashboard/, and GET /api/v1/me, which
tells the page whose key it holds (the role and unit decide what it shows and offers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from api.deps import ViewerKey
from api.errors import ERRORS
from api.keys import ApiKey

FILES = Path(__file__).resolve().parent.parent / "dashboard"
# The page holds an API key: it runs only its own scripts and talks only to its origin.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load (an ETag makes that cheap) so an upgrade is never half-seen.
_REVALIDATE = "no-cache"

router = APIRouter()


@router.get("/api/v1/me", tags=["keys"], responses=ERRORS)
async def me(key: ViewerKey) -> ApiKey:
    """The caller's key: its holder, role and, for a crew, its unit (never the key)."""
    return key


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(
        FILES / "index.html",
        headers={"Cache-Control": _REVALIDATE, "Content-Security-Policy": _POLICY},
    )


class DashboardFiles(StaticFiles):
    """The page's scripts and styles, revalidated on every load."""

    def __init__(self) -> None:
        super().__init__(directory=FILES)

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = _REVALIDATE
        return response
