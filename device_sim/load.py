"""Load mode: publish N readings for D devices as fast as the broker accepts, from P processes.

Each process prepares its PUBLISH packets first, connects, and waits for a common start
signal, so the clock measures publishing, not interpreter start-up. It then writes QoS 1
packets in chunks, keeping a window of them unacknowledged; a reading counts as published
when the broker's PUBACK arrives. The fleet is split by device, so each device's `seq`
runs 0, 1, 2, … from one process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event as ProcessEvent

from core.settings import MqttEndpoint
from ingest import mqtt

# Unacknowledged publishes one process allows: hides the round trip, stays far below the
# 65,535 packet ids and the broker's in-flight limit.
_WINDOW = 2000
# Packets handed to the socket in one write.
_CHUNK = 200
# A publisher that has not finished in this time is stuck (the broker went away).
_PROCESS_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class LoadPlan:
    url: str
    readings: int
    devices: int
    processes: int
    seed: int = 1
    device_prefix: str = "load"
    start_ms: int = 0  # timestamp of seq 0; 0 means "so that the newest reading is now"

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}-{index:05d}"


@dataclass(frozen=True, slots=True)
class LoadResult:
    published: int
    acknowledged: int
    seconds: float  # from the common start to the last PUBACK

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0


def reading_payload(device_id: str, seq: int, ts_ms: int, rng: random.Random) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "seq": seq,
            "ts": ts_ms,
            "tilt_deg": round(rng.uniform(0, 3), 2),
            "displacement_mm": round(rng.uniform(0, 4), 1),
            "water_level_cm": round(rng.uniform(20, 60), 1),
            "battery_v": 3.6,
            "rssi_dbm": -85,
            "temperature_c": 12.5,
        },
        separators=(",", ":"),
    ).encode()


def _share(plan: LoadPlan, process: int) -> list[tuple[str, int]]:
    """(device_id, seq) pairs of one process, interleaved across its devices."""
    indexes = [i for i in range(plan.devices) if i % plan.processes == process]
    per_device, extra = divmod(plan.readings, plan.devices)
    counts = {i: per_device + (1 if i < extra else 0) for i in indexes}
    longest = max(counts.values(), default=0)
    return [(plan.device_id(i), seq) for seq in range(longest) for i in indexes if seq < counts[i]]


def _packets(plan: LoadPlan, process: int) -> list[bytes]:
    rng = random.Random(plan.seed * 1000 + process)
    span_ms = (plan.readings // max(plan.devices, 1) + 1) * 1000
    base_ms = plan.start_ms or (time.time_ns() // 1_000_000 - span_ms)
    return [
        mqtt.publish_packet(
            f"covers/{device}/telemetry",
            reading_payload(device, seq, base_ms + seq * 1000, rng),
            qos=1,
            packet_id=index % 65535 + 1,
            retain=False,
        )
        for index, (device, seq) in enumerate(_share(plan, process))
    ]


async def _publish(connection: mqtt.MqttConnection, packets: list[bytes]) -> int:
    sent = 0
    for offset in range(0, len(packets), _CHUNK):
        while sent - connection.pipelined_acks >= _WINDOW:
            await connection.pipelined_acks_advance()
        chunk = packets[offset : offset + _CHUNK]
        connection.send(b"".join(chunk))
        sent += len(chunk)
    while connection.pipelined_acks < sent:
        await connection.pipelined_acks_advance()
    return connection.pipelined_acks


async def _run_share(plan: LoadPlan, process: int, ready: ProcessEvent, go: ProcessEvent) -> int:
    packets = _packets(plan, process)
    endpoint = MqttEndpoint.parse(plan.url)
    client_id = f"{plan.device_prefix}-pub-{process}-{time.time_ns() % 10**9}"
    options = mqtt.SessionOptions(client_id=client_id, clean_start=True)
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:
        ready.set()
        await asyncio.to_thread(go.wait)
        return await _publish(connection, packets)


def _process_main(
    plan: LoadPlan,
    process: int,
    ready: ProcessEvent,
    go: ProcessEvent,
    results: multiprocessing.Queue[tuple[int, float]],
) -> None:
    acknowledged = asyncio.run(_run_share(plan, process, ready, go))
    results.put((acknowledged, time.monotonic()))


def run_load(plan: LoadPlan, on_start: Callable[[], None] | None = None) -> LoadResult:
    """Publishes the plan from `plan.processes` processes; returns once all are acknowledged.

    `on_start` is called at the common start, after every process is connected and ready.
    """
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[int, float]] = context.Queue()
    go = context.Event()
    readies = [context.Event() for _ in range(plan.processes)]
    workers = [
        context.Process(target=_process_main, args=(plan, index, readies[index], go, results))
        for index in range(plan.processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for ready, worker in zip(readies, workers, strict=True):
            while not ready.wait(0.2):
                if not worker.is_alive():
                    raise RuntimeError(f"publisher process exited with {worker.exitcode}")
        started = time.monotonic()
        if on_start is not None:
            on_start()
        go.set()
        finished = [results.get(timeout=_PROCESS_TIMEOUT_S) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    acknowledged = sum(count for count, _ in finished)
    return LoadResult(plan.readings, acknowledged, max(end for _, end in finished) - started)
