"""What a simulated fleet sends, and when: a pure function of (scenario, fleet, seed, time base).

Nothing here touches the network or the clock. `Plan.actions()` yields every publication
and connection change in simulated-time order; the runner only paces them against the real
clock. So the same seed gives the same bytes, and the messages can be tested, printed
(`--dry-run`) or run through the service's own decoder (`predict`) without a broker.

Time compression: simulated time starts in the past and catches up with the real clock
exactly when the scenario ends (`Timebase.catching_up`). With `--speed 60` an hour-long
scenario takes a minute and its readings are stamped from 59 minutes ago up to now, so a
reading is never stamped after the moment it is sent (never `future_ts`), and nothing is
older than the scenario's duration (at most 6 days: never `stale_ts`). Only the clock-skew
and malformed scenarios break these rules, on purpose.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

from core.contract import (
    MAX_BATCH_READINGS,
    MAX_PAYLOAD_BYTES,
    SEQ_MAX,
    STALE_LIMIT_MS,
    STATUS_TOPIC,
    TELEMETRY_TOPIC,
    Reason,
)
from device_sim import sensors
from device_sim.fleet import SimCover
from device_sim.scenario import (
    BatteryEvent,
    BufferEvent,
    CrewEvent,
    DisplaceEvent,
    DuplicateEvent,
    FloodEvent,
    MalformedEvent,
    Scenario,
    SilentEvent,
    SkewEvent,
    SpikeEvent,
    TiltEvent,
)

_Windowed = TypeVar("_Windowed", SilentEvent, BufferEvent, SkewEvent, DuplicateEvent)

DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Devices that stamp RFC 3339 strings use local time with its offset, as vendors do.
_LOCAL_TZ = timezone(timedelta(hours=8))
# How much water can stand above a well's rim before it runs off along the road.
_OVERFLOW_CM = 10.0
# The order of things a device does at the same instant: it reconnects, uploads its
# buffer, then reports; it goes silent last, so a reading at that instant is not sent.
_ONLINE, _FLUSH, _MALFORMED, _READING, _OFFLINE = range(5)


@dataclass(frozen=True, slots=True)
class Timebase:
    """Maps simulated time (epoch ms on the devices' clocks) to the real clock."""

    sim_start_ms: int
    real_start_ms: int
    speed: float

    @classmethod
    def catching_up(cls, *, real_start_ms: int, duration_s: float, speed: float) -> Timebase:
        """Simulated time starts in the past and reaches the real clock when the run ends."""
        duration_ms = duration_s * 1000
        return cls(round(real_start_ms - duration_ms + duration_ms / speed), real_start_ms, speed)

    def sim_ms(self, elapsed_s: float) -> int:
        return self.sim_start_ms + round(elapsed_s * 1000)

    def real_ms(self, sim_ms: int) -> float:
        """When, on the real clock, the moment `sim_ms` of the simulation is due."""
        return self.real_start_ms + (sim_ms - self.sim_start_ms) / self.speed


@dataclass(frozen=True, slots=True)
class Publication:
    """A message a device publishes (QoS 1) at simulated time `at_ms`."""

    at_ms: int
    device: int  # index into the plan's covers
    topic: str
    payload: bytes
    intent: str  # what it is meant to be: reading, batch, duplicate, malformed:<reason>

    @property
    def is_telemetry(self) -> bool:
        return self.topic.endswith("/telemetry")


@dataclass(frozen=True, slots=True)
class LinkChange:
    """A device drops its connection (the broker publishes its Will) or reconnects."""

    at_ms: int
    device: int
    online: bool


@dataclass(frozen=True, slots=True)
class CrewStep:
    """The crew moves the open case of cover `device` through `moves`, in order (the API)."""

    at_ms: int
    device: int
    moves: tuple[str, ...]
    note: str


Action = Publication | LinkChange | CrewStep


@dataclass(frozen=True, slots=True)
class Plan:
    """A scenario bound to concrete covers, a seed and a time base: everything it will send."""

    scenario: Scenario
    covers: tuple[SimCover, ...]
    seed: int
    timebase: Timebase

    def actions(self) -> Iterator[Action]:
        """Every action of every device, in simulated-time order (ties: by device), and
        the crew's steps (after what the devices do at the same instant)."""
        devices = [_DeviceTimeline(self, index) for index in range(len(self.covers))]
        streams = [device.actions() for device in devices]
        return heapq.merge(*streams, self.crew_steps(), key=lambda a: a.at_ms)

    def crew_steps(self) -> Iterator[CrewStep]:
        steps = [
            CrewStep(self.timebase.sim_ms(event.at_s), cover, tuple(event.to), event.note)
            for event in self.scenario.events
            if isinstance(event, CrewEvent)
            for cover in event.covers
        ]
        return iter(sorted(steps, key=lambda step: (step.at_ms, step.device)))

    def publications(self) -> Iterator[Publication]:
        return (action for action in self.actions() if isinstance(action, Publication))

    @property
    def end_ms(self) -> int:
        return self.timebase.sim_ms(self.scenario.duration_s)


def status_topic(device_id: str) -> str:
    return STATUS_TOPIC.format(device_id=device_id)


def telemetry_topic(device_id: str) -> str:
    return TELEMETRY_TOPIC.format(device_id=device_id)


def encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def format_ts(ts_ms: int, rfc3339: bool) -> int | str:
    if not rfc3339:
        return ts_ms
    stamp = (_EPOCH + timedelta(milliseconds=ts_ms)).astimezone(_LOCAL_TZ)
    return stamp.isoformat(timespec="milliseconds")


def malformed_payload(
    reason: Reason, *, device_id: str, seq: int, ts_ms: int, future_lead_ms: int
) -> bytes:
    """A message the service must dead-letter with exactly `reason` (DESIGN §3).

    `future_lead_ms` must exceed how far simulated time lags the real clock plus the
    10 minutes the contract tolerates.
    """
    good: dict[str, object] = {
        "device_id": device_id,
        "seq": seq,
        "ts": ts_ms,
        "tilt_deg": 0.8,
        "displacement_mm": 1.2,
    }
    if reason is Reason.BAD_JSON:  # the connection cut the message short
        return encode(good)[:-9]
    if reason is Reason.NOT_OBJECT:  # firmware that wraps its reading in an array
        return encode([good])
    if reason is Reason.SCHEMA:  # the tilt sensor failed and its field is missing
        return encode({k: v for k, v in good.items() if k != "tilt_deg"})
    if reason is Reason.TOPIC_MISMATCH:  # a cloned firmware image with another id
        return encode({**good, "device_id": f"{device_id}-clone"})
    if reason is Reason.OUT_OF_RANGE:  # an uncalibrated sensor
        return encode({**good, "tilt_deg": 181.5, "battery_v": 7.2})
    if reason is Reason.TOO_LARGE:  # a debug dump attached to the reading
        return encode({**good, "debug": "0" * MAX_PAYLOAD_BYTES})
    if reason is Reason.FUTURE_TS:
        return encode({**good, "ts": ts_ms + future_lead_ms})
    if reason is Reason.STALE_TS:
        return encode({**good, "ts": ts_ms - STALE_LIMIT_MS - DAY_MS})
    raise ValueError(f"a device cannot cause {reason}")


@functools.lru_cache(maxsize=64)
def _flood_response(rain: tuple[tuple[float, float], ...], response_s: float) -> list[float]:
    """A linear reservoir's level under the rain, sampled every `_flood_step(…)` s, peak 1."""
    step = _flood_step(response_s)
    end = rain[-1][0] + 5 * response_s
    level, levels = 0.0, []
    for i in range(int(end / step) + 1):
        level += step * (_rain_at(rain, i * step) - level / response_s)
        levels.append(level)
    peak = max(levels)
    return [value / peak for value in levels] if peak > 0 else levels


def _flood_step(response_s: float) -> float:
    return min(60.0, response_s / 10)


def _rain_at(rain: tuple[tuple[float, float], ...], t_s: float) -> float:
    if t_s < rain[0][0] or t_s > rain[-1][0]:
        return 0.0
    for (t0, r0), (t1, r1) in itertools.pairwise(rain):
        if t0 <= t_s <= t1:
            return r0 + (r1 - r0) * (t_s - t0) / (t1 - t0)
    return 0.0


@dataclass(order=True, frozen=True, slots=True)
class _Mark:
    """Something a device does at `t_s` into the run; `rank` orders the same instant."""

    t_s: float
    rank: int
    spike: SpikeEvent | None = field(default=None, compare=False)
    malformed: MalformedEvent | None = field(default=None, compare=False)


class _DeviceTimeline:
    """One device's actions in time order: scheduled and triggered readings, faults."""

    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.index = index
        self.cover = plan.covers[index]
        self.base = sensors.baseline(plan.seed, self.cover)
        scenario = plan.scenario
        self.events = [event for event in scenario.events if index in event.covers]
        self.interval_s = scenario.report_interval_s or self.cover.report_interval_s
        self.topic = telemetry_topic(self.cover.device_id)
        self.seq = self.base.first_seq
        self.buffered: list[dict[str, object]] = []
        # Duplicates not yet due, as (at_ms, order pushed, publication): the order breaks ties.
        self.later: list[tuple[int, int, Publication]] = []
        self.pushed = 0

    # -- when things happen ----------------------------------------------------------

    def _scheduled(self) -> Iterator[_Mark]:
        """One reading per report interval, at the device's phase, jittered within its slot."""
        jitter = self.plan.scenario.jitter
        slots = int(self.plan.scenario.duration_s // self.interval_s)
        for k in range(slots):
            u = random.Random(f"jitter/{self.plan.seed}/{self.cover.device_id}/{k}").random()
            offset = self.base.phase * (1 - jitter) + u * jitter
            yield _Mark((k + offset) * self.interval_s, _READING)

    def _unscheduled(self) -> list[_Mark]:
        marks: list[_Mark] = []
        for event in self.events:
            if isinstance(event, TiltEvent | DisplaceEvent) and event.report_now:
                marks.append(_Mark(event.at_s, _READING))
            elif isinstance(event, SpikeEvent):
                marks.append(_Mark(event.at_s, _READING, spike=event))
                marks.append(_Mark(event.at_s + event.recover_s, _READING))
            elif isinstance(event, SilentEvent | BufferEvent):
                marks.append(_Mark(event.at_s, _OFFLINE))
                if event.until_s is not None:
                    marks.append(_Mark(event.until_s, _ONLINE))
                if isinstance(event, BufferEvent):
                    marks.append(_Mark(event.until_s, _FLUSH))
            elif isinstance(event, MalformedEvent):
                marks.append(_Mark(event.at_s, _MALFORMED, malformed=event))
        duration = self.plan.scenario.duration_s
        return sorted(mark for mark in marks if mark.t_s < duration)

    def actions(self) -> Iterator[Action]:
        for mark in heapq.merge(self._scheduled(), self._unscheduled()):
            at_ms = self.plan.timebase.sim_ms(mark.t_s)
            yield from self._due(at_ms)
            if mark.rank in (_ONLINE, _OFFLINE):
                yield LinkChange(at_ms, self.index, online=mark.rank == _ONLINE)
            elif mark.rank == _FLUSH:
                yield from self._flush(at_ms)
            elif mark.malformed is not None:
                yield from self._malformed(mark.malformed, at_ms)
            else:
                yield from self._reading(mark, at_ms)
        yield from self._due(None)

    def _due(self, until_ms: int | None) -> Iterator[Publication]:
        while self.later and (until_ms is None or self.later[0][0] <= until_ms):
            yield heapq.heappop(self.later)[2]

    # -- what is sent ----------------------------------------------------------------

    def _active(self, kind: type[_Windowed], t_s: float) -> list[_Windowed]:
        return [e for e in self.events if isinstance(e, kind) and e.active(t_s)]

    def _reading(self, mark: _Mark, at_ms: int) -> Iterator[Publication]:
        if self._active(SilentEvent, mark.t_s):
            return  # no power, no reading: the sequence number does not move either
        document = self._measure(mark, at_ms)
        if self._active(BufferEvent, mark.t_s):
            self.buffered.append({k: v for k, v in document.items() if k != "device_id"})
            return
        payload = encode(document)
        yield Publication(at_ms, self.index, self.topic, payload, "reading")
        for event in self._active(DuplicateEvent, mark.t_s):
            for copy in range(1, event.copies + 1):
                self.pushed += 1
                redelivery = Publication(
                    at_ms + round(copy * event.delay_s * 1000),
                    self.index,
                    self.topic,
                    payload,
                    "duplicate",
                )
                heapq.heappush(self.later, (redelivery.at_ms, self.pushed, redelivery))

    def _measure(self, mark: _Mark, at_ms: int) -> dict[str, object]:
        seq = self.seq
        self.seq = (self.seq + 1) % (SEQ_MAX + 1)
        value = sensors.sample(
            self.base, self.cover, seed=self.plan.seed, seq=seq, sim_ms=at_ms, elapsed_s=mark.t_s
        )
        for event in self.events:
            self._apply(event, value, mark)
        skew_s = sum(event.offset_s for event in self._active(SkewEvent, mark.t_s))
        return {
            "device_id": self.cover.device_id,
            "seq": seq,
            "ts": format_ts(at_ms + round(skew_s * 1000), self.base.rfc3339),
            **sensors.reading_fields(value),
        }

    def _apply(self, event: object, value: sensors.Sample, mark: _Mark) -> None:
        t_s = mark.t_s
        if isinstance(event, TiltEvent) and event.active(t_s):
            value.tilt_deg += self._ramped(event.tilt_deg, event.at_s, event.ramp_s, t_s)
        elif isinstance(event, DisplaceEvent) and event.active(t_s):
            value.displacement_mm += event.displacement_mm
            if event.tilt_deg is not None:
                value.tilt_deg += event.tilt_deg - self.base.tilt_deg
        elif isinstance(event, SpikeEvent) and mark.spike is event:
            value.tilt_deg += event.tilt_deg - self.base.tilt_deg
            value.displacement_mm += event.displacement_mm or 0.0
        elif isinstance(event, FloodEvent):
            value.water_level_cm = self._flooded(event, value.water_level_cm, t_s)
        elif isinstance(event, BatteryEvent) and t_s > event.at_s:
            value.battery_v -= event.volts_per_h * (t_s - event.at_s) / 3600

    def _ramped(self, target: float, at_s: float, ramp_s: float, t_s: float) -> float:
        """How far the tilt has moved from the seated position towards `target`."""
        share = 1.0 if ramp_s == 0 else min(1.0, (t_s - at_s) / ramp_s)
        return (target - self.base.tilt_deg) * share

    def _flooded(self, event: FloodEvent, level_cm: float, t_s: float) -> float:
        distance = abs(event.covers.index(self.index) - event.lowest)
        depth = self.cover.depth_cm
        peak_cm = min(
            depth + _OVERFLOW_CM, depth - event.peak_below_rim_cm - distance * event.step_cm
        )
        curve = _flood_response(tuple(event.rain), event.response_s)
        position = (t_s - event.at_s - distance * event.lag_s) / _flood_step(event.response_s)
        if peak_cm <= level_cm or position < 0 or position >= len(curve) - 1:
            return level_cm
        low = int(position)
        response = curve[low] + (curve[low + 1] - curve[low]) * (position - low)
        return level_cm + (peak_cm - level_cm) * response

    def _flush(self, at_ms: int) -> Iterator[Publication]:
        """The NB-IoT upload: buffered readings in batches, in the order the modem sends them."""
        readings, self.buffered = self.buffered, []
        random.Random(f"batch/{self.plan.seed}/{self.cover.device_id}/{at_ms}").shuffle(readings)
        for batch in _batches(self.cover.device_id, readings):
            yield Publication(at_ms, self.index, self.topic, batch, "batch")

    def _malformed(self, event: MalformedEvent, at_ms: int) -> Iterator[Publication]:
        # Far enough ahead of the real clock whatever the compression (see Timebase).
        lead_ms = round(self.plan.scenario.duration_s * 1000) + DAY_MS
        for reason in event.reasons:
            payload = malformed_payload(
                reason,
                device_id=self.cover.device_id,
                seq=self.seq,
                ts_ms=at_ms,
                future_lead_ms=lead_ms,
            )
            yield Publication(at_ms, self.index, self.topic, payload, f"malformed:{reason.value}")


def _batches(device_id: str, readings: Iterable[dict[str, object]]) -> Iterator[bytes]:
    """Batches of at most 100 readings and 8 KiB, each a valid batch message."""
    # The compact encoding is compositional: a batch's size is its frame plus its items.
    frame = len(encode({"device_id": device_id, "readings": []}))
    current: list[dict[str, object]] = []
    size = frame
    for reading in readings:
        item = len(encode(reading)) + (1 if current else 0)  # the comma between items
        if current and (size + item > MAX_PAYLOAD_BYTES or len(current) == MAX_BATCH_READINGS):
            yield encode({"device_id": device_id, "readings": current})
            current, size, item = [], frame, item - 1
        current.append(reading)
        size += item
    if current:
        yield encode({"device_id": device_id, "readings": current})
