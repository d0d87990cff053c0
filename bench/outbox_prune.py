"""`python -m bench.outbox_prune`: how long outbox pruning takes, on SQLite and PostgreSQL.

Fills a fresh outbox with `--events` events, each delivered on two channels 40 days ago,
then prunes them as the dispatcher does (keep period 30 days, 500 events a transaction,
a pause between transactions). Prints, per backend, the events removed, the whole run, and
the median and longest transaction: the longest is what other writers may wait for.
A private PostgreSQL is started; without its binaries only SQLite is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.dispatcher import DispatchOptions
from alerting.models import DeliveryRow, OutboxRow
from alerting.outbox import prune_delivered
from core.db import create_engine, session_factory, transaction, upgrade
from tests.servers import PostgresServer, ServerError

_DAY_MS = 24 * 3600 * 1000
_NOW_MS = 1_800_000_000_000
_FILL_ROWS = 5000  # events per insert transaction while filling


async def _fill(sessions: async_sessionmaker[AsyncSession], events: int) -> None:
    delivered_ms = _NOW_MS - 40 * _DAY_MS
    for start in range(0, events, _FILL_ROWS):
        ids = range(start + 1, min(events, start + _FILL_ROWS) + 1)
        async with transaction(sessions) as session:
            await session.execute(
                insert(OutboxRow),
                [
                    {
                        "id": i,
                        "event_id": f"bench-{i}",
                        "type": "case.changed",
                        "unit_code": "WATER",
                        "occurred_ms": delivered_ms,
                        "payload": {"case": {"id": i}},
                    }
                    for i in ids
                ],
            )
            await session.execute(
                insert(DeliveryRow),
                [
                    {
                        "outbox_id": i,
                        "channel": channel,
                        "attempts": 1,
                        "next_attempt_ms": delivered_ms,
                        "delivered_ms": delivered_ms,
                    }
                    for i in ids
                    for channel in ("mqtt", "webhook")
                ],
            )


async def measure(database_url: str, events: int) -> str:
    options = DispatchOptions()  # the dispatcher's batch size and pause
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        sessions = session_factory(engine)
        await _fill(sessions, events)
        before_ms = _NOW_MS - options.keep_ms
        batches: list[float] = []
        removed = 0
        started = time.perf_counter()
        while True:  # the loop of `OutboxDispatcher.prune`, each transaction timed
            began = time.perf_counter()
            batch = await prune_delivered(sessions, before_ms=before_ms, limit=options.prune_batch)
            batches.append(time.perf_counter() - began)
            removed += batch or 0
            if not batch or batch < options.prune_batch:
                break
            await asyncio.sleep(options.prune_pause_s)
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    return (
        f"{engine.dialect.name}: removed {removed} of {events} events in {elapsed:.1f} s, "
        f"{sum(batches):.1f} s of it in transactions of {options.prune_batch}: "
        f"median {statistics.median(batches) * 1000:.0f} ms, longest {max(batches) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as root:
        Path(root).chmod(0o755)  # PostgreSQL runs as its own user and must reach its files
        print(asyncio.run(measure(f"sqlite:///{Path(root) / 'outbox.db'}", args.events)))
        try:
            with PostgresServer(Path(root) / "pg") as server:
                server.create_database("bench_prune")
                print(asyncio.run(measure(server.url("bench_prune"), args.events)))
        except ServerError as exc:
            print(f"PostgreSQL not measured: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
