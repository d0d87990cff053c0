"""`sim --check`: runs a scenario against a running service and judges its expectations.

The service is observed through a `ServiceProbe` (`service_api.ServiceApi` over HTTP):
`/readyz` and the Prometheus counters of `/metrics`, whose change over the run is compared
with the scenario's counts; the registry, alerts and cases of the API, from which the
alerts raised and the cases opened on the scenario's covers during the run are judged
(those the service held before the run are told apart by their ids).

Alerts come from readings ordered by the devices' timestamps, and from timers on the
service's clock. `device_silent` is such a timer: it fires after 3 of the device's
registered report intervals without a reading, real seconds, so it is judged only when
the run keeps the device silent that long (see `silence_note`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from device_sim.errors import ProbeError, SimError
from device_sim.fleet import SimCover
from device_sim.runner import CrewOutcome, RunResult
from device_sim.scenario import (
    AlertExpectation,
    CaseExpectation,
    Expectations,
    IncidentExpectation,
)
from device_sim.timeline import Plan

STORED_METRIC = "smartcover_ingest_readings_stored_total"
ACKNOWLEDGED_METRIC = "smartcover_ingest_acknowledged_total"
DEADLETTERS_METRIC = "smartcover_deadletters_total"
SETTLE_TIMEOUT_S = 30.0
# Alerts and cases are committed before their readings are acknowledged (DESIGN §8), but
# some come from the service's timers (verification of a fix, tilt confirmation), which
# run every second: expectations not met yet are looked at again for this long.
GRACE_S = 5.0
# device_silent is raised by a timer that runs every second, committed a moment later.
SILENCE_SLACK_S = 2.0
# How many report intervals without a reading make a device silent (DESIGN §5).
SILENT_INTERVALS = 3
# The counters must stay put this long after the last message is acknowledged: the
# service counts a batch's readings before it acknowledges the batch, so a short pause
# only guards against a straggler still on its way.
_QUIET_S = 0.3
_POLL_S = 0.1
_REGRADE_S = 0.25
_FINISHED = frozenset({"closed", "cancelled"})
# Messages that reach the service as readings (its silence timer hears them).
_READING_INTENTS = frozenset({"reading", "batch", "duplicate"})


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
class RegisteredDevice:
    """A device as the service's registry holds it."""

    device_id: str
    cover_id: str | None
    report_interval_s: int


@dataclass(frozen=True, slots=True)
class ObservedAlert:
    id: int
    kind: str
    cover_id: str
    severity: str
    status: str = "active"


@dataclass(frozen=True, slots=True)
class ObservedCase:
    id: int
    cover_id: str
    severity: str
    unit: str
    status: str = "dispatched"
    incident_id: int | None = None
    reopened: int = 0


@dataclass(frozen=True, slots=True)
class Observation:
    """The alerts and cases of some covers at one moment."""

    alerts: list[ObservedAlert]
    cases: list[ObservedCase]

    def since(self, before: Observation) -> Observation:
        """What is new since `before`: alerts raised and cases opened in between."""
        alert_ids = {alert.id for alert in before.alerts}
        case_ids = {case.id for case in before.cases}
        return Observation(
            [alert for alert in self.alerts if alert.id not in alert_ids],
            [case for case in self.cases if case.id not in case_ids],
        )


