"""Public shapes of registry records (units, roads, covers, devices, bindings), validated.

These are the request and response bodies of the API as well as what the registry's
data functions take and return. Field names of the unit record and of the census are
fixed by DESIGN §11.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from core.contract import DEVICE_ID
from core.text import PLAIN

# -- the standard cover number (CJ/T 214-2007, GB/T 30428.2-2013) ----------------------

COVER_NUMBER_DIGITS = 16
PUBLIC_FACILITIES = "01"  # major class of the public-facilities components
UNKNOWN_OWNER_CLASS = "14"  # 无主井盖: owned by the township unit (DESIGN §6)

# The minor classes of major class 01 that are covers, as the standard's table lists
# them. 13 (消防设施, fire hydrants) and 15 onwards (交接箱, 电杆, 路灯, 报刊亭, …) are
# components of the same class but not covers; codes from 27 on are local extensions
# that differ between cities (中水, 输油(气), 公交, …) and are not accepted.
COVER_CLASSES: dict[str, str] = {
    "01": "上水井盖 water supply",
    "02": "污水井盖 sewage",
    "03": "雨水井盖 storm water",
    "04": "雨水箅子 storm-water grate",
    "05": "电力井盖 power",
    "06": "路灯井盖 street lighting",
    "07": "通讯井盖 telecom",
    "08": "电视井盖 cable TV",
    "09": "网络井盖 network",
    "10": "热力井盖 heating",
    "11": "燃气井盖 gas",
    "12": "公安井盖 public security",
    "14": "无主井盖 unknown owner",
}

# First two digits of a GB/T 2260 administrative code: the provinces (71 Taiwan, 81 Hong
# Kong, 82 Macao included, as the standard lists them).
_PROVINCES = frozenset(
    str(code)
    # North, North-east, East, Centre-South, South-west, North-west, Taiwan, HK and Macao.
    for first, last in [
        (11, 15),
        (21, 23),
        (31, 37),
        (41, 46),
        (50, 54),
        (61, 65),
        (71, 71),
        (81, 82),
    ]
    for code in range(first, last + 1)
)
_DIGITS = re.compile(r"^[0-9]+$")


def cover_number_problem(number: str) -> str | None:
    """Why `number` is not a valid 16-digit cover number, or None when it is."""
    if len(number) != COVER_NUMBER_DIGITS or not _DIGITS.match(number):
        return f"must be {COVER_NUMBER_DIGITS} digits, got {number[:40]!r}"
    admin, major, minor, sequence = number[:6], number[6:8], number[8:10], number[10:]
    if admin[:2] not in _PROVINCES:
        return f"administrative code {admin} names no province of GB/T 2260"
    if admin[2:] == "0000":
        return f"administrative code {admin} is a whole province, not a city or county"
    if major != PUBLIC_FACILITIES:
        return f"major class {major} is not {PUBLIC_FACILITIES} (public facilities)"
    if minor not in COVER_CLASSES:
        return f"minor class {minor} is not a cover class ({', '.join(COVER_CLASSES)})"
    if sequence == "000000":
        return "sequence 000000 is not allowed (sequences start at 000001)"
    return None


def kind_code_of(number: str) -> str:
    """The 4-digit class (major + minor) inside a cover number."""
    return number[6:10]


def _check_cover_number(value: str) -> str:
    problem = cover_number_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_kind_code(value: str) -> str:
    if len(value) != 4 or not _DIGITS.match(value):
        raise ValueError(f"must be 4 digits, got {value[:20]!r}")
    if value[:2] != PUBLIC_FACILITIES or value[2:] not in COVER_CLASSES:
        raise ValueError(
            f"{value} is not a cover class (01xx with xx in {', '.join(COVER_CLASSES)})"
        )
    return value


def _check_webhook_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _any_of(codes: Iterable[str]) -> str:
    return "(?:" + "|".join(sorted(codes)) + ")"


# The checks above as JSON Schema patterns, so that the OpenAPI schema states them (a
# schema-driven client then sends numbers that are accepted). No look-ahead: "not 0000"
# and "not 000000" are spelled out as a first non-zero digit somewhere.
_NOT_ZEROS_4 = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_NOT_ZEROS_6 = (
    "(?:[1-9][0-9]{5}|0[1-9][0-9]{4}|00[1-9][0-9]{3}|000[1-9][0-9]{2}|0000[1-9][0-9]|00000[1-9])"
)
KIND_CODE_PATTERN = f"^{PUBLIC_FACILITIES}{_any_of(COVER_CLASSES)}$"
_ADMIN_CODE = _any_of(_PROVINCES) + _NOT_ZEROS_4  # a province's city or county
COVER_NUMBER_PATTERN = f"^{_ADMIN_CODE}{PUBLIC_FACILITIES}{_any_of(COVER_CLASSES)}{_NOT_ZEROS_6}$"
WEBHOOK_URL_PATTERN = r"^https?://[^\x00-\x1f\x7f-\x9f]*$"  # and no control character

CoverNumber = Annotated[
    str,
    AfterValidator(_check_cover_number),
    WithJsonSchema({"type": "string", "pattern": COVER_NUMBER_PATTERN}),
]
KindCode = Annotated[
    str,
    AfterValidator(_check_kind_code),
    WithJsonSchema({"type": "string", "pattern": KIND_CODE_PATTERN}),
]
# Unit codes end up in MQTT topics (`alerts/{unit_code}`): no `/`, `+` or `#`.
UnitCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# Anchored here: the contract's pattern is used with fullmatch().
DeviceId = Annotated[str, StringConstraints(pattern=rf"^(?:{DEVICE_ID.pattern})$")]
# An ingress source's name (a `[sources.<name>]` table) and a device's id on it: an IMEI,
# a devEUI, a platform's device id: printable ASCII without spaces.
SOURCE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
SourceName = Annotated[str, StringConstraints(pattern=SOURCE_NAME_PATTERN)]
ExternalId = Annotated[str, StringConstraints(pattern=r"^[!-~]{1,128}$")]
# Free strings refuse control characters (core.text): codes and numbers above have
# patterns that leave none in.
# Stripped, so at least one character that is not a space (the schema says so too).
_NOT_BLANK = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    PLAIN,
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 200, "pattern": _NOT_BLANK}),
]
ShortText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    PLAIN,
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 100, "pattern": _NOT_BLANK}),
]
WebhookUrl = Annotated[
    str,
    StringConstraints(max_length=2000),
    PLAIN,
    AfterValidator(_check_webhook_url),
    WithJsonSchema({"type": "string", "maxLength": 2000, "pattern": WEBHOOK_URL_PATTERN}),
]
WebhookSecret = Annotated[SecretStr, PLAIN]
# Numbers are strict: true or "12.5" is not a number (the schema says so; lax pydantic
# would read them as 1.0 and 12.5). The census converts its cells before these checks.
Longitude = Annotated[float, Field(ge=-180, le=180, strict=True)]
Latitude = Annotated[float, Field(ge=-90, le=90, strict=True)]
DepthCm = Annotated[float, Field(gt=0, le=10_000, strict=True)]


def _date_as_text(value: Any) -> Any:
    # Pydantic reads a number as a Unix time (0 is 1970-01-01): a date is YYYY-MM-DD here.
    if not isinstance(value, str | date):
        raise ValueError("give a date as YYYY-MM-DD")
    return value


IsoDate = Annotated[date, BeforeValidator(_date_as_text)]


def _number_not_text(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("give a number, not text")
    return value


# From a minute (a test rig) to a day (a sensor that only sends heartbeats).
# Not strict: JSON Schema's integer takes 60.0 too, as lax pydantic does; text it does not.
ReportInterval = Annotated[int, Field(ge=60, le=86_400), BeforeValidator(_number_not_text)]
DEFAULT_REPORT_INTERVAL_S = 3600  # an NB-IoT cover sensor's usual hourly heartbeat


class UnitKind(StrEnum):
    WATER_SUPPLY = "water_supply"
    DRAINAGE = "drainage"
    GAS = "gas"
    HEATING = "heating"
    POWER = "power"
    TELECOM = "telecom"
    PUBLIC_SECURITY = "public_security"
    TRAFFIC = "traffic"
    BROADCAST_TV = "broadcast_tv"
    TOWNSHIP = "township"
    OTHER = "other"


class CoverState(StrEnum):
    IN_SERVICE = "in_service"  # 在用
    ABANDONED = "abandoned"  # 废弃
    FILLED = "filled"  # 已填埋


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _refuse_cleared(update: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        if name in update.model_fields_set and getattr(update, name) is None:
            raise ValueError(f"{name} cannot be cleared")


def _not_null(names: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    """A partial update's schema: `names` may be left out, but not set to null."""

    def edit(schema: dict[str, Any]) -> None:
        for name in names:
            field = schema["properties"][name]
            kinds = [kind for kind in field.pop("anyOf") if kind != {"type": "null"}]
            field.update(kinds[0])  # each of these is one type or null
            field.pop("default", None)  # null: left out, it is not changed

    return edit


