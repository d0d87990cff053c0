"""The case desk: alerts become cases routed to the cover's owner unit, and cases move.

Alert → open or attach → route → deadlines, as one flow (`apply_alert_event`); the
transitions of DESIGN §6 with actor, time and note in the timeline (`transition`);
escalation, re-notification and verification by the sensor (`run_timers`). Every
change writes its outbox events in the caller's transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import (
    AlertRow,
    AlertStatus,
    CaseEventRow,
    CaseRow,
    CaseStatus,
    IncidentRow,
)
from alerting.outbox import MQTT_CHANNEL, WEBHOOK_CHANNEL, enqueue
from alerting.rules import Action, AlertEvent, AlertKind, Severity

logger = logging.getLogger(__name__)

SYSTEM = "system"
SENSOR = "system:sensor"
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS

# The only moves a case can make (DESIGN §6). Cancelling needs a reason.
TRANSITIONS: dict[CaseStatus, frozenset[CaseStatus]] = {
    CaseStatus.OPEN: frozenset({CaseStatus.DISPATCHED, CaseStatus.CANCELLED}),
    CaseStatus.DISPATCHED: frozenset({CaseStatus.ACKNOWLEDGED, CaseStatus.CANCELLED}),
    CaseStatus.ACKNOWLEDGED: frozenset({CaseStatus.ON_SITE, CaseStatus.CANCELLED}),
    CaseStatus.ON_SITE: frozenset({CaseStatus.RESOLVED, CaseStatus.CANCELLED}),
    CaseStatus.RESOLVED: frozenset(
        {CaseStatus.VERIFIED, CaseStatus.DISPATCHED, CaseStatus.CANCELLED}
    ),
    CaseStatus.VERIFIED: frozenset({CaseStatus.CLOSED}),
    CaseStatus.CLOSED: frozenset(),
    CaseStatus.CANCELLED: frozenset(),
}
OPEN_STATUSES = tuple(
    s.value for s in CaseStatus if s not in (CaseStatus.CLOSED, CaseStatus.CANCELLED)
)
# A milestone is met once the case reached any of these states.
MILESTONES: dict[str, frozenset[str]] = {
    "acknowledged": frozenset({"acknowledged", "on_site", "resolved", "verified", "closed"}),
    "on_site": frozenset({"on_site", "resolved", "verified", "closed"}),
    "resolved": frozenset({"resolved", "verified", "closed"}),
}


class CaseError(Exception):
    """Root of the case desk's errors."""


class CaseNotFound(CaseError):
    def __init__(self, case_id: int) -> None:
        super().__init__(f"case {case_id} not found")
        self.case_id = case_id


class IllegalTransition(CaseError):
    def __init__(self, current: str, wanted: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"a case that is {current} cannot become {wanted}; allowed: "
            f"{', '.join(allowed) or 'none'}"
        )
        self.current = current
        self.wanted = wanted
        self.allowed = list(allowed)


class ReasonRequired(CaseError):
    """Cancelling a case (a false alarm) needs a note saying why."""


@dataclass(frozen=True, slots=True)
class CoverInfo:
    """What the case desk needs of a cover from the registry."""

    cover_id: str
    unit_code: str
    road: str | None = None


@dataclass(frozen=True, slots=True)
class CasePolicy:
    """Deadlines by severity (ms after opening), and the rates of the desk's timers."""

    deadlines: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            "critical": {
                "acknowledged": 10 * MINUTE_MS,
                "on_site": 30 * MINUTE_MS,
                "resolved": 6 * HOUR_MS,
            },
            "major": {"acknowledged": 30 * MINUTE_MS, "resolved": 24 * HOUR_MS},
            "minor": {"resolved": 72 * HOUR_MS},
        }
    )
    renotify_every_ms: int = 5 * MINUTE_MS  # unacknowledged critical cases
    verify_window_ms: int = 30 * MINUTE_MS
    verify_min_readings: int = 3
    incident_window_ms: int = HOUR_MS  # water cases on one road within this: one incident
    auto_dispatch: bool = True


@dataclass
class DeskOutcome:
    """What a call changed, for the engine's metrics and latency figures."""

    alert_ids: list[int] = field(default_factory=list)
    case_ids: list[int] = field(default_factory=list)
    opened_cases: int = 0


def channels_for(has_webhook: bool) -> tuple[str, ...]:
    return (MQTT_CHANNEL, WEBHOOK_CHANNEL) if has_webhook else (MQTT_CHANNEL,)


