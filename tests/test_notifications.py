"""Outbox delivery against real Mosquitto, a real HTTP receiver, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.dispatcher import (
    DispatchOptions,
    OutboxDispatcher,
    delivery_summary,
    retry_delay_ms,
)
from alerting.models import AlertRow, DeliveryRow, OutboxRow
from alerting.notifiers import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    DeliveryError,
    DictUnitContacts,
    MqttNotifier,
    Notifier,
    OutboxEvent,
    UnitContact,
    WebhookNotifier,
    rfc3339_ms,
    signature_header,
    verify_signature,
)
from alerting.outbox import MQTT_CHANNEL, WEBHOOK_CHANNEL, enqueue
from core.db import Base, create_engine, session_factory, transaction
from core.outbound import OutboundPolicy
from core.settings import MqttEndpoint
from ingest import mqtt
from ingest.errors import MqttError
from tests.servers import LOOPBACK, MosquittoServer, PostgresServer, free_port

# Not a module-wide `pytestmark`: the signature and back-off tests are plain functions.
async_test = pytest.mark.asyncio

Sessions = async_sessionmaker[AsyncSession]
# Test time runs this much faster than the wall clock: DispatchOptions' real defaults (1 s
# first back-off, 5 min cap, 30 s lease) then play out in milliseconds.
SPEED = 100.0
# Generous: these are waits for things that normally take milliseconds, on 2 shared cores.
WAIT_S = 20.0
# The receivers listen on loopback, which webhooks may reach only when allowed.
LOCAL_RECEIVERS = OutboundPolicy.allowing("127.0.0.0/8")


class ScaledClock:
    """The dispatcher's clock and sleep, `speed` times faster than real time."""

    def __init__(self, speed: float = SPEED) -> None:
        self.speed = speed
        self._start_ms = time.time_ns() // 1_000_000
        self._t0 = time.monotonic()

    def now_ms(self) -> int:
        return self._start_ms + int((time.monotonic() - self._t0) * 1000 * self.speed)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self.speed)


# -- databases -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'notify.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"notify_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    return server.url(name)


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


async def add_events(
    sessions: Sessions,
    unit: str,
    count: int,
    *,
    clock: ScaledClock,
    channels: tuple[str, ...] = (MQTT_CHANNEL, WEBHOOK_CHANNEL),
    type_: str = "case.changed",
) -> list[str]:
    """Commits `count` events for `unit` in one transaction; their ids in outbox order."""
    async with transaction(sessions) as session:
        rows = [
            await enqueue(
                session,
                type=type_,
                unit_code=unit,
                occurred_ms=clock.now_ms(),
                payload={"case": {"id": n, "unit_code": unit, "status": "dispatched"}},
                channels=channels,
            )
            for n in range(count)
        ]
    return [row.event_id for row in rows]


