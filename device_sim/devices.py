"""Simulated devices' MQTT sessions: paho-mqtt 2 clients driven by one asyncio loop.

Each device is its own MQTT 5 client (client id = device id, user name = device id when it
has a password, retained `online` status and a retained `offline` Last Will, QoS 1), as a
real sensor is. paho's `loop_start()` would cost a thread per device, so instead the
clients' sockets are registered with the event loop (paho's external-loop callbacks), and
one timer task services every client's keep-alive. Devices then cost a socket each and
share one thread: measured on a 2-core test machine against a local Mosquitto, 500
devices connect in 0.15 s (1,000 in 0.3 s) and publish ~8,000 readings/s, message
generation included, from one core and ~50 MB of memory.

The protocol: MQTT 5 unless told otherwise, and MQTT 3.1.1 with a broker that refuses 5,
such as the amqtt broker `smartcover demo` embeds: one probe connection asks first.

Reconnecting: a device that loses its connection without being told to reconnects on its
own with exponential back-off and jitter; paho keeps its unacknowledged QoS 1 messages
and sends them again once connected (at least once, as the contract expects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from core.settings import MqttEndpoint
from device_sim.errors import BrokerError
from device_sim.fleet import Credentials, SimCover
from device_sim.timeline import status_topic

logger = logging.getLogger(__name__)

KEEPALIVE_S = 60
# How long one blocking TCP connect may take (paho connects synchronously).
CONNECT_TIMEOUT_S = 3.0
# Reconnect back-off: from half a second up to half a minute, with jitter.
_RECONNECT_FIRST_S = 0.5
_RECONNECT_MAX_S = 30.0
# paho's keep-alive bookkeeping needs a call at least this often.
_TIMER_INTERVAL_S = 1.0
# Connecting yields to the loop every so many devices, so CONNACKs are read meanwhile.
_CONNECT_CHUNK = 50
# A device told to go offline waits at most this long for its last PUBACKs first.
_OFFLINE_GRACE_S = 5.0
# What an MQTT 3.1.1 broker answers an MQTT 5 CONNECT: CONNACK, return code 0x01
# "unacceptable protocol version" (MQTT-3.1.2-2); an MQTT 5 broker's CONNACK is longer.
_REFUSES_MQTT5 = b"\x20\x02\x00\x01"
# MQTT 5 DISCONNECT reason 0x04: the broker publishes the Will as if the link had died.
_WITH_WILL = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")


@dataclass
class LinkStats:
    """Counts across all devices of a fleet; telemetry only, status messages aside."""

    published: int = 0
    acknowledged: int = 0
    refused: int = 0  # PUBACK with a failure reason (an ACL said no)
    connects: int = 0
    last_error: str = ""


class DeviceSession:
    """One device's MQTT session on the running event loop; create it inside the loop."""

    def __init__(
        self,
        device_id: str,
        endpoint: MqttEndpoint,
        password: str | None,
        stats: LinkStats,
        *,
        protocol: int = 5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.device_id = device_id
        self._mqtt5 = protocol == 5
        self._endpoint = endpoint
        self._stats = stats
        self._loop = asyncio.get_running_loop()
        self._status = status_topic(device_id)
        self._pending: set[int] = set()  # telemetry message ids not yet acknowledged
        self._wanted_online = False
        self._offline_when_idle = False
        self._attempt = 0
        self._retry: asyncio.TimerHandle | None = None
        self._refused = False
        self.connected = False
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._mqtt5 else MQTTProtocolVersion.MQTTv311,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_queued_messages_set(0)  # unlimited: readings wait while offline
        client.will_set(self._status, "offline", qos=1, retain=True)
        if password is not None:
            client.username_pw_set(device_id, password)
        if endpoint.tls:
            client.tls_set_context(ssl_context or ssl.create_default_context())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # Only records where to connect; every attempt is then a reconnect().
        client.connect_async(endpoint.host, endpoint.port, keepalive=KEEPALIVE_S)
        self._client = client

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- what the runner does --------------------------------------------------------

    def go_online(self) -> None:
        self._wanted_online = True
        self._offline_when_idle = False
        if not self.connected and self._retry is None:
            self._connect()

    def go_offline(self) -> None:
        """Drops the link as a dying device does: the broker publishes the Will (`offline`).

        Readings already sent are acknowledged first, so none is lost to the test.
        """
        self._wanted_online = False
        self._cancel_retry()
        if self._pending and self.connected:
            self._offline_when_idle = True
            self._loop.call_later(_OFFLINE_GRACE_S, self._disconnect_with_will)
        else:
            self._disconnect_with_will()

    def publish(self, topic: str, payload: bytes) -> None:
        """Publishes telemetry at QoS 1; counted as acknowledged when the PUBACK comes."""
        info = self._client.publish(topic, payload, qos=1)
        # Not connected: paho keeps the message and sends it after the next CONNACK.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"{self.device_id}: cannot publish: {paho.error_string(info.rc)}")
        self._pending.add(info.mid)
        self._stats.published += 1

    def service_timers(self) -> None:
        if self._client.socket() is not None:
            self._client.loop_misc()

    def close(self) -> None:
        self._wanted_online = False
        self._cancel_retry()
        self._disconnect_with_will()

    @property
    def closed(self) -> bool:
        return self._client.socket() is None

    # -- connecting ------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        try:
            self._client.reconnect()
        except OSError as exc:
            self._stats.last_error = (
                f"cannot reach {self._endpoint.host}:{self._endpoint.port}: {exc}"
            )
            self._schedule_retry()

    def _schedule_retry(self, ceiling_s: float | None = None) -> None:
        if not self._wanted_online or self._retry is not None:
            return
        ceiling = ceiling_s or min(_RECONNECT_MAX_S, _RECONNECT_FIRST_S * 2**self._attempt)
        self._attempt += 1
        delay = random.uniform(ceiling / 2, ceiling)  # jitter, so a fleet does not stampede
        logger.debug("%s: reconnecting in %.1f s", self.device_id, delay)
        self._retry = self._loop.call_later(delay, self._connect)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _disconnect_with_will(self) -> None:
        self._offline_when_idle = False
        sock = self._client.socket()
        if self._wanted_online or sock is None:
            return
        if self._mqtt5:
            self._client.disconnect(reasoncode=_WITH_WILL)
        elif isinstance(sock, socket.socket):
            # MQTT 3.1.1 has no such reason: the link dies without a DISCONNECT, as a
            # device's does, and paho notices the closed socket on its next read.
            sock.shutdown(socket.SHUT_RDWR)

    # -- paho callbacks (run in the event loop, from loop_read and loop_write) --------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._refused = True
            self._stats.last_error = f"broker refused {self.device_id}: {reason}"
            logger.debug("%s: broker refused the connection: %s", self.device_id, reason)
            return  # paho closes the socket; _on_disconnect schedules the retry
        self.connected = True
        self._refused = False
        self._attempt = 0
        self._stats.connects += 1
        client.publish(self._status, "online", qos=1, retain=True)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connected = False
        if self._wanted_online:
            logger.debug("%s: connection lost (%s)", self.device_id, reason)
            # Refused credentials are not fixed in a second: wait long.
            self._schedule_retry(_RECONNECT_MAX_S if self._refused else None)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        if mid not in self._pending:
            return  # a status message
        self._pending.discard(mid)
        if reason.is_failure:
            self._stats.refused += 1
            self._stats.last_error = f"broker refused a publish of {self.device_id}: {reason}"
        else:
            self._stats.acknowledged += 1
        if self._offline_when_idle and not self._pending:
            self._disconnect_with_will()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_reader(sock, self._readable)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _readable(self) -> None:
        self._client.loop_read()
        # TLS may hold decrypted bytes the selector cannot see.
        sock = self._client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._client.loop_read()
            sock = self._client.socket()


def _mqtt5_probe_connect() -> bytes:
    """A minimal MQTT 5 CONNECT: clean start, 10 s keep-alive, no properties, no Will."""
    client_id = f"smartcover-sim-probe-{secrets.token_hex(4)}".encode()
    variable_header = b"\x00\x04MQTT\x05\x02\x00\x0a\x00"
    body = variable_header + len(client_id).to_bytes(2, "big") + client_id
    return bytes((0x10, len(body))) + body  # under 128 bytes: a one-byte length


async def broker_protocol(
    endpoint: MqttEndpoint, wanted: int, *, ssl_context: ssl.SSLContext | None = None
) -> int:
    """The protocol the devices speak: `wanted`, or 4 (MQTT 3.1.1) when `wanted` is 5 and
    the broker refuses MQTT 5. Unreachable or unclear: `wanted` (connecting says why).

    The probe carries no Will although the devices' CONNECTs do: amqtt 0.12.1 (the demo's
    broker; `BrokerProtocolHandler.init_from_connect`) checks a CONNECT's Will, parsed the
    3.1.1 way, before the protocol level, so it drops an MQTT 5 CONNECT with a Will ("Will
    flag set, but will topic/message not present in payload") without the CONNACK 0x01
    that MQTT-3.1.2-2 requires, which leaves a client nothing to fall back on.
    """
    if wanted != 5:
        return wanted
    tls = (ssl_context or ssl.create_default_context()) if endpoint.tls else None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=tls)
            try:
                writer.write(_mqtt5_probe_connect())
                answer = await reader.readexactly(len(_REFUSES_MQTT5))
                writer.write(b"\xe0\x00")  # DISCONNECT, for a broker that accepted us
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return wanted
    if answer == _REFUSES_MQTT5:
        logger.info("the broker refuses MQTT 5: the devices speak MQTT 3.1.1")
        return 4
    return wanted


