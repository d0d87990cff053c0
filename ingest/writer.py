"""Makes a batch durable: dead letters to their log, readings to the store or the spool.

The rules (DESIGN §10): an unreachable store is retried with back-off until a short
deadline, then the batch goes to the fsync'd spool; while the store stays down, later
batches go straight to the spool. Points the store rejects (400) are found by splitting
the batch and dead-lettered one by one; a batch over the store's size limit (413) is
split in halves. The spool is replayed oldest first once the store answers again.
When the spool is full as well, `persist` waits until the store is back or the replay has
made room: the batch is not acknowledged meanwhile, the service stops reading, and the
broker keeps the rest (back-pressure; nothing is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from core.contract import Reading, Reason
from core.deadletters import DeadLetter, DeadLetterLog
from core.timeseries import (
    BatchTooLarge,
    ReadingStore,
    StoreAuthFailed,
    StoreRejected,
    TimeSeriesError,
)
from ingest.metrics import IngestMetrics
from ingest.spool import Spool

logger = logging.getLogger(__name__)

# Back-off between write attempts: starts small (a blip), grows to a second.
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# How often the replayer asks a store that is down whether it is back.
_PROBE_INTERVAL_S = 1.0
_MB = 1024 * 1024


@dataclass(slots=True)
class Batch:
    """Messages received on one connection, made durable and acknowledged together."""

    connection_id: int
    opened_at: float = field(default_factory=time.monotonic)
    messages: int = 0
    generation: int = 0  # the evaluator's generation when the batch was sealed
    packet_ids: list[int] = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)
    # The cover each reading's device was bound to when it arrived (its `cover_id` tag):
    # looked up on receipt, as a sensor moved before the batch is written must not take
    # its earlier readings along to the new cover.
    covers: list[str | None] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # HTTP pushes waiting for this batch: resolved once it is durable and evaluated, as
    # its MQTT messages are acknowledged then (ingest.service.IngestService.submit).
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.readings) + len(self.dead_letters)


@dataclass
class StoreHealth:
    """What /readyz and the logs say about the store."""

    down: bool = False
    auth_failed: bool = False
    last_error: str = ""


def _device_of(point: bytes) -> str:
    """The device_id tag of an encoded point (ids are [A-Za-z0-9_.-]: nothing escaped)."""
    series = point.split(b" ", 1)[0]
    for tag in series.split(b",")[1:]:
        if tag.startswith(b"device_id="):
            return tag.removeprefix(b"device_id=").decode(errors="replace")
    return "unknown"


def _backoff(attempt: int) -> float:
    ceiling = min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not cryptography


class BatchWriter:
    def __init__(
        self,
        *,
        store: ReadingStore,
        spool: Spool,
        dead_letters: DeadLetterLog,
        metrics: IngestMetrics,
        deadline_s: float,
        clock_ms: Callable[[], int],
        cover_of: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        """`cover_of` maps a device to the cover it is bound to, for the `cover_id` tag."""
        self._store = store
        self._cover_of = cover_of
        self._spool = spool
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._clock_ms = clock_ms
        self.health = StoreHealth()
        self._spool_lock = asyncio.Lock()
        self._room = asyncio.Event()  # set when the store is back or a segment is replayed
        self._full_since: float | None = None  # monotonic time the spool became full
        self._refresh_spool_gauges()

    def covers_now(self, readings: list[Reading]) -> list[str | None]:
        """The cover each reading's device is bound to now, for its `cover_id` tag."""
        cover_of = self._cover_of
        return [cover_of(reading.device_id) for reading in readings]

    async def persist(self, batch: Batch) -> None:
        """Returns once every reading and dead letter of the batch is durable."""
        covers = batch.covers
        if len(covers) != len(batch.readings):  # a batch put together without receipt tags
            covers = self.covers_now(batch.readings)
        points = self._store.encode(batch.readings, covers)
        rejected = await self._store_or_spool(points)
        letters = batch.dead_letters + [
            self._rejected_letter(points[i], why) for i, why in rejected
        ]
        if letters:
            await asyncio.to_thread(self._dead_letters.append, letters)
            for letter in letters:
                self._metrics.count_dead_letter(letter.reason)
            logger.warning(
                "dead-lettered %d: first %s on %s: %s (payload %.120r)",
                len(letters),
                letters[0].reason,
                letters[0].topic,
                letters[0].detail,
                letters[0].payload,
            )

    def _rejected_letter(self, point: bytes, why: str) -> DeadLetter:
        device = _device_of(point)
        return DeadLetter.of(
            at_ms=self._clock_ms(),
            topic=f"covers/{device}/telemetry",
            reason=Reason.STORE_REJECTED,
            detail=why,
            payload=point,
        )

    async def _store_or_spool(self, points: list[bytes]) -> list[tuple[int, str]]:
        """Writes to the store, or spools; returns the points the store rejected.

        With the store down and the spool full it waits, for as long as that lasts.
        """
        if not points:
            return []
        while True:
            if not self.health.down:
                rejected = await self._write_to_store(points)
                if rejected is not None:
                    self._spool_not_full()
                    return rejected
            if self._spool.has_room(points):
                await self._spool_points(points)
                self._spool_not_full()
                return []
            await self._wait_for_room()

    async def _write_to_store(self, points: list[bytes]) -> list[tuple[int, str]] | None:
        """The points the store rejected, or None when it is down (and now marked so)."""
        started = time.monotonic()
        try:
            rejected = await self._write_splitting(points, 0, time.monotonic() + self._deadline_s)
        except TimeSeriesError as exc:
            self._mark_down(exc)
            return None
        self._metrics.batch_write_seconds.observe(time.monotonic() - started)
        self._metrics.count_stored(len(points) - len(rejected))
        self._metrics.store_up.set(1)
        return rejected

    async def _wait_for_room(self) -> None:
        """One wait of a batch held back by a full spool: until room or the next probe."""
        if self._full_since is None:
            self._full_since = time.monotonic()
            self._metrics.spool_full.set(1)
            logger.error(
                "spool full (%.1f of %.1f MB) and the store down: readings are no longer "
                "acknowledged, the broker keeps them until the store is back",
                self._spool.size_bytes / _MB,
                (self._spool.max_bytes or 0) / _MB,
            )
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), _PROBE_INTERVAL_S)

    def _spool_not_full(self) -> None:
        if self._full_since is None:
            return
        logger.warning(
            "spool no longer full after %.0f s: acknowledging readings again (%.1f MB spooled)",
            time.monotonic() - self._full_since,
            self._spool.size_bytes / _MB,
        )
        self._full_since = None
        self._metrics.spool_full.set(0)

    async def _spool_points(self, points: list[bytes]) -> None:
        async with self._spool_lock:
            await asyncio.to_thread(self._spool.append, points)
        self._metrics.count_spooled(len(points))
        self._refresh_spool_gauges()

    def _mark_down(self, exc: TimeSeriesError) -> None:
        if not self.health.down:
            logger.error("time-series store unavailable, spooling readings locally: %s", exc)
        self.health.down = True
        self.health.auth_failed = isinstance(exc, StoreAuthFailed)
        self.health.last_error = str(exc)
        self._metrics.store_up.set(0)

    def _mark_up(self) -> None:
        if self.health.down:
            logger.warning("time-series store reachable again")
        self.health = StoreHealth()
        self._metrics.store_up.set(1)
        self._room.set()

    async def _write_splitting(
        self, points: Sequence[bytes], offset: int, deadline: float
    ) -> list[tuple[int, str]]:
        """Writes `points`; returns (index, reason) of each point the store rejects."""
        try:
            await self._write_retrying(points, deadline)
        except (StoreRejected, BatchTooLarge) as exc:
            if len(points) == 1:
                if isinstance(exc, BatchTooLarge):
                    raise
                return [(offset, str(exc))]
            middle = len(points) // 2
            first = await self._write_splitting(points[:middle], offset, deadline)
            second = await self._write_splitting(points[middle:], offset + middle, deadline)
            return first + second
        return []

    async def _write_retrying(self, points: Sequence[bytes], deadline: float) -> None:
        attempt = 0
        while True:
            try:
                await self._store.write(points)
            except TimeSeriesError as exc:
                if not exc.retryable:
                    raise
                pause = exc.retry_after if exc.retry_after is not None else _backoff(attempt)
                if time.monotonic() + pause > deadline:
                    raise
                logger.info("store write failed (%s), retrying in %.2f s", exc, pause)
                await asyncio.sleep(pause)
                attempt += 1
            else:
                return

    async def replay_forever(self) -> None:
        """Drains the spool into the store, oldest segment first, whenever the store is up."""
        while True:
            segment = await asyncio.to_thread(self._spool.oldest)
            if segment is None:
                if self.health.down:
                    await self._probe()
                await asyncio.sleep(_PROBE_INTERVAL_S)
                continue
            try:
                deadline = time.monotonic() + self._deadline_s
                rejected = await self._write_splitting(segment.points, 0, deadline)
            except TimeSeriesError as exc:
                self._mark_down(exc)
                await asyncio.sleep(_PROBE_INTERVAL_S)
                continue
            await self._finish_replay(segment.points, rejected)
            async with self._spool_lock:
                await asyncio.to_thread(self._spool.remove, segment)
            self._refresh_spool_gauges()
            self._mark_up()  # and room in the spool for a batch waiting for it

    async def _finish_replay(self, points: list[bytes], rejected: list[tuple[int, str]]) -> None:
        letters = [self._rejected_letter(points[index], why) for index, why in rejected]
        if letters:
            await asyncio.to_thread(self._dead_letters.append, letters)
            self._metrics.count_dead_letter(Reason.STORE_REJECTED, len(letters))
        replayed = len(points) - len(rejected)
        self._metrics.totals.replayed += replayed
        self._metrics.count_stored(replayed)
        logger.info("replayed %d spooled readings", replayed)

    async def prune_dead_letters(self, before_ms: int) -> int:
        """Removes dead letters written before `before_ms`; returns how many went."""
        removed = await asyncio.to_thread(self._dead_letters.prune, before_ms)
        if removed:
            self._metrics.dead_letters_pruned.inc(removed)
            before = datetime.fromtimestamp(before_ms / 1000, UTC).isoformat(timespec="seconds")
            logger.info("pruned %d dead letters written before %s", removed, before)
        return removed

    async def _probe(self) -> None:
        try:
            await self._store.ping()
        except TimeSeriesError:
            return
        self._mark_up()

    def _refresh_spool_gauges(self) -> None:
        self._metrics.spool_bytes.set(self._spool.size_bytes)
        self._metrics.spool_segments.set(self._spool.segment_count())

    @property
    def spool_empty(self) -> bool:
        return self._spool.size_bytes == 0
