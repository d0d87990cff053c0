"""Scenario files (`device_sim/scenarios/*.toml`): their schema, loading and expectations."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.contract import Reason
from device_sim.errors import ScenarioError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
# Readings older than 7 days are dead-lettered as stale_ts (DESIGN §3). Simulated time
# starts in the past by up to the scenario's duration, so a day is left as a margin.
MAX_DURATION_S = 6 * 86400
MAX_SPEED = 1_000_000
# Every reason one device message can be dead-lettered for: store_rejected is the store's,
# and rate_limited takes a flood of messages, not one.
_NOT_ONE_MESSAGE = (Reason.STORE_REJECTED, Reason.RATE_LIMITED)
# Reasons of the ingress adapters (DESIGN §12: HTTP pushes, platform ids, vendor codecs),
# which a simulated device publishing v1 JSON over MQTT never meets.
_NOT_MQTT_V1 = (Reason.BAD_SIGNATURE, Reason.UNKNOWN_DEVICE, Reason.DECODE_FAILED)
DEVICE_REASONS = tuple(reason for reason in Reason if reason not in _NOT_ONE_MESSAGE + _NOT_MQTT_V1)

AlertKind = Literal[
    "cover_open", "cover_tilted", "cover_displaced", "water_high", "battery_low", "device_silent"
]
Severity = Literal["critical", "major", "minor"]
# A case's states (DESIGN §6); a case is opened as `open`, so it never moves there.
CaseState = Literal[
    "open", "dispatched", "acknowledged", "on_site", "resolved", "verified", "closed", "cancelled"
]
CaseMove = Literal[
    "dispatched", "acknowledged", "on_site", "resolved", "verified", "closed", "cancelled"
]
Seconds = Annotated[float, Field(ge=0)]
CoverIndexes = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Event(_Strict):
    """Something that happens to some of the scenario's covers, `at_s` into the run."""

    covers: CoverIndexes
    at_s: Seconds = 0.0


class _Windowed(_Event):
    until_s: Seconds | None = None  # None: until the end of the run

    def active(self, t_s: float) -> bool:
        return self.at_s <= t_s and (self.until_s is None or t_s < self.until_s)

    @model_validator(mode="after")
    def _ends_after_start(self) -> Self:
        if self.until_s is not None and self.until_s <= self.at_s:
            raise ValueError(f"until_s ({self.until_s:g}) must be after at_s ({self.at_s:g})")
        return self


class TiltEvent(_Windowed):
    """The cover tilts to `tilt_deg`, at once or creeping over `ramp_s` (subsidence)."""

    kind: Literal["tilt"]
    tilt_deg: Annotated[float, Field(ge=0, le=180)]
    ramp_s: Seconds = 0.0
    report_now: bool = True  # sensors report a sudden change at once, off schedule


class DisplaceEvent(_Windowed):
    """The cover is shifted out of its seat by `displacement_mm` (a vehicle strike)."""

    kind: Literal["displace"]
    displacement_mm: Annotated[float, Field(ge=0)]
    tilt_deg: Annotated[float, Field(ge=0, le=180)] | None = None
    report_now: bool = True


class SpikeEvent(_Event):
    """A shock: one off-schedule reading at `tilt_deg`, a normal one `recover_s` later."""

    kind: Literal["spike"]
    tilt_deg: Annotated[float, Field(ge=0, le=180)]
    displacement_mm: Annotated[float, Field(ge=0)] | None = None
    recover_s: Annotated[float, Field(gt=0)] = 5.0


