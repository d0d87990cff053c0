"""`smartcover demo`: the whole pipeline on embedded defaults, with a storyline to watch.

An MQTT broker in this process (amqtt, MQTT 3.1.1), the embedded time-series store and
SQLite, a seeded pilot registry, and simulated covers publishing over MQTT into the same
service `smartcover serve` runs: decoding, rules, case desk, outbox, API. The storyline:
normal traffic; a lorry's one-reading tilt spike (no case); a vehicle strike displacing a
cover (a critical case for its owner); a storm flooding the low-lying road (one incident);
a crew working the strike's case through the API; the sensor verifying the fix.

Engineers test against it: the broker listens on 1883 (another free port when 1883 is
taken) and the admin key is also written to `<dir>/admin-key`, so `smartcover sim`
reaches the demo with its defaults and that key. The simulator's devices speak MQTT 5,
which amqtt does not: they find out and speak 3.1.1 (device_sim.devices.broker_protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from amqtt.broker import Broker
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from sqlalchemy import func, select

from alerting.models import AlertRow, CaseRow
from core.db import create_engine, session_factory, transaction, upgrade
from core.settings import MqttEndpoint, Settings
from ingest import mqtt
from ingest.errors import MqttError
from smartcover.runtime import Service, build_service, run_service
from smartcover.seed import LOW_LYING_ROAD, SeededCover, plan_pilot, seed_pilot
from smartcover.serve import api_server, serve_api

logger = logging.getLogger(__name__)

DEMO_COVERS = 300
BROKER_PORT = 1883  # MQTT's own port: `smartcover sim` and other tools find the demo there
ADMIN_KEY_FILE = "admin-key"
REPORT_INTERVAL_S = 60  # each sensor's routine report; events are reported at once
CREW = "crew:demo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def broker_port(wanted: int) -> int:
    """`wanted` if it is free on the loopback, else a free port (a Mosquitto may hold 1883)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            return free_port()
    return wanted


