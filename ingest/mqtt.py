"""A small MQTT 5 client on an asyncio protocol, built for acknowledging after storage.

Why not paho or aiomqtt: both acknowledge a QoS 1 message on receipt (a crash then loses
what sat in memory), aiomqtt drops messages when its queue is full, and paho spends
~50 µs per message in `recv()`/`select()` calls (PERF-NOTES.md). Here the socket is read
in large chunks, every PUBLISH is handed to a synchronous callback, and the caller sends
PUBACKs itself, many in one write, once the readings are durable.

One `MqttConnection` is one network connection: it lives exactly as long as one
`async with connect(...)` block. Reconnecting is the caller's outer loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from core.settings import MqttEndpoint
from ingest.errors import MqttError, MqttRefused

logger = logging.getLogger(__name__)

# Control packet types (high nibble of the first byte).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_UNSUBSCRIBE, _UNSUBACK = 0xA2, 0xB0
# MQTT 5 property identifiers used here.
_PROP_SESSION_EXPIRY, _PROP_RECEIVE_MAXIMUM, _PROP_SERVER_KEEP_ALIVE = 0x11, 0x21, 0x13
_PROP_REASON_STRING = 0x1F
_PROP_SUBSCRIPTION_ID = 0x0B
# Reason codes at or above this value are failures (MQTT 5 §2.4).
_FAILURE = 0x80
# CONNACK reasons after which retrying with the same credentials is pointless.
_FINAL_REFUSALS = {
    0x84: "unsupported protocol",
    0x85: "client id not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}
_PINGREQ_PACKET = bytes((_PINGREQ, 0))
_DISCONNECT_PACKET = bytes((_DISCONNECT, 0))
_PUBACK_HEADER = bytes((_PUBACK, 2))


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH received. `packet_id` is 0 for QoS 0 (nothing to acknowledge)."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    retain: bool
    dup: bool
    # False when the connection subscribed with a Subscription Identifier and this
    # message carries none of its identifiers: a subscription someone else left in our
    # persistent session delivered it.
    ours: bool = True


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What the CONNECT packet asks for."""

    client_id: str
    clean_start: bool = False
    session_expiry_s: int = 0
    receive_maximum: int = 65535
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    # 5, or 4 (MQTT 3.1.1) for brokers that speak nothing newer, like the demo's embedded
    # one: then the session lasts until a clean connect, and there is no Receive Maximum.
    protocol: int = 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def _read_varint(data: bytes | bytearray | memoryview, start: int) -> tuple[int, int] | None:
    """Decodes a variable byte integer at `start`: (value, next offset), None if incomplete."""
    value, shift, index = 0, 0, start
    while index < len(data):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            return value, index
        shift += 7
        if shift > 21:
            raise MqttError("malformed variable byte integer from broker")
    return None


def connect_packet(options: SessionOptions, endpoint: MqttEndpoint) -> bytes:
    flags = 0x02 if options.clean_start else 0x00
    payload = _utf8(options.client_id)
    if endpoint.username is not None:
        flags |= 0x80
        payload += _utf8(endpoint.username)
    if endpoint.password is not None:
        flags |= 0x40
        payload += _binary(endpoint.password.get_secret_value().encode())
    header = _utf8("MQTT") + bytes((options.protocol, flags))
    header += struct.pack("!H", options.keepalive_s)
    if options.protocol != 5:
        return _packet(_CONNECT, header + payload)
    properties = (
        bytes((_PROP_SESSION_EXPIRY,))
        + struct.pack("!I", options.session_expiry_s)
        + bytes((_PROP_RECEIVE_MAXIMUM,))
        + struct.pack("!H", options.receive_maximum)
    )
    return _packet(_CONNECT, header + _varint(len(properties)) + properties + payload)


def subscribe_packet(
    packet_id: int,
    filters: Iterable[tuple[str, int]],
    *,
    v5: bool = True,
    subscription_id: int | None = None,
) -> bytes:
    properties = b""
    if v5 and subscription_id is not None:
        properties = bytes((_PROP_SUBSCRIPTION_ID,)) + _varint(subscription_id)
    body = struct.pack("!H", packet_id) + (_varint(len(properties)) + properties if v5 else b"")
    for topic_filter, qos in filters:
        body += _utf8(topic_filter) + bytes((qos,))
    return _packet(_SUBSCRIBE, body)


def unsubscribe_packet(packet_id: int, filters: Iterable[str], *, v5: bool = True) -> bytes:
    body = struct.pack("!H", packet_id) + (_varint(0) if v5 else b"")
    for topic_filter in filters:
        body += _utf8(topic_filter)
    return _packet(_UNSUBSCRIBE, body)


