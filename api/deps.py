"""What path operations depend on: the app's context, a read session, the caller's key."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import CasePolicy
from api.errors import Forbidden, Unauthenticated, Unprocessable
from api.keys import ApiKey, authenticate
from api.models import Role
from api.readings import ReadingQuery
from api.stream import OutboxSignal, StreamConfig
from core.db import transaction
from core.outbound import OutboundPolicy
from core.registry import VERSION_STEPS
from core.registry_cache import RegistryChange
from core.registry_errors import RegistryError
from core.text import control_character_problem

logger = logging.getLogger(__name__)


async def nothing_to_refresh(_change: RegistryChange) -> None:
    """An API-only process holds no registry cache: other processes are notified."""


@dataclass(frozen=True, slots=True)
class ApiContext:
    """Everything the routes share, built once by `create_app` and kept on `app.state`."""

    sessions: async_sessionmaker[AsyncSession]
    readings: ReadingQuery | None
    admin_key: str
    case_policy: CasePolicy
    signal: OutboxSignal
    stream: StreamConfig
    clock_ms: Callable[[], int]
    # Brings this process's registry cache up to date; called after every registry write,
    # before the answer, so a reading that follows the answer is evaluated with the change.
    registry_changed: Callable[[RegistryChange], Awaitable[object]] = nothing_to_refresh
    # Which non-public networks written URLs (a unit's webhook) may point at.
    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)


async def refuse_control_characters(request: Request) -> None:
    """Path and query parameters holding a control character are refused (422) before
    any lookup, as body strings are (core.text): the same answer on both databases."""
    for where, items in (
        ("path", request.path_params.items()),
        ("query", request.query_params.multi_items()),
    ):
        for name, value in items:
            # The name too: a query string's names are the caller's as much as its values.
            problem = control_character_problem(str(value)) or control_character_problem(name)
            if problem is not None:
                raise Unprocessable(
                    f"{where} parameter {name!r}: {problem}",
                    code="control_character",
                    details={"in": where, "name": name},
                )


def get_context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.context)


ContextDep = Annotated[ApiContext, Depends(get_context)]


async def read_session(context: ContextDep) -> AsyncIterator[AsyncSession]:
    """A read-only transaction for one request, closed before the answer is sent."""
    async with transaction(context.sessions, write=False) as session:
        yield session


@asynccontextmanager
async def registry_write(
    context: ApiContext, change: RegistryChange
) -> AsyncIterator[AsyncSession]:
    """A registry write transaction whose `change` this process's cache holds once it ends."""
    async with transaction(context.sessions) as session:
        yield session
        change.steps = session.info.get(VERSION_STEPS, 0)
    if not change.steps:
        return  # nothing changed (an update to the same values)
    try:
        await context.registry_changed(change)
    except (SQLAlchemyError, OSError, RegistryError):
        # Committed, but not reloaded: the next poll or notification catches up.
        logger.exception("registry cache refresh after a write failed")


# scope="function": the session ends with the path operation, not after the response.
SessionDep = Annotated[AsyncSession, Depends(read_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `smartcover keys create`: `Authorization: Bearer <key>`",
)


async def current_key(
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if credentials is None:
        raise Unauthenticated("an API key is needed: Authorization: Bearer <key>")
    async with transaction(context.sessions, write=False) as session:
        key = await authenticate(
            session=session, key=credentials.credentials, admin_key=context.admin_key
        )
    if key is None:
        raise Unauthenticated("unknown or revoked API key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def require(role: Role) -> Callable[[ApiKey], ApiKey]:
    """A dependency admitting keys of `role` or a higher one."""

    def check(key: CurrentKey) -> ApiKey:
        if not key.at_least(role):
            raise Forbidden(f"this needs a {role.value} key or higher, not a {key.role.value} key")
        return key

    return check


ViewerKey = Annotated[ApiKey, Depends(require(Role.VIEWER))]
CrewKey = Annotated[ApiKey, Depends(require(Role.CREW))]
DispatcherKey = Annotated[ApiKey, Depends(require(Role.DISPATCHER))]
AdminKey = Annotated[ApiKey, Depends(require(Role.ADMIN))]
