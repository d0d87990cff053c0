"""What a platform's push holds, read the way each platform documents it.

Each parser turns one request body into platform messages: a device's data (its payload
for the codec, with the platform's sequence number and time when it has them) or its
online/offline status. Messages of other types (command answers, device added…) are
left out: nothing to store. A body that is not the platform's shape is PushMalformed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest.codecs.base import Payload


class PushMalformed(Exception):
    """The body is not what the platform sends; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class PlatformMessage:
    external_id: str  # the device's id on the platform: IMEI, platform device id
    payload: Payload | None  # None: a status message
    seq: int | None = None
    ts_ms: int | None = None
    online: bool | None = None  # a status message: True online, False offline


_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def _object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PushMalformed(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PushMalformed(f"top level is {type(document).__name__}, not an object")
    return document


def _int_or_none(value: Any) -> int | None:
    """A number as platforms send it: 12, "12", or nothing meaningful (-1, "", null)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _text_id(value: Any) -> str | None:
    # CTWing sends "undefined" (and "") for an id it does not have.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and value != "undefined":
        return value.strip()
    return None


def _value_payload(value: Any) -> Payload:
    """A platform field holding the device's data: an object, hex text, or other text."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return bytes.fromhex(value) if _HEX.fullmatch(value) else value.encode()
    raise PushMalformed(f"device data is {type(value).__name__}, not an object or text")


# -- CTWing (天翼物联 AIoT): 数据变化通知 dataReport, 设备上下线 deviceOnlineOfflineReport -----


def ctwing_messages(body: bytes) -> list[PlatformMessage]:
    document = _object(body)
    external_id = _text_id(document.get("IMEI")) or _text_id(document.get("deviceId"))
    kind = document.get("messageType")
    if kind not in ("dataReport", "deviceOnlineOfflineReport"):
        return []  # command answers, events, device added/deleted: nothing to store
    if external_id is None:
        raise PushMalformed("neither IMEI nor deviceId names the device")
    ts_ms = _int_or_none(document.get("timestamp"))
    if kind == "deviceOnlineOfflineReport":
        online = _int_or_none(document.get("eventType")) == 1
        return [PlatformMessage(external_id, None, ts_ms=ts_ms, online=online)]
    return [
        PlatformMessage(
            external_id,
            _ctwing_payload(document.get("payload")),
            seq=_int_or_none(document.get("upPacketSN")),
            ts_ms=ts_ms,
        )
    ]


def _ctwing_payload(payload: Any) -> Payload:
    if not isinstance(payload, dict):
        raise PushMalformed("payload: not an object")
    if "APPdata" in payload:  # a transparent product: the device's bytes, base64
        try:
            return base64.b64decode(str(payload["APPdata"]), validate=True)
        except (binascii.Error, ValueError):
            raise PushMalformed("payload.APPdata: not base64") from None
    data = payload.get("serviceData", payload)  # a thing-model product: decoded JSON
    if not isinstance(data, dict):
        raise PushMalformed("payload.serviceData: not an object")
    return data


# -- OneNET: HTTP 推送, {"msg": …, "msg_signature": …, "nonce": …} ---------------------------


def onenet_messages(msg: Any) -> list[PlatformMessage]:
    """The messages of a verified `msg`: one object, or a list of them (batched push)."""
    items = msg if isinstance(msg, list) else [msg]
    messages: list[PlatformMessage] = []
    for item in items:
        if not isinstance(item, dict):
            raise PushMalformed("msg: not an object")
        external_id = _text_id(item.get("dev_id")) or _text_id(item.get("imei"))
        kind = item.get("type")
        if kind not in (1, 2):
            continue  # 7: a cached command's result
        if external_id is None:
            raise PushMalformed("msg: dev_id missing")
        ts_ms = _int_or_none(item.get("at"))
        if kind == 2:
            online = _int_or_none(item.get("status")) == 1
            messages.append(PlatformMessage(external_id, None, ts_ms=ts_ms, online=online))
        else:
            payload = _value_payload(item.get("value"))
            messages.append(PlatformMessage(external_id, payload, ts_ms=ts_ms))
    return messages


# -- Huawei IoTDA: 数据转发 HTTP push, resource device.property, event report ---------------


def iotda_messages(body: bytes) -> list[PlatformMessage]:
    document = _object(body)
    resource, event = document.get("resource"), document.get("event")
    notify = document.get("notify_data")
    if not isinstance(notify, dict):
        raise PushMalformed("notify_data: not an object")
    header = notify.get("header") or {}
    external_id = _text_id(header.get("device_id")) if isinstance(header, dict) else None
    if external_id is None:
        raise PushMalformed("notify_data.header.device_id missing")
    body_part = notify.get("body") or {}
    if resource == "device.status" and event == "update":
        online = isinstance(body_part, dict) and body_part.get("status") == "ONLINE"
        return [PlatformMessage(external_id, None, online=online)]
    if (resource, event) != ("device.property", "report"):
        return []
    services = body_part.get("services") if isinstance(body_part, dict) else None
    if not isinstance(services, list) or not services:
        raise PushMalformed("notify_data.body.services: not a list of services")
    # A device's services' properties, together: one reading (names do not collide in a
    # cover sensor's model; the first service's time is the reading's).
    properties: dict[str, Any] = {}
    for service in services:
        if not isinstance(service, dict) or not isinstance(service.get("properties"), dict):
            raise PushMalformed("notify_data.body.services[]: properties missing")
        properties.update(service["properties"])
    ts_ms = _iotda_time(services[0].get("event_time"))
    return [PlatformMessage(external_id, properties, ts_ms=ts_ms)]


def _iotda_time(value: Any) -> int | None:
    """IoTDA's times: yyyyMMdd'T'HHmmss'Z' (UTC)."""
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return round(stamp.timestamp() * 1000)


# -- http-json: our own v1 JSON whose device_id is the device's external id --------------


def http_json_messages(body: bytes) -> list[PlatformMessage]:
    document = _object(body)
    external_id = _text_id(document.pop("device_id", None))
    if external_id is None:
        raise PushMalformed("device_id: missing (the device's external id on this source)")
    return [PlatformMessage(external_id, document)]
