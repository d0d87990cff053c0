"""The sensor model: what a seated cover's sensor reads at a simulated time (pure functions).

Every value is a function of (seed, device, seq, simulated time): the noise comes from a
generator seeded with exactly those, and slow changes (displacement drift, the day's
temperature and water cycle, battery wear) are closed-form functions of time, so any
reading can be recomputed on its own, in any order, and the same seed gives the same bytes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from device_sim.fleet import SimCover

DAY_S = 86400.0
# China Standard Time: the day's cycles peak in the local afternoon.
_LOCAL_OFFSET_S = 8 * 3600
TILT_NOISE_DEG = 0.3  # accelerometer noise of a seated cover
DISPLACEMENT_NOISE_MM = 0.2
WATER_NOISE_CM = 0.5
BATTERY_NOISE_V = 0.004
BATTERY_WEAR_V_PER_DAY = 0.002  # a lithium primary cell over a five-year life
RSSI_NOISE_DB = 3.0
TEMPERATURE_NOISE_C = 0.3
# Share of devices whose vendor stamps readings with RFC 3339 strings, not epoch ms.
RFC3339_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class Baseline:
    """What makes one device differ from the others, fixed for a run by the seed."""

    tilt_deg: float  # a cover never sits perfectly flat in its frame
    displacement_mm: float
    drift_mm: float  # amplitude of the slow thermal drift of the displacement
    drift_period_s: float
    drift_phase: float
    water_fraction: float  # dry-weather water level, as a share of the well's depth
    battery_v: float
    rssi_dbm: float
    temperature_offset_c: float
    phase: float  # where in each report interval this device's readings fall (0 … 1)
    rfc3339: bool
    first_seq: int


@dataclass(slots=True)
class Sample:
    """One reading's measured values, before scenario effects are applied to them."""

    tilt_deg: float
    displacement_mm: float
    water_level_cm: float
    battery_v: float
    rssi_dbm: float
    temperature_c: float


def baseline(seed: int, cover: SimCover) -> Baseline:
    rng = random.Random(f"baseline/{seed}/{cover.device_id}")
    return Baseline(
        tilt_deg=rng.uniform(0.2, 1.2),
        displacement_mm=rng.uniform(0.0, 3.0),
        drift_mm=rng.uniform(0.3, 1.5),
        drift_period_s=rng.uniform(1.0, 3.0) * DAY_S,
        drift_phase=rng.uniform(0, 2 * math.pi),
        water_fraction=rng.uniform(0.08, 0.25),
        battery_v=rng.uniform(3.55, 3.65),
        rssi_dbm=rng.uniform(-105, -70),
        temperature_offset_c=rng.uniform(-2.0, 2.0),
        phase=rng.random(),
        rfc3339=rng.random() < RFC3339_SHARE,
        first_seq=rng.randrange(0, 100_000),
    )


def sample(
    base: Baseline, cover: SimCover, *, seed: int, seq: int, sim_ms: int, elapsed_s: float
) -> Sample:
    """The seated cover's reading number `seq`, taken at `sim_ms`, `elapsed_s` into the run."""
    rng = random.Random(f"reading/{seed}/{cover.device_id}/{seq}")
    local_day = ((sim_ms / 1000 + _LOCAL_OFFSET_S) % DAY_S) / DAY_S
    # Warmest at 15:00, coolest at 03:00.
    daily = math.sin(2 * math.pi * (local_day - 0.375))
    drift = base.drift_mm * math.sin(
        2 * math.pi * (sim_ms / 1000) / base.drift_period_s + base.drift_phase
    )
    return Sample(
        tilt_deg=abs(base.tilt_deg + rng.gauss(0, TILT_NOISE_DEG)),
        displacement_mm=max(
            0.0, base.displacement_mm + drift + rng.gauss(0, DISPLACEMENT_NOISE_MM)
        ),
        water_level_cm=max(
            0.0,
            cover.depth_cm * base.water_fraction + 2.0 * daily + rng.gauss(0, WATER_NOISE_CM),
        ),
        battery_v=base.battery_v
        - BATTERY_WEAR_V_PER_DAY * elapsed_s / DAY_S
        + 0.01 * daily  # a cell's voltage rises a little with temperature
        + rng.gauss(0, BATTERY_NOISE_V),
        rssi_dbm=base.rssi_dbm + rng.gauss(0, RSSI_NOISE_DB),
        temperature_c=14.0
        + 6.0 * daily
        + base.temperature_offset_c
        + rng.gauss(0, TEMPERATURE_NOISE_C),
    )


def reading_fields(sample: Sample) -> dict[str, float | int]:
    """The contract's measurement fields, rounded as a sensor reports them and in range."""
    return {
        "tilt_deg": round(min(180.0, max(0.0, sample.tilt_deg)), 2),
        "displacement_mm": round(max(0.0, sample.displacement_mm), 1),
        "water_level_cm": round(max(0.0, sample.water_level_cm), 1),
        "battery_v": round(min(5.0, max(0.0, sample.battery_v)), 3),
        "rssi_dbm": int(min(0, max(-150, round(sample.rssi_dbm)))),
        "temperature_c": round(min(100.0, max(-50.0, sample.temperature_c)), 1),
    }