class FloodEvent(_Event):
    """Rain fills the wells of neighbouring covers; the wave moves along them in order.

    Each well follows the rain like a linear reservoir (time constant `response_s`). At
    the storm's worst the `lowest` cover's water stands `peak_below_rim_cm` below its rim
    (negative: over the road), each cover further along `step_cm` lower and reached
    `lag_s` later. Levels are relative to the rim, so the alarm level (rim - 30 cm by
    default) is crossed by the same covers whatever their depths.
    """

    kind: Literal["flood"]
    rain: Annotated[list[tuple[Seconds, Seconds]], Field(min_length=2)]  # (s after at_s, mm/h)
    response_s: Annotated[float, Field(gt=0)] = 1800.0
    peak_below_rim_cm: float = -5.0
    step_cm: Annotated[float, Field(ge=0)] = 25.0
    lowest: Annotated[int, Field(ge=0)] = 0  # position in `covers`
    lag_s: Seconds = 300.0

    @field_validator("rain")
    @classmethod
    def _rain_in_time_order(cls, rain: list[tuple[float, float]]) -> list[tuple[float, float]]:
        times = [t for t, _ in rain]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError("rain points must be in strictly increasing time order")
        return rain

    @model_validator(mode="after")
    def _lowest_is_a_cover(self) -> Self:
        if self.lowest >= len(self.covers):
            raise ValueError(f"lowest ({self.lowest}) must be a position in covers")
        return self


class BatteryEvent(_Event):
    """The battery drains `volts_per_h` faster than normal wear (a failing cell)."""

    kind: Literal["battery"]
    volts_per_h: Annotated[float, Field(gt=0, le=5)]


class SilentEvent(_Windowed):
    """The device loses power or is stolen: its connection drops (Last Will), no readings."""

    kind: Literal["silent"]


class BufferEvent(_Windowed):
    """NB-IoT out of coverage: offline, readings buffered, then sent as out-of-order batches."""

    kind: Literal["buffer"]
    until_s: Seconds  # a buffer always ends: the upload


class DuplicateEvent(_Windowed):
    """Each reading is published `copies` more times, `delay_s` apart (same seq and ts)."""

    kind: Literal["duplicate"]
    copies: Annotated[int, Field(ge=1, le=10)] = 1
    delay_s: Annotated[float, Field(gt=0)] = 1.0


class SkewEvent(_Windowed):
    """The device's clock is `offset_s` off: its timestamps move, not its schedule."""

    kind: Literal["skew"]
    offset_s: float


class CrewEvent(_Event):
    """The owner unit's crew moves the cover's open case through the API, in this order.

    Performed by `--check` with its API key (the scenario's expected outcome may depend
    on it: a fix the sensor verifies, or a fix that does not hold).
    """

    kind: Literal["crew"]
    to: Annotated[list[CaseMove], Field(min_length=1)]
    note: Annotated[str, Field(max_length=2000)] = ""


class MalformedEvent(_Event):
    """One message of each listed reason code (DESIGN §3), published `at_s`."""

    kind: Literal["malformed"]
    reasons: Annotated[list[Reason], Field(min_length=1)] = list(DEVICE_REASONS)

    @field_validator("reasons")
    @classmethod
    def _device_reasons(cls, reasons: list[Reason]) -> list[Reason]:
        if Reason.STORE_REJECTED in reasons:
            raise ValueError("store_rejected comes from the store; a device cannot cause it")
        if Reason.RATE_LIMITED in reasons:
            raise ValueError("rate_limited takes a flood of messages, not one malformed message")
        adapters = [reason.value for reason in reasons if reason in _NOT_MQTT_V1]
        if adapters:
            raise ValueError(f"{', '.join(adapters)}: ingress adapters' reasons, not a device's")
        return reasons


Event = Annotated[
    TiltEvent
    | DisplaceEvent
    | SpikeEvent
    | FloodEvent
    | BatteryEvent
    | SilentEvent
    | BufferEvent
    | DuplicateEvent
    | SkewEvent
    | MalformedEvent
    | CrewEvent,
    Field(discriminator="kind"),
]
SensorEvent = TiltEvent | DisplaceEvent | SpikeEvent | FloodEvent | BatteryEvent


class AlertExpectation(_Strict):
    """`count` alerts of `kind` raised on the scenario's cover number `cover`."""

    kind: AlertKind
    cover: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=0)] = 1
    severity: Severity | None = None


