"""The API's errors: one root, one JSON body for every 4xx and 5xx, and the handlers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from alerting.cases import CaseNotFound, IllegalTransition, ReasonRequired
from core.census import CensusFileError
from core.registry_errors import Conflict, Invalid, NotFound, RegistryError
from core.timeseries import TimeSeriesError

logger = logging.getLogger(__name__)

# The methods a route can be made for, each tried on a 405's path to fill its Allow.
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Codes for statuses raised by the framework itself (unknown path, wrong method, …).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    """What every error answer holds: the status again, a stable code, a sentence, data."""

    status: int
    code: str
    message: str
    details: Any = None


class ApiError(Exception):
    """Root of the API's own errors: each one knows its status and code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthenticated(ApiError):
    status, code = 401, "unauthenticated"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFoundError(ApiError):
    status, code = 404, "not_found"


class ConflictError(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class Unprocessable(ApiError):
    status, code = 422, "invalid"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(status=status, code=code, message=message, details=details)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _translate(exc: Exception) -> ApiError:
    """Other domains' errors as the API shows them (the one seam where that happens)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, IllegalTransition):
        return ConflictError(
            str(exc),
            code="illegal_transition",
            details={"current": exc.current, "wanted": exc.wanted, "allowed": exc.allowed},
        )
    if isinstance(exc, CaseNotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, ReasonRequired):
        return Unprocessable(str(exc), code="reason_required")
    if isinstance(exc, CensusFileError):
        details = [{"row": e.row, "column": e.column, "reason": e.reason} for e in exc.errors]
        return Unprocessable(exc.reason, code="census_file", details=details)
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc), details={"entity": exc.entity, "key": exc.key})
    if isinstance(exc, Conflict):
        return ConflictError(str(exc), details={"entity": exc.entity, "key": exc.key})
    if isinstance(exc, Invalid):
        return Unprocessable(str(exc), details={"field": exc.field, "reason": exc.reason})
    if isinstance(exc, TimeSeriesError):
        return Unavailable(f"time-series store: {exc}", code="timeseries_unavailable")
    return Unprocessable(str(exc))  # another RegistryError


async def _on_domain_error(_request: Request, exc: Exception) -> JSONResponse:
    error = _translate(exc)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return error_response(error.status, error.code, error.message, error.details, headers)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    headers = dict(exc.headers or {})
    allowed = _allowed_methods(request) if exc.status_code == 405 else ""
    if allowed:  # else a mounted app's own (static files: GET, HEAD)
        headers["Allow"] = allowed
    return error_response(exc.status_code, code, message, headers=headers or None)


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path answers. Starlette's router names only those
    of the first route matching the path (GET /units, not POST /units beside it)."""
    # A mount matches every method; its app names its own (static files: GET, HEAD).
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    return error_response(422, "invalid", f"{where}: {first['msg']}", details)


# PostgreSQL refuses text it cannot store (a NUL character, U+0000) with these SQLSTATEs;
# SQLite stores it. Either way it comes from the request, so it is the caller's error.
_BAD_TEXT_STATES = frozenset({"22021", "22P05"})


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if getattr(exc.orig, "sqlstate", None) in _BAD_TEXT_STATES:
        return error_response(422, "invalid", "text must not contain NUL characters (U+0000)")
    return await _on_unexpected(request, exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_domain_error)
    app.add_exception_handler(RegistryError, _on_domain_error)
    app.add_exception_handler(CaseNotFound, _on_domain_error)
    app.add_exception_handler(IllegalTransition, _on_domain_error)
    app.add_exception_handler(ReasonRequired, _on_domain_error)
    app.add_exception_handler(TimeSeriesError, _on_domain_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(DBAPIError, _on_database_error)
    app.add_exception_handler(Exception, _on_unexpected)


def error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Error answers declared in the OpenAPI schema, shared by the routers.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("Bad request (a range too long, a bad parameter)"),
    401: error_doc("No key, or an unknown or revoked one"),
    403: error_doc("The key's role may not do this"),
    404: error_doc("Not found (or not the crew's unit)"),
    422: error_doc("The request breaks a rule"),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: error_doc("Conflicts with what exists (or an illegal transition)"),
}
