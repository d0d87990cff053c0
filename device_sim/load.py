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
import queue
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
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
# How often the parent reports the publishers' progress.
_PROGRESS_INTERVAL_S = 0.2

# (published, acknowledged) so far, summed over the processes.
LoadProgress = Callable[[int, int], None]


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


class _Tally:
    """One process's (published, acknowledged) slots in an array the parent reads."""

    def __init__(self, counts: SynchronizedArray[int] | None, process: int) -> None:
        self._counts = counts
        self._slot = 2 * process

    def update(self, sent: int, acknowledged: int) -> None:
        if self._counts is not None:
            # Each slot has one writer; a torn read only shows a count a moment old.
            self._counts[self._slot] = sent
            self._counts[self._slot + 1] = acknowledged


async def _publish(
    connection: mqtt.MqttConnection, packets: list[bytes], tally: _Tally | None = None
) -> int:
    tally = tally or _Tally(None, 0)
    sent = 0
    for offset in range(0, len(packets), _CHUNK):
        while sent - connection.pipelined_acks >= _WINDOW:
            await connection.pipelined_acks_advance()
        chunk = packets[offset : offset + _CHUNK]
        connection.send(b"".join(chunk))
        sent += len(chunk)
        tally.update(sent, connection.pipelined_acks)
    while connection.pipelined_acks < sent:
        await connection.pipelined_acks_advance()
    tally.update(sent, connection.pipelined_acks)
    return connection.pipelined_acks


async def _run_share(
    plan: LoadPlan, process: int, ready: ProcessEvent, go: ProcessEvent, tally: _Tally
) -> int:
    packets = _packets(plan, process)
    endpoint = MqttEndpoint.parse(plan.url)
    client_id = f"{plan.device_prefix}-pub-{process}-{time.time_ns() % 10**9}"
    options = mqtt.SessionOptions(client_id=client_id, clean_start=True)
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:
        ready.set()
        await asyncio.to_thread(go.wait)
        return await _publish(connection, packets, tally)


@dataclass(frozen=True, slots=True)
class _Channels:
    """How one publisher process and the parent talk."""

    ready: ProcessEvent  # set by the process once connected
    go: ProcessEvent  # set by the parent: the common start
    results: multiprocessing.Queue[tuple[int, float]]
    counts: SynchronizedArray[int]


def _process_main(plan: LoadPlan, process: int, channels: _Channels) -> None:
    tally = _Tally(channels.counts, process)
    acknowledged = asyncio.run(_run_share(plan, process, channels.ready, channels.go, tally))
    channels.results.put((acknowledged, time.monotonic()))


def _collect(
    workers: Sequence[multiprocessing.process.BaseProcess],
    results: multiprocessing.Queue[tuple[int, float]],
    counts: SynchronizedArray[int],
    on_progress: LoadProgress | None,
) -> list[tuple[int, float]]:
    """Each process's (acknowledged, finish time), reporting progress while waiting."""
    finished: list[tuple[int, float]] = []
    deadline = time.monotonic() + _PROCESS_TIMEOUT_S
    while len(finished) < len(workers):
        try:
            finished.append(results.get(timeout=_PROGRESS_INTERVAL_S))
        except queue.Empty:
            crashed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if crashed or time.monotonic() > deadline:
                raise RuntimeError(
                    f"publisher processes failed (exit codes {crashed}) or took over "
                    f"{_PROCESS_TIMEOUT_S} s"
                ) from None
        if on_progress is not None:
            on_progress(sum(counts[0::2]), sum(counts[1::2]))
    return finished


def run_load(
    plan: LoadPlan,
    on_start: Callable[[], None] | None = None,
    *,
    on_progress: LoadProgress | None = None,
) -> LoadResult:
    """Publishes the plan from `plan.processes` processes; returns once all are acknowledged.

    `on_start` is called at the common start, after every process is connected and ready;
    `on_progress(published, acknowledged)` about five times a second until the end.
    """
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[int, float]] = context.Queue()
    counts = context.Array("q", 2 * plan.processes)
    go = context.Event()
    readies = [context.Event() for _ in range(plan.processes)]
    workers = [
        context.Process(
            target=_process_main,
            args=(plan, index, _Channels(readies[index], go, results, counts)),
        )
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
        finished = _collect(workers, results, counts, on_progress)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    acknowledged = sum(count for count, _ in finished)
    return LoadResult(plan.readings, acknowledged, max(end for _, end in finished) - started)
