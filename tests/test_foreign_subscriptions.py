"""A subscription someone else left in the service's persistent session is removed.

Real Mosquitto: a rogue client connects with the service's client id (taking the session
over), subscribes to filters of its own and leaves; the service reconnects to that session
and must end up with its own subscription only.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from core.settings import MqttEndpoint
from ingest import mqtt
from ingest.foreign_subscriptions import covering_filters
from tests.harness import reading, running_service, service_env, wait_until
from tests.servers import InfluxServer, MosquittoServer


def _matches(topic_filter: str, topic: str) -> bool:
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def test_covering_filters_are_every_filter_that_matches_and_only_those() -> None:
    topic = "covers/dev-x/telemetry"
    filters = covering_filters(topic)
    assert len(filters) == len(set(filters)) == 23  # 8 without '#', 1 + 2 + 4 + 8 with
    assert {"#", "covers/#", "+/+/+", "covers/dev-x/telemetry", "covers/+/telemetry"} <= set(
        filters
    )
    assert all(_matches(f, topic) for f in filters)
    assert not _matches("covers/+/status", topic)


async def _leave_subscriptions(url: str, client_id: str, filters: list[str]) -> None:
    """What a rogue client does: takes the session over, subscribes, disconnects."""
    options = mqtt.SessionOptions(client_id, session_expiry_s=3600)
    async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as rogue:
        await rogue.subscribe([(f, 1) for f in filters])


async def _publish(url: str, device: str, seq: int) -> None:
    options = mqtt.SessionOptions("test-device", clean_start=True)
    payload = json.dumps(reading(device, seq, time.time_ns() // 1_000_000)).encode()
    async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as connection:
        await connection.publish(f"covers/{device}/telemetry", payload, qos=1)


@pytest.mark.asyncio
async def test_subscriptions_left_in_the_service_session_are_removed(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    client_id = env["SMARTCOVER_MQTT_CLIENT_ID"]
    async with running_service(env) as parts:
        metrics = parts.metrics
        await _leave_subscriptions(mosquitto.url, client_id, ["covers/#", "covers/dev-x/telemetry"])
        # The service comes back to its session and removes the general filter at once.
        await wait_until(
            lambda: metrics.foreign_subscriptions_removed._value.get() >= 1,
            timeout_s=20,
            what="covers/# to be removed",
        )
        assert parts.service.broker_connected
        # The device-specific one shows itself with the next reading of that device.
        await _publish(mosquitto.url, "dev-x", 1)
        await wait_until(
            lambda: metrics.foreign_subscriptions_removed._value.get() == 2,
            timeout_s=10,
            what="covers/dev-x/telemetry to be removed",
        )
        assert metrics.foreign_messages._value.get() >= 1  # dev-x's reading came twice
        await asyncio.sleep(1.0)  # received is counted per batch: let the last one seal
        foreign_before = metrics.foreign_messages._value.get()
        received_before = metrics.totals.received
        await _publish(mosquitto.url, "dev-x", 2)
        await _publish(mosquitto.url, "dev-y", 1)
        await wait_until(
            lambda: metrics.totals.received >= received_before + 2,
            timeout_s=10,
            what="the two readings",
        )
        await asyncio.sleep(1.0)  # a second copy would be counted by now
        # Exactly one copy each now, and none through a foreign subscription.
        assert metrics.totals.received == received_before + 2
        assert metrics.foreign_messages._value.get() == foreign_before
