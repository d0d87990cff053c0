"""The alert rules of DESIGN §5 as a pure state machine: `step(state, reading, rule)`.

No I/O and no clock of its own: the engine around it loads the state, passes each
reading (and, for timers, the current time to `tick`), stores the new state and turns
the events into alerts, all in one transaction.

Every rule has the same shape. A reading is classified against the thresholds as OVER
(counts towards raising), NORMAL (counts towards clearing), BAND (the dead band between
the two: breaks both streaks, moves nothing) or HOLD (this rule has nothing to say: the
field is missing, or another rule owns the value). An alert is raised after
`raise_after` OVER readings in a row (or `confirm_ms` after the first one, for tilt) and
cleared after `clear_after` NORMAL readings in a row. A reading older than the newest
one already evaluated changes nothing, so buffered or redelivered readings cannot
clear a live alarm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

from core.contract import Reading


class AlertKind(StrEnum):
    COVER_OPEN = "cover_open"
    COVER_TILTED = "cover_tilted"
    COVER_DISPLACED = "cover_displaced"
    WATER_HIGH = "water_high"
    BATTERY_LOW = "battery_low"
    DEVICE_SILENT = "device_silent"
    FLAPPING = "flapping"


class Severity(StrEnum):
    MINOR = "minor"
    MAJOR = "major"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return (Severity.MINOR, Severity.MAJOR, Severity.CRITICAL).index(self)


class Action(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    TRANSIENT = "transient"  # over the limit once, then normal: counted, no alert


class Level(Enum):
    OVER = "over"
    BAND = "band"
    NORMAL = "normal"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """DESIGN §5 defaults; every one can be overridden per cover in the registry."""

    tilt_open_deg: float = 45.0
    tilt_warn_deg: float = 10.0
    tilt_clear_deg: float = 5.0
    displacement_raise_mm: float = 20.0
    displacement_clear_mm: float = 10.0
    water_margin_cm: float = 30.0  # limit = well depth − margin, unless the cover has its own
    water_clear_cm: float = 10.0  # cleared this far below the limit
    flood_prone_extra_cm: float = 10.0  # a flood-prone cover's limit is this much lower
    battery_low_v: float = 3.3
    battery_ok_v: float = 3.4
    clear_streak: int = 3
    battery_streak: int = 3
    tilt_confirm_ms: int = 30_000
    flapping_cycles: int = 4  # more raises than this within the window is flapping
    flapping_window_ms: int = 3_600_000


@dataclass(frozen=True, slots=True)
class CoverRule:
    """What the rules need to know about one cover."""

    thresholds: Thresholds = Thresholds()
    depth_cm: float | None = None
    water_limit_cm: float | None = None  # the cover's own limit, overriding depth − margin
    flood_prone: bool = False

    def water_limit(self) -> float | None:
        t = self.thresholds
        if self.water_limit_cm is not None:
            limit = self.water_limit_cm
        elif self.depth_cm is not None:
            limit = self.depth_cm - t.water_margin_cm
        else:
            return None
        return limit - t.flood_prone_extra_cm if self.flood_prone else limit


@dataclass(frozen=True, slots=True)
class KindState:
    """The state of one (cover, alert kind)."""

    active: bool = False
    over_streak: int = 0
    normal_streak: int = 0
    pending_since_ms: int | None = None  # first OVER reading of a streak not yet raised
    last_ts_ms: int = -1  # newest reading evaluated
    raises: tuple[int, ...] = ()  # times of recent raises, for flapping
    flapping: bool = False


@dataclass(frozen=True, slots=True)
class AlertEvent:
    kind: AlertKind
    action: Action
    severity: Severity
    ts_ms: int
    value: float | None = None
    subject: AlertKind | None = None  # for FLAPPING: the kind that flaps


def _tilt_open(reading: Reading, rule: CoverRule) -> Level:
    t = rule.thresholds
    if reading.tilt_deg >= t.tilt_open_deg:
        return Level.OVER
    return Level.NORMAL if reading.tilt_deg < t.tilt_clear_deg else Level.BAND


def _tilt_warn(reading: Reading, rule: CoverRule) -> Level:
    t = rule.thresholds
    if reading.tilt_deg >= t.tilt_open_deg:
        return Level.HOLD  # an open cover is cover_open's business: one alert is enough
    if reading.tilt_deg >= t.tilt_warn_deg:
        return Level.OVER
    return Level.NORMAL if reading.tilt_deg < t.tilt_clear_deg else Level.BAND


def _displaced(reading: Reading, rule: CoverRule) -> Level:
    t = rule.thresholds
    if reading.displacement_mm >= t.displacement_raise_mm:
        return Level.OVER
    return Level.NORMAL if reading.displacement_mm < t.displacement_clear_mm else Level.BAND


def _water(reading: Reading, rule: CoverRule) -> Level:
    limit = rule.water_limit()
    if reading.water_level_cm is None or limit is None:
        return Level.HOLD
    if reading.water_level_cm >= limit:
        return Level.OVER
    below = limit - rule.thresholds.water_clear_cm
    return Level.NORMAL if reading.water_level_cm <= below else Level.BAND


def _battery(reading: Reading, rule: CoverRule) -> Level:
    t = rule.thresholds
    if reading.battery_v is None:
        return Level.HOLD
    if reading.battery_v < t.battery_low_v:
        return Level.OVER
    return Level.NORMAL if reading.battery_v >= t.battery_ok_v else Level.BAND


@dataclass(frozen=True, slots=True)
class Criterion:
    kind: AlertKind
    classify: Callable[[Reading, CoverRule], Level]
    value: Callable[[Reading], float | None]
    raise_after: Callable[[Thresholds], int]
    clear_after: Callable[[Thresholds], int]
    confirm: bool = False  # raised also when tilt_confirm_ms pass without a normal reading

    def severity(self, rule: CoverRule) -> Severity:
        if self.kind is AlertKind.BATTERY_LOW:
            return Severity.MINOR
        if self.kind is AlertKind.WATER_HIGH:
            return Severity.CRITICAL if rule.flood_prone else Severity.MAJOR
        return Severity.CRITICAL


def _once(_: Thresholds) -> int:
    return 1


def _clear_streak(t: Thresholds) -> int:
    return t.clear_streak


CRITERIA: tuple[Criterion, ...] = (
    Criterion(AlertKind.COVER_OPEN, _tilt_open, lambda r: r.tilt_deg, _once, _clear_streak),
    Criterion(
        AlertKind.COVER_TILTED,
        _tilt_warn,
        lambda r: r.tilt_deg,
        lambda t: 2,
        _clear_streak,
        confirm=True,
    ),
    Criterion(
        AlertKind.COVER_DISPLACED, _displaced, lambda r: r.displacement_mm, _once, _clear_streak
    ),
    Criterion(AlertKind.WATER_HIGH, _water, lambda r: r.water_level_cm, _once, _clear_streak),
    Criterion(
        AlertKind.BATTERY_LOW, _battery, lambda r: r.battery_v, lambda t: t.battery_streak, _once
    ),
)
CRITERION_OF = {criterion.kind: criterion for criterion in CRITERIA}


def step(
    state: KindState,
    reading: Reading,
    rule: CoverRule,
    criterion: Criterion,
    *,
    received_ms: int | None = None,
) -> tuple[KindState, list[AlertEvent]]:
    """Evaluates one reading for one (cover, kind); returns the new state and its events.

    `received_ms` (server clock) starts a confirmation window, which `tick` measures on
    the server's clock too: a device clock that is off must not shorten or stretch it.
    Without it, the device's time is used (tests that drive both clocks alike).
    """
    if reading.ts_ms <= state.last_ts_ms:
        return state, []  # older than what was evaluated, or the same one again
    level = criterion.classify(reading, rule)
    state = dataclasses.replace(state, last_ts_ms=reading.ts_ms)
    if level is Level.HOLD:
        return state, []
    value = criterion.value(reading)
    if level is Level.OVER:
        if state.pending_since_ms is None:
            since = reading.ts_ms if received_ms is None else received_ms
            state = dataclasses.replace(state, pending_since_ms=since)
        return _over(state, reading.ts_ms, value, rule, criterion)
    return _not_over(state, level, reading.ts_ms, value, rule=rule, criterion=criterion)


def _over(
    state: KindState, ts_ms: int, value: float | None, rule: CoverRule, criterion: Criterion
) -> tuple[KindState, list[AlertEvent]]:
    streak = state.over_streak + 1
    state = dataclasses.replace(state, over_streak=streak, normal_streak=0)
    if state.active or streak < criterion.raise_after(rule.thresholds):
        return state, []
    return _raise(state, ts_ms, value, rule, criterion)


def _not_over(
    state: KindState,
    level: Level,
    ts_ms: int,
    value: float | None,
    *,
    rule: CoverRule,
    criterion: Criterion,
) -> tuple[KindState, list[AlertEvent]]:
    events: list[AlertEvent] = []
    if not state.active and state.over_streak and criterion.confirm:
        events.append(
            AlertEvent(criterion.kind, Action.TRANSIENT, criterion.severity(rule), ts_ms, value)
        )
    normal_streak = state.normal_streak + 1 if level is Level.NORMAL else 0
    state = dataclasses.replace(
        state, over_streak=0, normal_streak=normal_streak, pending_since_ms=None
    )
    if state.active and normal_streak >= criterion.clear_after(rule.thresholds):
        state = dataclasses.replace(state, active=False)
        if not state.flapping:
            events.append(
                AlertEvent(criterion.kind, Action.CLEARED, criterion.severity(rule), ts_ms, value)
            )
    if state.flapping and not state.active and level is Level.NORMAL:
        events.extend(_calm_down(state, ts_ms, rule, criterion))
        if events and events[-1].kind is AlertKind.FLAPPING:
            state = dataclasses.replace(state, flapping=False, raises=())
    return state, events


def _raise(
    state: KindState, ts_ms: int, value: float | None, rule: CoverRule, criterion: Criterion
) -> tuple[KindState, list[AlertEvent]]:
    t = rule.thresholds
    recent = (*(r for r in state.raises if ts_ms - r < t.flapping_window_ms), ts_ms)
    state = dataclasses.replace(state, active=True, raises=recent, pending_since_ms=None)
    severity = criterion.severity(rule)
    if state.flapping:
        return state, []  # the flapping alert stands for this raise
    if len(recent) > t.flapping_cycles:
        state = dataclasses.replace(state, flapping=True)
        return state, [
            AlertEvent(
                AlertKind.FLAPPING, Action.RAISED, severity, ts_ms, value, subject=criterion.kind
            )
        ]
    return state, [AlertEvent(criterion.kind, Action.RAISED, severity, ts_ms, value)]


def _calm_down(
    state: KindState, ts_ms: int, rule: CoverRule, criterion: Criterion
) -> list[AlertEvent]:
    """Flapping ends once the kind has not been raised for a whole window."""
    if state.raises and ts_ms - state.raises[-1] < rule.thresholds.flapping_window_ms:
        return []
    return [
        AlertEvent(
            AlertKind.FLAPPING,
            Action.CLEARED,
            criterion.severity(rule),
            ts_ms,
            subject=criterion.kind,
        )
    ]


def tick(
    state: KindState, now_ms: int, rule: CoverRule, criterion: Criterion
) -> tuple[KindState, list[AlertEvent]]:
    """Timers: raises a confirm-type alert when its window passed without a normal reading."""
    if not criterion.confirm or state.active or state.pending_since_ms is None:
        return state, []
    if now_ms - state.pending_since_ms < rule.thresholds.tilt_confirm_ms:
        return state, []
    return _raise(state, now_ms, None, rule, criterion)


def silence(
    *,
    last_seen_ms: int | None,
    interval_s: float,
    now_ms: int,
    active: bool,
) -> Action | None:
    """device_silent: raised after 3 report intervals without a reading, cleared by one.

    A device that never reported is `never_reported`, not silent: nothing happens here.
    """
    if last_seen_ms is None:
        return None
    silent = now_ms - last_seen_ms > 3 * interval_s * 1000
    if silent and not active:
        return Action.RAISED
    if not silent and active:
        return Action.CLEARED
    return None