class ServiceProbe(Protocol):
    """How `--check` observes the service under test; raises ProbeError when it cannot."""

    async def readiness(self) -> None:
        """Returns when the service is up and ready; raises ProbeError saying why not."""
        ...

    async def counters(self) -> Counters: ...

    async def devices(self, device_ids: Sequence[str]) -> dict[str, RegisteredDevice] | None:
        """The registered ones among these devices; None when the service has no API."""
        ...

    async def alerts(self, *, cover_ids: Sequence[str]) -> list[ObservedAlert] | None:
        """Every alert of these covers; None when the service has no alerts API."""
        ...

    async def cases(self, *, cover_ids: Sequence[str]) -> list[ObservedCase] | None:
        """Every case of these covers; None when the service has no cases API."""
        ...


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
    UNCHECKED = "not checkable"


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    expected: str
    observed: str
    status: Status
    note: str = ""
    cover: int | None = None  # the scenario's cover it is about, if one


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
    grace_s: float = GRACE_S,
) -> CheckReport:
    """Runs the scenario between two observations of the service and judges the change."""
    try:
        await probe.readiness()
        before = await probe.counters()
    except ProbeError as exc:
        return CheckReport(all_failed(expect, covers, str(exc)), None)
    alerting = _AlertingJudge(expect, covers, probe)
    await alerting.look_before()
    try:
        result = await run()
    except SimError as exc:
        return CheckReport(all_failed(expect, covers, f"the scenario did not run: {exc}"), None)
    try:
        after, lag = await _settle(probe, before, result.acknowledged, settle_timeout_s)
    except ProbeError as exc:
        return CheckReport(all_failed(expect, covers, str(exc)), result)
    verdicts = _delivery(result, lag)
    delta = after.minus(before)
    verdicts += count_verdicts(expect, delta, other_traffic=_other_traffic(delta, result))
    verdicts += crew_verdicts(result.crew, covers)
    verdicts += await alerting.judge(result.plan, grace_s)
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


def _other_traffic(delta: Counters, result: RunResult) -> str:
    """Why the service's counters cannot be the run's alone, or "": it acknowledged more
    messages than the run published, so other devices publish meanwhile (`make demo`'s)."""
    if delta.acknowledged <= result.published:
        return ""
    return (
        f"the service acknowledged {delta.acknowledged:g} messages, the run published"
        f" {result.published}: other devices publish too, counts need a quiet service"
    )


def count_verdicts(expect: Expectations, delta: Counters, other_traffic: str = "") -> list[Verdict]:
    """The counters' change against the scenario's counts. With `other_traffic` (why the
    counters are not the run's alone) readings and messages are not checkable; dead
    letters still are, since other devices are not expected to send any."""
    counted = [("readings stored", expect.readings_stored, delta.readings_stored)]
    if expect.acknowledged is not None:
        counted.append(("messages acknowledged", expect.acknowledged, delta.acknowledged))
    verdicts = [
        Verdict(what, f"{expected:g}", f"{observed:g}", Status.UNCHECKED, other_traffic)
        if other_traffic
        else _compare(what, expected, observed)
        for what, expected, observed in counted
    ]
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


def crew_verdicts(outcomes: Sequence[CrewOutcome], covers: Sequence[SimCover]) -> list[Verdict]:
    """One row per crew step: every move made, or where and why it stopped."""
    verdicts = []
    for outcome in sorted(outcomes, key=lambda o: (o.step.at_ms, o.step.device)):
        what = f"crew on {_cover_label(covers, outcome.step.device)}: " + " → ".join(
            outcome.step.moves
        )
        case = f"case {outcome.case_id}: " if outcome.case_id is not None else ""
        reached = " → ".join(outcome.reached) or "no move"
        observed = f"{case}{reached}"
        status = Status.PASSED if outcome.done else Status.FAILED
        verdicts.append(Verdict(what, "done", observed, status, outcome.problem))
    return verdicts


def _cover_label(covers: Sequence[SimCover], index: int) -> str:
    return f"cover {index} ({covers[index].cover_id})"


# -- alerts, cases, incidents ----------------------------------------------------------


