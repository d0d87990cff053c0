"""The service's HTTP API as the simulator uses it: observe (`--check`), register, crew.

`ServiceApi` is the `ServiceProbe` of `--check` (`/readyz`, `/metrics`, the registry,
alerts and cases), the scenario's crew (case transitions) and the registry writer of
`--register`. Every answer the API can give is turned into a `ProbeError` (reading) or a
`RegistrationError` (writing) that says what to do about it; httpx errors stop here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from device_sim.check import (
    Counters,
    ObservedAlert,
    ObservedCase,
    RegisteredDevice,
    parse_metrics,
)
from device_sim.errors import ProbeError, RegistrationError
from device_sim.fleet import SimCover
from device_sim.runner import CrewOutcome
from device_sim.timeline import CrewStep

API = "/api/v1"
# The API's largest page.
_PAGE = 500
# How long the crew waits for the cover's case to be opened before giving up: a case is
# committed before the reading that opened it is acknowledged, well within this.
CREW_WAIT_S = 5.0
_CREW_POLL_S = 0.1
_FINISHED = frozenset({"closed", "cancelled"})
# Longest part of an error answer quoted in a message.
_QUOTE = 300
# A registration and a check make bursts of requests that a key's rate limit (20/s by
# default) answers with 429: each is retried after the Retry-After asked, this often.
_RATE_LIMITED_TRIES = 5
_RETRY_AFTER_MAX_S = 5.0


class ServiceApi:
    """One service's HTTP API, with an API key (`Authorization: Bearer`) when given."""

    def __init__(self, base_url: str, *, api_key: str = "", timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self._has_api: bool | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; answered 429 (the key's rate limit), retried after Retry-After."""
        for _ in range(_RATE_LIMITED_TRIES - 1):
            answer = await self._send(method, path, **kwargs)
            if answer.status_code != 429:
                return answer
            await asyncio.sleep(_retry_after_s(answer))
        return await self._send(method, path, **kwargs)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ProbeError(
                f"service at {self.base_url} is not reachable ({path}): {exc or type(exc).__name__}"
            ) from None

    # -- operations endpoints ----------------------------------------------------------

    async def readiness(self) -> None:
        answer = await self._request("GET", "/readyz")
        if answer.status_code != 200:
            raise ProbeError(
                f"service at {self.base_url} is not ready ({answer.status_code}): "
                f"{answer.text[:_QUOTE]}"
            )

    async def counters(self) -> Counters:
        answer = await self._request("GET", "/metrics")
        if answer.status_code != 200:
            raise ProbeError(f"{self.base_url}/metrics answered {answer.status_code}")
        return parse_metrics(answer.text, source=f"{self.base_url}/metrics")

    # -- reading the API -----------------------------------------------------------------

    async def has_api(self) -> bool:
        """Whether the service serves the API (`smartcover ingest` serves operations only)."""
        if self._has_api is None:
            answer = await self._request("GET", f"{API}/alerts", params={"limit": 1})
            self._has_api = answer.status_code != 404
            if self._has_api:
                self._expect_ok(answer, "reading alerts")
        return self._has_api

    def _expect_ok(self, answer: httpx.Response, doing: str) -> Any:
        if answer.status_code == 200:
            return answer.json()
        raise ProbeError(_refusal(answer, doing))

    async def _pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            answer = await self._request(
                "GET", path, params={**params, "limit": _PAGE, "offset": offset}
            )
            page = self._expect_ok(answer, f"reading {path}")
            items += page["items"]
            offset = page["next_offset"]
        return items

    async def devices(self, device_ids: Sequence[str]) -> dict[str, RegisteredDevice] | None:
        if not await self.has_api():
            return None
        found = {}
        for device_id in device_ids:
            answer = await self._request("GET", f"{API}/devices/{device_id}")
            if answer.status_code == 404:
                continue
            device = self._expect_ok(answer, "reading the registry")
            found[device_id] = RegisteredDevice(
                device_id, device.get("cover_id"), int(device["report_interval_s"])
            )
        return found

    async def alerts(self, *, cover_ids: Sequence[str]) -> list[ObservedAlert] | None:
        if not await self.has_api():
            return None
        alerts = []
        for cover_id in cover_ids:
            for item in await self._pages(f"{API}/alerts", {"cover_id": cover_id}):
                alerts.append(
                    ObservedAlert(
                        int(item["id"]),
                        item["kind"],
                        item["cover_id"],
                        item["severity"],
                        item["status"],
                    )
                )
        return alerts

    async def cases(self, *, cover_ids: Sequence[str]) -> list[ObservedCase] | None:
        if not await self.has_api():
            return None
        cases = []
        for cover_id in cover_ids:
            for item in await self._pages(f"{API}/cases", {"cover_id": cover_id}):
                cases.append(_case(item))
        return cases

    # -- the crew ------------------------------------------------------------------------

    async def work(self, step: CrewStep, cover: SimCover) -> CrewOutcome:
        """Moves the cover's open case through the step's states, one transition each."""
        reached: list[str] = []
        case_id = None
        try:
            case_id = await self._open_case(cover.cover_id)
            if case_id is None:
                problem = f"no open case on the cover within {CREW_WAIT_S:g} s"
                return CrewOutcome(step, cover.cover_id, None, (), problem)
            for state in step.moves:
                answer = await self._request(
                    "POST",
                    f"{API}/cases/{case_id}/transitions",
                    json={"to": state, "note": step.note},
                )
                if answer.status_code != 200:
                    problem = _refusal(answer, f"moving case {case_id} to {state}")
                    return CrewOutcome(step, cover.cover_id, case_id, tuple(reached), problem)
                reached.append(state)
        except ProbeError as exc:
            return CrewOutcome(step, cover.cover_id, case_id, tuple(reached), str(exc))
        return CrewOutcome(step, cover.cover_id, case_id, tuple(reached))

    async def _open_case(self, cover_id: str) -> int | None:
        deadline = time.monotonic() + CREW_WAIT_S
        while True:
            found = [
                _case(item)
                for item in await self._pages(f"{API}/cases", {"cover_id": cover_id})
                if item["status"] not in _FINISHED
            ]
            if found:
                return max(case.id for case in found)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(_CREW_POLL_S)

    # -- writing the registry (admin) -----------------------------------------------------

    async def unit_exists(self, code: str) -> bool:
        answer = await self._request("GET", f"{API}/units/{code}")
        if answer.status_code == 404:
            return False
        if answer.status_code != 200:
            raise RegistrationError(_refusal(answer, f"reading unit {code}"))
        return True

    async def create_unit(self, code: str, name: str, kind: str) -> None:
        answer = await self._request(
            "POST", f"{API}/units", json={"code": code, "name": name, "kind": kind}
        )
        if answer.status_code not in (201, 409):  # 409: someone was quicker, as wanted
            raise RegistrationError(_refusal(answer, f"creating unit {code}"))

    async def registered(self, kind: str, key: str) -> dict[str, Any] | None:
        """The registry's record of a cover or device (`kind` "covers" or "devices"), or
        None when it has none."""
        answer = await self._request("GET", f"{API}/{kind}/{key}")
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            raise RegistrationError(_refusal(answer, f"reading {kind} {key}"))
        record: dict[str, Any] = answer.json()
        return record

    async def devices_ever_on(self, cover_id: str) -> list[str]:
        """The devices mounted on a cover over time (its binding history), oldest first."""
        answer = await self._request("GET", f"{API}/covers/{cover_id}/bindings")
        if answer.status_code != 200:
            raise RegistrationError(_refusal(answer, f"reading cover {cover_id}'s devices"))
        return [str(binding["device_id"]) for binding in answer.json()]

    async def create_device(self, device_id: str, *, model: str, report_interval_s: int) -> bool:
        """Creates a device; False when it exists already (someone was quicker)."""
        body = {"device_id": device_id, "model": model, "report_interval_s": report_interval_s}
        answer = await self._request("POST", f"{API}/devices", json=body)
        if answer.status_code not in (201, 409):
            raise RegistrationError(_refusal(answer, f"creating device {device_id}"))
        return answer.status_code == 201

    async def import_census(self, csv_bytes: bytes) -> dict[str, Any]:
        """Imports a census file (all rows or none); returns the import's report."""
        answer = await self._request(
            "POST",
            f"{API}/covers/import",
            content=csv_bytes,
            headers={"Content-Type": "text/csv; charset=utf-8"},
        )
        if answer.status_code != 200:
            raise RegistrationError(_refusal(answer, "importing the fleet's census"))
        report: dict[str, Any] = answer.json()
        return report


def _retry_after_s(answer: httpx.Response) -> float:
    """The wait a 429 asks for (whole seconds), within reason; a second without one."""
    try:
        wait = float(answer.headers.get("Retry-After", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.1), _RETRY_AFTER_MAX_S)


def _case(item: dict[str, Any]) -> ObservedCase:
    return ObservedCase(
        int(item["id"]),
        item["cover_id"],
        item["severity"],
        item["unit_code"],
        item["status"],
        item.get("incident_id"),
        int(item.get("reopened") or 0),
    )


def _refusal(answer: httpx.Response, doing: str) -> str:
    """What the API said, and what to do about it, as one sentence."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    detail = message or answer.text[:_QUOTE] or answer.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("details"), dict):
        rejected = body["details"].get("errors") or []
        detail += "".join(
            f"; row {error.get('row')} {error.get('column') or ''}: {error.get('reason')}"
            for error in rejected[:3]
        )
    hint = ""
    if answer.status_code == 401:
        hint = " (give --api-key, or set SMARTCOVER_API_KEY or SMARTCOVER_ADMIN_KEY)"
    elif answer.status_code == 403:
        hint = " (a key of a higher role is needed)"
    return f"{doing}: the API answered {answer.status_code}: {detail}{hint}"
