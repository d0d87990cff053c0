"""Helpers for end-to-end tests: run the service (in-process or as a process) and publish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from core.settings import MqttEndpoint, Settings
from ingest import mqtt
from ingest.bootstrap import IngestParts, build_ingest
from ingest.errors import MqttError
from ingest.service import IngestService
from smartcover.runtime import Service, build_service, run_service
from smartcover.serve import api_server, serve_api
from tests.servers import InfluxServer, MosquittoServer, free_port


def service_env(
    broker: MosquittoServer, influx: InfluxServer, database: str, workdir: Path, **extra: str
) -> dict[str, str]:
    """The SMARTCOVER_* variables of a service wired to the test's private servers."""
    env = {
        "SMARTCOVER_MQTT_URL": broker.url,
        "SMARTCOVER_MQTT_CLIENT_ID": f"ingest-{database}",
        "SMARTCOVER_INFLUX_URL": influx.url,
        "SMARTCOVER_INFLUX_DB": database,
        "SMARTCOVER_SPOOL_DIR": str(workdir / "spool"),
        "SMARTCOVER_API_PORT": str(free_port()),
        "SMARTCOVER_WRITE_DEADLINE_S": "1",
    }
    env.update(extra)
    return env


def settings_of(env: dict[str, str]) -> Settings:
    fields = {key.removeprefix("SMARTCOVER_").lower(): value for key, value in env.items()}
    return Settings.model_validate(fields)  # exactly these values: no environment, no .env


async def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        await asyncio.sleep(interval_s)


async def _connected(service: IngestService, task: asyncio.Task[None]) -> None:
    """Until `service` is connected to its broker; its own error if it ended instead."""
    await wait_until(
        lambda: service.broker_connected or task.done(),
        timeout_s=10,
        what="the service to connect",
    )
    if task.done():
        task.result()


@contextlib.asynccontextmanager
async def running_service(env: dict[str, str]) -> AsyncIterator[IngestParts]:
    """The ingest pipeline in this event loop, stopped (drained) when the block ends."""
    parts = build_ingest(settings_of(env), CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(parts.service.run(stop))
    try:
        await _connected(parts.service, task)
        yield parts
    finally:
        stop.set()
        await task
        await parts.store.close()


@contextlib.asynccontextmanager
async def serving_in_process(env: dict[str, str]) -> AsyncIterator[Service]:
    """`smartcover serve` (ingest, alerting, API) in this event loop, once connected to
    the broker; shut down in order when the block ends."""
    built = await build_service(settings_of(env))
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(built, stop, api=serve_api(api_server(built), stop)))
    try:
        await _connected(built.ingest.service, task)
        yield built
    finally:
        stop.set()
        await task


class ServiceProcess:
    """`python -m smartcover serve` as a child process, for signal and crash tests."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smartcover", "serve"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def reading(device_id: str, seq: int, ts_ms: int, **fields: float) -> dict[str, object]:
    return {
        "device_id": device_id,
        "seq": seq,
        "ts": ts_ms,
        "tilt_deg": 1.0,
        "displacement_mm": 0.5,
        **fields,
    }


class SteadyPublisher:
    """Publishes at a steady rate, QoS 1, and survives broker restarts (at least once).

    A message counts as sent only when the broker's PUBACK arrives; after a lost
    connection it is published again, so the service may see it twice (harmless).
    """

    def __init__(self, url: str, client_id: str) -> None:
        self._endpoint = MqttEndpoint.parse(url)
        self._options = mqtt.SessionOptions(client_id=client_id, clean_start=True)
        self.sent = 0

    async def publish_all(self, messages: Iterable[tuple[str, bytes]], rate_per_s: float) -> None:
        pending = list(messages)
        interval = 1 / rate_per_s
        while pending:
            try:
                async with mqtt.connect(self._endpoint, self._options, lambda _: None) as conn:
                    while pending:
                        topic, payload = pending[0]
                        await conn.publish(topic, payload, qos=1, timeout_s=5)
                        pending.pop(0)
                        self.sent += 1
                        await asyncio.sleep(interval)
            except MqttError:
                await asyncio.sleep(0.2)


def kill_hard(proc: ServiceProcess) -> None:
    proc.signal(signal.SIGKILL)
    proc.wait(10)


def wait_ready(base_url: str, process: ServiceProcess, timeout_s: float = 20.0) -> None:
    """Until `/readyz` answers 200; the service's log in the error if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.proc is not None and process.proc.poll() is not None:
            break
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"service not ready within {timeout_s} s:\n{process.log()[-3000:]}")


@dataclass(frozen=True)
class Serving:
    broker: MosquittoServer
    env: dict[str, str]
    base_url: str


@contextlib.contextmanager
def serving(workdir: Path, influx: InfluxServer, **extra_env: str) -> Iterator[Serving]:
    """`smartcover serve` as a process on a broker and databases of its own, once ready;
    stopped with SIGTERM (and its InfluxDB database dropped) when the block ends."""
    database = f"test_{uuid.uuid4().hex[:12]}"
    influx.create_database(database)
    with MosquittoServer(workdir / "mosquitto") as broker:
        env = service_env(
            broker,
            influx,
            database,
            workdir,
            SMARTCOVER_DATABASE_URL=f"sqlite:///{workdir / 'smartcover.db'}",
            **extra_env,
        )
        process = ServiceProcess(env, workdir / "service.log")
        process.start()
        base_url = f"http://127.0.0.1:{env['SMARTCOVER_API_PORT']}"
        try:
            wait_ready(base_url, process)
            yield Serving(broker, env, base_url)
        finally:
            if process.proc is not None and process.proc.poll() is None:
                process.signal(signal.SIGTERM)
                process.wait(15)
            process.close()
    influx.drop_database(database)
