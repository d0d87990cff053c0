"""How many heavy requests (ledger exports, census imports) run at once, per key and role."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException, Request

from api.deps import CurrentKey
from api.errors import ErrorBody
from api.keys import ApiKey
from api.models import Role
from core.settings import Settings

logger = logging.getLogger(__name__)


def _role_totals() -> dict[Role, int]:
    # Viewer keys are the most widely handed out: they get the smallest share.
    return {Role.VIEWER: 2, Role.CREW: 4, Role.DISPATCHER: 4, Role.ADMIN: 4}


@dataclass(frozen=True, slots=True)
class HeavyLimits:
    """At most `per_key` heavy requests of one key at once, `per_role` of all keys of a
    role; beyond them 429, to be tried again after `retry_after_s`."""

    per_key: int = 2
    per_role: Mapping[Role, int] = field(default_factory=_role_totals)
    # An export of a city's census takes seconds to a minute: a few seconds' wait is fair.
    retry_after_s: int = 5


def heavy_limits(settings: Settings) -> HeavyLimits:
    others = dict.fromkeys(Role, settings.heavy_role_total)
    return HeavyLimits(
        per_key=settings.heavy_per_key,
        per_role={**others, Role.VIEWER: settings.heavy_viewer_total},
    )


class Busy(HTTPException):
    """429: the key or its role has as many heavy requests running as it may."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(429, message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class HeavyLimiter:
    """Counts the heavy requests running in this process, per key and per role."""

    def __init__(self, limits: HeavyLimits) -> None:
        self.limits = limits
        self._keys: Counter[int] = Counter()
        self._roles: Counter[Role] = Counter()

    def running(self, key: ApiKey) -> int:
        return self._keys[key.id]

    @contextmanager
    def slot(self, key: ApiKey) -> Iterator[None]:
        """Holds a place for one heavy request of `key`; raises Busy if there is none."""
        self._take(key)
        try:
            yield
        finally:
            self._keys[key.id] -= 1
            self._roles[key.role] -= 1

    def _take(self, key: ApiKey) -> None:
        limits = self.limits
        if self._keys[key.id] >= limits.per_key:
            logger.info("heavy request of key %s refused: %d running", key.prefix, limits.per_key)
            raise Busy(
                f"this key has {limits.per_key} heavy requests running: wait for one to end",
                limits.retry_after_s,
            )
        role_total = limits.per_role.get(key.role, limits.per_key)
        if self._roles[key.role] >= role_total:
            logger.info("heavy request of a %s key refused: %d running", key.role, role_total)
            raise Busy(
                f"{role_total} heavy requests of {key.role.value} keys are running: try later",
                limits.retry_after_s,
            )
        self._keys[key.id] += 1
        self._roles[key.role] += 1


def heavy_limiter(request: Request) -> HeavyLimiter:
    return cast(HeavyLimiter, request.app.state.heavy)


async def heavy_slot(request: Request, key: CurrentKey) -> AsyncIterator[None]:
    with heavy_limiter(request).slot(key):
        yield


# For a route's `responses`.
BUSY_DOC: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "The key or its role runs as many heavy requests as it may: retry"
        " after `Retry-After` seconds",
    }
}

# scope="request": the place is held until the response is sent, a streamed one included.
HeavySlot = Annotated[None, Depends(heavy_slot, scope="request")]