# -- units ------------------------------------------------------------------------------


class Unit(_Record):
    """The unit record of DESIGN §11, for `POST /api/v1/units` and every unit answer.

    The webhook secret signs deliveries, so it is kept as given, and shown as `**********`
    whenever the record is serialised.
    """

    code: UnitCode
    name: Name
    kind: UnitKind
    parent: UnitCode | None = None
    webhook_url: WebhookUrl | None = None
    webhook_secret: WebhookSecret | None = None
    supervisor_contact: Name | None = None


class UnitUpdate(_Record):
    """A partial change of a unit: only the fields given are changed (null clears)."""

    UNCLEARABLE: ClassVar[tuple[str, ...]] = ("name", "kind")
    model_config = ConfigDict(json_schema_extra=_not_null(UNCLEARABLE))

    name: Name | None = None
    kind: UnitKind | None = None
    parent: UnitCode | None = None
    webhook_url: WebhookUrl | None = None
    webhook_secret: WebhookSecret | None = None
    supervisor_contact: Name | None = None

    @model_validator(mode="after")
    def _required_stay_set(self) -> Self:
        _refuse_cleared(self, self.UNCLEARABLE)
        return self


# -- roads (一路一档案) ------------------------------------------------------------------


class RoadCreate(_Record):
    name: ShortText
    # The township unit that owns the covers on this road nobody else owns (DESIGN §6).
    township_unit: UnitCode | None = None


