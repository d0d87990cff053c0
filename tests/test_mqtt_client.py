"""Our MQTT client against a real Mosquitto: both protocol versions, sessions, refusals."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from core.settings import MqttEndpoint
from ingest import mqtt
from ingest.errors import MqttRefused
from tests.harness import wait_until
from tests.servers import MosquittoServer

pytestmark = pytest.mark.asyncio


async def publish(url: str, topic: str, payload: bytes, protocol: int) -> None:
    options = mqtt.SessionOptions("publisher", clean_start=True, protocol=protocol)
    async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as connection:
        await connection.publish(topic, payload, qos=1)


@pytest.mark.parametrize("protocol", [4, 5])
async def test_unacknowledged_messages_come_again_after_reconnect(
    mosquitto: MosquittoServer, protocol: int
) -> None:
    endpoint = MqttEndpoint.parse(mosquitto.url)
    options = mqtt.SessionOptions("consumer", session_expiry_s=600, protocol=protocol)
    received: list[mqtt.Message] = []
    async with mqtt.connect(endpoint, options, received.append) as connection:
        await connection.subscribe([("covers/+/telemetry", 1)])
        await publish(mosquitto.url, "covers/d1/telemetry", b"one", protocol)
        await wait_until(lambda: len(received) == 1, timeout_s=5)
        # Not acknowledged: the session keeps it for us.
    async with mqtt.connect(endpoint, options, received.append) as connection:
        assert connection.session_present
        await wait_until(lambda: len(received) == 2, timeout_s=5)
        connection.ack([received[1].packet_id])
    assert received[1].payload == b"one"
    assert received[1].dup
    async with mqtt.connect(endpoint, options, received.append):
        await asyncio.sleep(0.5)
    assert len(received) == 2  # acknowledged once: gone


def write_password_file(path: Path, user: str, password: str) -> None:
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), user, password], check=True)


@pytest.mark.parametrize("protocol", [4, 5])
async def test_bad_credentials_are_refused_for_good(tmp_path: Path, protocol: int) -> None:
    passwords = tmp_path / "passwd"
    await asyncio.to_thread(write_password_file, passwords, "ingest", "right")
    with MosquittoServer(tmp_path / "broker", password_file=passwords) as broker:
        wrong = MqttEndpoint.parse(f"mqtt://ingest:wrong@127.0.0.1:{broker.port}")
        options = mqtt.SessionOptions("consumer", protocol=protocol)
        with pytest.raises(MqttRefused):
            async with mqtt.connect(wrong, options, lambda _: None):
                pass
        right = MqttEndpoint.parse(f"mqtt://ingest:right@127.0.0.1:{broker.port}")
        async with mqtt.connect(right, options, lambda _: None) as connection:
            assert connection.is_open
