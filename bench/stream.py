"""`python -m bench.stream`: what 500 live-stream clients cost the service, against one.

Starts a private PostgreSQL (SQLite when its binaries are missing) and `smartcover api`
as a process. This process writes outbox events at a steady rate, as the evaluating
process of a deployment would (the API process finds them by polling). With 1 and then
500 clients connected to `/api/v1/stream` (bare sockets here, each reading every event),
it measures over a fixed window the service process's CPU (seconds per second) and
resident memory and, on PostgreSQL, the transactions per second the service makes
(`pg_stat_database`, less the writer's own, which it counts). Prints each, with the
same window without any client for comparison, and the 500:1 ratios.

Target (issue 12): 500 clients cost about what one does; the database's load does not
grow with the number of clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from alerting.outbox import enqueue
from core.db import async_url, create_engine, session_factory, transaction, upgrade
from tests.servers import PostgresServer, ServerError, free_port

ADMIN_KEY = "bench-stream-admin-key-0123456789abcdef"
_TICK_S = 0.1  # the writer commits one transaction of events this often
_DATABASE = "bench_stream"


@dataclass
class Phase:
    clients: int
    cpu_s_per_s: float  # the service process's CPU time per second of wall time
    rss_mb: float
    db_tps: float | None  # the service's transactions per second (PostgreSQL only)
    events: int  # events written during the window
    all_received: bool  # every client got every event, in order


class Client:
    """One stream on a bare socket, reading everything: the ids it got, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.ids: list[int] = []
        self._buffer = b""

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {ADMIN_KEY}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head[:60]!r}")
        return cls(reader, writer)

    async def read(self) -> None:
        """Until the server ends the stream (chunked transfer: size line, data, CRLF)."""
        while (line := await self._reader.readline()) and (size := int(line.strip(), 16)):
            self._buffer += (await self._reader.readexactly(size + 2))[:-2]
            *blocks, self._buffer = self._buffer.split(b"\n\n")
            self.ids += [int(b[4 : b.index(b"\n")]) for b in blocks if b.startswith(b"id: ")]

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


class Writer:
    """Outbox events at a steady rate, one transaction per tick, as the engine writes."""

    def __init__(self, engine: AsyncEngine, rate: int) -> None:
        self._sessions = session_factory(engine)
        self._per_tick = max(1, round(rate * _TICK_S))
        self.transactions = 0
        self.last_id = 0

    async def run(self) -> None:
        payload = {"alert": {"cover_id": "4112030101000001", "kind": "cover_displaced"}}
        while True:
            started = time.monotonic()
            async with transaction(self._sessions) as session:
                for _ in range(self._per_tick):
                    row = await enqueue(
                        session, type="alert.raised", unit_code="WATER",
                        occurred_ms=int(time.time() * 1000), payload=payload, channels=(),
                    )  # fmt: skip
            self.transactions += 1
            self.last_id = row.id
            await asyncio.sleep(max(0.0, _TICK_S - (time.monotonic() - started)))


async def _transactions(stats: AsyncEngine | None) -> int:
    if stats is None:
        return 0
    query = text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name")
    async with stats.connect() as connection:
        return int((await connection.execute(query, {"name": _DATABASE})).scalar_one())


async def measure(
    port: int, service: psutil.Process, writer: Writer, stats: AsyncEngine | None, *,
    clients: int, warmup_s: float, window_s: float,
) -> Phase:  # fmt: skip
    streams = list(await asyncio.gather(*(Client.open(port) for _ in range(clients))))
    async with asyncio.TaskGroup() as group:
        readers = [group.create_task(stream.read()) for stream in streams]
        await asyncio.sleep(warmup_s)
        cpu, xacts = _cpu(service), await _transactions(stats)
        ours, first = writer.transactions, writer.last_id
        await asyncio.sleep(window_s)
        used, xacts = _cpu(service) - cpu, await _transactions(stats) - xacts
        ours, last = writer.transactions - ours, writer.last_id
        rss_mb = service.memory_info().rss / 2**20
        await _received(streams, last)
        for task in readers:
            task.cancel()
    await asyncio.gather(*(stream.close() for stream in streams))
    return Phase(
        clients=clients,
        cpu_s_per_s=used / window_s,
        rss_mb=rss_mb,
        db_tps=None if stats is None else (xacts - ours) / window_s,
        events=last - first,
        all_received=all(_in_order(stream.ids, last) for stream in streams),
    )


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _received(streams: list[Client], last: int) -> None:
    """Waits (a while) until every client has the window's last event."""
    for _ in range(300):
        if all(stream.ids and stream.ids[-1] >= last for stream in streams):
            return
        await asyncio.sleep(0.1)