class _AlertingJudge:
    """Judges the alerts, cases and incidents a run caused on the scenario's covers."""

    def __init__(
        self, expect: Expectations, covers: Sequence[SimCover], probe: ServiceProbe
    ) -> None:
        self.expect = expect
        self.covers = covers
        self.probe = probe
        self.cover_ids = [cover.cover_id for cover in covers]
        self.problem = ""
        self.registered: dict[str, RegisteredDevice] | None = None
        self.before: Observation | None = None

    async def look_before(self) -> None:
        """The registry and what the covers had before the run (when there is anything to
        judge); a failure is kept to explain the verdicts, the run goes on."""
        if not self.expect.observes_alerting:
            return
        try:
            self.registered = await self.probe.devices([c.device_id for c in self.covers])
            self.before = await self._observe()
        except ProbeError as exc:
            self.problem = str(exc)

    async def _observe(self) -> Observation | None:
        alerts = await self.probe.alerts(cover_ids=self.cover_ids)
        cases = await self.probe.cases(cover_ids=self.cover_ids)
        if alerts is None or cases is None:
            return None
        return Observation(alerts, cases)

    async def judge(self, plan: Plan, grace_s: float) -> list[Verdict]:
        """The verdicts once they all pass, or as they stand when the grace ran out."""
        if not self.expect.observes_alerting:
            return []
        if self.problem:
            return _expectations_failed(self.expect, self.covers, self.problem)
        if self.before is None or self.registered is None:
            return self._unchecked("the service has no alerts and cases API")
        registration = registration_verdict(self.covers, self.registered)
        silence = _SilenceJudge(plan, self.registered)
        deadline = time.monotonic() + grace_s
        while True:
            try:
                now = await self._observe()
            except ProbeError as exc:
                return _expectations_failed(self.expect, self.covers, str(exc))
            if now is None:
                return self._unchecked("the service's alerts and cases API went away")
            verdicts = self._verdicts(now.since(self.before), self.before, silence)
            settled = all(verdict.status is not Status.FAILED for verdict in verdicts)
            # Alerts of devices the service does not know never come: no use waiting.
            if settled or registration.status is Status.FAILED or time.monotonic() > deadline:
                return [registration, *verdicts]
            await asyncio.sleep(_REGRADE_S)

    def _unchecked(self, why: str) -> list[Verdict]:
        rows = _expectation_rows(self.expect, self.covers)
        return [Verdict(what, expected, "-", Status.UNCHECKED, why) for what, expected in rows]

    def _verdicts(
        self, caused: Observation, before: Observation, silence: _SilenceJudge
    ) -> list[Verdict]:
        expect, covers = self.expect, self.covers
        verdicts = alert_verdicts(expect.alerts, covers, caused.alerts, silence=silence)
        cases = case_verdicts(expect.cases, covers, caused.cases, before)
        verdicts += [self._unless_unnoticeable(verdict, silence) for verdict in cases]
        verdicts += incident_verdicts(expect.incidents, covers, caused.cases)
        return verdicts

    def _unless_unnoticeable(self, verdict: Verdict, silence: _SilenceJudge) -> Verdict:
        """A case that only a silence this run cannot show would open is not checkable."""
        if verdict.status is not Status.FAILED or verdict.cover is None:
            return verdict
        raising = [a for a in self.expect.alerts if a.cover == verdict.cover and a.count]
        if not raising or any(a.kind != "device_silent" for a in raising):
            return verdict
        note = silence.note(verdict.cover)
        if not note:
            return verdict
        return dataclasses.replace(
            verdict, status=Status.UNCHECKED, note=f"only device_silent opens it: {note}"
        )


def registration_verdict(
    covers: Sequence[SimCover], registered: Mapping[str, RegisteredDevice]
) -> Verdict:
    """Alerts are evaluated only for devices bound to covers in the service's registry."""
    wrong = []
    for cover in covers:
        device = registered.get(cover.device_id)
        if device is None:
            wrong.append(f"{cover.device_id} is not registered")
        elif device.cover_id != cover.cover_id:
            wrong.append(f"{cover.device_id} is on cover {device.cover_id or 'none'}")
    note = ""
    if wrong:
        note = "; ".join(wrong[:3]) + (" …" if len(wrong) > 3 else "")
        note += ": register the fleet (--register, or import its census)"
    return Verdict(
        "devices bound to the scenario's covers in the registry",
        str(len(covers)),
        str(len(covers) - len(wrong)),
        Status.FAILED if wrong else Status.PASSED,
        note,
    )


