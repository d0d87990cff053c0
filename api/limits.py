"""Limits before work: the caller's key before its body, body sizes by route, and each
key's request rate and live streams, checked in front of the app (plain ASGI)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.keys import KEY_PREFIX, ApiKey, authenticate, bootstrap_admin, key_hash
from api.routes.registry import MAX_CENSUS_BYTES
from core.db import transaction
from core.rates import RateTable
from core.settings import Settings

logger = logging.getLogger(__name__)

_KIB = 1024
# A JSON body is a unit, a cover, a transition with its note: a few kilobytes at most.
JSON_MAX_BYTES = 64 * _KIB
STREAM_PATH = "/api/v1/stream"
# A refused stream may come back once a stream of its key has ended; a client that
# vanished without closing its connection is noticed at the next keep-alive (15 s).
_STREAM_RETRY_S = 15
# Keys found in the database are trusted this long before the body is read (the route
# checks the key again on every request, so a revoked key is still refused there).
_KEY_CACHE_S = 10.0
_KEY_CACHE_MAX = 1000  # more distinct keys than a city's staff: the cache starts over
_MAX_RATE_KEYS = 10_000  # keys in the rate table per generation (see core.rates)
_CLOSE = {"Connection": "close"}  # after a refusal the unread rest of a body is not read


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """Requests whose path starts with `prefix` may send at most `max_bytes` of body;
    `keyed`: their key is checked before the body is read, and counts against its rate."""

    prefix: str
    max_bytes: int
    keyed: bool


# The longest matching prefix decides. The ingest push route (`/ingest/v1/`) adds its row.
BODY_LIMITS: tuple[BodyLimit, ...] = (
    BodyLimit("/api/v1/covers/import", MAX_CENSUS_BYTES, keyed=True),
    BodyLimit("/api/v1/", JSON_MAX_BYTES, keyed=True),
    BodyLimit("/", JSON_MAX_BYTES, keyed=False),
)


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """Body sizes by path, and per key (in this process) a request rate with bursts and
    a number of live streams open at once. A rate or stream count of 0: no such limit."""

    rate_per_s: float = 0.0
    rate_burst: int = 1
    streams_per_key: int = 0
    bodies: tuple[BodyLimit, ...] = BODY_LIMITS

    @property
    def per_key(self) -> bool:
        return self.rate_per_s > 0 or self.streams_per_key > 0


def api_limits(settings: Settings) -> ApiLimits:
    return ApiLimits(
        rate_per_s=settings.api_rate_per_s,
        rate_burst=settings.api_rate_burst,
        streams_per_key=settings.api_streams_per_key,
    )


def _error_answer(description: str, retry: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if retry:
        seconds = {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}
        answer["headers"] = {"Retry-After": seconds}
    return answer


_TOO_LARGE = _error_answer("The body is larger than this route allows", retry=False)
_TOO_MANY = _error_answer("The key is over its request rate or its live streams", retry=True)


def document_limits(app: FastAPI) -> None:
    """States the middleware's answers in the app's OpenAPI schema: 429 on every
    operation under /api/v1, 413 on those that take a body."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/api/v1/"):
                    for operation in operations.values():
                        _document_operation(operation)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to extend it


def _document_operation(operation: dict[str, Any]) -> None:
    answers = operation.setdefault("responses", {})
    answers.setdefault("429", _TOO_MANY)
    if "requestBody" in operation:
        answers.setdefault("413", _TOO_LARGE)


def _size(count: int) -> str:
    if count % (_KIB * _KIB) == 0:
        return f"{count // (_KIB * _KIB)} MiB"
    if count % _KIB == 0:
        return f"{count // _KIB} KiB"
    return f"{count} bytes"


