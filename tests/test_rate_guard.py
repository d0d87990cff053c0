"""The rate table (GCRA) and the per-device guard: bursts, refill, bounded memory, and a
flooding device throttled through real Mosquitto and InfluxDB while a calm one is not."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.contract import Reading, Reason
from core.rates import RateTable
from ingest.bootstrap import deadletter_log
from ingest.rate_guard import LIVE_WINDOW_MS, DeviceRateGuard
from tests.harness import (
    SteadyPublisher,
    reading,
    running_service,
    service_env,
    settings_of,
    wait_until,
)
from tests.servers import InfluxServer, MosquittoServer

NOW_MS = 1_800_000_000_000


def taken(device_id: str, ago_ms: int) -> list[Reading]:
    """A message's one reading, taken `ago_ms` before it arrived (at NOW_MS)."""
    return [Reading(device_id, 1, NOW_MS - ago_ms, 0.5, 0.0, 40.0, 3.6)]


class Clock:
    """Seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admitted(table: RateTable, key: str, events: int) -> int:
    return sum(1 for _ in range(events) if table.admit(key) == 0.0)


def test_a_burst_is_admitted_at_once_then_one_event_per_interval() -> None:
    clock = Clock()
    table = RateTable(rate_per_s=10, burst=5, max_keys=100, clock=clock)

    assert admitted(table, "a", 8) == 5
    assert table.admit("a") == pytest.approx(0.1)  # the next token is a tenth of a second away
    clock.now += 0.1
    assert admitted(table, "a", 3) == 1
    clock.now += 60
    assert admitted(table, "a", 8) == 5  # refilled, never beyond the burst


def test_a_sustained_rate_is_admitted_and_anything_faster_is_not() -> None:
    clock = Clock()
    table = RateTable(rate_per_s=10, burst=5, max_keys=100, clock=clock)
    at_rate = 0
    for _ in range(100):  # ten seconds at exactly the rate
        at_rate += admitted(table, "steady", 1)
        clock.now += 0.1
    flooded = 0
    for _ in range(100):  # ten seconds at ten times the rate
        flooded += admitted(table, "flood", 10)
        clock.now += 0.1

    assert at_rate == 100
    assert flooded == 5 + 99  # the burst, then one a tenth of a second


def test_keys_are_independent() -> None:
    clock = Clock()
    table = RateTable(rate_per_s=1, burst=2, max_keys=100, clock=clock)

    assert admitted(table, "flood", 10) == 2
    assert admitted(table, "calm", 2) == 2


def test_idle_keys_are_forgotten_and_memory_is_capped() -> None:
    clock = Clock()
    table = RateTable(rate_per_s=10, burst=10, max_keys=50, clock=clock)
    for n in range(1000):
        table.admit(f"device-{n}")
    assert len(table) <= 2 * 50
    clock.now += 2.1  # two periods of burst / rate: every bucket is full again
    table.admit("x")
    clock.now += 1.1
    table.admit("x")
    assert len(table) == 1


def test_a_flooding_key_is_remembered_across_early_swaps() -> None:
    clock = Clock()
    table = RateTable(rate_per_s=1, burst=3, max_keys=10, clock=clock)
    assert admitted(table, "flood", 3) == 3
    for n in range(100):  # many other keys force swaps; the flood keeps being refused
        table.admit(f"other-{n}")
        assert table.admit("flood") > 0


def test_the_guard_refuses_a_flood_and_says_why() -> None:
    clock = Clock()
    guard = DeviceRateGuard(rate_per_s=2, burst=3, clock=clock)
    verdicts = [guard.admit("flood-1", taken("flood-1", 0), NOW_MS) for _ in range(5)]
    letter = guard.letter(at_ms=5, topic="covers/flood-1/telemetry", payload=b"{}")

    assert verdicts == [True, True, True, False, False]
    assert letter.reason == Reason.RATE_LIMITED
    assert letter.detail == "over 2 messages/s after a burst of 3"


def test_the_guard_off_and_ids_that_are_not_ids() -> None:
    off = DeviceRateGuard(rate_per_s=0, burst=1)
    on = DeviceRateGuard(rate_per_s=1, burst=1)
    too_long = "x" * 65  # not a device id: the decoder dead-letters it, the table skips it

    assert all(off.admit("dev-1", [], NOW_MS) for _ in range(1000))
    assert all(on.admit(too_long, [], NOW_MS) for _ in range(10))
    assert on.devices == 0


def test_the_default_never_throttles_a_sensor() -> None:
    # A soak's device: one reading every 5 s, and bursts of a backlog after an outage.
    clock = Clock()
    guard = DeviceRateGuard(rate_per_s=10, burst=600, clock=clock)
    recent = [guard.admit("dev-1", taken("dev-1", 5_000), NOW_MS) for _ in range(500)]
    steady = []
    for _ in range(1000):
        clock.now += 0.1  # ten times a sensor's alarm rate
        steady.append(guard.admit("dev-1", taken("dev-1", 0), NOW_MS))

    assert all(recent)
    assert all(steady)


def test_a_backlog_after_an_outage_is_never_throttled() -> None:
    # A week away: the broker hands over a sensor's 2,016 five-minute readings at once.
    guard = DeviceRateGuard(rate_per_s=10, burst=600, clock=Clock())
    week = [taken("dev-1", LIVE_WINDOW_MS + 1 + n * 300_000) for n in range(2016)]
    assert all(guard.admit("dev-1", readings, NOW_MS) for readings in week)
    # The same device flooding live readings now is throttled past its burst.
    live = [guard.admit("dev-1", taken("dev-1", 0), NOW_MS) for _ in range(700)]
    assert live.count(False) == 100
    # A message that decoded to nothing counts as live: garbage cannot slip past.
    assert not guard.admit("dev-1", [], NOW_MS)


@pytest.mark.asyncio
async def test_a_flooding_device_is_throttled_while_a_calm_one_is_stored_whole(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_DEVICE_RATE_PER_S="2",
        SMARTCOVER_DEVICE_RATE_BURST="10",
    )
    base = time.time_ns() // 1_000_000 - 60_000
    flood = [("flood-1", seq) for seq in range(100)]
    calm = [("calm-1", seq) for seq in range(10)]  # never more than the burst
    # The calm device's messages spread among the flood's.
    order = sorted(flood + calm, key=lambda item: item[1] * (10 if item[0] == "calm-1" else 1))
    messages = [
        (f"covers/{device}/telemetry", json.dumps(reading(device, seq, base + seq)).encode())
        for device, seq in order
    ]
    async with running_service(env) as parts:
        await SteadyPublisher(mosquitto.url, "flood-pub").publish_all(messages, rate_per_s=1000)
        await wait_until(
            lambda: parts.metrics.totals.acknowledged == len(messages),
            timeout_s=20,
            what="every message acknowledged",
        )
        limited = parts.metrics.registry.get_sample_value(
            "smartcover_deadletters_total", {"reason": "rate_limited"}
        )
    points = influx_server.points(influx_db)
    stored_calm = sorted(p["seq"] for p in points if p["device_id"] == "calm-1")
    stored_flood = [p for p in points if p["device_id"] == "flood-1"]
    letters = deadletter_log(settings_of(env)).newest(200)

    assert stored_calm == list(range(10))
    assert 10 <= len(stored_flood) < 100  # at least the burst, and not the flood
    assert limited == 100 - len(stored_flood)
    assert parts.metrics.totals.dead_letters_by_reason == {"rate_limited": limited}
    assert {letter.topic for letter in letters} == {"covers/flood-1/telemetry"}
    assert {letter.reason for letter in letters} == {"rate_limited"}
