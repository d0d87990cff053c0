"""The outbox dispatcher: due deliveries out through the notifiers, retried with back-off.

The rules it keeps:

- At least once. A delivery is marked delivered only after its notifier returned; a crash
  in between means one more attempt later, never a lost event. Receivers deduplicate on
  the event id.
- Lanes. Attempts are ordered per (channel, unit): a lane tries its oldest undelivered
  event first and goes no further until that one is delivered, so a unit's events arrive
  in order and a dead endpoint costs one attempt per back-off period, not one per event.
  Lanes run concurrently (bounded), so a dead webhook blocks neither other units nor the
  MQTT channel. The gate is in SQL (`_candidates`), which makes it hold after a restart
  and across processes too.
- Claims. Before an attempt the row is claimed by moving `next_attempt_ms` a lease ahead,
  in one conditional UPDATE: two dispatchers on one database do not both send it, and an
  attempt cut short by a crash is due again when the lease runs out.
- Back-off. A failed attempt counts, keeps its error text and is due again after an
  exponential delay with jitter, capped; a non-retryable failure (the receiver refused the
  event, the unit has no webhook) waits the cap at once, since DESIGN §11 retries anything
  that is not a 2xx but a misconfigured endpoint is not fixed in seconds.
- Pruning. Every `prune_interval_s`, events delivered on every channel more than
  `keep_ms` ago are removed in small batches (`outbox.prune_delivered`), so the outbox
  stays bounded; undelivered events are never removed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import Update, and_, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.models import AlertRow, DeliveryRow, OutboxRow
from alerting.notifiers import DeliveryError, Notifier, OutboxEvent
from alerting.outbox import MQTT_CHANNEL, WEBHOOK_CHANNEL, prune_delivered
from core.clock import wall_clock_ms
from core.db import transaction
from core.settings import Settings

logger = logging.getLogger(__name__)

ALERT_RAISED = "alert.raised"
# Failing deliveries listed by `delivery_summary`, worst first: enough to name dead lanes.
_SUMMARY_FAILING_ROWS = 20
# Bounds the exponent of the back-off: 2**30 × the first delay is far past any cap.
_MAX_DOUBLINGS = 30
# Histogram buckets, seconds from the event (device time) to delivery: the target is well
# under a second, the tail is an endpoint that was down.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_DAY_MS = 24 * 3600 * 1000

Sleep = Callable[[float], Coroutine[Any, Any, None]]
Lane = tuple[str, str]  # (channel, unit_code)


@dataclass(frozen=True, slots=True)
class DispatchOptions:
    """How the dispatcher paces itself. Times in `*_ms` are on the injected clock."""

    page_size: int = 200  # candidate rows per scheduling round, all lanes together
    per_lane: int = 20  # rows one lane takes per round: a busy unit cannot fill the page
    concurrency: int = 16  # attempts in flight at once, all lanes together
    # Covers events committed by other processes, and retries coming due; `wake()` covers
    # this process's own commits within milliseconds.
    poll_interval_s: float = 1.0
    # A safety net over the notifiers' own timeouts, so no lane hangs on a bug.
    attempt_timeout_s: float = 15.0
    # How long a claimed row is kept from other dispatchers: longer than any attempt.
    lease_ms: int = 30_000
    backoff_first_ms: int = 1_000
    backoff_max_ms: int = 300_000  # 5 min: a returning endpoint waits at most this long
    error_chars: int = 500  # of `last_error`
    # Delivered events are kept this long (the live stream resumes from them), then pruned.
    keep_ms: int = 30 * _DAY_MS
    prune_interval_s: float = 3600.0
    # Rows per pruning transaction: short enough not to hold up the engine's writes.
    prune_batch: int = 500
    prune_pause_s: float = 0.05  # between batches, so other writers get their turn

    @classmethod
    def from_settings(cls, settings: Settings) -> DispatchOptions:
        return cls(keep_ms=round(settings.outbox_keep_days * _DAY_MS))

    def __post_init__(self) -> None:
        if self.lease_ms <= self.attempt_timeout_s * 1000:
            raise ValueError("lease_ms must exceed attempt_timeout_s, or claims expire mid-attempt")
        if min(self.page_size, self.per_lane, self.concurrency, self.prune_batch) < 1:
            raise ValueError("page_size, per_lane, concurrency and prune_batch must be at least 1")


def retry_delay_ms(attempts: int, error: DeliveryError, options: DispatchOptions) -> int:
    """When to try again after the `attempts`-th failed attempt, with jitter against herds."""
    cap = options.backoff_max_ms
    ceiling = cap
    if error.retryable:
        doublings = min(max(attempts - 1, 0), _MAX_DOUBLINGS)
        ceiling = min(cap, options.backoff_first_ms * 2**doublings)
    delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not cryptography
    if error.retry_after is not None:
        # Honoured up to the cap: an alert is worth asking again sooner than told.
        delay = max(delay, min(error.retry_after * 1000, cap))
    return int(delay)


class DispatchMetrics:
    """Prometheus metrics of the dispatcher, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry, channels: list[str]) -> None:
        self.delivered = Counter(
            "smartcover_notifications_delivered",
            "Outbox events delivered, by channel",
            ["channel"],
            registry=registry,
        )
        self.failed = Counter(
            "smartcover_notification_attempts_failed",
            "Delivery attempts that failed (and will be retried), by channel",
            ["channel"],
            registry=registry,
        )
        self.latency = Histogram(
            "smartcover_notification_latency_seconds",
            "From the event (device time for alerts) to its delivery, by channel",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_to_notification = Histogram(
            "smartcover_alert_publish_to_notification_seconds",
            "From the device's reading to the first delivery of its alert on any channel",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.pruned = Counter(
            "smartcover_outbox_pruned",
            "Delivered outbox events removed once older than the keep period",
            registry=registry,
        )
        for channel in channels:  # visible from the start, at zero
            self.delivered.labels(channel=channel)
            self.failed.labels(channel=channel)
            self.latency.labels(channel=channel)


@dataclass(frozen=True, slots=True)
class _Claim:
    event: OutboxEvent
    channel: str
    attempts: int  # before this attempt


class OutboxDispatcher:
    """Delivers the outbox through `notifiers` (channel name → notifier) until cancelled.

    `wake()` after committing events gets them attempted at once. Not thread-safe: call
    `wake()` from the event loop the dispatcher runs in.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        notifiers: Mapping[str, Notifier],
        *,
        registry: CollectorRegistry,
        options: DispatchOptions | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._sessions = sessions
        self._notifiers = dict(notifiers)
        self._options = options or DispatchOptions()
        self._clock_ms = clock_ms
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._options.concurrency)
        self._lanes: dict[Lane, deque[int]] = {}
        self.metrics = DispatchMetrics(registry, sorted(self._notifiers))
        self.delivered = 0  # this dispatcher's totals, for its summary line and tests
        self.failed_attempts = 0

    def wake(self) -> None:
        """Looks for due deliveries now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Dispatches until cancelled; attempts in flight are then abandoned (and retried)."""
        started = time.monotonic()
        logger.info("outbox dispatcher started, channels: %s", ", ".join(sorted(self._notifiers)))
        try:
            async with asyncio.TaskGroup() as lanes:
                lanes.create_task(self._prune_forever(), name="outbox-prune")
                while True:
                    self._wake.clear()
                    try:
                        self._start_lanes(lanes, await self._candidates(self._clock_ms()))
                    except (SQLAlchemyError, OSError) as exc:
                        logger.warning("outbox: cannot read due deliveries: %s", exc)
                    await self._idle()
        finally:
            logger.info(
                "outbox dispatcher stopped after %.1f s: %d delivered, %d failed attempts, "
                "%d lanes were in flight",
                time.monotonic() - started,
                self.delivered,
                self.failed_attempts,
                len(self._lanes),
            )

    async def _idle(self) -> None:
        """Until `wake()` or the poll interval, whichever comes first."""
        if self._wake.is_set():
            return
        async with asyncio.TaskGroup() as group:
            woken = group.create_task(self._wake.wait())
            slept = group.create_task(self._sleep(self._options.poll_interval_s))
            woken.add_done_callback(lambda _: slept.cancel())
            slept.add_done_callback(lambda _: woken.cancel())

    # -- keeping the outbox bounded ----------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("outbox: pruning failed, trying again later: %s", exc)
            await self._sleep(self._options.prune_interval_s)

    async def prune(self) -> int:
        """Removes events delivered more than `keep_ms` ago, batch by batch; how many went."""
        options = self._options
        before_ms = self._clock_ms() - options.keep_ms
        removed = 0
        while True:
            batch = await prune_delivered(
                self._sessions, before_ms=before_ms, limit=options.prune_batch
            )
            if batch is None:
                logger.debug("outbox: another process is pruning")
                break
            removed += batch
            self.metrics.pruned.inc(batch)
            if batch < options.prune_batch:
                break
            await self._sleep(options.prune_pause_s)
        if removed:
            logger.info(
                "outbox: pruned %d events delivered more than %.0f days ago",
                removed,
                options.keep_ms / _DAY_MS,
            )
        return removed

    # -- choosing what to attempt ------------------------------------------------------

    async def _candidates(self, now_ms: int) -> list[tuple[Lane, int]]:
        """Due rows at the head of their lanes: (lane, outbox id), lane heads first.

        A row qualifies when it and every older undelivered row of its lane are due (the
        running maximum of `next_attempt_ms` is the gate): a lane waiting for a retry of
        its oldest event, or with an attempt in flight (claimed, so not due), yields nothing.
        """
        lane = (DeliveryRow.channel, OutboxRow.unit_code)
        order = DeliveryRow.outbox_id
        ranked = (
            select(
                DeliveryRow.outbox_id,
                DeliveryRow.channel,
                OutboxRow.unit_code,
                DeliveryRow.next_attempt_ms,
                func.max(DeliveryRow.next_attempt_ms)
                .over(partition_by=lane, order_by=order)
                .label("gate"),
                func.row_number().over(partition_by=lane, order_by=order).label("rank"),
            )
            .join(OutboxRow, OutboxRow.id == DeliveryRow.outbox_id)
            .where(
                DeliveryRow.delivered_ms.is_(None),
                DeliveryRow.channel.in_(self._notifiers),
            )
            .subquery()
        )
        query = (
            select(ranked.c.channel, ranked.c.unit_code, ranked.c.outbox_id)
            .where(ranked.c.gate <= now_ms, ranked.c.rank <= self._options.per_lane)
            .order_by(ranked.c.rank, ranked.c.next_attempt_ms, ranked.c.outbox_id)
            .limit(self._options.page_size)
        )
        async with transaction(self._sessions, write=False) as session:
            rows = (await session.execute(query)).all()
        return [((channel, unit), outbox_id) for channel, unit, outbox_id in rows]

    def _start_lanes(self, group: asyncio.TaskGroup, candidates: list[tuple[Lane, int]]) -> None:
        fresh: dict[Lane, deque[int]] = {}
        for lane, outbox_id in candidates:
            if lane not in self._lanes:  # a running lane asks for more when it is done
                fresh.setdefault(lane, deque()).append(outbox_id)
        for lane, queue in fresh.items():
            self._lanes[lane] = queue
            group.create_task(self._run_lane(lane, queue), name=f"outbox-{lane[0]}-{lane[1]}")

    # -- one lane ----------------------------------------------------------------------

    async def _run_lane(self, lane: Lane, queue: deque[int]) -> None:
        """Attempts the lane's rows in order, stopping at the first that is not delivered."""
        drained = False
        try:
            while queue:
                if not await self._attempt(lane[0], queue.popleft()):
                    return  # the rest waits behind its head, gated in `_candidates`
            drained = True
        except (SQLAlchemyError, OSError) as exc:
            # Whatever was claimed is due again when its lease runs out.
            logger.warning("outbox: database error in lane %s/%s: %s", lane[0], lane[1], exc)
        finally:
            del self._lanes[lane]
            if drained:
                self._wake.set()  # more of this lane may be waiting

    async def _attempt(self, channel: str, outbox_id: int) -> bool:
        """One attempt at one row: claim, deliver, mark. True when delivered."""
        # The slot is taken before the claim, so waiting for one does not eat the lease.
        async with self._slots:
            claim = await self._claim(channel, outbox_id)
            if claim is None:
                return False  # delivered or claimed meanwhile by another dispatcher
            error = await self._deliver(claim)
            if error is None:
                await self._mark_delivered(claim)
                return True
            await self._mark_failed(claim, error)
            return False

    async def _deliver(self, claim: _Claim) -> DeliveryError | None:
        """The notifier's verdict: None when delivered, else why not."""
        try:
            async with asyncio.timeout(self._options.attempt_timeout_s):
                await self._notifiers[claim.channel].deliver(claim.event)
        except DeliveryError as exc:
            return exc
        except TimeoutError:
            timeout_s = self._options.attempt_timeout_s
            return DeliveryError(f"no result within {timeout_s:g} s", retryable=True)
        except Exception as exc:
            # A notifier's bug or a poison event must not stop delivery to everyone: the
            # traceback goes to the log, the row waits the longest back-off.
            logger.exception(
                "outbox: notifier %s failed on event %s", claim.channel, claim.event.event_id
            )
            return DeliveryError(f"{type(exc).__name__}: {exc}", retryable=False)
        return None

    async def _claim(self, channel: str, outbox_id: int) -> _Claim | None:
        now = self._clock_ms()
        claim = (
            update(DeliveryRow)
            .where(
                DeliveryRow.outbox_id == outbox_id,
                DeliveryRow.channel == channel,
                DeliveryRow.delivered_ms.is_(None),
                DeliveryRow.next_attempt_ms <= now,
            )
            .values(next_attempt_ms=now + self._options.lease_ms)
            .returning(DeliveryRow.attempts)
            .execution_options(synchronize_session=False)
        )
        async with transaction(self._sessions) as session:
            attempts = (await session.execute(claim)).scalar_one_or_none()
            if attempts is None:
                return None
            row = await session.get_one(OutboxRow, outbox_id)
            event = OutboxEvent(
                outbox_id=row.id,
                event_id=row.event_id,
                type=row.type,
                unit_code=row.unit_code,
                occurred_ms=row.occurred_ms,
                payload=row.payload,
            )
        return _Claim(event=event, channel=channel, attempts=attempts)

    async def _mark_delivered(self, claim: _Claim) -> None:
        now = self._clock_ms()
        event = claim.event
        async with transaction(self._sessions) as session:
            await session.execute(
                _this_delivery(claim).values(delivered_ms=now, attempts=claim.attempts + 1)
            )
            alert_id = _raised_alert_id(event)
            if alert_id is not None:
                first = await session.execute(
                    update(AlertRow)
                    .where(AlertRow.id == alert_id, AlertRow.notified_ms.is_(None))
                    .values(notified_ms=now)
                    .execution_options(synchronize_session=False)
                )
                if first.rowcount:  # type: ignore[attr-defined]  # CursorResult's
                    self._observe_first_notification(event, now)
        self.delivered += 1
        self.metrics.delivered.labels(channel=claim.channel).inc()
        latency_s = max(0, now - event.occurred_ms) / 1000
        self.metrics.latency.labels(channel=claim.channel).observe(latency_s)
        logger.debug("outbox: %s %s delivered on %s", event.type, event.event_id, claim.channel)

    def _observe_first_notification(self, event: OutboxEvent, now_ms: int) -> None:
        alert = event.payload.get("alert")
        raised = alert.get("raised_ms") if isinstance(alert, dict) else None
        if isinstance(raised, int):
            self.metrics.publish_to_notification.observe(max(0, now_ms - raised) / 1000)

    async def _mark_failed(self, claim: _Claim, error: DeliveryError) -> None:
        attempts = claim.attempts + 1
        delay_ms = retry_delay_ms(attempts, error, self._options)
        text = str(error)[: self._options.error_chars]
        async with transaction(self._sessions) as session:
            await session.execute(
                _this_delivery(claim).values(
                    attempts=attempts,
                    next_attempt_ms=self._clock_ms() + delay_ms,
                    last_error=text,
                )
            )
        self.failed_attempts += 1
        self.metrics.failed.labels(channel=claim.channel).inc()
        logger.warning(
            "outbox: %s to unit %s on %s failed (attempt %d): %s; next in %.1f s",
            claim.event.type,
            claim.event.unit_code,
            claim.channel,
            attempts,
            text,
            delay_ms / 1000,
        )


def _this_delivery(claim: _Claim) -> Update:
    return (
        update(DeliveryRow)
        .where(
            DeliveryRow.outbox_id == claim.event.outbox_id,
            DeliveryRow.channel == claim.channel,
            DeliveryRow.delivered_ms.is_(None),
        )
        .execution_options(synchronize_session=False)
    )


def _raised_alert_id(event: OutboxEvent) -> int | None:
    """The alert an `alert.raised` event reports (payload `alert.id`), else None."""
    if event.type != ALERT_RAISED:
        return None
    alert = event.payload.get("alert")
    alert_id = alert.get("id") if isinstance(alert, Mapping) else None
    return alert_id if isinstance(alert_id, int) and not isinstance(alert_id, bool) else None


# -- what the API shows ----------------------------------------------------------------


class ChannelSummary(TypedDict):
    pending: int  # not delivered yet
    failing: int  # of those, how many have failed at least once
    delivered: int
    oldest_pending_age_s: float | None  # since the oldest pending event occurred


class FailingDelivery(TypedDict):
    event_id: str
    type: str
    unit_code: str
    channel: str
    attempts: int
    next_attempt_ms: int
    last_error: str | None


class DeliverySummary(TypedDict):
    channels: dict[str, ChannelSummary]
    failing: list[FailingDelivery]  # the most-attempted pending deliveries, worst first


def _empty_channel() -> ChannelSummary:
    return ChannelSummary(pending=0, failing=0, delivered=0, oldest_pending_age_s=None)


async def delivery_summary(
    sessions: async_sessionmaker[AsyncSession],
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
    failing_limit: int = _SUMMARY_FAILING_ROWS,
) -> DeliverySummary:
    """Pending, failing and delivered counts per channel, and the deliveries that fail."""
    now = clock_ms()
    pending = DeliveryRow.delivered_ms.is_(None)
    channels = {channel: _empty_channel() for channel in (MQTT_CHANNEL, WEBHOOK_CHANNEL)}
    by_channel = (
        select(
            DeliveryRow.channel,
            func.count(),
            func.count().filter(DeliveryRow.attempts > 0),
            func.min(OutboxRow.occurred_ms),
        )
        .join(OutboxRow, OutboxRow.id == DeliveryRow.outbox_id)
        .where(pending)
        .group_by(DeliveryRow.channel)
    )
    delivered = (
        select(DeliveryRow.channel, func.count())
        .where(DeliveryRow.delivered_ms.is_not(None))
        .group_by(DeliveryRow.channel)
    )
    failing = (
        select(
            OutboxRow.event_id,
            OutboxRow.type,
            OutboxRow.unit_code,
            DeliveryRow.channel,
            DeliveryRow.attempts,
            DeliveryRow.next_attempt_ms,
            DeliveryRow.last_error,
        )
        .join(OutboxRow, OutboxRow.id == DeliveryRow.outbox_id)
        .where(and_(pending, DeliveryRow.attempts > 0))
        .order_by(DeliveryRow.attempts.desc(), DeliveryRow.outbox_id)
        .limit(failing_limit)
    )
    async with transaction(sessions, write=False) as session:
        for channel, count, failed, oldest_ms in (await session.execute(by_channel)).all():
            summary = channels.setdefault(channel, _empty_channel())
            summary["pending"] = count
            summary["failing"] = failed
            summary["oldest_pending_age_s"] = max(0, now - oldest_ms) / 1000
        for channel, count in (await session.execute(delivered)).all():
            channels.setdefault(channel, _empty_channel())["delivered"] = count
        rows = (await session.execute(failing)).all()
    return DeliverySummary(
        channels=channels,
        failing=[
            FailingDelivery(
                event_id=row.event_id,
                type=row.type,
                unit_code=row.unit_code,
                channel=row.channel,
                attempts=row.attempts,
                next_attempt_ms=row.next_attempt_ms,
                last_error=row.last_error,
            )
            for row in rows
        ],
    )
