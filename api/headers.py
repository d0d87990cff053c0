"""Response headers every answer carries, whatever route or error produced it."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every HTTP response.

    A browser must not guess a type: an uploaded census or a ledger served as a download
    would otherwise be sniffed as HTML and run. Plain ASGI, not BaseHTTPMiddleware, so the
    live stream's body passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self._app(scope, receive, send_with_header)