def _in_order(ids: list[int], last: int) -> bool:
    return bool(ids) and ids[-1] >= last and ids == list(range(ids[0], ids[-1] + 1))


@contextlib.contextmanager
def database(workdir: Path, use_postgres: bool) -> Iterator[tuple[str, str | None]]:
    """(the service's database URL, the URL of a database to read statistics from)."""
    with contextlib.ExitStack() as stack:
        if use_postgres:
            try:
                server = stack.enter_context(PostgresServer(workdir / "cluster"))
            except ServerError as exc:
                print(f"postgresql: not available ({str(exc).splitlines()[0]}); SQLite instead")
            else:
                server.create_database(_DATABASE)
                yield server.url(_DATABASE), server.url()
                return
        yield f"sqlite:///{workdir / 'stream.db'}", None


def start_service(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`smartcover api`: the HTTP API alone, whose streams poll the outbox."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "smartcover", "api"], env=env, stdout=log, stderr=log
        )


async def service_ready(port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the service did not start")


async def run(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    with database(workdir, not args.no_postgres) as (url, stats_url):
        engine = create_engine(url)
        await upgrade(engine)
        if stats_url is not None:
            # Without the pool's pre-ping, each of the writer's transactions is one of
            # PostgreSQL's, and can be taken out of its count exactly.
            await engine.dispose()
            engine = create_async_engine(async_url(url))
        stats = create_engine(stats_url) if stats_url else None
        port = free_port()
        env = {
            **os.environ,
            "SMARTCOVER_DATABASE_URL": url,
            "SMARTCOVER_API_PORT": str(port),
            "SMARTCOVER_ADMIN_KEY": ADMIN_KEY,
            "SMARTCOVER_LOG_LEVEL": "WARNING",
        }
        process = start_service(env, workdir / "service.log")
        try:
            await service_ready(port)
            writer = Writer(engine, args.rate)
            phases = []
            async with asyncio.TaskGroup() as group:
                writing = group.create_task(writer.run())
                for clients in (0, 1, args.clients):
                    phase = await measure(
                        port, psutil.Process(process.pid), writer, stats, clients=clients,
                        warmup_s=args.warmup, window_s=args.window,
                    )  # fmt: skip
                    print(f"  {json.dumps(asdict(phase))}", flush=True)
                    phases.append(phase)
                writing.cancel()
            return phases
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()  # a stream that never ends keeps it from stopping
                process.wait()
            if stats is not None:
                await stats.dispose()
            await engine.dispose()


def report(idle: Phase, one: Phase, many: Phase) -> None:
    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

    print(f"\nlive stream, {one.clients} vs {many.clients} clients ({many.events} events/window):")
    for phase in (idle, one, many):
        tps = phase.db_tps
        print(
            f"  {phase.clients:>4} clients: CPU {phase.cpu_s_per_s * 100:5.1f} %,"
            f" RSS {phase.rss_mb:5.1f} MB, the service's database transactions/s"
            f" {'-' if tps is None else f'{tps:.1f}'}, every client got every event in"
            f" order: {phase.all_received}"
        )
    print(
        f"  ratio {many.clients}:{one.clients}: CPU {ratio(many.cpu_s_per_s, one.cpu_s_per_s)},"
        f" RSS {ratio(many.rss_mb, one.rss_mb)},"
        f" database {ratio(many.db_tps, one.db_tps)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rate", type=int, default=50, help="events written per second")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as workdir:
        Path(workdir).chmod(0o755)  # the PostgreSQL server may run as another user
        idle, one, many = asyncio.run(run(args, Path(workdir)))
    report(idle, one, many)
    if not (one.all_received and many.all_received):
        sys.exit("some client missed events")


if __name__ == "__main__":
    main()