@dataclass
class Story:
    """What happened so far, for the live summary."""

    published: int = 0
    events: list[str] = field(default_factory=list)

    def tell(self, line: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')}  {line}")
        del self.events[:-8]
        logger.info("demo: %s", line)


def demo_settings(directory: Path, broker_port: int, api_port: int, admin_key: str) -> Settings:
    return Settings.model_validate(
        {
            "mqtt_url": f"mqtt://127.0.0.1:{broker_port}",
            "mqtt_protocol": 4,  # the embedded broker speaks MQTT 3.1.1
            "mqtt_client_id": "smartcover-demo",
            "database_url": f"sqlite:///{directory / 'smartcover.db'}",
            "timeseries_path": str(directory / "timeseries.db"),
            "spool_dir": str(directory / "spool"),
            "api_port": api_port,
            "admin_key": admin_key,
            "tilt_confirm_s": 10,
            "verify_window_s": 40,  # a demo cannot wait half an hour for verification
            "verify_min_readings": 3,
            "log_level": "WARNING",
            # Embedded and local: a webhook tried from the demo goes to a receiver here.
            "outbound_allow_nets": "127.0.0.0/8,::1/128",
        }
    )


class Fleet:
    """Every seeded cover's sensor, publishing over one MQTT connection."""

    def __init__(self, url: str, covers: list[SeededCover], story: Story, pace: float) -> None:
        self._endpoint = MqttEndpoint.parse(url)
        self._covers = covers
        self._story = story
        self._pace = pace
        self._rng = random.Random(11)  # noqa: S311 -- sensor noise, not cryptography
        self._seq: dict[str, int] = {}
        self._connection: mqtt.MqttConnection | None = None
        self.overrides: dict[str, dict[str, float]] = {}  # device → values the story sets

    async def publish_forever(self) -> None:
        options = mqtt.SessionOptions("demo-fleet", clean_start=True, protocol=4)
        while True:
            try:
                async with mqtt.connect(self._endpoint, options, lambda _: None) as connection:
                    self._connection = connection
                    await self._rounds(connection)
            except MqttError as exc:
                logger.warning("demo fleet: %s; reconnecting", exc)
                await asyncio.sleep(1)

    async def _rounds(self, connection: mqtt.MqttConnection) -> None:
        interval = REPORT_INTERVAL_S * self._pace / len(self._covers)
        while True:
            for cover in self._covers:
                await self.send(connection, cover)
                await asyncio.sleep(interval)

    async def report_now(self, cover: SeededCover, **values: float) -> None:
        """Sets what the cover measures from now on and reports it at once, as sensors do."""
        if values:
            self.overrides.setdefault(cover.device_id, {}).update(values)
        else:
            self.overrides.pop(cover.device_id, None)
        if self._connection is not None:
            with contextlib.suppress(MqttError):
                await self.send(self._connection, cover)

    async def send(self, connection: mqtt.MqttConnection, cover: SeededCover) -> None:
        seq = self._seq.get(cover.device_id, 0)
        self._seq[cover.device_id] = seq + 1
        reading = {
            "device_id": cover.device_id,
            "seq": seq,
            "ts": time.time_ns() // 1_000_000,
            "tilt_deg": round(abs(self._rng.gauss(0.6, 0.3)), 2),
            "displacement_mm": round(abs(self._rng.gauss(1.0, 0.5)), 1),
            "water_level_cm": round(cover.depth_cm - 120 + self._rng.uniform(-5, 5), 1),
            "battery_v": 3.62,
            "rssi_dbm": -80 - self._rng.randint(0, 15),
            "temperature_c": 11.5,
        }
        reading.update(self.overrides.get(cover.device_id, {}))
        payload = json.dumps(reading).encode()
        await connection.publish(f"covers/{cover.device_id}/telemetry", payload, qos=1)
        self._story.published += 1


class Storyline:
    def __init__(
        self,
        fleet: Fleet,
        covers: list[SeededCover],
        api: httpx.AsyncClient,
        story: Story,
        pace: float,
    ) -> None:
        self._fleet = fleet
        self._covers = covers
        self._api = api
        self._story = story
        self._pace = pace
        self.struck = next(c for c in covers if c.road != LOW_LYING_ROAD)
        self.lorry = next(c for c in covers[5:] if c.road != LOW_LYING_ROAD)
        self.flooded = [c for c in covers if c.road == LOW_LYING_ROAD][:8]

    async def _at(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self._pace)

    async def run(self) -> None:
        await self._at(15)
        await self._spike()
        await self._at(15)
        self._story.tell(f"vehicle strike: cover {self.struck.cover_id} displaced 45 mm")
        await self._fleet.report_now(self.struck, displacement_mm=45.0, tilt_deg=7.0)
        await self._at(10)
        self._story.tell(f"storm: water rising on {LOW_LYING_ROAD}")
        storm = asyncio.ensure_future(self._storm())
        await self._at(10)
        await self._crew_fixes()
        await storm

    async def _spike(self) -> None:
        self._story.tell(f"a lorry passes cover {self.lorry.cover_id}: one 28° tilt reading")
        await self._fleet.report_now(self.lorry, tilt_deg=28.0)
        await asyncio.sleep(2)  # the shock is over: the sensor reports normal at once
        await self._fleet.report_now(self.lorry)

    async def _storm(self) -> None:
        for step in range(12):
            for cover in self.flooded:
                # Level sensors report every 10 cm of rise: the well fills within minutes.
                await self._fleet.report_now(cover, water_level_cm=cover.depth_cm - 100 + step * 10)
            await self._at(5)

    async def _crew_fixes(self) -> None:
        case_id = await self._case_of(self.struck.cover_id)
        if case_id is None:
            self._story.tell("no case for the strike yet: is the service keeping up?")
            return
        for status, note in (
            ("acknowledged", "on our way"),
            ("on_site", "cover found 4 cm off"),
            ("resolved", "cover re-seated and locked"),
        ):
            await self._at(8)
            if status == "resolved":
                await self._fleet.report_now(self.struck)
            answer = await self._api.post(
                f"/api/v1/cases/{case_id}/transitions", json={"to": status, "note": note}
            )
            self._story.tell(f"crew: case {case_id} → {status} ({answer.status_code})")
        self._story.tell("the sensor now has to confirm the fix: normal readings for 40 s")
        for _ in range(6):  # the re-seated cover reports normal, as its routine goes on
            await self._at(8)
            await self._fleet.report_now(self.struck)

    async def _case_of(self, cover_id: str) -> int | None:
        for _ in range(30):
            answer = await self._api.get("/api/v1/cases", params={"cover_id": cover_id})
            if answer.status_code == 200:
                items = answer.json().get("items", [])
                matching = [c for c in items if c.get("cover_id") == cover_id]
                if matching:
                    return int(matching[0]["id"])
            await asyncio.sleep(1)
        return None


async def _summary(service: Service, story: Story) -> Table:
    async with transaction(service.sessions, write=False) as session:
        active = await session.scalar(
            select(func.count()).select_from(AlertRow).where(AlertRow.status == "active")
        )
        by_status = dict(
            (await session.execute(select(CaseRow.status, func.count()).group_by(CaseRow.status)))
            .tuples()
            .all()
        )
    totals = service.ingest.metrics.totals
    table = Table(title="smartcover demo (Ctrl-C stops)", show_header=False)
    table.add_row("readings published / stored", f"{story.published} / {totals.stored}")
    table.add_row("dead letters", str(totals.dead_lettered))
    table.add_row("active alerts", str(active or 0))
    table.add_row("cases", ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())) or "none")
    return table


