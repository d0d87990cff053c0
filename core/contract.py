"""MQTT wire contract v1 (DESIGN §3): topics, the reading, and decoding with reason codes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_PAYLOAD_BYTES = 8 * 1024
MAX_BATCH_READINGS = 100
FUTURE_LIMIT_MS = 10 * 60 * 1000  # a device clock more than 10 min ahead is wrong
STALE_LIMIT_MS = 7 * 24 * 3600 * 1000  # older than a week: not telemetry any more
SEQ_MAX = 2**32 - 1

DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # always used with fullmatch
TELEMETRY_TOPIC = "covers/{device_id}/telemetry"
STATUS_TOPIC = "covers/{device_id}/status"
ALERTS_TOPIC = "alerts/{unit_code}"
TELEMETRY_FILTER = "covers/+/telemetry"
STATUS_FILTER = "covers/+/status"


class Reason(StrEnum):
    """Why a message (or one reading of a batch) was dead-lettered."""

    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    SCHEMA = "schema"
    TOPIC_MISMATCH = "topic_mismatch"
    OUT_OF_RANGE = "out_of_range"
    TOO_LARGE = "too_large"
    FUTURE_TS = "future_ts"
    STALE_TS = "stale_ts"
    STORE_REJECTED = "store_rejected"
    RATE_LIMITED = "rate_limited"  # the device's messages come far faster than a sensor's
    # Ingress from IoT platforms and vendor frames (DESIGN §12).
    BAD_SIGNATURE = "bad_signature"  # a push whose signature or token is wrong: refused, 401
    UNKNOWN_DEVICE = "unknown_device"  # no registry device has that source's external id
    DECODE_FAILED = "decode_failed"  # the device model's codec could not read the payload


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated measurement of one device, timestamped by the device (epoch ms)."""

    device_id: str
    seq: int
    ts_ms: int
    tilt_deg: float
    displacement_mm: float
    water_level_cm: float | None = None
    battery_v: float | None = None
    rssi_dbm: int | None = None
    temperature_c: float | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message, or one reading inside a batch, that is not stored, and why."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Decoded:
    readings: list[Reading]
    rejections: list[Rejection]


def _ts_to_ms(value: int | str) -> int:
    if isinstance(value, int):
        return value
    if "T" not in value and "t" not in value:
        raise ValueError("ts string must be RFC 3339, e.g. 2026-11-28T10:00:00Z")
    # RFC 3339 allows a lower-case "t" and "z"; fromisoformat does not before Python 3.12.
    stamp = datetime.fromisoformat(value.upper())
    if stamp.tzinfo is None:
        raise ValueError("ts string must carry a UTC offset (RFC 3339)")
    return round(stamp.timestamp() * 1000)