class DeviceFleet:
    """The sessions of all simulated devices of this process, on the running loop."""

    def __init__(self, sessions: Sequence[DeviceSession], stats: LinkStats) -> None:
        self.sessions = list(sessions)
        self.stats = stats

    @property
    def online(self) -> int:
        return sum(session.connected for session in self.sessions)

    @property
    def pending(self) -> int:
        return sum(session.pending for session in self.sessions)

    async def wait_online(self, timeout_s: float) -> None:
        if not await poll(lambda: self.online == len(self.sessions), timeout_s):
            raise BrokerError(
                f"only {self.online} of {len(self.sessions)} devices connected within "
                f"{timeout_s:g} s; last error: {self.stats.last_error or 'none'}"
            )

    async def _service_timers(self) -> None:
        while True:
            await asyncio.sleep(_TIMER_INTERVAL_S)
            for session in self.sessions:
                session.service_timers()


async def poll(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Waits until `condition()` holds or time is up; paho's callbacks set no event to await."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


@contextlib.asynccontextmanager
async def connected_fleet(
    covers: Sequence[SimCover],
    endpoint: MqttEndpoint,
    credentials: Credentials,
    *,
    protocol: int = 5,
    connect_timeout_s: float = 15.0,
) -> AsyncIterator[DeviceFleet]:
    """Connects every cover's device; leaving the block disconnects them with their Will."""
    protocol = await broker_protocol(endpoint, protocol)
    stats = LinkStats()
    fleet = DeviceFleet(
        [
            DeviceSession(
                cover.device_id,
                endpoint,
                credentials.password_for(cover.device_id),
                stats,
                protocol=protocol,
            )
            for cover in covers
        ],
        stats,
    )
    timers = asyncio.create_task(fleet._service_timers(), name="sim-mqtt-timers")
    try:
        for index, session in enumerate(fleet.sessions):
            session.go_online()
            if index % _CONNECT_CHUNK == _CONNECT_CHUNK - 1:
                await asyncio.sleep(0)
        await fleet.wait_online(connect_timeout_s)
        yield fleet
    finally:
        for session in fleet.sessions:
            session.close()
        # The DISCONNECT packets leave through the loop's writers: give them a moment.
        await poll(lambda: all(session.closed for session in fleet.sessions), 2.0)
        timers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timers
