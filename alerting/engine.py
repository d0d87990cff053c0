"""The alert engine: evaluates every reading at once, commits what changed, runs the timers.

Evaluation is synchronous and in memory (called from the ingest's receive path); the
state of each (cover, kind) that is not at rest is kept in a dict and mirrored in the
`alert_states` table. Whatever an evaluation changed (state, alerts, cases, outbox
events) is committed in one transaction by the committer task, right away when an
event happened (latency matters) and at the latest when the ingest asks for it before
acknowledging a batch (`commit_through`). Per-device progress (newest reading time,
last heard of) is written every few seconds: it only orders readings and feeds the
silence timer, and a stale value after a crash errs on the side of evaluating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import Insert, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import CaseDesk, CasePolicy, CoverInfo, DeskOutcome
from alerting.models import AlertRow, AlertStateRow, DeviceProgress
from alerting.rules import (
    CRITERIA,
    CRITERION_OF,
    Action,
    AlertEvent,
    AlertKind,
    CoverRule,
    KindState,
    Level,
    Severity,
    silence,
    step,
    tick,
)
from core.contract import Reading
from core.db import transaction

logger = logging.getLogger(__name__)

# How often device progress is written, and how often the timers run.
PROGRESS_FLUSH_S = 2.0
TICK_S = 1.0
# Silence is looked for less often: it walks every device, and takes minutes to arise.
SILENCE_CHECK_MS = 10_000
# Back-off of the committer while the database is unreachable.
_COMMIT_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)
_REST = KindState()


@dataclass(frozen=True, slots=True)
class CoverContext:
    """A device's cover as the rules and the case desk see it (from the registry)."""

    info: CoverInfo
    rule: CoverRule
    report_interval_s: float


class CoverDirectory(Protocol):
    """The registry, as the engine needs it; look-ups are in memory (hot path)."""

    def cover_of(self, device_id: str) -> CoverContext | None: ...

    def cover(self, cover_id: str) -> CoverContext | None: ...

    def webhook_units(self) -> frozenset[str]: ...

    def is_registered(self, device_id: str) -> bool:
        """In the registry, whether or not on a cover."""
        ...

    async def refresh_for_unknown(self, received_ms: int) -> None:
        """Brings the registry up to date with what was known when a reading arrived."""
        ...

    def note_unregistered(self, device_id: str, received_ms: int) -> None: ...


@dataclass
class _Pending:
    """Changes made by evaluations since the last commit."""

    states: dict[tuple[str, str], KindState] = field(default_factory=dict)
    events: list[tuple[CoverContext, str | None, AlertEvent, int]] = field(default_factory=list)
    reopens: dict[str, str] = field(default_factory=dict)  # cover → why its fix failed

    def __bool__(self) -> bool:
        return bool(self.states or self.events or self.reopens)


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "smartcover_alert_events",
            "Alert events by kind and action",
            ["kind", "action"],
            registry=registry,
        )
        self.cases_opened = Counter("smartcover_cases_opened", "Cases opened", registry=registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30)
        self.publish_to_commit = Histogram(
            "smartcover_alert_publish_to_commit_seconds",
            "Device timestamp of the raising reading to the alert's commit",
            buckets=buckets,
            registry=registry,
        )
        self.receive_to_commit = Histogram(
            "smartcover_alert_receive_to_commit_seconds",
            "Receipt of the raising reading to the alert's commit",
            buckets=buckets,
            registry=registry,
        )


def _is_rest(state: KindState) -> bool:
    return not (
        state.active
        or state.over_streak
        or state.pending_since_ms is not None
        or state.flapping
        or state.raises
    )


def state_to_json(state: KindState) -> dict[str, object]:
    data = dataclasses.asdict(state)
    data["raises"] = list(state.raises)
    return data


def state_from_json(data: dict[str, Any]) -> KindState:
    values = dict(data)
    values["raises"] = tuple(values.get("raises") or ())
    return KindState(**values)