class _SilenceJudge:
    """Whether a run keeps a device silent long enough for the service to notice."""

    def __init__(self, plan: Plan, registered: Mapping[str, RegisteredDevice]) -> None:
        self.plan = plan
        self.registered = registered

    def note(self, index: int) -> str:
        """Why device_silent cannot be judged on this cover in this run ("" if it can)."""
        device = self.registered.get(self.plan.covers[index].device_id)
        if device is None:
            return ""  # the registration verdict says what is wrong
        return silence_note(self.plan, index, device.report_interval_s)


def silent_stretch_s(plan: Plan, index: int) -> float:
    """The longest time, on the real clock, in which the device sends no reading during
    the run (from its last reading to its next one or to the end); 0 if it never sends."""
    timebase = plan.timebase
    sent = [
        timebase.real_ms(publication.at_ms)
        for publication in plan.publications()
        if publication.device == index and publication.intent in _READING_INTENTS
    ]
    if not sent:
        return 0.0  # never reported: not silent (DESIGN §5)
    end = timebase.real_ms(plan.end_ms)
    gaps = [later - earlier for earlier, later in itertools.pairwise([*sent, end])]
    return max(gaps) / 1000


def silence_note(plan: Plan, index: int, interval_s: float) -> str:
    """Why the service cannot notice the device's silence within this run ("" if it can).

    The service judges silence on its own clock: 3 registered report intervals (at least
    a minute each, the registry's minimum) without a reading, real seconds. Time
    compression shortens the silence, not the intervals the service waits for.
    """
    needed = SILENT_INTERVALS * interval_s + SILENCE_SLACK_S
    stretch = silent_stretch_s(plan, index)
    if stretch >= needed:
        return ""
    speed = plan.scenario.speed
    fastest = math.floor(stretch * speed / needed)
    advice = f"run with --speed {fastest} or less" if fastest >= 1 else "not at any speed"
    return (
        f"judged on the service's clock after {SILENT_INTERVALS} × {interval_s:g} s (the "
        f"registered interval) without a reading; at {speed:g}x the device is silent for "
        f"{stretch:.0f} s of this run: {advice}"
    )


def alert_verdicts(
    expected: Sequence[AlertExpectation],
    covers: Sequence[SimCover],
    caused: Sequence[ObservedAlert],
    *,
    silence: _SilenceJudge | None = None,
) -> list[Verdict]:
    verdicts = []
    for item in expected:
        what = f"alert {item.kind} on {_cover_label(covers, item.cover)}"
        if item.severity:
            what += f", {item.severity}"
        found = sum(
            1
            for alert in caused
            if alert.kind == item.kind
            and alert.cover_id == covers[item.cover].cover_id
            and (item.severity is None or alert.severity == item.severity)
        )
        timing = ""
        if silence is not None and item.kind == "device_silent" and item.count:
            timing = silence.note(item.cover)
        verdict = _compare(what, item.count, found, timing)
        if timing and verdict.status is Status.FAILED:
            # The run cannot show it: not a failure of the service.
            verdict = dataclasses.replace(verdict, status=Status.UNCHECKED)
        verdicts.append(verdict)
    return verdicts


def case_verdicts(
    expected: Sequence[CaseExpectation],
    covers: Sequence[SimCover],
    caused: Sequence[ObservedCase],
    before: Observation | None = None,
) -> list[Verdict]:
    """Cases opened during the run, routed to the cover's owner unit; their state after."""
    verdicts = []
    for item in expected:
        cover = covers[item.cover]
        label = _cover_label(covers, item.cover)
        what = f"case on {label} for {cover.owner_unit}"
        if item.severity:
            what += f", {item.severity}"
        matching = [
            case
            for case in caused
            if case.cover_id == cover.cover_id
            and case.unit == cover.owner_unit
            and (item.severity is None or case.severity == item.severity)
        ]
        elsewhere = sorted(
            {c.unit for c in caused if c.cover_id == cover.cover_id} - {cover.owner_unit}
        )
        note = f"routed to {', '.join(elsewhere)}" if elsewhere else ""
        if len(matching) != item.count and before is not None:
            note = note or _open_before(before, cover.cover_id)
        counted = _compare(what, item.count, len(matching), note)
        verdicts.append(dataclasses.replace(counted, cover=item.cover))
        latest = max(matching, key=lambda case: case.id, default=None)
        if item.status is not None:
            observed = latest.status if latest is not None else "-"
            verdicts.append(
                _state_verdict(f"{label}: case status", item.status, observed, item.cover)
            )
        if item.reopened is not None:
            observed = str(latest.reopened) if latest is not None else "-"
            verdicts.append(
                _state_verdict(f"{label}: case reopened", str(item.reopened), observed, item.cover)
            )
    return verdicts


