"""`smartcover serve` stops on SIGTERM even while a live-stream client has stopped reading
(a phone that lost its network keeps its connection open, and the server's writes to it
back up): the API gives open connections a bounded grace, then closes them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from alerting.outbox import MQTT_CHANNEL, enqueue
from core import db
from smartcover.serve import API_SHUTDOWN_GRACE_S
from tests.harness import ServiceProcess, service_env, wait_ready
from tests.servers import InfluxServer, MosquittoServer

ADMIN_KEY = "an-admin-key-for-this-test-only"
# Far more than the kernel's socket buffers hold for a client that reads nothing.
EVENTS, EVENT_PAD = 300, 32_000
# SIGTERM → exit: the grace for open connections plus the service's own drain.
EXIT_WITHIN_S = API_SHUTDOWN_GRACE_S + 10


async def write_events(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:
        async with db.transaction(db.session_factory(engine)) as session:
            for n in range(EVENTS):
                await enqueue(
                    session,
                    type="test.event",
                    unit_code="DR-CITY",
                    occurred_ms=n,
                    payload={"n": n, "pad": "x" * EVENT_PAD},
                    channels=(MQTT_CHANNEL,),
                )
    finally:
        await engine.dispose()


def stalled_stream(port: int) -> socket.socket:
    """A stream client with a tiny receive window that never reads."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(
        f"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\n\r\n".encode()
    )
    return client


@pytest.mark.slow
def test_sigterm_stops_the_service_while_a_stream_client_has_stopped_reading(
    tmp_path: Path, influx_server: InfluxServer
) -> None:
    database = f"test_{uuid.uuid4().hex[:12]}"
    influx_server.create_database(database)
    database_url = f"sqlite:///{tmp_path / 'smartcover.db'}"
    with MosquittoServer(tmp_path / "mosquitto") as broker:
        env = service_env(
            broker,
            influx_server,
            database,
            tmp_path,
            SMARTCOVER_DATABASE_URL=database_url,
            SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
        )
        process = ServiceProcess(env, tmp_path / "service.log")
        process.start()
        try:
            wait_ready(f"http://127.0.0.1:{env['SMARTCOVER_API_PORT']}", process)
            with contextlib.closing(stalled_stream(int(env["SMARTCOVER_API_PORT"]))):
                asyncio.run(write_events(database_url))
                time.sleep(2)  # the feed polls every 0.5 s: the server is writing by now
                process.signal(signal.SIGTERM)
                assert process.wait(EXIT_WITHIN_S) == 0, process.log()[-3000:]
        finally:
            process.close()
    influx_server.drop_database(database)