def alert_json(alert: AlertRow) -> dict[str, Any]:
    return {
        "id": alert.id,
        "cover_id": alert.cover_id,
        "device_id": alert.device_id,
        "kind": alert.kind,
        "subject": alert.subject,
        "severity": alert.severity,
        "status": alert.status,
        "value": alert.value,
        "raised_ms": alert.raised_ms,
        "cleared_ms": alert.cleared_ms,
        "case_id": alert.case_id,
    }


def case_json(case: CaseRow) -> dict[str, Any]:
    return {
        "id": case.id,
        "cover_id": case.cover_id,
        "unit_code": case.unit_code,
        "road": case.road,
        "severity": case.severity,
        "status": case.status,
        "kinds": list(case.kinds),
        "incident_id": case.incident_id,
        "opened_ms": case.opened_ms,
        "state_times": dict(case.state_times),
        "deadlines": dict(case.deadlines),
        "overdue": case.overdue,
        "escalated": list(case.escalated),
        "cancel_reason": case.cancel_reason,
        "reopened": case.reopened,
    }


class CaseDesk:
    """Operations on one session (one transaction, committed by the caller)."""

    def __init__(
        self,
        session: AsyncSession,
        policy: CasePolicy,
        *,
        webhook_units: frozenset[str] = frozenset(),
    ) -> None:
        self._session = session
        self._policy = policy
        self._webhook_units = webhook_units

    async def _emit(self, type_: str, unit_code: str, now_ms: int, payload: dict[str, Any]) -> None:
        await enqueue(
            self._session,
            type=type_,
            unit_code=unit_code,
            occurred_ms=now_ms,
            payload=payload,
            channels=channels_for(unit_code in self._webhook_units),
        )

    # Alerts

    async def apply_alert_event(
        self,
        *,
        cover: CoverInfo,
        device_id: str | None,
        event: AlertEvent,
        received_ms: int,
        now_ms: int,
        outcome: DeskOutcome,
    ) -> None:
        if event.action is Action.RAISED:
            await self._raise(
                cover, device_id, event, received_ms=received_ms, now_ms=now_ms, outcome=outcome
            )
        elif event.action is Action.CLEARED:
            await self._clear(cover, event, now_ms)

    async def _raise(
        self,
        cover: CoverInfo,
        device_id: str | None,
        event: AlertEvent,
        *,
        received_ms: int,
        now_ms: int,
        outcome: DeskOutcome,
    ) -> None:
        alert = AlertRow(
            cover_id=cover.cover_id,
            device_id=device_id,
            kind=event.kind.value,
            subject=event.subject.value if event.subject else None,
            severity=event.severity.value,
            status=AlertStatus.ACTIVE.value,
            value=event.value,
            raised_ms=event.ts_ms,
            received_ms=received_ms,
            committed_ms=None,
        )
        self._session.add(alert)
        case = await self._open_or_attach(cover, event, now_ms, outcome)
        alert.case_id = case.id
        await self._session.flush()
        outcome.alert_ids.append(alert.id)
        await self._emit("alert.raised", cover.unit_code, now_ms, {"alert": alert_json(alert)})

    async def _clear(self, cover: CoverInfo, event: AlertEvent, now_ms: int) -> None:
        kind = event.kind.value
        alert = await self._session.scalar(
            select(AlertRow).where(
                AlertRow.cover_id == cover.cover_id,
                AlertRow.kind == kind,
                AlertRow.status == AlertStatus.ACTIVE.value,
            )
        )
        if alert is None:
            return  # cleared already (a replay after a crash): nothing to do twice
        alert.status = AlertStatus.CLEARED.value
        alert.cleared_ms = event.ts_ms
        await self._emit("alert.cleared", cover.unit_code, now_ms, {"alert": alert_json(alert)})

    async def open_case_of(self, cover_id: str) -> CaseRow | None:
        return await self._session.scalar(
            select(CaseRow).where(CaseRow.cover_id == cover_id, CaseRow.status.in_(OPEN_STATUSES))
        )

    async def _open_or_attach(
        self, cover: CoverInfo, event: AlertEvent, now_ms: int, outcome: DeskOutcome
    ) -> CaseRow:
        case = await self.open_case_of(cover.cover_id)
        if case is not None and case.status == CaseStatus.VERIFIED.value:
            # The sensor confirmed that fix; a new alert is a new problem, with a case of
            # its own (the verified one is closed, and stays on the acceptance ledger).
            await self._move(
                case,
                CaseStatus.CLOSED,
                SYSTEM,
                f"closed: {event.kind.value} is a new problem",
                now_ms,
            )
            case = None
        if case is None:
            case = await self._open(cover, event, now_ms)
            outcome.opened_cases += 1
        else:
            await self._attach(case, event, now_ms)
        outcome.case_ids.append(case.id)
        return case

    async def _open(self, cover: CoverInfo, event: AlertEvent, now_ms: int) -> CaseRow:
        severity = event.severity.value
        deadlines = {m: now_ms + d for m, d in self._policy.deadlines.get(severity, {}).items()}
        case = CaseRow(
            cover_id=cover.cover_id,
            unit_code=cover.unit_code,
            road=cover.road,
            severity=severity,
            status=CaseStatus.OPEN.value,
            kinds=[event.kind.value],
            opened_ms=now_ms,
            state_times={CaseStatus.OPEN.value: now_ms},
            deadlines=deadlines,
            escalated=[],
            overdue=False,
            last_notified_ms=now_ms,
            verify_readings=0,
            reopened=0,
        )
        self._session.add(case)
        await self._session.flush()
        self._timeline(
            case,
            now_ms,
            SYSTEM,
            "open",
            (None, CaseStatus.OPEN.value),
            note=f"{event.kind.value} on {cover.cover_id}, routed to {cover.unit_code}",
        )
        if event.kind is AlertKind.WATER_HIGH and cover.road:
            await self._group_flooding(case, now_ms)
        await self._emit("case.opened", cover.unit_code, now_ms, {"case": case_json(case)})
        if self._policy.auto_dispatch:
            await self._move(
                case, CaseStatus.DISPATCHED, SYSTEM, "routed to the owner unit", now_ms
            )
        return case

    async def _attach(self, case: CaseRow, event: AlertEvent, now_ms: int) -> None:
        kinds = list(case.kinds)
        if event.kind.value not in kinds:
            kinds.append(event.kind.value)
        case.kinds = kinds
        note = f"{event.kind.value} attached"
        if Severity(event.severity).rank > Severity(case.severity).rank:
            case.severity = event.severity.value
            note += f", severity raised to {case.severity}"
        self._timeline(case, now_ms, SYSTEM, "attach", (case.status, case.status), note=note)
        if case.status == CaseStatus.RESOLVED.value:
            # The fix did not hold: the sensor says so before verification.
            case.reopened += 1
            await self._move(
                case,
                CaseStatus.DISPATCHED,
                SENSOR,
                f"{event.kind.value} again before verification",
                now_ms,
            )
        else:
            await self._emit("case.changed", case.unit_code, now_ms, {"case": case_json(case)})

    async def _group_flooding(self, case: CaseRow, now_ms: int) -> None:
        """Water cases on one road within the window share one incident."""
        since = now_ms - self._policy.incident_window_ms
        neighbours = list(
            await self._session.scalars(
                select(CaseRow).where(
                    CaseRow.road == case.road,
                    CaseRow.id != case.id,
                    CaseRow.status.in_(OPEN_STATUSES),
                    CaseRow.opened_ms >= since,
                )
            )
        )
        flooded = [c for c in neighbours if AlertKind.WATER_HIGH.value in c.kinds]
        if not flooded:
            return
        incident_id = next((c.incident_id for c in flooded if c.incident_id), None)
        if incident_id is None:
            incident = IncidentRow(
                kind="flooding", road=case.road or "", opened_ms=now_ms, last_ms=now_ms
            )
            self._session.add(incident)
            await self._session.flush()
            incident_id = incident.id
            await self._emit(
                "incident.opened",
                case.unit_code,
                now_ms,
                {"incident": {"id": incident.id, "kind": incident.kind, "road": incident.road}},
            )
        for member in [*flooded, case]:
            member.incident_id = incident_id

    # Transitions

    async def transition(
        self,
        *,
        case_id: int,
        to: str,
        actor: str,
        note: str,
        now_ms: int,
        unit_code: str | None = None,
    ) -> CaseRow:
        """Moves a case; `unit_code` limits a crew to its own unit's cases."""
        case = await self._session.get(CaseRow, case_id, with_for_update=True)
        if case is None or (unit_code is not None and case.unit_code != unit_code):
            raise CaseNotFound(case_id)
        wanted = CaseStatus(to)
        allowed = TRANSITIONS[CaseStatus(case.status)]
        if wanted not in allowed:
            raise IllegalTransition(case.status, wanted.value, sorted(a.value for a in allowed))
        if wanted is CaseStatus.CANCELLED:
            if not note.strip():
                raise ReasonRequired("cancelling a case needs a reason in the note")
            case.cancel_reason = note
        await self._move(case, wanted, actor, note, now_ms)
        return case

    async def _move(
        self, case: CaseRow, to: CaseStatus, actor: str, note: str, now_ms: int
    ) -> None:
        before = case.status
        case.status = to.value
        case.state_times = {**case.state_times, to.value: now_ms}
        if to is CaseStatus.RESOLVED:
            case.verify_since_ms, case.verify_readings = now_ms, 0
        elif to is CaseStatus.DISPATCHED:
            case.verify_since_ms, case.verify_readings = None, 0
        self._timeline(case, now_ms, actor, "transition", (before, to.value), note=note)
        await self._emit(
            "case.changed",
            case.unit_code,
            now_ms,
            {"case": case_json(case), "from": before, "to": to.value, "actor": actor, "note": note},
        )

    def _timeline(
        self,
        case: CaseRow,
        now_ms: int,
        actor: str,
        action: str,
        change: tuple[str | None, str | None],
        *,
        note: str,
    ) -> None:
        before, after = change
        self._session.add(
            CaseEventRow(
                case_id=case.id,
                at_ms=now_ms,
                actor=actor,
                action=action,
                from_status=before,
                to_status=after,
                note=note,
            )
        )

    # Timers and verification

    async def reopen_if_resolved(self, cover_id: str, reason: str, now_ms: int) -> bool:
        """Back to dispatched: the sensor says the fix did not hold (still over a limit)."""
        case = await self.open_case_of(cover_id)
        if case is None or case.status != CaseStatus.RESOLVED.value:
            return False
        case.reopened += 1
        await self._move(case, CaseStatus.DISPATCHED, SENSOR, reason, now_ms)
        return True

    async def _verify_if_due(self, case: CaseRow, readings: int, now_ms: int) -> None:
        policy = self._policy
        since = case.verify_since_ms
        if since is None or now_ms - since < policy.verify_window_ms:
            return
        if readings < policy.verify_min_readings:
            return
        case.verify_readings = readings
        await self._move(
            case,
            CaseStatus.VERIFIED,
            SENSOR,
            f"{readings} normal readings over the verification window",
            now_ms,
        )

    async def resolved_cases(self) -> list[CaseRow]:
        return list(
            await self._session.scalars(
                select(CaseRow).where(CaseRow.status == CaseStatus.RESOLVED.value)
            )
        )

    async def run_timers(self, now_ms: int, verify_counts: Mapping[int, int]) -> None:
        """Escalation of missed deadlines, re-notification, verification windows.

        `verify_counts`: per resolved case, the normal readings its cover sent since the
        case was resolved, while none of its alerts was active (counted by the engine).
        """
        cases = list(
            await self._session.scalars(select(CaseRow).where(CaseRow.status.in_(OPEN_STATUSES)))
        )
        for case in cases:
            await self._escalate_missed(case, now_ms)
            await self._renotify(case, now_ms)
            if case.status == CaseStatus.RESOLVED.value:
                await self._verify_if_due(case, verify_counts.get(case.id, 0), now_ms)

    async def _escalate_missed(self, case: CaseRow, now_ms: int) -> None:
        for milestone, due in case.deadlines.items():
            if milestone in case.escalated or now_ms < due:
                continue
            if case.status in MILESTONES[milestone]:
                continue
            case.escalated = [*case.escalated, milestone]
            case.overdue = True
            self._timeline(
                case,
                now_ms,
                SYSTEM,
                "escalate",
                (case.status, case.status),
                note=f"{milestone} deadline missed",
            )
            await self._emit(
                "case.escalated",
                case.unit_code,
                now_ms,
                {
                    "case": case_json(case),
                    "milestone": milestone,
                    "escalate_to": ["supervisor", "district"],
                },
            )

    async def _renotify(self, case: CaseRow, now_ms: int) -> None:
        if case.severity != Severity.CRITICAL.value:
            return
        if case.status not in (CaseStatus.OPEN.value, CaseStatus.DISPATCHED.value):
            return
        if now_ms - case.last_notified_ms < self._policy.renotify_every_ms:
            return
        case.last_notified_ms = now_ms
        self._timeline(
            case,
            now_ms,
            SYSTEM,
            "renotify",
            (case.status, case.status),
            note="not acknowledged yet",
        )
        await self._emit("case.renotified", case.unit_code, now_ms, {"case": case_json(case)})