async def add_raised_alert(sessions: Sessions, unit: str, *, clock: ScaledClock) -> tuple[int, str]:
    """An alert row and its `alert.raised` event on both channels: (alert id, event id)."""
    async with transaction(sessions) as session:
        alert = AlertRow(
            cover_id="4112030101000001",
            device_id="dev-1",
            kind="cover_open",
            severity="critical",
            status="active",
            value=62.0,
            raised_ms=clock.now_ms(),
        )
        session.add(alert)
        await session.flush()
        row = await enqueue(
            session,
            type="alert.raised",
            unit_code=unit,
            occurred_ms=alert.raised_ms,
            payload={"alert": {"id": alert.id, "kind": "cover_open", "severity": "critical"}},
            channels=(MQTT_CHANNEL, WEBHOOK_CHANNEL),
        )
    return alert.id, row.event_id


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    what: str,
    timeout_s: float = WAIT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(*jobs: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Runs long-lived jobs (dispatchers, notifiers) for the block, cancelled at its end."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(job) for job in jobs]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()


def dispatcher(
    sessions: Sessions,
    notifiers: dict[str, Notifier],
    clock: ScaledClock,
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> OutboxDispatcher:
    return OutboxDispatcher(
        sessions,
        notifiers,
        registry=registry or CollectorRegistry(),
        options=DispatchOptions(**options),
        clock_ms=clock.now_ms,
        sleep=clock.sleep,
    )


async def pending(sessions: Sessions, channel: str) -> int:
    summary = await delivery_summary(sessions)
    return summary["channels"][channel]["pending"]


async def _channel_pending(sessions: Sessions, channel: str, count: int) -> bool:
    return await pending(sessions, channel) == count


# -- a real HTTP receiver --------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    received_s: float  # the receiver's clock, unix seconds
    status: int  # what the receiver answered

    @property
    def event_id(self) -> str:
        return str(json.loads(self.body)["event_id"])


@dataclass
class Receiver:
    """A webhook endpoint: http.server in a thread, on a port kept across restarts."""

    port: int = field(default_factory=free_port)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hooks/smartcover"

    def start(self) -> None:
        self._server = _QuietServer((LOOPBACK, self.port), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
        self._server = self._thread = None

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def accepted(self) -> list[Request]:
        return [r for r in self.snapshot() if 200 <= r.status < 300]

    def accepted_ids(self) -> list[str]:
        return [r.event_id for r in self.accepted()]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a cancelled dispatcher) is part of the test, not an error."""


def _handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.status
            headers = {name.lower(): value for name, value in self.headers.items()}
            receiver.record(Request(self.path, headers, body, time.time(), status))
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            self.send_response(status)
            for name, value in receiver.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: pytest shows what matters."""

    return Handler


@pytest.fixture
def receivers() -> Iterator[Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


def secret_of(unit: str) -> str:
    return f"whsec-{unit}-0123456789abcdef"


def contacts_for(**receivers: Receiver) -> DictUnitContacts:
    return DictUnitContacts(
        {unit: UnitContact(receiver.url, secret_of(unit)) for unit, receiver in receivers.items()}
    )


def signed_correctly(unit: str, request: Request) -> bool:
    return verify_signature(
        secret_of(unit),
        request.headers.get(SIGNATURE_HEADER.lower()),
        request.body,
        now=request.received_s,
    )


# -- an MQTT subscriber ----------------------------------------------------------------


class Subscriber:
    """Collects `alerts/#` with a persistent session, acknowledging, reconnecting."""

    def __init__(self, url: str) -> None:
        self._endpoint = MqttEndpoint.parse(url)
        self._options = mqtt.SessionOptions(
            client_id=f"crew-{uuid.uuid4().hex[:8]}", session_expiry_s=3600
        )
        self.messages: list[mqtt.Message] = []
        self.subscribed = asyncio.Event()
        self._connection: mqtt.MqttConnection | None = None
        self._unacked: list[int] = []

    def _on_message(self, message: mqtt.Message) -> None:
        self.messages.append(message)
        if self._connection is None:
            # Queued messages can arrive with the CONNACK, before `connect` has returned.
            self._unacked.append(message.packet_id)
        else:
            self._connection.ack([message.packet_id])

    async def run(self) -> None:
        while True:
            with contextlib.suppress(MqttError):
                async with mqtt.connect(self._endpoint, self._options, self._on_message) as conn:
                    self._connection = conn
                    conn.ack(self._unacked)
                    await conn.subscribe([("alerts/#", 1)])
                    self.subscribed.set()
                    await asyncio.wait({conn.closed})
            self._connection = None
            self._unacked.clear()
            await asyncio.sleep(0.05)

    def event_ids(self, topic: str | None = None) -> set[str]:
        return {
            json.loads(m.payload)["event_id"]
            for m in self.messages
            if topic is None or m.topic == topic
        }


def mqtt_notifier(broker: MosquittoServer, clock: ScaledClock | None = None) -> MqttNotifier:
    return MqttNotifier(
        MqttEndpoint.parse(broker.url),
        client_id="smartcover-notify-test",
        sleep=clock.sleep if clock is not None else asyncio.sleep,
    )


# -- signatures --------------------------------------------------------------------------


def test_verify_signature_accepts_fresh_and_rejects_replayed_or_tampered() -> None:
    secret, body, now = "s3cret", b'{"event_id":"e1"}', 1_800_000_000
    header = signature_header(secret, body, timestamp=now)
    assert verify_signature(secret, header, body, now=now)
    assert verify_signature(secret, header, body, now=now + 299)
    assert not verify_signature(secret, header, body, now=now + 301), "a replay, too old"
    assert not verify_signature(secret, header, body, now=now - 301), "from the future"
    assert verify_signature(secret, header, body, now=now + 50, tolerance_s=60)
    assert not verify_signature(secret, header, body, now=now + 61, tolerance_s=60)
    assert not verify_signature(secret, header, body + b" ", now=now), "body changed"
    assert not verify_signature("other", header, body, now=now), "wrong secret"
    # The timestamp is signed too: moving it forward to pass the window breaks the MAC.
    forged = header.replace(f"t={now}", f"t={now + 1000}")
    assert not verify_signature(secret, forged, body, now=now + 1000)
    for garbage in (None, "", "v1=abc", f"t={now}", "t=x,v1=00", "nonsense"):
        assert not verify_signature(secret, garbage, body, now=now)
    # A receiver rotating its secret: one of several v1 entries matching is enough.
    rotated = f"t={now},v1={'0' * 64},{header.split(',')[1]}"
    assert verify_signature(secret, rotated, body, now=now)


def test_occurred_at_is_rfc3339_utc_to_the_millisecond() -> None:
    assert rfc3339_ms(1_714_552_200_123) == "2024-05-01T08:30:00.123Z"
    assert rfc3339_ms(0) == "1970-01-01T00:00:00.000Z"


def test_back_off_grows_to_the_cap_and_honours_retry_after() -> None:
    options = DispatchOptions()
    transient = DeliveryError("503", retryable=True)
    assert 500 <= retry_delay_ms(1, transient, options) <= 1000
    assert 4000 <= retry_delay_ms(4, transient, options) <= 8000
    assert 150_000 <= retry_delay_ms(60, transient, options) <= 300_000
    refused = DeliveryError("410", retryable=False)
    assert 150_000 <= retry_delay_ms(1, refused, options) <= 300_000
    told = DeliveryError("429", retryable=True, retry_after=20)
    assert retry_delay_ms(1, told, options) == 20_000
    greedy = DeliveryError("429", retryable=True, retry_after=86_400)
    assert retry_delay_ms(1, greedy, options) == 300_000


# -- webhook answers ---------------------------------------------------------------------


@async_test
async def test_webhook_answers_are_classified_for_retry(
    receivers: Callable[[], Receiver],
) -> None:
    receiver = receivers()
    receiver.start()
    event = OutboxEvent(1, str(uuid.uuid4()), "case.opened", "WATER", 1_800_000_000_000, {})
    contacts = contacts_for(WATER=receiver)
    async with WebhookNotifier(contacts, outbound=LOCAL_RECEIVERS, timeout_s=2) as notifier:
        await notifier.deliver(event)  # 200
        answers = {503: True, 500: True, 408: True, 410: False, 400: False, 401: False, 302: False}
        for status, retryable in answers.items():
            receiver.status = status
            with pytest.raises(DeliveryError) as caught:
                await notifier.deliver(event)
            assert caught.value.retryable is retryable, status
            assert str(status) in str(caught.value)
        receiver.status, receiver.headers = 429, {"Retry-After": "7"}
        with pytest.raises(DeliveryError) as caught:
            await notifier.deliver(event)
        assert caught.value.retryable
        assert caught.value.retry_after == 7

        receiver.stop()  # connection refused
        with pytest.raises(DeliveryError) as caught:
            await notifier.deliver(event)
        assert caught.value.retryable

        unusable = (
            None,
            UnitContact(None, "s"),
            UnitContact(receiver.url, None),
            UnitContact("ftp://127.0.0.1/hooks", "s"),
        )
        for contact in unusable:
            contacts.set("WATER", contact)
            with pytest.raises(DeliveryError) as caught:
                await notifier.deliver(event)
            assert not caught.value.retryable


@async_test
async def test_webhook_answer_too_slow_is_a_retryable_timeout(
    receivers: Callable[[], Receiver],
) -> None:
    receiver = receivers()
    receiver.delay_s = 1.0
    receiver.start()
    event = OutboxEvent(1, str(uuid.uuid4()), "case.opened", "WATER", 1_800_000_000_000, {})
    async with WebhookNotifier(
        contacts_for(WATER=receiver), outbound=LOCAL_RECEIVERS, timeout_s=0.2
    ) as notifier:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as caught:
            await notifier.deliver(event)
    assert caught.value.retryable
    assert time.monotonic() - started < 0.9


# -- delivery through the dispatcher -------------------------------------------------------


@async_test
async def test_mqtt_event_reaches_crews_on_the_unit_topic_within_milliseconds(
    sessions: Sessions, mosquitto: MosquittoServer
) -> None:
    clock = ScaledClock(speed=1)  # real time: this test measures latency
    crews = Subscriber(mosquitto.url)
    notifier = mqtt_notifier(mosquitto)
    # Polling once a minute: only wake() can explain a delivery within a second.
    outbox = dispatcher(sessions, {MQTT_CHANNEL: notifier}, clock, poll_interval_s=60)
    async with running(crews.run(), notifier.run(), outbox.run()):
        await asyncio.wait_for(crews.subscribed.wait(), WAIT_S)
        await eventually(lambda: notifier.connected, what="the notifier's connection")
        alert_id, event_id = await add_raised_alert(sessions, "WATER", clock=clock)
        committed = time.monotonic()
        outbox.wake()
        await eventually(lambda: bool(crews.messages), what="the alert on alerts/WATER")
        latency_s = time.monotonic() - committed
        await eventually(
            lambda: _channel_pending(sessions, MQTT_CHANNEL, 0), what="the delivery marked"
        )
    message = crews.messages[0]
    assert message.topic == "alerts/WATER"
    assert message.qos == 1
    body = json.loads(message.payload)
    assert body["event_id"] == event_id
    assert body["type"] == "alert.raised"
    assert body["alert"] == {"id": alert_id, "kind": "cover_open", "severity": "critical"}
    assert datetime.fromisoformat(body["occurred_at"]).tzinfo is not None
    assert latency_s < 1.0, f"commit to crew took {latency_s:.3f} s"
    # The webhook delivery is still pending: this dispatcher has no webhook notifier.
    summary = await delivery_summary(sessions)
    assert summary["channels"][MQTT_CHANNEL]["delivered"] == 1
    assert summary["channels"][MQTT_CHANNEL]["pending"] == 0
    assert summary["channels"][WEBHOOK_CHANNEL]["pending"] == 1


@async_test
async def test_webhook_is_signed_with_the_contract_body_and_headers(
    sessions: Sessions, receivers: Callable[[], Receiver]
) -> None:
    clock = ScaledClock()
    receiver = receivers()
    receiver.start()
    async with WebhookNotifier(contacts_for(DRAIN=receiver), outbound=LOCAL_RECEIVERS) as webhooks:
        outbox = dispatcher(sessions, {WEBHOOK_CHANNEL: webhooks}, clock)
        async with running(outbox.run()):
            (event_id,) = await add_events(
                sessions, "DRAIN", 1, clock=clock, channels=(WEBHOOK_CHANNEL,), type_="case.opened"
            )
            outbox.wake()
            await eventually(lambda: _nothing_pending(sessions), what="the webhook delivered")
    (request,) = receiver.snapshot()
    assert request.path == "/hooks/smartcover"
    assert request.headers["content-type"] == "application/json"
    assert request.headers[EVENT_ID_HEADER.lower()] == event_id
    assert signed_correctly("DRAIN", request)
    assert not signed_correctly("GAS", request), "another unit's secret"
    timestamp = int(request.headers[SIGNATURE_HEADER.lower()].split(",")[0].removeprefix("t="))
    assert abs(timestamp - request.received_s) < 5
    body = json.loads(request.body)
    assert list(body) == ["event_id", "type", "occurred_at", "case"]
    assert body["event_id"] == event_id
    assert body["type"] == "case.opened"
    assert body["case"] == {"id": 0, "unit_code": "DRAIN", "status": "dispatched"}
    async with transaction(sessions, write=False) as session:
        occurred_ms = await session.scalar(
            select(OutboxRow.occurred_ms).where(OutboxRow.event_id == event_id)
        )
    assert occurred_ms is not None
    assert body["occurred_at"] == rfc3339_ms(occurred_ms)
    occurred = datetime.fromisoformat(body["occurred_at"].replace("Z", "+00:00"))
    assert round(occurred.timestamp() * 1000) == occurred_ms


@async_test
async def test_dead_webhook_endpoint_catches_up_without_blocking_anyone(
    sessions: Sessions, mosquitto: MosquittoServer, receivers: Callable[[], Receiver]
) -> None:
    """Unit WATER's endpoint refuses connections, then answers 503, then comes back."""
    clock = ScaledClock()
    dead, alive = receivers(), receivers()
    alive.start()
    crews = Subscriber(mosquitto.url)
    mqtt_out = mqtt_notifier(mosquitto)
    registry = CollectorRegistry()
    async with WebhookNotifier(
        contacts_for(WATER=dead, DRAIN=alive), outbound=LOCAL_RECEIVERS
    ) as webhooks:
        notifiers: dict[str, Notifier] = {MQTT_CHANNEL: mqtt_out, WEBHOOK_CHANNEL: webhooks}
        # A poll every 50 ms of real time: retries come due between wakes.
        outbox = dispatcher(sessions, notifiers, clock, registry, poll_interval_s=5)
        async with running(crews.run(), mqtt_out.run(), outbox.run()):
            await asyncio.wait_for(crews.subscribed.wait(), WAIT_S)
            water = await add_events(sessions, "WATER", 5, clock=clock)
            drain = await add_events(sessions, "DRAIN", 5, clock=clock)
            outbox.wake()

            # Meanwhile the other unit and the MQTT channel are served.
            await eventually(lambda: alive.accepted_ids() == drain, what="DRAIN's webhooks")
            await eventually(lambda: crews.event_ids() == {*water, *drain}, what="all MQTT events")
            await eventually(
                lambda: _head_attempts(sessions, water[0], WEBHOOK_CHANNEL, at_least=3),
                what="WATER's head retried",
            )
            summary = await delivery_summary(sessions)
            webhook = summary["channels"][WEBHOOK_CHANNEL]
            assert webhook["pending"] == 5
            # One attempt per back-off period at the head of the lane, not one per event.
            assert webhook["failing"] == 1
            assert webhook["oldest_pending_age_s"] is not None
            (failing,) = summary["failing"]
            assert failing["unit_code"] == "WATER"
            assert failing["event_id"] == water[0]
            assert "ConnectError" in (failing["last_error"] or "")

            water += await add_events(sessions, "WATER", 3, clock=clock)  # join the queue
            outbox.wake()
            dead.status = 503
            dead.start()
            await eventually(lambda: len(dead.snapshot()) >= 2, what="503 answers")
            dead.status = 200
            await eventually(lambda: set(dead.accepted_ids()) == set(water), what="WATER caught up")
            await eventually(lambda: crews.event_ids() == {*water, *drain}, what="MQTT")
            await eventually(
                lambda: _nothing_pending(sessions), what="every delivery marked delivered"
            )

    requests = dead.snapshot()
    assert all(signed_correctly("WATER", r) for r in requests)
    assert all(signed_correctly("DRAIN", r) for r in alive.snapshot())
    # While failing, only the lane's oldest event was tried.
    assert {r.event_id for r in requests if r.status == 503} == {water[0]}
    # One dispatcher, no crash: every event arrived once, and in the order it was raised.
    assert dead.accepted_ids() == water
    assert Counter(m.topic for m in crews.messages if not m.dup) == {
        "alerts/WATER": 8,
        "alerts/DRAIN": 5,
    }
    summary = await delivery_summary(sessions)
    assert summary["channels"][WEBHOOK_CHANNEL]["delivered"] == 13
    assert summary["channels"][MQTT_CHANNEL]["delivered"] == 13
    assert summary["failing"] == []
    sample = registry.get_sample_value
    assert sample("smartcover_notifications_delivered_total", {"channel": "webhook"}) == 13
    assert sample("smartcover_notifications_delivered_total", {"channel": "mqtt"}) == 13
    failed = sample("smartcover_notification_attempts_failed_total", {"channel": "webhook"})
    assert failed is not None
    assert failed >= 4
    latency = sample("smartcover_notification_latency_seconds_count", {"channel": "webhook"})
    assert latency == 13


async def _head_attempts(sessions: Sessions, event_id: str, channel: str, *, at_least: int) -> bool:
    summary = await delivery_summary(sessions)
    return any(
        f["event_id"] == event_id and f["channel"] == channel and f["attempts"] >= at_least
        for f in summary["failing"]
    )


async def _nothing_pending(sessions: Sessions) -> bool:
    summary = await delivery_summary(sessions)
    return all(c["pending"] == 0 for c in summary["channels"].values())


@async_test
async def test_restarted_dispatcher_delivers_what_the_first_left(
    sessions: Sessions, receivers: Callable[[], Receiver]
) -> None:
    clock = ScaledClock()
    receiver = receivers()
    receiver.delay_s = 0.05  # slow enough to be cut off mid-attempt
    receiver.start()
    async with WebhookNotifier(contacts_for(WATER=receiver), outbound=LOCAL_RECEIVERS) as webhooks:
        events = await add_events(sessions, "WATER", 12, clock=clock, channels=(WEBHOOK_CHANNEL,))
        first = dispatcher(sessions, {WEBHOOK_CHANNEL: webhooks}, clock)
        async with running(first.run()):
            first.wake()
            await eventually(lambda: len(receiver.snapshot()) >= 4, what="some deliveries")
        assert first.delivered < len(events)
        left = await pending(sessions, WEBHOOK_CHANNEL)
        assert left > 0

        second = dispatcher(sessions, {WEBHOOK_CHANNEL: webhooks}, clock)
        async with running(second.run()):
            second.wake()
            await eventually(lambda: _nothing_pending(sessions), what="the rest delivered")
    received = Counter(r.event_id for r in receiver.snapshot())
    assert set(received) == set(events)
    # At least once: only the attempt cut off by the cancel may have arrived twice.
    assert sum(count - 1 for count in received.values()) <= 1
    assert first.delivered + second.delivered == len(events)


@async_test
async def test_notified_ms_is_set_by_the_first_delivery_only(
    sessions: Sessions, mosquitto: MosquittoServer, receivers: Callable[[], Receiver]
) -> None:
    clock = ScaledClock()
    receiver = receivers()
    receiver.delay_s = 0.2  # the webhook lands well after the MQTT message
    receiver.start()
    mqtt_out = mqtt_notifier(mosquitto)
    async with WebhookNotifier(contacts_for(WATER=receiver), outbound=LOCAL_RECEIVERS) as webhooks:
        outbox = dispatcher(sessions, {MQTT_CHANNEL: mqtt_out, WEBHOOK_CHANNEL: webhooks}, clock)
        async with running(mqtt_out.run(), outbox.run()):
            await eventually(lambda: mqtt_out.connected, what="the notifier's connection")
            alert_id, _ = await add_raised_alert(sessions, "WATER", clock=clock)
            outbox.wake()
            await eventually(lambda: _nothing_pending(sessions), what="both deliveries")
    async with transaction(sessions, write=False) as session:
        alert = await session.get_one(AlertRow, alert_id)
        delivered = (await session.scalars(select(DeliveryRow.delivered_ms))).all()
    mqtt_ms, webhook_ms = sorted(ms for ms in delivered if ms is not None)
    assert webhook_ms - mqtt_ms >= 0.1 * 1000 * SPEED  # they were apart
    assert alert.notified_ms == mqtt_ms


@async_test
async def test_mqtt_notifier_reconnects_and_delivers_after_a_broker_restart(
    sessions: Sessions, mosquitto: MosquittoServer
) -> None:
    clock = ScaledClock()
    crews = Subscriber(mosquitto.url)
    mqtt_out = mqtt_notifier(mosquitto, clock)  # reconnect back-off in test time too
    outbox = dispatcher(sessions, {MQTT_CHANNEL: mqtt_out}, clock)
    async with running(crews.run(), mqtt_out.run(), outbox.run()):
        await asyncio.wait_for(crews.subscribed.wait(), WAIT_S)
        before = await add_events(sessions, "WATER", 1, clock=clock, channels=(MQTT_CHANNEL,))
        outbox.wake()
        await eventually(lambda: crews.event_ids() == set(before), what="the first event")

        await asyncio.to_thread(mosquitto.stop)
        during = await add_events(sessions, "WATER", 3, clock=clock, channels=(MQTT_CHANNEL,))
        outbox.wake()
        await eventually(
            lambda: _head_attempts(sessions, during[0], MQTT_CHANNEL, at_least=1),
            what="a failed attempt while the broker is down",
        )
        await asyncio.to_thread(mosquitto.start)
        await eventually(
            lambda: crews.event_ids() == {*before, *during}, what="the events after the restart"
        )
        await eventually(lambda: _nothing_pending(sessions), what="the deliveries marked")
    assert mqtt_out.connected is False


@async_test
async def test_two_dispatchers_on_one_database_send_each_event_once(
    sessions: Sessions, receivers: Callable[[], Receiver]
) -> None:
    # Real time: the claims' lease (30 s) must outlast an attempt, and scaled 100 times it
    # would not, with two dispatchers taking turns at SQLite's write lock on busy cores.
    clock = ScaledClock(speed=1)
    receiver = receivers()
    receiver.start()
    units = ("WATER", "DRAIN", "GAS", "POWER")
    contacts = DictUnitContacts({u: UnitContact(receiver.url, secret_of(u)) for u in units})
    async with WebhookNotifier(contacts, outbound=LOCAL_RECEIVERS) as webhooks:
        pair = [dispatcher(sessions, {WEBHOOK_CHANNEL: webhooks}, clock) for _ in range(2)]
        async with running(*(d.run() for d in pair)):
            events: list[str] = []
            for unit in units:
                events += await add_events(
                    sessions, unit, 10, clock=clock, channels=(WEBHOOK_CHANNEL,)
                )
            for one in pair:
                one.wake()
            await eventually(lambda: _nothing_pending(sessions), what="all delivered")
    received = Counter(r.event_id for r in receiver.snapshot())
    assert set(received) == set(events)
    assert max(received.values()) == 1
    assert sum(d.delivered for d in pair) == len(events)


class _Flaky:
    """A notifier with a bug for one unit: the seam where a fake may enter."""

    def __init__(self) -> None:
        self.delivered: list[str] = []

    async def deliver(self, event: OutboxEvent) -> None:
        if event.unit_code == "GAS":
            raise KeyError("bug")
        self.delivered.append(event.event_id)


@async_test
async def test_a_notifier_bug_parks_its_event_and_spares_the_rest(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ScaledClock()
    flaky = _Flaky()
    outbox = dispatcher(sessions, {WEBHOOK_CHANNEL: flaky}, clock)
    with caplog.at_level(logging.INFO, logger="alerting.dispatcher"):
        async with running(outbox.run()):
            (poison,) = await add_events(
                sessions, "GAS", 1, clock=clock, channels=(WEBHOOK_CHANNEL,)
            )
            fine = await add_events(sessions, "WATER", 3, clock=clock, channels=(WEBHOOK_CHANNEL,))
            outbox.wake()
            await eventually(lambda: flaky.delivered == fine, what="the other unit's events")
            await eventually(
                lambda: _head_attempts(sessions, poison, WEBHOOK_CHANNEL, at_least=1),
                what="the failure recorded",
            )
    (failing,) = (await delivery_summary(sessions, clock_ms=clock.now_ms))["failing"]
    assert failing["last_error"] == "KeyError: 'bug'"
    assert failing["attempts"] == 1  # and the next one waits the longest back-off:
    assert failing["next_attempt_ms"] - clock.now_ms() > DispatchOptions().backoff_max_ms / 4
    assert "Traceback" in caplog.text  # logged with its traceback, not swallowed
    (summary,) = [r.getMessage() for r in caplog.records if "dispatcher stopped" in r.message]
    assert "3 delivered, 1 failed attempts" in summary


@async_test
async def test_mqtt_notifier_speaks_mqtt_3_1_1_too(mosquitto: MosquittoServer) -> None:
    crews = Subscriber(mosquitto.url)
    notifier = MqttNotifier(
        MqttEndpoint.parse(mosquitto.url), client_id="smartcover-notify-v4", protocol=4
    )
    event = OutboxEvent(7, str(uuid.uuid4()), "case.escalated", "TOWN-1", 1_800_000_000_000, {})
    async with running(crews.run(), notifier.run()):
        await asyncio.wait_for(crews.subscribed.wait(), WAIT_S)
        await notifier.deliver(event)  # returns once the PUBACK is in
        await eventually(lambda: bool(crews.messages), what="the event")
    assert crews.messages[0].topic == "alerts/TOWN-1"
    assert json.loads(crews.messages[0].payload)["type"] == "case.escalated"
    with pytest.raises(DeliveryError) as caught:
        await notifier.deliver(event)  # not running: not connected
    assert caught.value.retryable
    with pytest.raises(DeliveryError):
        await notifier.deliver(OutboxEvent(8, "e", "case.opened", "a/b", 0, {}))