class Road(RoadCreate):
    id: int
    covers: int = 0


# -- per-cover thresholds ---------------------------------------------------------------

Degrees = Annotated[float, Field(gt=0, le=180, strict=True)]
Millimetres = Annotated[float, Field(gt=0, le=10_000, strict=True)]
Centimetres = Annotated[float, Field(gt=0, le=10_000, strict=True)]
Volts = Annotated[float, Field(gt=0, le=5, strict=True)]

# (lower, upper) pairs that must stay strictly ordered when both are overridden.
_ORDERED = (
    ("tilt_clear_deg", "tilt_warn_deg"),
    ("tilt_warn_deg", "tilt_open_deg"),
    ("tilt_clear_deg", "tilt_open_deg"),
    ("displacement_clear_mm", "displacement_raise_mm"),
    ("battery_low_v", "battery_ok_v"),
)


class ThresholdOverrides(_Record):
    """A cover's own alert thresholds (DESIGN §5); a field left out keeps the default.

    Names are those of `alerting.rules.Thresholds`, plus `water_limit_cm`, the cover's
    own water limit that replaces depth minus margin.
    """

    tilt_open_deg: Degrees | None = None
    tilt_warn_deg: Degrees | None = None
    tilt_clear_deg: Degrees | None = None
    displacement_raise_mm: Millimetres | None = None
    displacement_clear_mm: Millimetres | None = None
    water_limit_cm: Centimetres | None = None
    water_margin_cm: Centimetres | None = None
    water_clear_cm: Centimetres | None = None
    battery_low_v: Volts | None = None
    battery_ok_v: Volts | None = None

    @model_validator(mode="after")
    def _dead_bands_stay_open(self) -> Self:
        # A clear level at or above its raise level would leave no dead band: flapping.
        for lower, upper in _ORDERED:
            low, high = getattr(self, lower), getattr(self, upper)
            if low is not None and high is not None and low >= high:
                raise ValueError(f"{lower} ({low:g}) must be below {upper} ({high:g})")
        return self

    def thresholds(self) -> dict[str, float]:
        """The overridden fields of `alerting.rules.Thresholds`, for `dataclasses.replace`."""
        return self.model_dump(exclude_none=True, exclude={"water_limit_cm"})

    @property
    def empty(self) -> bool:
        return not self.model_dump(exclude_none=True)


# -- covers -----------------------------------------------------------------------------


