"""What a codec is, its one error, and how its output becomes validated readings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from core.contract import Decoded, Reason, Rejection, validate_fields

# What a codec is given: the raw bytes of a frame or JSON text, or a JSON object a
# platform has already parsed (ChirpStack's `object`, IoTDA's `properties`).
Payload = bytes | dict[str, Any]
# One reading's fields with the contract's names (core.contract), not yet validated.
Fields = dict[str, Any]

# The names a codec may produce: the v1 reading's fields but `device_id`, which always
# comes from the envelope (the registry device the source's external id maps to).
READING_FIELDS = (
    "seq",
    "ts",
    "tilt_deg",
    "displacement_mm",
    "water_level_cm",
    "battery_v",
    "rssi_dbm",
    "temperature_c",
)
INTEGER_FIELDS = frozenset({"seq", "rssi_dbm"})


class CodecError(Exception):
    """The payload cannot be read by this model's codec; the message says exactly why."""


@runtime_checkable
class Codec(Protocol):
    """Turns one payload into the fields of one or more readings, or raises CodecError.

    Pure: no I/O, no clock. Validation (ranges, times) is not its job: every codec's output
    passes the contract's checks in `decode_payload`.
    """

    @property
    def model(self) -> str: ...

    def decode(self, payload: Payload) -> list[Fields]: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the transport knows of a payload, supplied where the payload lacks it."""

    device_id: str
    now_ms: int
    seq: int | None = None  # the platform's packet number, LoRaWAN's fCnt
    ts_ms: int | None = None  # the platform's time of receipt


def decode_payload(codec: Codec, payload: Payload, envelope: Envelope) -> Decoded:
    """Decodes and validates; never raises on bad input (a failure is a rejection)."""
    try:
        items = codec.decode(payload)
    except CodecError as exc:
        return Decoded([], [Rejection(Reason.DECODE_FAILED, f"{codec.model}: {exc}")])
    decoded = Decoded([], [])
    for fields in items:
        one = _validate(dict(fields), envelope)
        decoded.readings.extend(one.readings)
        decoded.rejections.extend(one.rejections)
    return decoded


def _validate(fields: Fields, envelope: Envelope) -> Decoded:
    named = fields.pop("device_id", envelope.device_id)
    if named != envelope.device_id:
        detail = f"payload names {str(named)[:64]!r}, the source maps it to {envelope.device_id!r}"
        return Decoded([], [Rejection(Reason.TOPIC_MISMATCH, detail)])
    if "seq" not in fields and envelope.seq is not None:
        fields["seq"] = envelope.seq
    if "ts" not in fields and envelope.ts_ms is not None:
        fields["ts"] = envelope.ts_ms
    return validate_fields(envelope.device_id, fields, envelope.now_ms)