def _state_verdict(what: str, expected: str, observed: str, cover: int) -> Verdict:
    status = Status.PASSED if expected == observed else Status.FAILED
    return Verdict(what, expected, observed, status, cover=cover)


def _open_before(before: Observation, cover_id: str) -> str:
    for case in before.cases:
        if case.cover_id == cover_id and case.status not in _FINISHED:
            return (
                f"case {case.id} ({case.status}) was open on the cover before the run: alerts "
                "attach to it; give the run covers of its own (--admin-code, --seed)"
            )
    return ""


def incident_verdicts(
    expected: Sequence[IncidentExpectation],
    covers: Sequence[SimCover],
    caused: Sequence[ObservedCase],
) -> list[Verdict]:
    """One incident links the run's cases on exactly these covers (of the scenario's)."""
    verdicts = []
    index_of = {cover.cover_id: index for index, cover in enumerate(covers)}
    for item in expected:
        wanted = sorted(set(item.covers))
        what = "one incident links the cases of covers " + ", ".join(map(str, wanted))
        incidents = {
            index_of[case.cover_id]: case.incident_id
            for case in sorted(caused, key=lambda case: case.id)
            if case.cover_id in index_of
        }
        linked = {incidents.get(index) for index in wanted}
        members: list[int] = []
        if len(linked) == 1 and None not in linked:
            incident = linked.pop()
            members = sorted(index for index, found in incidents.items() if found == incident)
        observed = ", ".join(
            f"{index}→{incidents.get(index) or '-'}" for index in sorted({*wanted, *members})
        )
        status = Status.PASSED if members == wanted else Status.FAILED
        verdicts.append(Verdict(what, "one incident", observed, status, "cover→incident"))
    return verdicts


# -- when nothing could be judged ------------------------------------------------------


def _expectation_rows(expect: Expectations, covers: Sequence[SimCover]) -> list[tuple[str, str]]:
    """(what, expected) of every alert, case and incident expectation."""
    rows = [
        (f"alert {a.kind} on {_cover_label(covers, a.cover)}", str(a.count)) for a in expect.alerts
    ]
    for case in expect.cases:
        label = _cover_label(covers, case.cover)
        rows.append((f"case on {label}", str(case.count)))
        if case.status is not None:
            rows.append((f"{label}: case status", case.status))
        if case.reopened is not None:
            rows.append((f"{label}: case reopened", str(case.reopened)))
    for incident in expect.incidents:
        rows.append(
            (
                "one incident links the cases of covers " + ", ".join(map(str, incident.covers)),
                "one incident",
            )
        )
    return rows


def _expectations_failed(
    expect: Expectations, covers: Sequence[SimCover], reason: str
) -> list[Verdict]:
    rows = _expectation_rows(expect, covers)
    return [Verdict(what, expected, "-", Status.FAILED, reason) for what, expected in rows]


def all_failed(expect: Expectations, covers: Sequence[SimCover], reason: str) -> list[Verdict]:
    """Every expectation failed for one reason (the service or the broker is not there)."""
    rows = [("readings stored", str(expect.readings_stored))]
    if expect.acknowledged is not None:
        rows.append(("messages acknowledged", str(expect.acknowledged)))
    rows += [(f"dead letters: {r.value}", str(count)) for r, count in expect.dead_letters.items()]
    rows += _expectation_rows(expect, covers)
    return [Verdict(what, expected, "-", Status.FAILED, reason) for what, expected in rows]
