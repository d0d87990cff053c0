"""The ingest service: broker session, decoding into batches, writing, acknowledging, stopping.

The flow of one message: the connection hands each PUBLISH to `_on_message` (synchronous,
in the event loop); it is decoded at once and added to the open batch together with its
packet id. A batch is sealed when full or old; sealed batches are made durable one after
another by the writer, and only then are their packet ids acknowledged, all in one write.
While two sealed batches wait, the socket is not read: the broker holds the rest
(back-pressure instead of an unbounded queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from core.clock import wall_clock_ms
from core.contract import Decoded, Reading, Reason, TelemetryDecoder
from core.deadletters import DeadLetter
from core.settings import Settings
from ingest import mqtt
from ingest.errors import IngestUnavailable, MqttError, MqttRefused
from ingest.foreign_subscriptions import (
    SERVICE_SUBSCRIPTION_ID,
    ForeignSubscriptions,
    own_filter,
)
from ingest.metrics import IngestMetrics
from ingest.rate_guard import DeviceRateGuard
from ingest.writer import Batch, BatchWriter

logger = logging.getLogger(__name__)

# Sealed batches allowed to wait for the writer before the socket stops being read.
_MAX_SEALED_BATCHES = 2
# Reconnect back-off: from half a second up to half a minute, with jitter.
_RECONNECT_FIRST_S = 0.5
_RECONNECT_MAX_S = 30.0
# How often dead letters past their keep period are removed: they are kept for days.
_PRUNE_INTERVAL_S = 3600.0
_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """The settings the pipeline uses, taken once from `Settings`."""

    endpoint_url: str
    client_id: str
    share_group: str
    session_expiry_s: int
    receive_maximum: int
    protocol: int
    batch_size: int
    batch_max_age_s: float
    shutdown_deadline_s: float
    deadletter_keep_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestOptions:
        return cls(
            endpoint_url=settings.mqtt_url.get_secret_value(),
            client_id=settings.mqtt_client_id,
            share_group=settings.mqtt_share_group,
            session_expiry_s=settings.mqtt_session_expiry_s,
            receive_maximum=settings.mqtt_receive_maximum,
            protocol=settings.mqtt_protocol,
            batch_size=settings.batch_size,
            batch_max_age_s=settings.batch_max_age_ms / 1000,
            shutdown_deadline_s=settings.shutdown_deadline_s,
            deadletter_keep_ms=round(settings.deadletter_keep_days * _DAY_MS),
        )

    def topic_filters(self) -> list[tuple[str, int]]:
        return [(own_filter(self.share_group), 1)]


class ReadingEvaluator(Protocol):
    """What ingest needs of the alert engine: evaluate now, confirm the commit before acks."""

    @property
    def generation(self) -> int: ...

    def evaluate(self, reading: Reading, received_ms: int) -> None: ...

    async def commit_through(self, generation: int) -> None: ...


class IngestService:
    def __init__(
        self,
        *,
        settings: Settings,
        writer: BatchWriter,
        metrics: IngestMetrics,
        evaluator: ReadingEvaluator | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._options = IngestOptions.from_settings(settings)
        self._endpoint = settings.mqtt
        self._writer = writer
        self._evaluator = evaluator
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._decoder = TelemetryDecoder()
        self._rate_guard = DeviceRateGuard.from_settings(settings)
        self._connection: mqtt.MqttConnection | None = None
        self._connection_id = 0
        self._batch = Batch(connection_id=0)
        self._sealed: asyncio.Queue[Batch] = asyncio.Queue()
        self._stopping = False
        self._abandoned = False
        self._running = False
        self._writing = False  # the writer is making a batch durable now
        self._foreign = ForeignSubscriptions(
            [own_filter(self._options.share_group)],
            self._options.share_group,
            on_removed=metrics.foreign_subscriptions_removed.inc,
        )

    @property
    def broker_connected(self) -> bool:
        return self._connection is not None and self._connection.is_open

    @property
    def accepting(self) -> bool:
        """Consuming (the active process, not stopping): submitted readings are taken."""
        return self._running and not self._stopping

    async def submit(self, readings: list[Reading], dead_letters: list[DeadLetter]) -> None:
        """Readings received another way (an HTTP push), on the MQTT readings' one path:
        evaluated now, added to the open batch, and returned from once that batch is
        durable and its evaluation committed. IngestUnavailable when this process is not
        consuming, or the batch could not be made durable."""
        if not self.accepting:
            raise IngestUnavailable("not consuming: a standby, or stopping")
        batch = self._batch
        if not batch.messages:
            batch.opened_at = time.monotonic()
        batch.messages += 1
        batch.readings.extend(readings)
        batch.covers.extend(self._writer.covers_now(readings))
        if self._evaluator is not None:
            self._evaluate(readings, self._clock_ms())
        batch.dead_letters.extend(dead_letters)
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.waiters.append(durable)
        # A platform waits for the answer: with the writer idle, write now rather than
        # when the batch is old; while it writes, pushes gather for the next write.
        idle = not self._writing and self._sealed.empty()
        full = batch.size >= self._options.batch_size
        if idle or full or batch.messages >= self._options.batch_size:
            self._seal()
        # Shielded: a caller that gives up leaves the batch's own future alone.
        await asyncio.shield(durable)

    # The hot path: called by the connection for every PUBLISH.

    def _on_message(self, message: mqtt.Message) -> None:
        batch = self._batch
        if not batch.messages:
            batch.opened_at = time.monotonic()
        batch.messages += 1
        if message.packet_id:
            batch.packet_ids.append(message.packet_id)
        topic = message.topic
        if not message.ours:
            # Still ingested (it may be one queued before we subscribed with our
            # identifier, and a second copy is stored idempotently); the subscription
            # that delivered it is looked for and removed.
            self._metrics.foreign_messages.inc()
            if self._connection is not None:
                self._foreign.noticed(self._connection, topic)
        parts = topic.split("/")
        if len(parts) == 3 and parts[2] == "telemetry":
            now_ms = self._clock_ms()
            # The decoder checks the topic's device id against the contract's pattern.
            decoded = self._decoder.decode(parts[1], message.payload, now_ms)
            # After decoding: the readings' own times tell a flood from a backlog.
            if self._rate_guard.admit(parts[1], decoded.readings, now_ms):
                self._accept(batch, message, decoded, now_ms)
            else:
                letter = self._rate_guard.letter(at_ms=now_ms, topic=topic, payload=message.payload)
                batch.dead_letters.append(letter)
        else:
            batch.dead_letters.append(
                DeadLetter.of(
                    at_ms=self._clock_ms(),
                    topic=topic,
                    reason=Reason.TOPIC_MISMATCH,
                    detail="not a telemetry topic",
                    payload=message.payload,
                )
            )
        if batch.size >= self._options.batch_size or batch.messages >= self._options.batch_size:
            self._seal()

    def _accept(self, batch: Batch, message: mqtt.Message, decoded: Decoded, now_ms: int) -> None:
        batch.readings.extend(decoded.readings)
        batch.covers.extend(self._writer.covers_now(decoded.readings))
        if self._evaluator is not None:
            self._evaluate(decoded.readings, now_ms)
        for rejection in decoded.rejections:
            batch.dead_letters.append(
                DeadLetter.of(
                    at_ms=now_ms,
                    topic=message.topic,
                    reason=rejection.reason,
                    detail=rejection.detail,
                    payload=message.payload,
                )
            )

    def _evaluate(self, readings: list[Reading], now_ms: int) -> None:
        evaluator = self._evaluator
        assert evaluator is not None
        for reading in readings:
            try:
                evaluator.evaluate(reading, now_ms)
            except Exception:  # a bug must not turn one reading into a redelivery loop
                # The reading is still stored; the traceback says what to fix.
                logger.exception(
                    "alert evaluation failed for %s seq %d", reading.device_id, reading.seq
                )

    def _seal(self) -> None:
        batch = self._batch
        self._batch = Batch(connection_id=self._connection_id)
        if not batch.messages:
            return
        if self._evaluator is not None:
            batch.generation = self._evaluator.generation
        self._metrics.count_received(batch.messages)
        self._sealed.put_nowait(batch)
        if self._sealed.qsize() >= _MAX_SEALED_BATCHES and self._connection is not None:
            self._connection.pause_reading()

    # Tasks

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set, then drains within the shutdown deadline.

        May run again after it returned (a standby that becomes active again)."""
        started = time.monotonic()
        self._stopping = self._abandoned = False
        self._drop_sealed()
        self._running = True
        try:
            await self._run_tasks(stop)
        finally:
            self._running = False
            _fail(self._batch.waiters, "stopped before the readings were written")
        self._log_summary(time.monotonic() - started)

    async def _run_tasks(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            write_task = group.create_task(self._write_forever(), name="ingest-writer")
            age_task = group.create_task(self._seal_old_batches(), name="ingest-batch-age")
            replay_task = group.create_task(self._writer.replay_forever(), name="spool-replay")
            prune_task = group.create_task(self._prune_forever(), name="deadletter-prune")
            try:
                await self._stay_connected(stop)
            finally:
                for task in (write_task, age_task, replay_task, prune_task):
                    task.cancel()

    async def _stay_connected(self, stop: asyncio.Event) -> None:
        """The reconnect loop: one `async with` per connection, re-subscribing each time."""
        attempt = 0
        options = mqtt.SessionOptions(
            client_id=self._options.client_id,
            session_expiry_s=self._options.session_expiry_s,
            receive_maximum=self._options.receive_maximum,
            protocol=self._options.protocol,
        )
        while not stop.is_set():
            if self._batch.messages:
                self._seal()  # readings pushed over HTTP meanwhile are written all the same
            # A new batch for the new connection before it exists: a resumed session's
            # messages may arrive in the same read as the CONNACK.
            self._connection_id += 1
            self._batch = Batch(connection_id=self._connection_id)
            try:
                async with mqtt.connect(
                    self._endpoint, options, self._on_message, on_connack=self._connected
                ) as connection:
                    attempt = 0
                    await self._serve_connection(connection, stop)
                    if stop.is_set():
                        await self._drain(connection)
                        return
            except MqttError as exc:
                self._connection_lost()
                delay = self._reconnect_delay(attempt, exc)
                attempt += 1
                logger.warning("MQTT: %s; reconnecting in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        await self._drain(None)

    def _connected(self, connection: mqtt.MqttConnection) -> None:
        """Called on the CONNACK, before any message that follows it is handed over."""
        self._connection = connection
        self._metrics.broker_connected.set(1)

    async def _serve_connection(self, connection: mqtt.MqttConnection, stop: asyncio.Event) -> None:
        await connection.subscribe(
            self._options.topic_filters(), subscription_id=SERVICE_SUBSCRIPTION_ID
        )
        await self._foreign.on_connect(connection)
        logger.info(
            "MQTT connected to %s:%d as %s (session present: %s)",
            self._endpoint.host,
            self._endpoint.port,
            self._options.client_id,
            connection.session_present,
        )
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        waiting: list[asyncio.Future[Any]] = [stopped, connection.closed]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not stop.is_set():
            raise MqttError("connection closed")

    def _connection_lost(self) -> None:
        self._metrics.broker_connected.set(0)
        if self._connection is not None:
            # What was received on the lost connection is still written, but its packet
            # ids mean nothing on the next one: the broker sends those messages again.
            self._seal()
        self._connection = None

    @staticmethod
    def _reconnect_delay(attempt: int, exc: MqttError) -> float:
        ceiling = min(_RECONNECT_MAX_S, _RECONNECT_FIRST_S * 2**attempt)
        if isinstance(exc, MqttRefused):
            ceiling = _RECONNECT_MAX_S  # wrong credentials are not fixed in a second
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter

    def abandon(self) -> None:
        """This process is no longer active: stop taking messages at once and acknowledge
        nothing more (what is unacknowledged goes to the new active); `run` then returns
        without draining once its `stop` is set."""
        self._abandoned = self._stopping = True
        _fail(self._batch.waiters, "this process is no longer the active one")
        if self._connection is not None:
            self._connection.pause_reading()
            self._connection.abort()

    def _drop_sealed(self) -> None:
        """Forgets batches an abandoned run left: never acknowledged, delivered again."""
        while not self._sealed.empty():
            _fail(self._sealed.get_nowait().waiters, "this process was no longer the active one")
            self._sealed.task_done()

    async def _drain(self, connection: mqtt.MqttConnection | None) -> None:
        """Stops intake, writes what was received and acknowledges it, within the deadline."""
        self._stopping = True
        if connection is not None:
            connection.pause_reading()
        if self._abandoned:
            return
        self._seal()
        try:
            async with asyncio.timeout(self._options.shutdown_deadline_s):
                await self._sealed.join()
        except TimeoutError:
            logger.error(
                "shutdown deadline of %.0f s passed with %d batches unwritten; the "
                "broker will deliver them again",
                self._options.shutdown_deadline_s,
                self._sealed.qsize(),
            )

    async def _write_forever(self) -> None:
        while True:
            batch = await self._sealed.get()
            self._writing = True
            try:
                if self._evaluator is None:
                    await self._writer.persist(batch)
                else:
                    # A message is acknowledged once its reading is durable and its
                    # evaluation committed (DESIGN §8); the two proceed side by side.
                    await asyncio.gather(
                        self._writer.persist(batch),
                        self._evaluator.commit_through(batch.generation),
                    )
                self._acknowledge(batch)
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            finally:
                _fail(batch.waiters, "the batch was not made durable")  # those left waiting
                self._writing = False
                self._sealed.task_done()
            if self._batch.waiters and self._sealed.empty():
                self._seal()  # pushes that gathered during this write: their turn now
            connection = self._connection
            if (
                connection is not None
                and self._sealed.qsize() < _MAX_SEALED_BATCHES
                and not self._stopping
            ):
                connection.resume_reading()

    def _acknowledge(self, batch: Batch) -> None:
        connection = self._connection
        if connection is None or batch.connection_id != self._connection_id:
            return  # that connection is gone; the broker redelivers, the store overwrites
        self._metrics.count_acknowledged(connection.ack(batch.packet_ids))

    async def _seal_old_batches(self) -> None:
        """Seals the open batch when it is old, so a quiet stream is written too."""
        max_age = self._options.batch_max_age_s
        while True:
            await asyncio.sleep(max_age / 4)
            batch = self._batch
            if batch.messages and time.monotonic() - batch.opened_at >= max_age:
                self._seal()

    async def _prune_forever(self) -> None:
        """Keeps dead letters no longer than their keep period (the count is bounded too)."""
        while True:
            try:
                await self._writer.prune_dead_letters(
                    self._clock_ms() - self._options.deadletter_keep_ms
                )
            except OSError as exc:
                logger.warning("cannot prune dead letters, trying again later: %s", exc)
            await asyncio.sleep(_PRUNE_INTERVAL_S)

    def _log_summary(self, elapsed_s: float) -> None:
        totals = self._metrics.totals
        logger.info(
            "ingest stopped after %.1f s: received %d, stored %d (replayed %d), spooled %d, "
            "dead-lettered %d, acknowledged %d",
            elapsed_s,
            totals.received,
            totals.stored,
            totals.replayed,
            totals.spooled,
            totals.dead_lettered,
            totals.acknowledged,
        )


def _fail(waiters: list[asyncio.Future[None]], why: str) -> None:
    """Tells HTTP pushes still waiting that their readings were not made durable here."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(IngestUnavailable(why))
            waiter.exception()  # retrieved: a caller that gave up must not make asyncio warn
