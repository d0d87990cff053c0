"""`make bench` (alerting): publish → case committed and publish → webhook received.

Starts a private Mosquitto and influxd, a registry of 1,000 covers with sensors, and
`smartcover serve` as a process with a webhook receiver in this process. Background
traffic of normal readings runs at a steady rate (default 2,000/s) while, every 100 ms,
one cover is struck (displacement 45 mm). For every strike: the device's timestamp (the
publish time), the alert's commit time (server clock, same machine), and the time the
webhook carrying its `alert.raised` arrived. Reports p50 and p99 of both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from sqlalchemy import select

from alerting.models import AlertRow
from core import registry
from core.db import create_engine, session_factory, transaction, upgrade
from core.registry_schemas import UnitUpdate
from core.settings import MqttEndpoint
from ingest import mqtt
from smartcover.seed import UNITS, SeededCover, plan_pilot, seed_pilot
from tests.servers import InfluxServer, MosquittoServer, free_port

_BACKGROUND_CHUNK = 100  # readings written to the socket at once by the background load


class Receiver:
    """Webhook endpoint: the arrival time of each alert.raised, by cover."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                arrived = time.time()
                event = json.loads(body)
                if event.get("type") == "alert.raised":
                    receiver.arrivals.setdefault(event["alert"]["cover_id"], arrived)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def load_device(index: int) -> str:
    return f"load-{index:05d}"


async def prepare_registry(database_url: str, covers: int, webhook: str | None) -> None:
    """A registry of `covers` covers whose sensors are the load's devices."""
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    await seed_pilot(sessions, plan_pilot(covers, device_id=load_device), report_interval_s=60)
    async with transaction(sessions) as session:
        for code, *_ in UNITS if webhook else ():
            await registry.update_unit(
                session=session, code=code, update=UnitUpdate(webhook_url=webhook)
            )
    await engine.dispose()


def reading(device: str, seq: int, **values: float) -> bytes:
    body = {
        "device_id": device,
        "seq": seq,
        "ts": time.time_ns() // 1_000_000,
        "tilt_deg": 0.5,
        "displacement_mm": 1.0,
        "water_level_cm": 40.0,
        "battery_v": 3.6,
        **values,
    }
    return json.dumps(body).encode()


async def background(url: str, devices: int, rate: float, stop: asyncio.Event) -> int:
    """Normal readings at `rate` per second, spread over the devices (QoS 1, pipelined)."""
    endpoint = MqttEndpoint.parse(url)
    options = mqtt.SessionOptions("bench-background", clean_start=True)
    sent, seq = 0, 0
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:
        started = time.monotonic()
        while not stop.is_set():
            packets = []
            for _ in range(_BACKGROUND_CHUNK):
                device = load_device(sent % devices)
                packets.append(
                    mqtt.publish_packet(
                        f"covers/{device}/telemetry",
                        reading(device, seq),
                        qos=1,
                        packet_id=sent % 65535 + 1,
                        retain=False,
                    )
                )
                sent += 1
                if sent % devices == 0:
                    seq += 1
            connection.send(b"".join(packets))
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    return sent


async def strikes(url: str, devices: list[str], interval_s: float) -> dict[str, float]:
    """One displaced cover per interval; returns publish times (epoch s) by device."""
    endpoint = MqttEndpoint.parse(url)
    options = mqtt.SessionOptions("bench-strikes", clean_start=True)
    published: dict[str, float] = {}
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:
        for device in devices:
            published[device] = time.time()
            await connection.publish(
                f"covers/{device}/telemetry", reading(device, 10**6, displacement_mm=45.0), qos=1
            )
            await asyncio.sleep(interval_s)
    return published


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace, root: Path) -> None:
    receiver = Receiver()
    database_url = f"sqlite:///{root / 'smartcover.db'}"
    await prepare_registry(database_url, args.covers, receiver.url)
    covers = plan_pilot(args.covers, device_id=load_device)
    with InfluxServer(root / "influxd") as influx, MosquittoServer(root / "mosquitto") as broker:
        api_port = free_port()
        env = {
            **os.environ,
            "SMARTCOVER_MQTT_URL": broker.url,
            "SMARTCOVER_INFLUX_URL": influx.url,
            "SMARTCOVER_DATABASE_URL": database_url,
            "SMARTCOVER_SPOOL_DIR": str(root / "spool"),
            "SMARTCOVER_API_PORT": str(api_port),
            "SMARTCOVER_LOG_LEVEL": "WARNING",
            "SMARTCOVER_OUTBOUND_ALLOW_NETS": "127.0.0.0/8",  # the receiver is local
        }
        service = start_service(env, root / "service.log")
        try:
            await _wait_ready(api_port)
            stop = asyncio.Event()
            load = asyncio.create_task(background(broker.url, args.covers, args.rate, stop))
            await asyncio.sleep(2)  # the load settles
            struck = [c.device_id for c in covers[: args.strikes]]
            published = await strikes(broker.url, struck, args.interval)
            await asyncio.sleep(3)
            stop.set()
            sent = await load
            committed = await _committed(database_url)
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
            receiver.close()
    _report(args, Strikes(covers, published, committed, receiver.arrivals, sent))


def start_service(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "smartcover", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _wait_ready(api_port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                answer = await client.get(f"http://127.0.0.1:{api_port}/readyz")
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the service did not become ready")


async def _committed(database_url: str) -> dict[str, tuple[int, int]]:
    """cover → (raised_ms, committed_ms) of its displacement alert."""
    engine = create_engine(database_url)
    async with transaction(session_factory(engine), write=False) as session:
        rows = await session.scalars(select(AlertRow).where(AlertRow.kind == "cover_displaced"))
        found = {a.cover_id: (a.raised_ms, a.committed_ms or 0) for a in rows}
    await engine.dispose()
    return found


@dataclass
class Strikes:
    """What the run observed of its strikes, keyed by device or cover."""

    covers: list[SeededCover]
    published: dict[str, float]  # device → publish time, epoch s
    committed: dict[str, tuple[int, int]]  # cover → (raised ms, committed ms)
    arrivals: dict[str, float]  # cover → webhook arrival, epoch s
    background_sent: int


def _report(args: argparse.Namespace, seen: Strikes) -> None:
    cover_of = {c.device_id: c.cover_id for c in seen.covers}
    to_case = [
        (seen.committed[cover_of[d]][1] / 1000 - t) * 1000
        for d, t in seen.published.items()
        if cover_of[d] in seen.committed
    ]
    to_hook = [
        (seen.arrivals[cover_of[d]] - t) * 1000
        for d, t in seen.published.items()
        if cover_of[d] in seen.arrivals
    ]
    strikes_sent = len(seen.published)
    print(
        f"background: {seen.background_sent:,} normal readings at {args.rate:,.0f}/s; "
        f"{strikes_sent} strikes"
    )
    print(f"cases committed {len(to_case)}/{strikes_sent}, webhooks {len(to_hook)}/{strikes_sent}")
    for name, values, target in (
        ("publish → case committed", to_case, 250),
        ("publish → webhook received", to_hook, 500),
    ):
        if values:
            print(
                f"  {name:28} p50 {statistics.median(values):6.1f} ms   p99 "
                f"{percentile(values, 0.99):6.1f} ms   (target p99 ≤ {target} ms)"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"publish_to_case_ms": to_case, "publish_to_webhook_ms": to_hook})
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--covers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2000.0, help="background readings/s")
    parser.add_argument("--strikes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between strikes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smartcover-bench-alerting-") as tmp:
        asyncio.run(measure(args, Path(tmp)))


if __name__ == "__main__":
    main()
