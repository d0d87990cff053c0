"""Load mode: publish N readings for D devices as fast as the broker accepts, from P processes.

Each process holds one MQTT connection and keeps a window of QoS 1 publishes in flight;
a publish counts as done when the broker's PUBACK arrives. The fleet is split by device
so every device's `seq` runs 0, 1, 2, … in order from one process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from dataclasses import dataclass

from core.settings import MqttEndpoint
from ingest import mqtt

# QoS 1 publishes one process keeps in flight: enough to hide the round trip to the broker.
_WINDOW = 500
# A publisher process that has not finished in this time is stuck (broker gone).
_PROCESS_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class LoadPlan:
    url: str
    readings: int
    devices: int
    processes: int
    seed: int = 1
    device_prefix: str = "load"
    start_ms: int = 0  # timestamp of the first reading; 0 means "now minus the run"

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}-{index:05d}"


@dataclass(frozen=True, slots=True)
class LoadResult:
    published: int
    acknowledged: int
    seconds: float

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
    devices = [plan.device_id(i) for i in range(plan.devices) if i % plan.processes == process]
    per_device = plan.readings // plan.devices
    extra = plan.readings % plan.devices
    counts = {d: per_device + (1 if int(d.rsplit("-", 1)[1]) < extra else 0) for d in devices}
    return [
        (d, seq)
        for seq in range(max(counts.values(), default=0))
        for d in devices
        if seq < counts[d]
    ]


async def _publish_share(plan: LoadPlan, process: int) -> int:
    rng = random.Random(plan.seed * 1000 + process)
    work = _share(plan, process)
    # One reading a second per device, the newest stamped now.
    span_ms = (plan.readings // max(plan.devices, 1) + 1) * 1000
    base_ms = plan.start_ms or (time.time_ns() // 1_000_000 - span_ms)
    endpoint = MqttEndpoint.parse(plan.url)
    options = mqtt.SessionOptions(client_id=f"{plan.device_prefix}-pub-{process}", clean_start=True)
    position = 0
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:

        async def worker() -> int:
            nonlocal position
            done = 0
            while position < len(work):
                device, seq = work[position]
                position += 1
                payload = reading_payload(device, seq, base_ms + seq * 1000, rng)
                await connection.publish(f"covers/{device}/telemetry", payload, qos=1)
                done += 1
            return done

        counts = await asyncio.gather(*(worker() for _ in range(_WINDOW)))
    return sum(counts)


def _process_main(plan: LoadPlan, process: int, results: multiprocessing.Queue[int]) -> None:
    results.put(asyncio.run(_publish_share(plan, process)))


def run_load(plan: LoadPlan) -> LoadResult:
    """Publishes the plan from `plan.processes` processes; returns once all are acknowledged."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[int] = context.Queue()
    started = time.monotonic()
    workers = [
        context.Process(target=_process_main, args=(plan, index, results))
        for index in range(plan.processes)
    ]
    for worker in workers:
        worker.start()
    acknowledged = sum(results.get(timeout=_PROCESS_TIMEOUT_S) for _ in workers)
    for worker in workers:
        worker.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} publisher processes failed")
    return LoadResult(plan.readings, acknowledged, time.monotonic() - started)