def publish_packet(
    topic: str, payload: bytes, *, qos: int, packet_id: int, retain: bool, v5: bool = True
) -> bytes:
    first = _PUBLISH | (qos << 1) | (1 if retain else 0)
    properties = _varint(0) if v5 else b""
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + properties + payload
    return _packet(first, body)


def _reason_string(data: bytes, start: int) -> str:
    """The Reason String property of an ack or CONNACK, if the broker sent one."""
    decoded = _read_varint(data, start)
    if decoded is None:
        return ""
    length, index = decoded
    end = index + length
    while index < end:
        identifier = data[index]
        index += 1
        if identifier == _PROP_REASON_STRING:
            (size,) = struct.unpack_from("!H", data, index)
            return data[index + 2 : index + 2 + size].decode(errors="replace")
        index = _skip_property(data, index, identifier)
    return ""


def _skip_property(data: bytes, index: int, identifier: int) -> int:
    if identifier in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
        return index + 1
    if identifier in (0x13, 0x21, 0x22, 0x23):
        return index + 2
    if identifier in (0x02, 0x11, 0x18, 0x27):
        return index + 4
    if identifier == 0x0B:
        decoded = _read_varint(data, index)
        return decoded[1] if decoded else len(data)
    if identifier == 0x26:  # user property: two strings
        index += 2 + int(struct.unpack_from("!H", data, index)[0])
    return index + 2 + int(struct.unpack_from("!H", data, index)[0])


def _subscription_ids(data: bytes, index: int, end: int) -> set[int]:
    """The Subscription Identifiers among a PUBLISH's properties (index..end)."""
    found: set[int] = set()
    while index < end:
        identifier = data[index]
        index += 1
        if identifier == _PROP_SUBSCRIPTION_ID:
            decoded = _read_varint(data, index)
            if decoded is None:
                raise MqttError("Subscription Identifier is truncated")
            found.add(decoded[0])
            index = decoded[1]
        else:
            index = _skip_property(data, index, identifier)
    return found


def _server_keepalive(data: bytes, start: int) -> int | None:
    decoded = _read_varint(data, start)
    if decoded is None:
        return None
    length, index = decoded
    end = index + length
    while index < end:
        identifier = data[index]
        index += 1
        if identifier == _PROP_SERVER_KEEP_ALIVE:
            return int(struct.unpack_from("!H", data, index)[0])
        index = _skip_property(data, index, identifier)
    return None


