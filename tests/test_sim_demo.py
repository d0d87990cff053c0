"""The simulator against `smartcover demo`: its devices connect to the demo's embedded
amqtt broker (MQTT 3.1.1 only) and its scenario is ingested, alerted and checked, as the
README shows an engineer doing; and the protocol the devices speak, broker by broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from amqtt.broker import Broker

from core.settings import MqttEndpoint, Settings
from device_sim.devices import broker_protocol
from tests.servers import MosquittoServer, free_port


@dataclass(frozen=True)
class RunningDemo:
    api_url: str
    broker_url: str
    admin_key: str
    directory: Path


def _quiet_env() -> dict[str, str]:
    """The environment without SMARTCOVER_* settings: the commands' own defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTCOVER_")}
    return {**env, "COLUMNS": "200"}


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[RunningDemo]:
    """`smartcover demo` in a process of its own, on free ports."""
    api_port, mqtt_port = free_port(), free_port()
    directory = tmp_path / "demo"
    out = tmp_path / "demo.txt"
    command = [sys.executable, "-m", "smartcover", "demo", "--dir", str(directory)]
    command += ["--port", str(api_port), "--broker-port", str(mqtt_port)]
    with open(out, "wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=_quiet_env(), cwd=tmp_path
        )
    try:
        deadline = time.monotonic() + 60
        while "simulator" not in out.read_text(errors="replace"):
            assert process.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "the demo did not start within 60 s"
            time.sleep(0.25)
        announced = out.read_text(errors="replace")
        # The demo names the command that reaches it, with its broker and API.
        found = re.search(r"smartcover sim --broker (\S+) --service (\S+) --register", announced)
        assert found, announced
        assert found.group(1) == f"mqtt://127.0.0.1:{mqtt_port}"
        key = (directory / "admin-key").read_text(encoding="ascii").strip()
        assert f"admin API key {key}" in announced
        assert (directory / "admin-key").stat().st_mode & 0o777 == 0o600
        yield RunningDemo(found.group(2), found.group(1), key, directory)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_scenario_registered_and_checked_against_the_demo_passes(demo: RunningDemo) -> None:
    # As the README says: the admin key from the demo's file, MQTT 5 left as the default.
    command = [sys.executable, "-m", "smartcover", "sim", "--scenario", "vehicle_strike"]
    command += ["--speed", "600", "--register", "--check"]
    command += ["--broker", demo.broker_url, "--service", demo.api_url]
    env = {**_quiet_env(), "SMARTCOVER_API_KEY": demo.admin_key}
    sim = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
    output = sim.stdout + sim.stderr
    assert sim.returncode == 0, output
    assert "the devices speak MQTT 3.1.1" in output
    assert "Will flag set" not in output
    # Delivered, ingested (its readings moved the rules: an alert and a case), checked.
    for row in ("published and acknowledged by the broker", "alert cover_displaced", "case on"):
        line = next(line for line in output.splitlines() if row in line)
        assert "pass" in line, line
    assert "vehicle_strike: passed" in output
    # The demo's own covers were not touched: the simulator's are numbered apart.
    assert "covers 4 new, 0 updated" in " ".join(output.split())


@pytest.mark.asyncio
async def test_devices_speak_311_to_amqtt_and_5_to_mosquitto(mosquitto: MosquittoServer) -> None:
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        amqtt = MqttEndpoint.parse(f"mqtt://127.0.0.1:{port}")
        assert await broker_protocol(amqtt, 5) == 4
        assert await broker_protocol(amqtt, 4) == 4
    finally:
        await broker.shutdown()
    assert await broker_protocol(MqttEndpoint.parse(mosquitto.url), 5) == 5
    # Nobody listening: the configured protocol, and connecting will say why.
    assert await broker_protocol(MqttEndpoint.parse(f"mqtt://127.0.0.1:{free_port()}"), 5) == 5


def test_the_protocol_can_be_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTCOVER_MQTT_PROTOCOL", "4")
    assert Settings().mqtt_protocol == 4