async def _show(service: Service, story: Story, console: Console) -> None:
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            table = await _summary(service, story)
            live.update(Group(table, *story.events))
            await asyncio.sleep(1)


async def run_demo(
    directory: Path,
    *,
    api_port: int,
    pace: float,
    console: Console,
    stop: asyncio.Event,
    mqtt_port: int = BROKER_PORT,
) -> None:
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    mqtt_port = broker_port(mqtt_port)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{mqtt_port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    admin_key = secrets.token_urlsafe(24)
    await asyncio.to_thread(_keep_admin_key, directory / ADMIN_KEY_FILE, admin_key)
    settings = demo_settings(directory, mqtt_port, api_port, admin_key)
    covers = plan_pilot(DEMO_COVERS)
    await _seed(settings, covers)
    service = await build_service(settings)
    story = Story()
    _announce(console, settings, admin_key)
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", headers=headers) as api:
        fleet = Fleet(settings.mqtt_url.get_secret_value(), covers, story, pace)
        storyline = Storyline(fleet, covers, api, story, pace)
        jobs: list[Coroutine[Any, Any, None]] = [
            fleet.publish_forever(),
            storyline.run(),
            _show(service, story, console),
        ]
        try:
            await run_service(
                service,
                stop,
                jobs,
                api=serve_api(api_server(service), stop),
            )
        finally:
            await broker.shutdown()


async def _seed(settings: Settings, covers: list[SeededCover]) -> None:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        await seed_pilot(session_factory(engine), covers, report_interval_s=REPORT_INTERVAL_S)
    finally:
        await engine.dispose()


def _keep_admin_key(path: Path, admin_key: str) -> None:
    """The key in a file only this user reads, for scripts and `smartcover sim`."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(admin_key + "\n")


def _announce(console: Console, settings: Settings, admin_key: str) -> None:
    base = f"http://{settings.api_host}:{settings.api_port}"
    console.print(
        f"[bold]smartcover demo[/bold]: {DEMO_COVERS} covers on "
        f"{settings.mqtt_url.get_secret_value()} (embedded broker)"
    )
    console.print(f"  dashboard     {base}/")
    console.print(f"  API docs      {base}/docs")
    console.print(f"  cases         {base}/api/v1/cases")
    console.print(f"  metrics       {base}/metrics")
    console.print(f"  admin API key {admin_key}   (Authorization: Bearer …; this run only)")
    broker = settings.mqtt_url.get_secret_value()
    console.print(
        f"  simulator     smartcover sim --broker {broker} --service {base} --register"
        "   (SMARTCOVER_API_KEY: the admin key)",
        soft_wrap=True,
    )


def main(directory: Path, api_port: int, pace: float, mqtt_port: int = BROKER_PORT) -> None:
    console = Console()

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_demo(
            directory,
            api_port=api_port,
            pace=pace,
            console=console,
            stop=stop,
            mqtt_port=mqtt_port,
        )

    asyncio.run(go())
    console.print("\ndemo stopped")
