"""Notifiers: an outbox event out to crews over MQTT `alerts/{unit}` and signed HTTP webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Protocol, Self

import httpx

from core.outbound import OutboundPolicy, OutboundRefused, guarded_client
from core.settings import MqttEndpoint
from ingest import mqtt
from ingest.errors import MqttError, MqttRefused

logger = logging.getLogger(__name__)

EVENT_ID_HEADER = "X-Smartcover-Event-Id"
SIGNATURE_HEADER = "X-Smartcover-Signature"
# Envelope fields of DESIGN §11; the payload's objects ("alert", "case") sit beside them.
ENVELOPE_FIELDS = ("event_id", "type", "occurred_at")
# How far a signature's timestamp may be from the receiver's clock (replay window).
SIGNATURE_TOLERANCE_S = 300
# Per attempt, the whole request: connecting, sending, the answer's status line.
WEBHOOK_TIMEOUT_S = 10.0
# Answers that say "later": a timeout, too early, too many requests, a server error.
_TRANSIENT_STATUS = frozenset({408, 425, 429})
# Enough of an error answer's body to say what the receiver disliked, not a page of HTML.
_ERROR_BODY_BYTES = 200
# MQTT, per attempt: waiting for the PUBACK, and for the connection when it is being
# re-established (short: while the broker is down the dispatcher's back-off takes over).
MQTT_PUBLISH_TIMEOUT_S = 5.0
MQTT_CONNECT_WAIT_S = 1.0
# Reconnect back-off of the notifier's own MQTT connection, with jitter. Capped lower than
# the consumer's: alerts wait for this connection, and a CONNECT costs the broker little.
_RECONNECT_FIRST_S = 0.5
_RECONNECT_MAX_S = 10.0
# A topic level may not hold these: the unit code would change the topic or be a filter.
_TOPIC_UNSAFE = frozenset("/+#\0")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One event of the outbox as a notifier sees it (a row of `outbox`, detached)."""

    outbox_id: int
    event_id: str  # the idempotency key receivers deduplicate on
    type: str
    unit_code: str
    occurred_ms: int
    payload: Mapping[str, Any]


class DeliveryError(Exception):
    """One attempt failed; the dispatcher retries it. The data say how soon.

    `retryable`: the failure is transient (refused, timed out, 5xx, 408/425/429), so the
    normal exponential back-off applies. False: the receiver rejected the event or is not
    configured (other 4xx, 3xx, no webhook URL, an MQTT ACL refusal). DESIGN §11 still has
    it retried, since a unit may fix its endpoint, but at the longest back-off.
    `retry_after`: seconds the receiver asked us to wait (Retry-After), if it said so.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Notifier(Protocol):
    """A channel to crews. `deliver` returns once the receiver has the event, else raises.

    Returning means delivered: the broker's PUBACK came, or the webhook answered 2xx. Every
    failure, whatever its cause, is raised as a `DeliveryError`.
    """

    async def deliver(self, event: OutboxEvent) -> None: ...


# -- the event on the wire -------------------------------------------------------------


def rfc3339_ms(epoch_ms: int) -> str:
    """`2024-05-01T08:30:00.123Z`: RFC 3339, UTC, milliseconds (exact: no float)."""
    moment = _EPOCH + timedelta(milliseconds=epoch_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(event: OutboxEvent) -> dict[str, Any]:
    """The JSON object sent on every channel: DESIGN §11's fields, then the payload's."""
    body: dict[str, Any] = {
        "event_id": event.event_id,
        "type": event.type,
        "occurred_at": rfc3339_ms(event.occurred_ms),
    }
    for key, value in event.payload.items():
        body.setdefault(key, value)  # the envelope's own fields cannot be overwritten
    return body


def envelope_bytes(event: OutboxEvent) -> bytes:
    """The envelope as compact UTF-8 JSON: the exact bytes that are sent and signed."""
    return json.dumps(envelope(event), ensure_ascii=False, separators=(",", ":")).encode()


def alert_topic(unit_code: str) -> str:
    """`alerts/{unit_code}` (DESIGN §3); a code that would change the topic is refused."""
    if not unit_code or _TOPIC_UNSAFE.intersection(unit_code):
        raise DeliveryError(f"unit code {unit_code!r} cannot be a topic level", retryable=False)
    return f"alerts/{unit_code}"


# -- signatures ------------------------------------------------------------------------


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(_secret_bytes(secret), message, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, *, timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` (DESIGN §11)."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def _parse_signature(header: str) -> tuple[int, list[str]] | None:
    timestamp: int | None = None
    digests: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            digests.append(value)
    if timestamp is None or not digests:
        return None
    return timestamp, digests


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """Whether `header` signs exactly `body` with `secret`, at a time within the tolerance.

    `now` is the receiver's clock in unix seconds. A timestamp further than `tolerance_s`
    from it, in the past (a replay) or the future, is rejected. Several `v1=` entries are
    allowed (one per secret while a unit rotates its secret); one matching is enough.
    """
    parsed = _parse_signature(header) if header else None
    if parsed is None:
        return False
    timestamp, digests = parsed
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body)
    # Compare with every candidate, in constant time each, so timing says nothing.
    matches = [hmac.compare_digest(expected, digest) for digest in digests]
    return any(matches)


# -- unit contacts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitContact:
    """Where a unit takes its webhook events, and the secret they are signed with."""

    webhook_url: str | None
    webhook_secret: str | None = field(default=None, repr=False)  # never into a log line


class UnitContacts(Protocol):
    """The registry's answer for a unit, or None for a unit it does not know."""

    async def contact(self, unit_code: str) -> UnitContact | None: ...


