"""The parts of a declarative codec file both kinds share: names, scaling, times."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.codecs.base import INTEGER_FIELDS, CodecError

FieldName = Literal[
    "seq",
    "ts",
    "tilt_deg",
    "displacement_mm",
    "water_level_cm",
    "battery_v",
    "rssi_dbm",
    "temperature_c",
]
# How a `ts` field is written: epoch milliseconds or seconds, or an RFC 3339 string.
TimeFormat = Literal["epoch_ms", "epoch_s", "rfc3339"]
ModelName = str


class Strict(BaseModel):
    """Declarative files are refused on any unknown key: a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Scaled(Strict):
    """value * scale + add, e.g. centidegrees: scale 0.01; millimetres to cm: 0.1."""

    scale: float = 1.0
    add: float = 0.0
    time: TimeFormat | None = None  # only for `ts`


class CodecFile(Strict):
    """The header of every codec file."""

    model: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    kind: Literal["json", "binary"]
    description: str = ""

    @model_validator(mode="after")
    def _ts_has_a_format(self) -> CodecFile:
        fields: dict[str, Scaled] = getattr(self, "fields", {})
        for name, spec in fields.items():
            if (name == "ts") != (spec.time is not None):
                raise ValueError(
                    f"fields.{name}: `time` (epoch_ms, epoch_s, rfc3339) is for ts, and ts needs it"
                )
        return self


def convert(name: str, spec: Scaled, value: Any) -> Any:
    """A raw value as the contract's field `name` wants it, or CodecError."""
    if spec.time == "rfc3339":
        if not isinstance(value, str):
            raise CodecError(f"{name}: expected an RFC 3339 string, got {value!r:.40}")
        return value
    # Rounded: 3 × 0.1 is 0.30000000000000004 in binary floating point, not a sensor's 0.3.
    number = round(_number(name, value) * spec.scale + spec.add, 9)
    if spec.time == "epoch_s":
        return round(number * 1000)
    if spec.time == "epoch_ms" or name in INTEGER_FIELDS:
        if number != round(number):
            raise CodecError(f"{name}: {number} is not a whole number")
        return round(number)
    return float(number)


def _number(name: str, value: Any) -> float:
    # Vendors and platforms send numbers as text too ("23.5"); both are read.
    if isinstance(value, bool):
        raise CodecError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise CodecError(f"{name}: expected a number, got {value!r:.40}")