def _bearer(headers: Headers) -> str | None:
    """The key of `Authorization: Bearer <key>`, as FastAPI's HTTPBearer reads it."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    # The server has refused a malformed length before the app is called.
    return int(value) if value is not None and value.isdigit() else None


class KeyCache:
    """The callers of the keys seen lately: checking a key before the body then costs no
    database look-up per request. Only found keys are kept."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        admin_key: SecretStr | str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        secret = admin_key.get_secret_value() if isinstance(admin_key, SecretStr) else admin_key
        self._admin_key = secret
        self._clock = clock
        self._found: dict[str, tuple[ApiKey, float]] = {}

    async def caller(self, token: str) -> ApiKey | None:
        admin = bootstrap_admin(token, self._admin_key)
        if admin is not None or not token.startswith(KEY_PREFIX):
            return admin
        digest, now = key_hash(token), self._clock()
        hit = self._found.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        async with transaction(self._sessions, write=False) as session:
            key = await authenticate(session=session, key=token)
        if key is not None:
            if len(self._found) >= _KEY_CACHE_MAX:
                self._found.clear()
            self._found[digest] = (key, now + _KEY_CACHE_S)
        return key


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive`, refusing a body (chunked, or longer than it said) past `limit` bytes."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Raised where the app reads the body: its error handler answers 413.
                raise HTTPException(413, f"the body is over {_size(limit)}", headers=_CLOSE)
        return message

    return capped


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    code: str
    message: str
    headers: dict[str, str]


class RequestLimits:
    """Refuses, before the app reads anything: a body longer than its route allows (413,
    on Content-Length, and while a chunked body streams in), a body without a valid key
    (401), a key over its request rate or its number of live streams (429, Retry-After).

    Plain ASGI, not BaseHTTPMiddleware: the live stream passes through unbuffered.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        sessions: async_sessionmaker[AsyncSession],
        admin_key: SecretStr | str,
        limits: ApiLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._app = app
        self._limits = limits
        self._bodies = sorted(limits.bodies, key=lambda rule: len(rule.prefix), reverse=True)
        self._keys = KeyCache(sessions, admin_key, clock)
        self._rates: RateTable | None = None
        if limits.rate_per_s > 0:
            self._rates = RateTable(
                rate_per_s=limits.rate_per_s,
                burst=limits.rate_burst,
                max_keys=_MAX_RATE_KEYS,
                clock=clock,
            )
        self._streams: dict[int, int] = {}

    def _rule(self, path: str) -> BodyLimit | None:
        return next((rule for rule in self._bodies if path.startswith(rule.prefix)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self._rule(scope["path"]) if scope["type"] == "http" else None
        if rule is None:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = _content_length(headers)
        has_body = bool(length) or "chunked" in headers.get("transfer-encoding", "").lower()
        key: ApiKey | None = None
        if rule.keyed and (has_body or self._limits.per_key):
            token = _bearer(headers)
            key = None if token is None else await self._keys.caller(token)
        refusal = self._refusal(rule, length, has_body, key, scope)
        if refusal is not None:
            response = error_response(
                refusal.status, refusal.code, refusal.message, headers=refusal.headers
            )
            await response(scope, receive, send)
            return
        if has_body:
            receive = _capped(receive, rule.max_bytes)
        await self._call_counted(key, scope, receive, send)

    def _refusal(
        self,
        rule: BodyLimit,
        length: int | None,
        has_body: bool,
        key: ApiKey | None,
        scope: Scope,
    ) -> _Refusal | None:
        if length is not None and length > rule.max_bytes:
            message = f"the body may be at most {_size(rule.max_bytes)} here, not {length} bytes"
            return _Refusal(413, "too_large", message, _CLOSE)
        if rule.keyed and has_body and key is None:
            message = "a valid API key is needed before the body: Authorization: Bearer <key>"
            return _Refusal(
                401, "unauthenticated", message, {"WWW-Authenticate": "Bearer", **_CLOSE}
            )
        if key is None:
            return None
        if self._rates is not None:
            wait = self._rates.admit(str(key.id))
            if wait > 0:
                message = f"over {self._limits.rate_per_s:g} requests/s for this key"
                retry = {"Retry-After": str(math.ceil(wait))}
                return _Refusal(429, "rate_limited", message, retry | (_CLOSE if has_body else {}))
        if self._is_stream(scope) and self._streams.get(key.id, 0) >= self._limits.streams_per_key:
            message = f"this key has {self._limits.streams_per_key} live streams open already"
            return _Refusal(429, "too_many_streams", message, {"Retry-After": str(_STREAM_RETRY_S)})
        return None

    def _is_stream(self, scope: Scope) -> bool:
        return (
            self._limits.streams_per_key > 0
            and scope["path"] == STREAM_PATH
            and scope["method"] == "GET"
        )

    async def _call_counted(
        self, key: ApiKey | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The app, with a live stream counted against its key while it runs."""
        if key is None or not self._is_stream(scope):
            await self._app(scope, receive, send)
            return
        self._streams[key.id] = self._streams.get(key.id, 0) + 1
        try:
            await self._app(scope, receive, send)
        finally:
            left = self._streams.pop(key.id) - 1
            if left:
                self._streams[key.id] = left