class DictUnitContacts:
    """Contacts held in a dict: for tests, and for tools that run without a registry."""

    def __init__(self, contacts: Mapping[str, UnitContact] | None = None) -> None:
        self._contacts = dict(contacts or {})

    def set(self, unit_code: str, contact: UnitContact | None) -> None:
        if contact is None:
            self._contacts.pop(unit_code, None)
        else:
            self._contacts[unit_code] = contact

    async def contact(self, unit_code: str) -> UnitContact | None:
        return self._contacts.get(unit_code)


# -- the webhook notifier --------------------------------------------------------------


def _retry_after(response: httpx.Response, now_s: float) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now_s)


class WebhookNotifier:
    """POSTs the signed envelope to the unit's webhook URL; a 2xx answer is delivery.

    Not followed: redirects (a moved endpoint must be fixed in the registry, and following
    one would send the signed event to wherever it points). The answer's body is not read
    beyond a short excerpt for the error text. Each attempt is signed afresh, so a retry
    hours later still passes the receiver's replay window.
    """

    def __init__(
        self,
        contacts: UnitContacts,
        *,
        outbound: OutboundPolicy | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = WEBHOOK_TIMEOUT_S,
        clock_s: Callable[[], float] = time.time,
        user_agent: str = "smartcover-webhook/1",
    ) -> None:
        """`outbound`: which non-public networks webhooks may reach (None: none). An
        injected `client` is used as it is, so it must bring its own guard."""
        self._contacts = contacts
        self._own_client = client is None
        self._client = client or guarded_client(outbound or OutboundPolicy(), timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._clock_s = clock_s
        self._user_agent = user_agent

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the HTTP client if this notifier made it (an injected one is the caller's)."""
        if self._own_client:
            await self._client.aclose()

    async def deliver(self, event: OutboxEvent) -> None:
        url, secret = await self._endpoint_of(event.unit_code)
        body = envelope_bytes(event)
        timestamp = int(self._clock_s())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            EVENT_ID_HEADER: event.event_id,
            SIGNATURE_HEADER: signature_header(secret, body, timestamp=timestamp),
        }
        try:
            # httpx's timeout bounds each read or write; this bounds the whole attempt.
            async with asyncio.timeout(self._timeout_s):
                await self._post(url, body, headers)
        except TimeoutError:
            raise DeliveryError(
                f"webhook gave no answer within {self._timeout_s:g} s", retryable=True
            ) from None
        except OutboundRefused as exc:
            # The receiver's address is refused: a unit's URL or DNS must change first.
            raise DeliveryError(f"webhook refused: {exc}", retryable=False) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            # The URL itself stays out of the text: webhook URLs often carry a token.
            raise DeliveryError(
                f"webhook URL of unit {event.unit_code!r} unusable: {type(exc).__name__}",
                retryable=False,
            ) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(
                f"webhook unreachable: {type(exc).__name__}: {exc}", retryable=True
            ) from exc

    async def _endpoint_of(self, unit_code: str) -> tuple[str, str]:
        contact = await self._contacts.contact(unit_code)
        if contact is None or not contact.webhook_url:
            raise DeliveryError(f"unit {unit_code!r} has no webhook URL", retryable=False)
        if not contact.webhook_secret:
            # An unsigned event could not be told from a forged one: do not send it.
            raise DeliveryError(f"unit {unit_code!r} has no webhook secret", retryable=False)
        return contact.webhook_url, contact.webhook_secret

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        async with self._client.stream("POST", url, content=body, headers=headers) as response:
            status = response.status_code
            if 200 <= status < 300:
                return
            excerpt = await _excerpt(response)
            message = f"webhook answered {status} {response.reason_phrase}: {excerpt}".rstrip(": ")
            transient = status >= 500 or status in _TRANSIENT_STATUS
            raise DeliveryError(
                message,
                retryable=transient,
                retry_after=_retry_after(response, self._clock_s()),
            )


async def _excerpt(response: httpx.Response) -> str:
    async for chunk in response.aiter_bytes():
        return chunk[:_ERROR_BODY_BYTES].decode(errors="replace").strip()
    return ""


# -- the MQTT notifier -----------------------------------------------------------------


class MqttNotifier:
    """Publishes the envelope to `alerts/{unit_code}` at QoS 1 over a connection of its own.

    Its own client id and socket: the consumer's socket may be paused for back-pressure,
    and a PUBACK must not wait behind telemetry. `run()` keeps the connection (one
    `async with` per connection, reconnecting with back-off) and must run, e.g. in the
    same TaskGroup as the dispatcher, for `deliver` to succeed. The session is clean: what
    was not acknowledged is the dispatcher's to retry, not the broker's to resend.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str,
        publish_timeout_s: float = MQTT_PUBLISH_TIMEOUT_S,
        connect_wait_s: float = MQTT_CONNECT_WAIT_S,
        protocol: int = 5,  # 4: MQTT 3.1.1, for brokers that speak nothing newer
        ssl_context: ssl.SSLContext | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._endpoint = endpoint
        self._options = mqtt.SessionOptions(
            client_id=client_id, clean_start=True, protocol=protocol
        )
        self._publish_timeout_s = publish_timeout_s
        self._connect_wait_s = connect_wait_s
        self._ssl_context = ssl_context
        self._sleep = sleep
        self._connection: mqtt.MqttConnection | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.is_open

    async def run(self) -> None:
        """Stays connected until cancelled."""
        attempt = 0
        while True:
            try:
                async with mqtt.connect(
                    self._endpoint, self._options, _ignore, ssl_context=self._ssl_context
                ) as connection:
                    attempt = 0
                    await self._serve(connection)
                error: MqttError = MqttError("connection closed")
            except MqttError as exc:
                error = exc
            finally:
                self._connection = None
                self._connected.clear()
            delay = _reconnect_delay(attempt, error)
            attempt += 1
            logger.warning("notifier MQTT: %s; reconnecting in %.1f s", error, delay)
            await self._sleep(delay)

    async def _serve(self, connection: mqtt.MqttConnection) -> None:
        self._connection = connection
        self._connected.set()
        logger.info(
            "notifier MQTT connected to %s:%d as %s",
            self._endpoint.host,
            self._endpoint.port,
            self._options.client_id,
        )
        # asyncio.wait, not await: cancelling us must not cancel the connection's future.
        await asyncio.wait({connection.closed})

    async def deliver(self, event: OutboxEvent) -> None:
        topic = alert_topic(event.unit_code)
        payload = envelope_bytes(event)
        try:
            async with asyncio.timeout(self._connect_wait_s):
                await self._connected.wait()
        except TimeoutError:
            raise DeliveryError("not connected to the MQTT broker", retryable=True) from None
        connection = self._connection
        if connection is None:
            raise DeliveryError("not connected to the MQTT broker", retryable=True)
        try:
            await connection.publish(topic, payload, qos=1, timeout_s=self._publish_timeout_s)
        except MqttError as exc:
            # A reason code means the broker answered and refused (an ACL, a quota).
            refused = exc.reason_code is not None
            raise DeliveryError(f"MQTT publish to {topic}: {exc}", retryable=not refused) from exc


def _ignore(_message: mqtt.Message) -> None:
    """The notifier subscribes to nothing; a stray PUBLISH (none expected) is dropped."""


def _reconnect_delay(attempt: int, error: MqttError) -> float:
    ceiling = min(_RECONNECT_MAX_S, _RECONNECT_FIRST_S * 2**attempt)
    if isinstance(error, MqttRefused):
        ceiling = _RECONNECT_MAX_S  # wrong credentials are not fixed in a second
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not cryptography