class MqttConnection(asyncio.Protocol):
    """The protocol side of one connection; `connect()` is how it is opened."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        protocol: int = 5,
        on_connack: Callable[[MqttConnection], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_connack = on_connack
        self._v5 = protocol == 5
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[tuple[bool, int]] = asyncio.get_running_loop().create_future()
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._next_packet_id = 0
        self._paused = False
        self._ack_progress: asyncio.Future[None] | None = None
        self.pipelined_acks = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.session_present = False
        self.last_received = time.monotonic()
        self.keepalive_s = 0
        # Identifiers this connection subscribed with; empty: every message counts as ours.
        self._subscription_ids: set[int] = set()

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = MqttError(f"connection lost: {exc or 'closed by broker'}")
        waiters: list[asyncio.Future[Any]] = [self._connack, *self._acks.values()]
        if self._ack_progress is not None:
            waiters.append(self._ack_progress)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._acks.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        # Nobody awaits a CONNACK that never came: retrieve it so asyncio does not warn.
        if self._connack.done() and not self._connack.cancelled():
            self._connack.exception()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        try:
            while size - offset >= 2:
                decoded = _read_varint(buffer, offset + 1)
                if decoded is None:
                    break
                length, body_start = decoded
                end = body_start + length
                if end > size:
                    break
                self._dispatch(buffer[offset], bytes(buffer[body_start:end]))
                offset = end
        except (MqttError, struct.error, UnicodeDecodeError, IndexError) as exc:
            logger.error("malformed packet from broker, closing the connection: %s", exc)
            self.abort()
        del buffer[:offset]

    # Packet handling

    def _dispatch(self, first_byte: int, body: bytes) -> None:
        kind = first_byte & 0xF0
        if kind == _PUBLISH:
            self._handle_publish(first_byte, body)
        elif kind in (_PUBACK, _SUBACK & 0xF0, _UNSUBACK):
            self._settle(body)
        elif kind == _CONNACK:
            self._handle_connack(body)
        elif kind == _DISCONNECT:
            reason = body[0] if body else 0
            logger.warning(
                "broker sent DISCONNECT, reason 0x%02x %s",
                reason,
                _reason_string(body, 1) if len(body) > 1 else "",
            )
        elif kind != _PINGRESP:
            logger.debug("ignored packet type 0x%02x", kind)

    def _handle_publish(self, first_byte: int, body: bytes) -> None:
        qos = (first_byte >> 1) & 0x03
        (topic_length,) = struct.unpack_from("!H", body, 0)
        index = 2 + topic_length
        topic = body[2:index].decode()
        packet_id = 0
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, index)
            index += 2
        ours = True
        if not self._v5:
            pass
        elif body[index] == 0:  # no properties
            index += 1
            ours = not self._subscription_ids
        elif (
            body[index] == 2 and body[index + 1] == _PROP_SUBSCRIPTION_ID and body[index + 2] < 128
        ):
            # Only our one-byte Subscription Identifier: the common case once subscribed.
            ours = not self._subscription_ids or body[index + 2] in self._subscription_ids
            index += 3
        else:
            decoded = _read_varint(body, index)
            if decoded is None:
                raise MqttError("PUBLISH properties are truncated")
            end = decoded[1] + decoded[0]
            if self._subscription_ids:
                ours = bool(_subscription_ids(body, decoded[1], end) & self._subscription_ids)
            index = end
        message = Message(
            topic,
            body[index:],
            qos,
            packet_id,
            bool(first_byte & 0x01),
            bool(first_byte & 0x08),
            ours,
        )
        self._on_message(message)

    def _handle_connack(self, body: bytes) -> None:
        session_present, reason = bool(body[0] & 0x01), body[1]
        if not self._v5:
            self._handle_connack_v4(session_present, reason)
            return
        keepalive = _server_keepalive(body, 2) if len(body) > 2 else None
        if keepalive is not None:
            self.keepalive_s = keepalive
        if reason >= _FAILURE:
            detail = _reason_string(body, 2) if len(body) > 2 else ""
            name = _FINAL_REFUSALS.get(reason, "refused")
            error_type = MqttRefused if reason in _FINAL_REFUSALS else MqttError
            self._connack.set_exception(
                error_type(
                    f"broker refused the connection: {name} (0x{reason:02x}) {detail}",
                    reason_code=reason,
                )
            )
        else:
            self._accepted(session_present, reason)

    def _accepted(self, session_present: bool, code: int) -> None:
        if self._connack.done():
            return
        self.session_present = session_present
        self._connack.set_result((session_present, code))
        if self._on_connack is not None:
            # Synchronously, before the messages that may follow in the same read.
            self._on_connack(self)

    def _handle_connack_v4(self, session_present: bool, code: int) -> None:
        if code == 0:
            self._accepted(session_present, code)
            return
        names = {
            1: "unacceptable protocol version",
            2: "client id rejected",
            3: "server unavailable",
            4: "bad user name or password",
            5: "not authorized",
        }
        error_type = MqttError if code == 3 else MqttRefused
        self._connack.set_exception(
            error_type(
                f"broker refused the connection: {names.get(code, 'refused')} ({code})",
                reason_code=code,
            )
        )

    def _settle(self, body: bytes) -> None:
        (packet_id,) = struct.unpack_from("!H", body, 0)
        waiter = self._acks.pop(packet_id, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(body[2:])
            return
        self.pipelined_acks += 1
        progress = self._ack_progress
        if progress is not None and not progress.done():
            progress.set_result(None)

    # Pipelined publishing: many QoS 1 PUBLISH packets in one write, acks only counted.
    # For the load generator; the packet ids are the caller's and must not collide with
    # those of awaited requests on the same connection (so use one or the other).

    async def pipelined_acks_advance(self) -> None:
        """Waits until at least one more pipelined PUBACK has arrived."""
        self._ack_progress = asyncio.get_running_loop().create_future()
        try:
            await self._ack_progress
        finally:
            self._ack_progress = None

    # What the owner of the connection does

    def ack(self, packet_ids: Iterable[int]) -> int:
        """Sends one PUBACK per id, all in one write. Returns how many were sent."""
        if self._transport is None or self._transport.is_closing():
            return 0
        chunks = [_PUBACK_HEADER + struct.pack("!H", pid) for pid in packet_ids if pid]
        if chunks:
            self._transport.write(b"".join(chunks))
        return len(chunks)

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def pause_reading(self) -> None:
        """Back-pressure: stop taking bytes from the socket (the broker then queues)."""
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    @property
    def reading_paused(self) -> bool:
        return self._paused

    async def subscribe(
        self,
        filters: list[tuple[str, int]],
        timeout_s: float = 10.0,
        *,
        subscription_id: int | None = None,
    ) -> None:
        """Subscribes; with a `subscription_id` (MQTT 5), messages that do not carry it
        arrive with `ours` False."""
        packet_id = self._new_packet_id()
        packet = subscribe_packet(packet_id, filters, v5=self._v5, subscription_id=subscription_id)
        if subscription_id is not None and self._v5:
            self._subscription_ids.add(subscription_id)
        reply = await self._request(packet_id, packet, timeout_s)
        if self._v5:
            decoded = _read_varint(reply, 0)
            codes = reply[decoded[1] + decoded[0] :] if decoded else b""
        else:
            codes = reply
        for (topic_filter, _), code in zip(filters, codes, strict=False):
            if code >= _FAILURE:
                raise MqttRefused(
                    f"subscription to {topic_filter!r} refused (0x{code:02x})", reason_code=code
                )

    async def unsubscribe(self, filters: list[str], timeout_s: float = 10.0) -> list[int]:
        """Unsubscribes; MQTT 5 answers a reason code per filter (0x00 removed, 0x11 there
        was no such subscription), MQTT 3.1.1 answers none (an empty list)."""
        packet_id = self._new_packet_id()
        reply = await self._request(
            packet_id, unsubscribe_packet(packet_id, filters, v5=self._v5), timeout_s
        )
        if not self._v5:
            return []
        decoded = _read_varint(reply, 0)
        return list(reply[decoded[1] + decoded[0] :]) if decoded else []

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        """Publishes and, for QoS 1, waits for the broker's PUBACK."""
        if qos == 0:
            self._write(
                publish_packet(topic, payload, qos=0, packet_id=0, retain=retain, v5=self._v5)
            )
            return
        packet_id = self._new_packet_id()
        packet = publish_packet(
            topic, payload, qos=1, packet_id=packet_id, retain=retain, v5=self._v5
        )
        reply = await self._request(packet_id, packet, timeout_s)
        if reply and reply[0] >= _FAILURE:
            raise MqttError(
                f"publish to {topic!r} refused (0x{reply[0]:02x})", reason_code=reply[0]
            )

    def ping(self) -> None:
        self._write(_PINGREQ_PACKET)

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker keeps our session and discards our Will."""
        if self.is_open and self._transport is not None:
            self._transport.write(_DISCONNECT_PACKET)
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def wait_connack(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            self.session_present, _ = await self._connack

    def send(self, packet: bytes) -> None:
        self._write(packet)

    def _write(self, packet: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise MqttError("not connected")
        self._transport.write(packet)

    def _new_packet_id(self) -> int:
        for _ in range(65535):
            self._next_packet_id = self._next_packet_id % 65535 + 1
            if self._next_packet_id not in self._acks:
                return self._next_packet_id
        raise MqttError("no free packet id: 65,535 requests outstanding")

    async def _request(self, packet_id: int, packet: bytes, timeout_s: float) -> bytes:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = waiter
        self._write(packet)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            raise MqttError(f"no answer to packet {packet_id} within {timeout_s} s") from None
        finally:
            self._acks.pop(packet_id, None)


async def _keepalive(connection: MqttConnection, interval_s: float) -> None:
    """Pings the broker, and drops a connection that has gone quiet (a half-open socket)."""
    while connection.is_open:
        await asyncio.sleep(interval_s)
        silent_for = time.monotonic() - connection.last_received
        if silent_for > 2 * interval_s and not connection.reading_paused:
            logger.warning("no answer from the broker for %.0f s: closing", silent_for)
            connection.abort()
            return
        with contextlib.suppress(MqttError):
            connection.ping()


@contextlib.asynccontextmanager
async def connect(
    endpoint: MqttEndpoint,
    options: SessionOptions,
    on_message: Callable[[Message], None],
    *,
    ssl_context: ssl.SSLContext | None = None,
    on_connack: Callable[[MqttConnection], None] | None = None,
) -> AsyncIterator[MqttConnection]:
    """Opens one connection; leaving the block disconnects cleanly (the session stays)."""
    loop = asyncio.get_running_loop()
    if endpoint.tls and ssl_context is None:
        ssl_context = ssl.create_default_context()
    try:
        async with asyncio.timeout(options.connect_timeout_s):
            _, connection = await loop.create_connection(
                lambda: MqttConnection(on_message, options.protocol, on_connack),
                endpoint.host,
                endpoint.port,
                ssl=ssl_context if endpoint.tls else None,
            )
    except (OSError, TimeoutError) as exc:
        raise MqttError(f"cannot reach {endpoint.host}:{endpoint.port}: {exc}") from exc
    try:
        connection.send(connect_packet(options, endpoint))
        await connection.wait_connack(options.connect_timeout_s)
    except TimeoutError:
        connection.abort()
        raise MqttError("no CONNACK from the broker") from None
    except MqttError:
        connection.abort()
        raise
    interval = (connection.keepalive_s or options.keepalive_s) / 2
    pinger = asyncio.create_task(_keepalive(connection, interval), name="mqtt-keepalive")
    try:
        yield connection
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
        connection.disconnect()
