"""`sim --check`: runs a scenario against a running service and judges its expectations.

The service is observed through a `ServiceProbe`. Today's probe reads `/readyz` and the
Prometheus counters of `/metrics` and compares their change over the run with the
scenario's counts; alerts and cases are reported as not checkable until the API serves
them (the probe's `alerts`/`cases` then return observations instead of None).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

from device_sim.errors import ProbeError, SimError
from device_sim.fleet import SimCover
from device_sim.runner import RunResult
from device_sim.scenario import AlertExpectation, CaseExpectation, Expectations

STORED_METRIC = "smartcover_ingest_readings_stored_total"
ACKNOWLEDGED_METRIC = "smartcover_ingest_acknowledged_total"
DEADLETTERS_METRIC = "smartcover_deadletters_total"
SETTLE_TIMEOUT_S = 30.0
# The counters must stay put this long after the last message is acknowledged: the
# service counts a batch's readings before it acknowledges the batch, so a short pause
# only guards against a straggler still on its way.
_QUIET_S = 0.3
_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Counters:
    readings_stored: float = 0.0
    acknowledged: float = 0.0
    dead_letters: Mapping[str, float] = field(default_factory=dict)

    def minus(self, earlier: Counters) -> Counters:
        reasons = set(self.dead_letters) | set(earlier.dead_letters)
        return Counters(
            self.readings_stored - earlier.readings_stored,
            self.acknowledged - earlier.acknowledged,
            {
                reason: self.dead_letters.get(reason, 0.0) - earlier.dead_letters.get(reason, 0.0)
                for reason in reasons
            },
        )


@dataclass(frozen=True, slots=True)
class ObservedAlert:
    kind: str
    cover_id: str
    severity: str


@dataclass(frozen=True, slots=True)
class ObservedCase:
    cover_id: str
    severity: str
    unit: str


class ServiceProbe(Protocol):
    """How `--check` observes the service under test; raises ProbeError when it cannot."""

    async def readiness(self) -> None:
        """Returns when the service is up and ready; raises ProbeError saying why not."""
        ...

    async def counters(self) -> Counters: ...

    async def alerts(
        self, *, cover_ids: Sequence[str], since_ms: int
    ) -> list[ObservedAlert] | None:
        """Alerts raised on these covers since then; None while the service cannot tell."""
        ...

    async def cases(self, *, cover_ids: Sequence[str], since_ms: int) -> list[ObservedCase] | None:
        """Cases opened for these covers since then; None while the service cannot tell."""
        ...


class HttpServiceProbe:
    """Observes a smartcover service over HTTP: `/readyz` and `/metrics` for now."""

    def __init__(self, base_url: str, *, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def _get(self, path: str) -> httpx.Response:
        try:
            return await self._client.get(path)
        except httpx.HTTPError as exc:
            raise ProbeError(
                f"service at {self.base_url} is not reachable ({path}): {exc or type(exc).__name__}"
            ) from None

    async def readiness(self) -> None:
        answer = await self._get("/readyz")
        if answer.status_code != 200:
            raise ProbeError(
                f"service at {self.base_url} is not ready ({answer.status_code}): "
                f"{answer.text[:300]}"
            )

    async def counters(self) -> Counters:
        answer = await self._get("/metrics")
        if answer.status_code != 200:
            raise ProbeError(f"{self.base_url}/metrics answered {answer.status_code}")
        return parse_metrics(answer.text, source=f"{self.base_url}/metrics")

    async def alerts(
        self, *, cover_ids: Sequence[str], since_ms: int
    ) -> list[ObservedAlert] | None:
        return None  # GET /api/v1/alerts does not exist yet

    async def cases(self, *, cover_ids: Sequence[str], since_ms: int) -> list[ObservedCase] | None:
        return None  # GET /api/v1/cases does not exist yet


def parse_metrics(text: str, *, source: str = "/metrics") -> Counters:
    stored = acknowledged = None
    dead_letters: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == STORED_METRIC:
                    stored = sample.value
                elif sample.name == ACKNOWLEDGED_METRIC:
                    acknowledged = sample.value
                elif sample.name == DEADLETTERS_METRIC:
                    reason = sample.labels.get("reason", "")
                    dead_letters[reason] = dead_letters.get(reason, 0.0) + sample.value
    except ValueError as exc:
        raise ProbeError(f"{source} is not Prometheus text: {exc}") from None
    if stored is None or acknowledged is None:
        raise ProbeError(
            f"{source} lacks {STORED_METRIC} or {ACKNOWLEDGED_METRIC}: is this smartcover?"
        )
    return Counters(stored, acknowledged, dead_letters)


class Status(StrEnum):
    PASSED = "pass"
    FAILED = "fail"
    UNCHECKED = "not checkable yet"


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    expected: str
    observed: str
    status: Status
    note: str = ""


@dataclass(frozen=True, slots=True)
class CheckReport:
    verdicts: list[Verdict]
    run: RunResult | None  # None when the scenario was not run

    @property
    def passed(self) -> bool:
        return all(verdict.status is not Status.FAILED for verdict in self.verdicts)


async def check(
    expect: Expectations,
    covers: Sequence[SimCover],
    run: Callable[[], Awaitable[RunResult]],
    probe: ServiceProbe,
    *,
    settle_timeout_s: float = SETTLE_TIMEOUT_S,
) -> CheckReport:
    """Runs the scenario between two observations of the service and judges the change."""
    try:
        await probe.readiness()
        before = await probe.counters()
    except ProbeError as exc:
        return CheckReport(all_failed(expect, covers, str(exc)), None)
    try:
        result = await run()
    except SimError as exc:
        return CheckReport(all_failed(expect, covers, f"the scenario did not run: {exc}"), None)
    try:
        after, lag = await _settle(probe, before, result.acknowledged, settle_timeout_s)
        cover_ids = [cover.cover_id for cover in covers]
        # On the devices' clocks the run started this long ago (time compression).
        since_ms = result.plan.timebase.sim_start_ms
        alerts = await probe.alerts(cover_ids=cover_ids, since_ms=since_ms)
        cases = await probe.cases(cover_ids=cover_ids, since_ms=since_ms)
    except ProbeError as exc:
        return CheckReport(all_failed(expect, covers, str(exc)), result)
    verdicts = _delivery(result, lag)
    verdicts += count_verdicts(expect, after.minus(before))
    verdicts += alert_verdicts(expect.alerts, covers, alerts)
    verdicts += case_verdicts(expect.cases, covers, cases)
    return CheckReport(verdicts, result)


async def _settle(
    probe: ServiceProbe, before: Counters, messages: int, timeout_s: float
) -> tuple[Counters, str]:
    """The counters once the service has acknowledged our messages (or time ran out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = await probe.counters()
        done = now.acknowledged - before.acknowledged
        if done >= messages:
            await asyncio.sleep(_QUIET_S)
            return await probe.counters(), ""
        if time.monotonic() > deadline:
            return now, f"the service acknowledged {done:.0f} of {messages} in {timeout_s:g} s"
        await asyncio.sleep(_POLL_S)


def _delivery(result: RunResult, lag: str) -> list[Verdict]:
    sent = Verdict(
        "published and acknowledged by the broker",
        str(result.published),
        str(result.acknowledged),
        Status.PASSED if result.acknowledged == result.published else Status.FAILED,
        f"{result.refused} refused" if result.refused else "",
    )
    if not lag:
        return [sent]
    return [sent, Verdict("service caught up", "all messages", "no", Status.FAILED, lag)]


def _compare(what: str, expected: float, observed: float, note: str = "") -> Verdict:
    status = Status.PASSED if expected == observed else Status.FAILED
    return Verdict(what, f"{expected:g}", f"{observed:g}", status, note)


def count_verdicts(expect: Expectations, delta: Counters) -> list[Verdict]:
    verdicts = [_compare("readings stored", expect.readings_stored, delta.readings_stored)]
    if expect.acknowledged is not None:
        verdicts.append(_compare("messages acknowledged", expect.acknowledged, delta.acknowledged))
    declared = {reason.value: count for reason, count in expect.dead_letters.items()}
    for reason, count in sorted(declared.items()):
        verdicts.append(
            _compare(f"dead letters: {reason}", count, delta.dead_letters.get(reason, 0.0))
        )
    others = {
        reason: count
        for reason, count in sorted(delta.dead_letters.items())
        if reason not in declared and count
    }
    verdicts.append(
        Verdict(
            "other dead letters",
            "none",
            ", ".join(f"{reason} {count:g}" for reason, count in others.items()) or "none",
            Status.FAILED if others else Status.PASSED,
        )
    )
    return verdicts


def _cover_label(covers: Sequence[SimCover], index: int) -> str:
    return f"cover {index} ({covers[index].cover_id})"


def alert_verdicts(
    expected: Sequence[AlertExpectation],
    covers: Sequence[SimCover],
    observed: list[ObservedAlert] | None,
) -> list[Verdict]:
    verdicts = []
    for item in expected:
        what = f"alert {item.kind} on {_cover_label(covers, item.cover)}"
        if item.severity:
            what += f", {item.severity}"
        if observed is None:
            verdicts.append(
                Verdict(what, str(item.count), "-", Status.UNCHECKED, "no alerts API yet")
            )
            continue
        found = sum(
            1
            for alert in observed
            if alert.kind == item.kind
            and alert.cover_id == covers[item.cover].cover_id
            and (item.severity is None or alert.severity == item.severity)
        )
        verdicts.append(_compare(what, item.count, found))
    return verdicts


def case_verdicts(
    expected: Sequence[CaseExpectation],
    covers: Sequence[SimCover],
    observed: list[ObservedCase] | None,
) -> list[Verdict]:
    verdicts = []
    for item in expected:
        cover = covers[item.cover]
        what = f"case on {_cover_label(covers, item.cover)} for {cover.owner_unit}"
        if item.severity:
            what += f", {item.severity}"
        if observed is None:
            verdicts.append(
                Verdict(what, str(item.count), "-", Status.UNCHECKED, "no cases API yet")
            )
            continue
        found = sum(
            1
            for case in observed
            if case.cover_id == cover.cover_id
            and case.unit == cover.owner_unit
            and (item.severity is None or case.severity == item.severity)
        )
        verdicts.append(_compare(what, item.count, found))
    return verdicts


def all_failed(expect: Expectations, covers: Sequence[SimCover], reason: str) -> list[Verdict]:
    """Every expectation failed for one reason (the service or the broker is not there)."""
    rows = [("readings stored", expect.readings_stored)]
    if expect.acknowledged is not None:
        rows.append(("messages acknowledged", expect.acknowledged))
    rows += [(f"dead letters: {r.value}", count) for r, count in expect.dead_letters.items()]
    rows += [(f"alert {a.kind} on {_cover_label(covers, a.cover)}", a.count) for a in expect.alerts]
    rows += [(f"case on {_cover_label(covers, c.cover)}", c.count) for c in expect.cases]
    return [Verdict(name, str(count), "-", Status.FAILED, reason) for name, count in rows]
