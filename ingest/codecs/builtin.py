"""The codecs written in Python that ship with smartcover: v1 JSON and ChirpStack's object."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from core.contract import MAX_BATCH_READINGS
from ingest.codecs.base import READING_FIELDS, CodecError, Fields, Payload
from ingest.codecs.json_paths import as_json_object

V1_MODEL = "v1"
CHIRPSTACK_OBJECT_MODEL = "chirpstack-object"


def _v1_document(payload: Payload) -> dict[str, Any]:
    """The JSON object, or the same JSON base64-encoded (a platform's payload field)."""
    if isinstance(payload, dict):
        return payload
    try:
        return as_json_object(payload)
    except CodecError as not_json:
        try:
            inner = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise not_json from None
        return as_json_object(inner)


def _fields(item: dict[str, Any]) -> Fields:
    # Only the contract's names: extra fields are ignored, as on the broker (DESIGN §3).
    found = {name: item[name] for name in READING_FIELDS if name in item}
    if "device_id" in item:
        found["device_id"] = item["device_id"]
    return found


class V1Codec:
    """The v1 reading of DESIGN §3 (one reading or a batch); `device_id`, `seq` and `ts`
    may be left to the envelope."""

    model = V1_MODEL

    def decode(self, payload: Payload) -> list[Fields]:
        document = _v1_document(payload)
        if "readings" not in document:
            return [_fields(document)]
        items = document["readings"]
        if not isinstance(items, list) or len(items) > MAX_BATCH_READINGS:
            raise CodecError(f"readings: not a list of at most {MAX_BATCH_READINGS}")
        if not all(isinstance(item, dict) for item in items):
            raise CodecError("readings: every item must be an object")
        named = {"device_id": document["device_id"]} if "device_id" in document else {}
        return [{**named, **_fields(item)} for item in items]


class ChirpStackObjectCodec:
    """ChirpStack's `object`: the network server's own JavaScript codec already produced
    the v1 field names; `seq` comes from `fCnt` and `ts` from `time` (the envelope)."""

    model = CHIRPSTACK_OBJECT_MODEL

    def decode(self, payload: Payload) -> list[Fields]:
        return [_fields(as_json_object(payload))]