class CaseExpectation(_Strict):
    """`count` cases opened for the cover, routed to its owner unit; when given, the
    `status` they are in once the run is over and how often they were `reopened`."""

    cover: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=0)] = 1
    severity: Severity | None = None
    status: CaseState | None = None
    reopened: Annotated[int, Field(ge=0)] | None = None


class IncidentExpectation(_Strict):
    """One area incident links the cases of exactly these covers (of the scenario's)."""

    covers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2)]


class Expectations(_Strict):
    """What the service should have done once the scenario has run.

    Counts are deltas of the service's counters over the run: `readings_stored` counts
    every reading written, redelivered ones included (the store overwrites them);
    `dead_letters` lists reasons with their counts, every reason not listed must stay 0.
    Alerts and cases are those the run caused: raised or opened on the scenario's covers
    while it ran (what the service held before the run does not count).
    """

    readings_stored: Annotated[int, Field(ge=0)]
    acknowledged: Annotated[int, Field(ge=0)] | None = None  # telemetry messages
    dead_letters: dict[Reason, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    alerts: list[AlertExpectation] = Field(default_factory=list)
    cases: list[CaseExpectation] = Field(default_factory=list)
    incidents: list[IncidentExpectation] = Field(default_factory=list)

    @property
    def observes_alerting(self) -> bool:
        """Whether judging these needs the service's alerts and cases (its API)."""
        return bool(self.alerts or self.cases or self.incidents)


class Scenario(_Strict):
    """A scenario: how many covers, for how long, what happens, and what it should cause."""

    name: str
    description: str
    fleet_size: Annotated[int, Field(ge=1, le=100_000)]
    duration_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S)]
    speed: Annotated[float, Field(ge=1, le=MAX_SPEED)] = 1.0
    # None: each device's own interval from the fleet. Shipped scenarios set it, so their
    # expected counts hold for any fleet.
    report_interval_s: Annotated[int, Field(ge=1, le=86400)] | None = None
    jitter: Annotated[float, Field(ge=0, le=0.9)] = 0.3  # share of the interval
    events: list[Event] = Field(default_factory=list)
    expect: Expectations | None = None

    @model_validator(mode="after")
    def _indexes_and_times_fit(self) -> Self:
        for number, event in enumerate(self.events):
            where = f"events[{number}] ({event.kind})"
            for index in event.covers:
                if index >= self.fleet_size:
                    raise ValueError(f"{where}: cover {index} >= fleet_size {self.fleet_size}")
            if event.at_s >= self.duration_s:
                raise ValueError(f"{where}: at_s {event.at_s:g} >= duration_s")
        if self.expect is not None:
            covers = [item.cover for item in self.expect.alerts]
            covers += [item.cover for item in self.expect.cases]
            covers += [index for item in self.expect.incidents for index in item.covers]
            for cover in covers:
                if cover >= self.fleet_size:
                    raise ValueError(f"expect: cover {cover} >= fleet_size {self.fleet_size}")
        return self

    def with_speed(self, speed: float | None) -> Scenario:
        return self if speed is None else self.model_copy(update={"speed": speed})


def shipped_scenarios() -> list[str]:
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def scenario_path(name_or_path: str) -> Path:
    """A shipped scenario's file by name, or the path given."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return Path(name_or_path)
    path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ScenarioError(
            f"no scenario named {name_or_path!r}; shipped: {', '.join(shipped_scenarios())}"
        )
    return path


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Reads and validates a scenario; errors name the file and the field."""
    path = name_or_path if isinstance(name_or_path, Path) else scenario_path(name_or_path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    document.setdefault("name", path.stem)
    try:
        return Scenario.model_validate(document)
    except ValidationError as exc:
        problems = [
            f"{path}: {_where(error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False)
        ]
        raise ScenarioError("\n".join(problems)) from None


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(file)"