class _ReadingFields(BaseModel):
    """The fields of a reading without `device_id` (the form inside a batch)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    seq: Annotated[int, Field(ge=0, le=SEQ_MAX)]
    ts: int | str
    tilt_deg: Annotated[float, Field(ge=0, le=180)]
    displacement_mm: Annotated[float, Field(ge=0)]
    water_level_cm: Annotated[float, Field(ge=0)] | None = None
    battery_v: Annotated[float, Field(ge=0, le=5)] | None = None
    rssi_dbm: Annotated[int, Field(ge=-150, le=0)] | None = None
    temperature_c: Annotated[float, Field(ge=-50, le=100)] | None = None

    @field_validator("ts")
    @classmethod
    def _ts_is_time(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise pydantic_core.PydanticCustomError("out_of_range", "ts before 1970")
        if isinstance(value, str):
            try:
                _ts_to_ms(value)
            except ValueError as exc:
                raise pydantic_core.PydanticCustomError("ts_format", str(exc)) from None
        return value


class _ReadingMessage(_ReadingFields):
    device_id: str


_RANGE_ERRORS = frozenset(
    {
        "greater_than_equal",
        "less_than_equal",
        "greater_than",
        "less_than",
        "finite_number",
        "out_of_range",
    }
)


def _classify(error: ValidationError) -> Rejection:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    detail = f"{where}: {first['msg']}"
    if all(item["type"] in _RANGE_ERRORS for item in error.errors(include_url=False)):
        return Rejection(Reason.OUT_OF_RANGE, detail)
    return Rejection(Reason.SCHEMA, detail)


def _to_reading(device_id: str, fields: _ReadingFields) -> Reading:
    return Reading(
        device_id=device_id,
        seq=fields.seq,
        ts_ms=_ts_to_ms(fields.ts),
        tilt_deg=float(fields.tilt_deg),
        displacement_mm=float(fields.displacement_mm),
        water_level_cm=None if fields.water_level_cm is None else float(fields.water_level_cm),
        battery_v=None if fields.battery_v is None else float(fields.battery_v),
        rssi_dbm=fields.rssi_dbm,
        temperature_c=None if fields.temperature_c is None else float(fields.temperature_c),
    )


def _check_time(reading: Reading, now_ms: int) -> Rejection | None:
    if reading.ts_ms > now_ms + FUTURE_LIMIT_MS:
        return Rejection(Reason.FUTURE_TS, f"ts {reading.ts_ms} is more than 10 min ahead")
    if reading.ts_ms < now_ms - STALE_LIMIT_MS:
        return Rejection(Reason.STALE_TS, f"ts {reading.ts_ms} is more than 7 days old")
    return None


class TelemetryDecoder:
    """Turns a telemetry message into readings and rejections; never raises on bad input.

    Pure apart from the clock, which is passed in so tests decide what "now" is.
    """

    def decode(self, topic_device_id: str, payload: bytes, now_ms: int) -> Decoded:
        if not DEVICE_ID.fullmatch(topic_device_id):
            return _rejected(
                Reason.SCHEMA,
                f"device_id {topic_device_id[:64]!r} is not 1-64 characters of [A-Za-z0-9_.-]",
            )
        if len(payload) > MAX_PAYLOAD_BYTES:
            return _rejected(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            # The fast path: one well-formed reading, validated straight from the bytes.
            message = _ReadingMessage.model_validate_json(payload)
        except ValidationError:
            return self._decode_slowly(topic_device_id, payload, now_ms)
        if message.device_id != topic_device_id:
            return _rejected(Reason.TOPIC_MISMATCH, _mismatch(message.device_id, topic_device_id))
        return self._accept([(topic_device_id, message)], now_ms)

    def _decode_slowly(self, topic_device_id: str, payload: bytes, now_ms: int) -> Decoded:
        """Classifies a message that is not one valid reading: a batch, or something bad."""
        try:
            document = pydantic_core.from_json(payload)
        except ValueError as exc:
            return _rejected(Reason.BAD_JSON, str(exc))
        if not isinstance(document, dict):
            return _rejected(Reason.NOT_OBJECT, f"top level is {type(document).__name__}")
        device_id = document.get("device_id")
        if not isinstance(device_id, str):
            return _rejected(Reason.SCHEMA, "device_id: missing or not a string")
        if device_id != topic_device_id:
            return _rejected(Reason.TOPIC_MISMATCH, _mismatch(device_id, topic_device_id))
        if "readings" in document:
            return self._decode_batch(device_id, document["readings"], now_ms)
        try:
            single = _ReadingMessage.model_validate(document)
        except ValidationError as exc:
            return Decoded([], [_classify(exc)])
        return self._accept([(device_id, single)], now_ms)

    def _decode_batch(self, device_id: str, items: Any, now_ms: int) -> Decoded:
        if not isinstance(items, list):
            return _rejected(Reason.SCHEMA, "readings: not a list")
        if len(items) > MAX_BATCH_READINGS:
            return _rejected(Reason.SCHEMA, f"readings: {len(items)} > {MAX_BATCH_READINGS}")
        valid: list[tuple[str, _ReadingFields]] = []
        rejections: list[Rejection] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                rejections.append(Rejection(Reason.NOT_OBJECT, f"readings[{index}] not object"))
                continue
            try:
                valid.append((device_id, _ReadingFields.model_validate(item)))
            except ValidationError as exc:
                found = _classify(exc)
                rejections.append(Rejection(found.reason, f"readings[{index}].{found.detail}"))
        accepted = self._accept(valid, now_ms)
        return Decoded(accepted.readings, rejections + accepted.rejections)

    @staticmethod
    def _accept(items: list[tuple[str, _ReadingFields]], now_ms: int) -> Decoded:
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        for device_id, fields in items:
            reading = _to_reading(device_id, fields)
            rejection = _check_time(reading, now_ms)
            if rejection is None:
                readings.append(reading)
            else:
                rejections.append(rejection)
        return Decoded(readings, rejections)


def validate_fields(device_id: str, fields: dict[str, Any], now_ms: int) -> Decoded:
    """Validates one reading's fields (as a codec produced them) by the contract's rules:
    the same checks, ranges and time limits as a v1 message on the broker."""
    if not DEVICE_ID.fullmatch(device_id):
        return _rejected(Reason.SCHEMA, f"device_id {device_id[:64]!r} is not a device id")
    try:
        checked = _ReadingFields.model_validate(fields)
    except ValidationError as exc:
        return Decoded([], [_classify(exc)])
    return TelemetryDecoder._accept([(device_id, checked)], now_ms)


def _rejected(reason: Reason, detail: str) -> Decoded:
    return Decoded([], [Rejection(reason, detail)])


def _mismatch(payload_id: str, topic_id: str) -> str:
    return f"device_id {payload_id[:64]!r} does not match topic segment {topic_id!r}"


def device_id_from_topic(topic: str) -> str | None:
    """`covers/{device_id}/telemetry` → device_id, or None when the topic is not ours."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "covers" or parts[2] != "telemetry":
        return None
    return parts[1] if DEVICE_ID.fullmatch(parts[1]) else None