class _CoverFields(_Record):
    """Everything about a cover but its number, as the census and the API give it."""

    maintainer_unit: UnitCode | None = None
    road: ShortText
    grid: ShortText | None = None
    lon: Longitude
    lat: Latitude
    depth_cm: DepthCm | None = None
    material: ShortText | None = None
    installed_on: IsoDate | None = None
    # Strict: 0, 1 or "yes" are not booleans (the schema says so, and a typo is caught).
    flood_prone: StrictBool = False
    anti_fall: StrictBool = False
    state: CoverState = CoverState.IN_SERVICE
    thresholds: ThresholdOverrides | None = None


class CoverCreate(_CoverFields):
    """A new cover. `kind_code` may be left out (it is the number's digits 7-10); without
    `owner_unit` only a class-14 cover is accepted, and it goes to its road's township."""

    cover_id: CoverNumber
    kind_code: KindCode | None = None
    owner_unit: UnitCode | None = None

    @model_validator(mode="after")
    def _kind_matches_number(self) -> Self:
        if self.kind_code is not None and self.kind_code != kind_code_of(self.cover_id):
            raise ValueError(
                f"kind_code {self.kind_code} differs from the cover number's class"
                f" {kind_code_of(self.cover_id)}"
            )
        return self


class CoverUpdate(_Record):
    """A partial change of a cover: only the fields given are changed (null clears)."""

    UNCLEARABLE: ClassVar[tuple[str, ...]] = (
        "owner_unit",
        "road",
        "lon",
        "lat",
        "flood_prone",
        "anti_fall",
        "state",
    )
    model_config = ConfigDict(json_schema_extra=_not_null(UNCLEARABLE))

    owner_unit: UnitCode | None = None
    maintainer_unit: UnitCode | None = None
    road: ShortText | None = None
    grid: ShortText | None = None
    lon: Longitude | None = None
    lat: Latitude | None = None
    depth_cm: DepthCm | None = None
    material: ShortText | None = None
    installed_on: IsoDate | None = None
    flood_prone: StrictBool | None = None
    anti_fall: StrictBool | None = None
    state: CoverState | None = None
    thresholds: ThresholdOverrides | None = None

    @model_validator(mode="after")
    def _required_stay_set(self) -> Self:
        _refuse_cleared(self, self.UNCLEARABLE)
        return self


class Cover(_CoverFields):
    """A cover as the registry holds it, with the device bound to it now."""

    cover_id: str
    kind_code: str
    owner_unit: str
    device_id: str | None = None
    created_at: datetime
    updated_at: datetime


# -- devices ----------------------------------------------------------------------------


class DeviceCreate(_Record):
    device_id: DeviceId
    model: ShortText | None = None
    report_interval_s: ReportInterval = DEFAULT_REPORT_INTERVAL_S
    # Readings pushed by that source under that id are this device's (both needed).
    source: SourceName | None = None
    external_id: ExternalId | None = None


class DeviceUpdate(_Record):
    UNCLEARABLE: ClassVar[tuple[str, ...]] = ("report_interval_s",)
    model_config = ConfigDict(json_schema_extra=_not_null(UNCLEARABLE))

    model: ShortText | None = None
    report_interval_s: ReportInterval | None = None
    source: SourceName | None = None
    external_id: ExternalId | None = None

    @model_validator(mode="after")
    def _interval_stays_set(self) -> Self:
        _refuse_cleared(self, self.UNCLEARABLE)
        return self


class Device(DeviceCreate):
    """A device as the registry holds it; its credentials are never shown, only whether
    it has some."""

    cover_id: str | None = None
    has_credentials: bool = False
    # As the device's IoT platform last reported it (null: never reported).
    online: bool | None = None
    status_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class EndReason(StrEnum):
    """Why a binding ended."""

    REPLACED = "replaced"  # another device was bound to the cover (theft, failure)
    MOVED = "moved"  # the device was bound to another cover
    UNBOUND = "unbound"  # taken off without a successor


class DeviceBinding(_Record):
    """One period during which a device was mounted on a cover."""

    device_id: str
    cover_id: str
    bound_at: datetime
    unbound_at: datetime | None = None
    end_reason: EndReason | None = None


def changes(update: BaseModel) -> dict[str, Any]:
    """The fields a partial update sets, with nested models left as models."""
    return {name: getattr(update, name) for name in update.model_fields_set}
