"""HTTP push from IoT platforms (`/ingest/v1/{source}`), and the sources for admins."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from api.deps import AdminKey, SessionDep
from api.errors import ERRORS, ApiError, NotFoundError
from core.held_readings import UnknownExternalId, list_unknown
from ingest.errors import IngestUnavailable
from ingest.push.handler import PushAnswer, PushIngress, ReplayOutcome

router = APIRouter(tags=["ingest"])

_PUSH_ANSWERS: dict[int | str, dict[str, str]] = {
    200: {"description": "Every reading of the request is stored and evaluated"},
    400: {"description": "Not the platform's message shape (the reason in the body)"},
    401: {"description": "Wrong token or signature (counted; nothing stored)"},
    403: {"description": "The sender's address is not in the source's allow-list"},
    404: {"description": "No such source"},
    503: {"description": "Not stored now: the platform should deliver it again"},
}


def _ingress(request: Request) -> PushIngress:
    return cast(PushIngress, request.app.state.push)


def _answer(ingress: PushIngress, source: str, answer: PushAnswer) -> Response:
    ingress.metrics.requests.labels(source, str(answer.status)).inc()
    return PlainTextResponse(answer.text, status_code=answer.status)


@router.post("/ingest/v1/{source}", responses=_PUSH_ANSWERS, response_class=PlainTextResponse)
async def push(source: str, request: Request) -> Response:
    """A platform's push (CTWing, OneNET, IoTDA, http-json): answered 200 once every
    reading in it is durable and evaluated. CTWing, IoTDA and http-json pass the source's
    token as `?token=`; OneNET signs its body."""
    ingress = _ingress(request)
    found = ingress.source(source)
    if found is None:
        return PlainTextResponse("no such source", status_code=404)
    address = request.client.host if request.client is not None else None
    refused = ingress.admit(found, token=request.query_params.get("token"), address=address)
    if refused is not None:  # before the body is read
        return _answer(ingress, source, refused)
    return _answer(ingress, source, await ingress.receive(found, await request.body()))


@router.get("/ingest/v1/{source}", responses=_PUSH_ANSWERS, response_class=PlainTextResponse)
async def verify_url(source: str, request: Request) -> Response:
    """OneNET's URL verification when the push is configured: echoes `msg` when
    `signature` is base64(MD5(token + nonce + msg))."""
    ingress = _ingress(request)
    found = ingress.source(source)
    if found is None:
        return PlainTextResponse("no such source", status_code=404)
    return _answer(ingress, source, ingress.verify_url(found, dict(request.query_params)))


class SourceOut(BaseModel):
    """A source as configured; its secrets only as whether they are set."""

    name: str
    kind: str
    model: str | None
    allow: list[str]
    has_token: bool
    has_aes_key: bool
    push_path: str | None


class Unavailable(ApiError):
    status, code = 503, "unavailable"


@router.get("/api/v1/sources/unknown", responses=ERRORS)
async def unknown_external_ids(*, _key: AdminKey, session: SessionDep) -> list[UnknownExternalId]:
    """Ids pushed by a source that no device has: readings held for them, first and last
    seen. Register a device with that source and external id, then replay (admin)."""
    return await list_unknown(session=session)


@router.post("/api/v1/sources/{source}/replay", responses=ERRORS)
async def replay_held(*, source: str, _key: AdminKey, request: Request) -> ReplayOutcome:
    """Stores and evaluates the held readings of ids that a device now has (up to 1,000
    a call: call again while `held` is 1,000), then forgets them (admin)."""
    ingress = _ingress(request)
    found = ingress.source(source)
    if found is None:
        raise NotFoundError(f"no source {source!r}")
    try:
        return await ingress.replay(found)
    except IngestUnavailable as exc:
        raise Unavailable(f"not replayed, try again: {exc}") from None


@router.get("/api/v1/sources", responses=ERRORS)
async def list_sources(*, _key: AdminKey, request: Request) -> list[SourceOut]:
    """The ingress sources of SMARTCOVER_SOURCES_FILE (admin)."""
    ingress = getattr(request.app.state, "push", None)
    if ingress is None:
        raise NotFoundError("this process takes no pushes: no sources")
    return [
        SourceOut(
            name=source.name,
            kind=source.kind.value,
            model=source.model,
            allow=[str(network) for network in source.allow],
            has_token=source.token is not None,
            has_aes_key=source.aes_key is not None,
            push_path=f"/ingest/v1/{source.name}",
        )
        for source in cast(PushIngress, ingress).sources
    ]
