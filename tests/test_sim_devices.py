"""Simulated devices on a real Mosquitto: bytes as planned, status and Will, auth, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import MqttEndpoint
from device_sim.errors import BrokerError
from device_sim.fleet import GeneratedFleet, NoCredentials, PasswordTemplate, SimCover
from device_sim.runner import Progress, RunResult, run_scenario
from device_sim.scenario import Scenario, load_scenario
from device_sim.timeline import Publication
from ingest import mqtt
from tests.servers import MosquittoServer
from tests.test_sim_cli import sim_app

# Every kind of connection change in one short run: silence with a Will, an NB-IoT
# outage (offline, back online, batch upload), redelivered duplicates, malformed messages.
EVENTFUL = {
    "name": "eventful",
    "description": "link changes and odd messages",
    "fleet_size": 4,
    "duration_s": 120,
    "speed": 100,
    "report_interval_s": 10,
    "events": [
        {"kind": "silent", "covers": [1], "at_s": 40},
        {"kind": "buffer", "covers": [2], "at_s": 30, "until_s": 80},
        {"kind": "duplicate", "covers": [3], "at_s": 20, "until_s": 60},
        {"kind": "malformed", "covers": [0], "at_s": 50},
    ],
}


class Watcher:
    """A subscriber to everything under covers/, keeping what arrives in order."""

    def __init__(self) -> None:
        self.messages: list[mqtt.Message] = []
        self._connection: mqtt.MqttConnection | None = None

    def on_message(self, message: mqtt.Message) -> None:
        self.messages.append(message)
        if self._connection is not None and message.packet_id:
            self._connection.ack([message.packet_id])

    def by_topic(self, suffix: str) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = defaultdict(list)
        for message in self.messages:
            if message.topic.endswith(suffix):
                found[message.topic].append(message.payload)
        return found


@contextlib.asynccontextmanager
async def watching(broker: MosquittoServer, client_id: str) -> AsyncIterator[Watcher]:
    watcher = Watcher()
    options = mqtt.SessionOptions(client_id=client_id, clean_start=True)
    async with mqtt.connect(MqttEndpoint.parse(broker.url), options, watcher.on_message) as conn:
        watcher._connection = conn
        await conn.subscribe([("covers/#", 1)])
        yield watcher


async def run(
    broker: MosquittoServer,
    scenario: Scenario,
    covers: list[SimCover],
    **options: object,
) -> RunResult:
    return await run_scenario(
        scenario,
        covers,
        seed=1,
        endpoint=MqttEndpoint.parse(broker.url),
        credentials=NoCredentials(),
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [5, 4])
async def test_devices_publish_exactly_the_planned_bytes_with_status_and_will(
    mosquitto: MosquittoServer, protocol: int
) -> None:
    scenario = Scenario.model_validate(EVENTFUL)
    covers = GeneratedFleet(4, device_prefix="ev").covers()
    async with watching(mosquitto, "watcher") as watcher:
        result = await run(mosquitto, scenario, covers, protocol=protocol)
        await asyncio.sleep(0.3)
    assert result.unacknowledged == 0
    assert result.acknowledged == result.published
    planned: dict[str, list[bytes]] = defaultdict(list)
    for publication in result.plan.publications():
        planned[publication.topic].append(publication.payload)
    assert watcher.by_topic("/telemetry") == planned  # per device, in order, byte for byte
    statuses = {
        topic: [p.decode() for p in payloads]
        for topic, payloads in watcher.by_topic("/status").items()
    }
    assert statuses == {
        "covers/ev-00000/status": ["online", "offline"],
        "covers/ev-00001/status": ["online", "offline"],  # the Will, at the silence
        "covers/ev-00002/status": ["online", "offline", "online", "offline"],
        "covers/ev-00003/status": ["online", "offline"],
    }
    # The silent device's Will came while the others still reported.
    order = [(m.topic, m.payload) for m in watcher.messages]
    will = order.index(("covers/ev-00001/status", b"offline"))
    assert any(topic.endswith("/telemetry") for topic, _ in order[will + 1 :])
    # What a dashboard connecting later sees: every status retained, all offline now.
    async with watching(mosquitto, "late") as late:
        await asyncio.sleep(0.2)
    assert sorted((m.topic, m.payload, m.retain) for m in late.messages) == [
        (f"covers/ev-0000{i}/status", b"offline", True) for i in range(4)
    ]


@pytest.mark.asyncio
async def test_hundreds_of_devices_share_one_thread(mosquitto: MosquittoServer) -> None:
    scenario = load_scenario("lorry_spike").model_copy(update={"fleet_size": 300, "speed": 6000})
    covers = GeneratedFleet(300, device_prefix="many").covers()
    threads_before = threading.active_count()
    seen: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        assert threading.active_count() <= threads_before + 1  # at most the loop's resolver

    result = await run(mosquitto, scenario, covers, on_progress=on_progress, planned=3002)
    assert result.published == result.acknowledged == 300 * 10 + 2
    assert seen[-1].acknowledged == 3002
    assert seen[-1].online == 300
    assert seen[-1].planned == 3002


def write_passwords(path: Path, users: dict[str, str]) -> None:
    for number, (user, password) in enumerate(users.items()):
        create = ["-c"] if number == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(path), user, password], check=True)


@pytest.mark.asyncio
async def test_devices_authenticate_as_themselves_under_an_acl(tmp_path: Path) -> None:
    covers = GeneratedFleet(3, device_prefix="auth").covers()
    passwords = tmp_path / "passwords"
    users = {cover.device_id: f"pw-{cover.device_id}" for cover in covers}
    await asyncio.to_thread(write_passwords, passwords, users)
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite covers/%u/#\n", encoding="utf-8")
    scenario = load_scenario("malformed").model_copy(update={"fleet_size": 3, "speed": 3000})
    with MosquittoServer(tmp_path / "broker", password_file=passwords, acl_file=acl) as broker:
        endpoint = MqttEndpoint.parse(broker.url)
        result = await run_scenario(
            scenario,
            covers,
            seed=1,
            endpoint=endpoint,
            credentials=PasswordTemplate("pw-{device_id}"),
        )
        assert result.acknowledged == result.published == 3 * 5 + 8
        assert result.refused == 0
        with pytest.raises(BrokerError, match=r"0 of 3 devices connected.*refused"):
            await run_scenario(
                scenario,
                covers,
                seed=1,
                endpoint=endpoint,
                credentials=PasswordTemplate("wrong"),
                connect_timeout_s=1.0,
            )


@pytest.mark.asyncio
async def test_devices_reconnect_after_a_broker_restart_and_lose_nothing(
    mosquitto: MosquittoServer,
) -> None:
    scenario = Scenario.model_validate(
        {
            "name": "steady",
            "description": "steady reports",
            "fleet_size": 5,
            "duration_s": 60,
            "speed": 30,
            "report_interval_s": 2,
        }
    )
    covers = GeneratedFleet(5, device_prefix="rc").covers()
    running = asyncio.create_task(run(mosquitto, scenario, covers))
    await asyncio.sleep(0.6)
    await asyncio.to_thread(mosquitto.restart)
    result = await running
    assert result.connects == 2 * 5
    assert result.published == 5 * 30
    assert result.acknowledged == result.published
    assert result.unacknowledged == 0


def test_load_mode_publishes_n_with_none_unacknowledged(mosquitto: MosquittoServer) -> None:
    answer = CliRunner().invoke(
        sim_app,
        ["sim", "--load", "3000", "--devices", "30", "--procs", "2", "--seed", "4"],
        env={"SMARTCOVER_MQTT_URL": mosquitto.url},
    )
    assert answer.exit_code == 0, answer.output
    assert "published 3,000, acknowledged by the broker 3,000" in answer.output


def test_publications_are_plain_data() -> None:
    publication = Publication(1, 0, "covers/x/telemetry", b"{}", "reading")
    assert publication.is_telemetry
    assert not Publication(1, 0, "covers/x/status", b"online", "status").is_telemetry