class AlertEngine:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        directory: CoverDirectory,
        policy: CasePolicy,
        metrics: AlertMetrics,
        clock_ms: Callable[[], int],
        on_commit: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sessions = sessions
        self._directory = directory
        self._policy = policy
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._on_commit = on_commit
        self._sleep = sleep
        self._states: dict[tuple[str, str], KindState] = {}
        self._progress: dict[str, tuple[int, int]] = {}  # device → (last ts, last seen)
        self._dirty_progress: set[str] = set()
        self._pending = _Pending()
        self._generation = 0
        self._committed = 0
        self._committed_changed = asyncio.Condition()
        self._work = asyncio.Event()
        self._verifying: dict[str, tuple[int, int]] = {}  # cover → (case id, since ms)
        self._verify_counts: dict[int, int] = {}
        self._silence_checked_ms = 0
        # Readings of devices the registry did not know on arrival, evaluated (or declared
        # unregistered) by the committer once the registry was checked again.
        self._unknown: list[tuple[Reading, int]] = []
        self._progress_lock = asyncio.Lock()

    @property
    def generation(self) -> int:
        """Increases with every evaluation that changed something to commit."""
        return self._generation

    async def load(self) -> None:
        """Replaces the in-memory state by the persisted one; call before evaluating.

        A standby process that becomes active calls it again: what it remembers is stale,
        and what it evaluated but did not commit while last active is dropped (those
        readings were not acknowledged, so the broker delivers them again).
        """
        self._states.clear()
        self._progress.clear()
        self._dirty_progress.clear()
        self._pending = _Pending()
        self._unknown.clear()
        self._verifying.clear()
        self._verify_counts.clear()
        self._silence_checked_ms = 0
        self._committed = self._generation  # nothing outstanding from an earlier term
        async with transaction(self._sessions, write=False) as session:
            for row in await session.scalars(select(AlertStateRow)):
                self._states[(row.cover_id, row.kind)] = state_from_json(row.state)
            for progress in await session.scalars(select(DeviceProgress)):
                self._progress[progress.device_id] = (progress.last_ts_ms, progress.last_seen_ms)
        logger.info(
            "alert engine loaded %d rule states, %d devices", len(self._states), len(self._progress)
        )

    # Evaluation: the hot path, synchronous.

    def evaluate(self, reading: Reading, received_ms: int) -> None:
        context = self._directory.cover_of(reading.device_id)
        if context is None:
            if not self._directory.is_registered(reading.device_id):
                self._park_unknown(reading, received_ms)
            return  # registered but on no cover: stored, nothing to evaluate
        last_ts, _ = self._progress.get(reading.device_id, (-1, 0))
        self._progress[reading.device_id] = (max(last_ts, reading.ts_ms), received_ms)
        self._dirty_progress.add(reading.device_id)
        cover_id = context.info.cover_id
        self._back_from_silence(context, reading, received_ms)
        if reading.ts_ms <= last_ts:
            return  # older than what was evaluated (buffered) or redelivered: stored only
        for criterion in CRITERIA:
            key = (cover_id, criterion.kind.value)
            state = self._states.get(key, _REST)
            if state is _REST and criterion.classify(reading, context.rule) is not Level.OVER:
                continue  # the common case: a cover at rest stays at rest
            new_state, events = step(
                state, reading, context.rule, criterion, received_ms=received_ms
            )
            self._record(key, context, reading.device_id, (new_state, events), received_ms)
        self._count_for_verification(cover_id, reading)

    def _park_unknown(self, reading: Reading, received_ms: int) -> None:
        # Perhaps registered a moment ago in another process: the committer checks the
        # registry once before declaring the device unregistered, and the batch is not
        # acknowledged before that (the generation moves).
        self._unknown.append((reading, received_ms))
        self._generation += 1
        self._work.set()

    async def _resolve_unknown(self) -> None:
        if not self._unknown:
            return
        parked, self._unknown = self._unknown, []
        try:
            await self._directory.refresh_for_unknown(max(at for _, at in parked))
        except BaseException:
            self._unknown = parked + self._unknown
            raise
        for reading, received_ms in parked:
            if self._directory.cover_of(reading.device_id) is not None:
                self.evaluate(reading, received_ms)
            elif not self._directory.is_registered(reading.device_id):
                self._directory.note_unregistered(reading.device_id, received_ms)

    def _record(
        self,
        key: tuple[str, str],
        context: CoverContext,
        device_id: str | None,
        change: tuple[KindState, list[AlertEvent]],
        received_ms: int,
    ) -> None:
        state, events = change
        rest = _is_rest(state)
        if rest:
            self._states.pop(key, None)
        else:
            self._states[key] = state
        self._pending.states[key] = _REST if rest else state
        for event in events:
            self._metrics.events.labels(kind=event.kind.value, action=event.action.value).inc()
            if event.action is not Action.TRANSIENT:
                self._pending.events.append((context, device_id, event, received_ms))
        self._generation += 1
        if events:
            self._work.set()  # commit now: someone is waiting for this alert

    def _back_from_silence(self, context: CoverContext, reading: Reading, received_ms: int) -> None:
        key = (context.info.cover_id, AlertKind.DEVICE_SILENT.value)
        state = self._states.get(key)
        if state is None or not state.active:
            return
        event = AlertEvent(AlertKind.DEVICE_SILENT, Action.CLEARED, Severity.MINOR, reading.ts_ms)
        self._record(key, context, reading.device_id, (_REST, [event]), received_ms)

    def _count_for_verification(self, cover_id: str, reading: Reading) -> None:
        """After a fix: normal readings count towards verifying it; an alert still active
        and still over its limit means the fix did not hold."""
        verifying = self._verifying.get(cover_id)
        if verifying is None or reading.ts_ms < verifying[1]:
            return
        active = [c for c in CRITERIA if self._states.get((cover_id, c.kind.value), _REST).active]
        if not active:
            case_id = verifying[0]
            self._verify_counts[case_id] = self._verify_counts.get(case_id, 0) + 1
            return
        context = self._directory.cover(cover_id)
        if context is None:
            return
        over = [c.kind.value for c in active if c.classify(reading, context.rule) is Level.OVER]
        if over:
            del self._verifying[cover_id]  # once; the desk puts the case back to dispatched
            self._pending.reopens[cover_id] = (
                f"{', '.join(over)} still over the limit after the fix"
            )
            self._generation += 1
            self._work.set()

    # Committing

    async def commit_through(self, generation: int) -> None:
        """Returns once every evaluation up to `generation` is committed."""
        if generation <= self._committed:
            return
        self._work.set()
        async with self._committed_changed:
            await self._committed_changed.wait_for(lambda: self._committed >= generation)

    async def commit_pending(self) -> None:
        """Commits what evaluations changed so far (the committer task does it by itself)."""
        await self._commit_once()

    async def close(self) -> None:
        """After the last evaluation: commit it and write device progress."""
        await self._commit_once()
        await self.flush_progress()

    async def run(self) -> None:
        """The committer, the progress writer and the timers; runs until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._commit_forever(), name="alert-committer")
            group.create_task(self._flush_progress_forever(), name="alert-progress")
            group.create_task(self._tick_forever(), name="alert-timers")

    async def _commit_forever(self) -> None:
        attempt = 0
        while True:
            await self._work.wait()
            self._work.clear()
            try:
                await self._commit_once()
                attempt = 0
            except Exception:  # the database is down or refused: keep the changes, retry
                logger.exception("alert commit failed; retrying")
                await self._sleep(_COMMIT_RETRY_S[min(attempt, len(_COMMIT_RETRY_S) - 1)])
                attempt += 1
                self._work.set()

    async def _commit_once(self) -> None:
        await self._resolve_unknown()
        pending, target = self._pending, self._generation
        if not pending:
            await self._mark_committed(target)
            return
        self._pending = _Pending()
        try:
            outcome = await self._write(pending)
        except BaseException:
            self._restore(pending)
            raise
        committed_ms = self._clock_ms()
        self._observe_latency(pending, committed_ms)
        self._metrics.cases_opened.inc(outcome.opened_cases)
        await self._mark_committed(target)
        if pending.events or pending.reopens:
            self._on_commit()

    def _restore(self, pending: _Pending) -> None:
        """Puts changes that failed to commit back, under anything newer."""
        merged = {**pending.states, **self._pending.states}
        reopens = {**pending.reopens, **self._pending.reopens}
        self._pending = _Pending(
            states=merged, events=pending.events + self._pending.events, reopens=reopens
        )

    async def _write(self, pending: _Pending) -> DeskOutcome:
        outcome = DeskOutcome()
        now_ms = self._clock_ms()
        async with transaction(self._sessions) as session:
            await self._write_states(session, pending.states, now_ms)
            desk = CaseDesk(session, self._policy, webhook_units=self._directory.webhook_units())
            for cover_id, reason in pending.reopens.items():
                await desk.reopen_if_resolved(cover_id, reason, now_ms)
            for context, device_id, event, received_ms in pending.events:
                await desk.apply_alert_event(
                    cover=context.info,
                    device_id=device_id,
                    event=event,
                    received_ms=received_ms,
                    now_ms=now_ms,
                    outcome=outcome,
                )
            if outcome.alert_ids:
                await self._stamp_committed(session, outcome.alert_ids)
        return outcome

    @staticmethod
    async def _write_states(
        session: AsyncSession, states: dict[tuple[str, str], KindState], now_ms: int
    ) -> None:
        for (cover_id, kind), state in states.items():
            if state is _REST:
                await session.execute(
                    delete(AlertStateRow).where(
                        AlertStateRow.cover_id == cover_id, AlertStateRow.kind == kind
                    )
                )
            else:
                await session.merge(
                    AlertStateRow(
                        cover_id=cover_id, kind=kind, state=state_to_json(state), updated_ms=now_ms
                    )
                )

    async def _stamp_committed(self, session: AsyncSession, alert_ids: list[int]) -> None:
        stamp = self._clock_ms()
        for alert in await session.scalars(select(AlertRow).where(AlertRow.id.in_(alert_ids))):
            alert.committed_ms = stamp

    def _observe_latency(self, pending: _Pending, committed_ms: int) -> None:
        for _, _, event, received_ms in pending.events:
            if event.action is Action.RAISED:
                self._metrics.publish_to_commit.observe(max(0, committed_ms - event.ts_ms) / 1e3)
                self._metrics.receive_to_commit.observe(max(0, committed_ms - received_ms) / 1e3)

    async def _mark_committed(self, generation: int) -> None:
        async with self._committed_changed:
            self._committed = max(self._committed, generation)
            self._committed_changed.notify_all()

    # Progress and timers

    async def _flush_progress_forever(self) -> None:
        while True:
            await self._sleep(PROGRESS_FLUSH_S)
            try:
                await self.flush_progress()
            except Exception:  # retried at the next flush; the values only grow
                logger.exception("writing device progress failed")

    async def flush_progress(self) -> None:
        # One flush at a time, rows in one order: at shutdown `close()` flushes while the
        # periodic flush may still be writing an overlapping set of devices, and two such
        # transactions deadlocked on PostgreSQL (the soak's stop exited 1 in 3 of 8 runs).
        async with self._progress_lock:
            await self._flush_progress_once()

    async def _flush_progress_once(self) -> None:
        dirty, self._dirty_progress = self._dirty_progress, set()
        if not dirty:
            return
        try:
            async with transaction(self._sessions) as session:
                dialect = (await session.connection()).dialect.name
                rows = [
                    _progress_row(device_id, self._progress[device_id])
                    for device_id in sorted(dirty)
                ]
                for start in range(0, len(rows), _PROGRESS_CHUNK):
                    await session.execute(
                        _progress_upsert(dialect), rows[start : start + _PROGRESS_CHUNK]
                    )
        except BaseException:
            self._dirty_progress |= dirty
            raise

    async def _tick_forever(self) -> None:
        while True:
            await self._sleep(TICK_S)
            try:
                await self.run_timers()
            except Exception:  # the next tick tries again; deadlines are in the database
                logger.exception("alert timers failed")

    async def run_timers(self) -> None:
        """Tilt confirmation, device silence, case deadlines and verification windows."""
        now_ms = self._clock_ms()
        self._confirm_pending(now_ms)
        if now_ms - self._silence_checked_ms >= SILENCE_CHECK_MS:
            self._silence_checked_ms = now_ms
            self._detect_silence(now_ms)
        if self._pending:
            self._work.set()
        async with transaction(self._sessions) as session:
            desk = CaseDesk(session, self._policy, webhook_units=self._directory.webhook_units())
            await desk.run_timers(now_ms, self._verify_counts)
            resolved = await desk.resolved_cases()
        self._verifying = {c.cover_id: (c.id, c.verify_since_ms or 0) for c in resolved}
        live = {case_id for case_id, _ in self._verifying.values()}
        self._verify_counts = {k: v for k, v in self._verify_counts.items() if k in live}
        self._on_commit()

    def _confirm_pending(self, now_ms: int) -> None:
        for key, state in list(self._states.items()):
            if state.pending_since_ms is None or state.active:
                continue
            criterion = CRITERION_OF.get(AlertKind(key[1]))
            context = self._directory.cover(key[0])
            if criterion is None or context is None:
                continue
            new_state, events = tick(state, now_ms, context.rule, criterion)
            if events:
                self._record(key, context, None, (new_state, events), now_ms)

    def _detect_silence(self, now_ms: int) -> None:
        for device_id, (_, last_seen) in self._progress.items():
            context = self._directory.cover_of(device_id)
            if context is None:
                continue
            key = (context.info.cover_id, AlertKind.DEVICE_SILENT.value)
            active = self._states.get(key, _REST).active
            action = silence(
                last_seen_ms=last_seen,
                interval_s=context.report_interval_s,
                now_ms=now_ms,
                active=active,
            )
            if action is Action.RAISED:
                event = AlertEvent(AlertKind.DEVICE_SILENT, action, Severity.MINOR, now_ms)
                silent = KindState(active=True, last_ts_ms=now_ms)
                self._record(key, context, device_id, (silent, [event]), now_ms)

    @property
    def active_states(self) -> int:
        return sum(1 for state in self._states.values() if state.active)


# Device progress rows written per statement: one multi-row upsert instead of a SELECT and
# a write per device (`session.merge` took about half the service's CPU at 2,000
# readings/s); the chunk keeps each statement under the drivers' parameter limits.
_PROGRESS_CHUNK = 2000


def _progress_row(device_id: str, progress: tuple[int, int]) -> dict[str, Any]:
    last_ts, last_seen = progress
    return {"device_id": device_id, "last_ts_ms": last_ts, "last_seen_ms": last_seen}


def _progress_upsert(dialect: str) -> Insert:
    """Insert a device's progress, or overwrite the row that exists (as `merge` did)."""
    row = DeviceProgress
    statement: postgresql.Insert | sqlite.Insert = (
        postgresql.insert(row) if dialect == "postgresql" else sqlite.insert(row)
    )
    return statement.on_conflict_do_update(
        index_elements=["device_id"],
        set_={
            "last_ts_ms": statement.excluded.last_ts_ms,
            "last_seen_ms": statement.excluded.last_seen_ms,
        },
    )
