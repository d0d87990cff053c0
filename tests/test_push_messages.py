"""Platforms' push bodies read as their documentation shows them, field types as they vary."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from ingest.push.auth import onenet_signature, onenet_signed, top_level_texts
from ingest.push.messages import (
    PlatformMessage,
    PushMalformed,
    ctwing_messages,
    iotda_messages,
    onenet_messages,
)

VECTORS = Path(__file__).parent / "vectors"


def ctwing(**changes: Any) -> bytes:
    document = json.loads((VECTORS / "ctwing_data_report.json").read_text())
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not None}).encode()


def test_ctwing_data_report_of_the_documentation() -> None:
    [message] = ctwing_messages(ctwing())
    frame = base64.b64decode(json.loads(ctwing())["payload"]["APPdata"])
    assert message == PlatformMessage("867725030000001", frame, seq=None, ts_ms=1591185880926)


@pytest.mark.parametrize(
    ("changes", "seq", "external_id"),
    [
        ({"upPacketSN": ""}, None, "867725030000001"),
        ({"upPacketSN": 17}, 17, "867725030000001"),
        ({"upPacketSN": "18"}, 18, "867725030000001"),
        ({"IMEI": "undefined"}, None, "15044216867725030000001"),
        ({"IMEI": None}, None, "15044216867725030000001"),
        ({"IMEI": ""}, None, "15044216867725030000001"),
    ],
)
def test_ctwing_field_types_vary_and_are_accepted(
    changes: dict[str, Any], seq: int | None, external_id: str
) -> None:
    [message] = ctwing_messages(ctwing(**changes))
    assert (message.seq, message.external_id) == (seq, external_id)


def test_ctwing_thing_model_payload_status_and_other_types() -> None:
    service_data = {"serviceId": 1, "serviceData": {"tilt_deg": 3.0, "displacement_mm": 0}}
    [data] = ctwing_messages(ctwing(payload=service_data))
    assert data.payload == {"tilt_deg": 3.0, "displacement_mm": 0}
    offline = (
        (VECTORS / "ctwing_online_report.json")
        .read_text()
        .replace('"eventType": 1', '"eventType": 0')
    )
    [status] = ctwing_messages(offline.encode())
    assert (status.payload, status.online) == (None, False)
    assert ctwing_messages(ctwing(messageType="commandResponse")) == []
    with pytest.raises(PushMalformed, match="APPdata: not base64"):
        ctwing_messages(ctwing(payload={"APPdata": "not base64!"}))
    with pytest.raises(PushMalformed, match="not JSON"):
        ctwing_messages(b"{")


def test_onenet_batched_messages_status_and_command_results() -> None:
    point = json.loads((VECTORS / "onenet_datapoint_msg.json").read_text())
    hex_point = {**point, "dev_id": 7, "value": "AA55"}
    online = {"type": 2, "dev_id": 2016617, "status": 1, "login_type": 10, "at": 1}
    command = {"type": 7, "dev_id": 2016617, "cmd_type": 1, "cmd_id": "c1", "at": 1}
    messages = onenet_messages([point, hex_point, online, command])
    assert [(m.external_id, m.online) for m in messages] == [
        ("2016617", None),
        ("7", None),
        ("2016617", True),
    ]
    assert messages[0].payload == point["value"]
    assert messages[1].payload == b"\xaa\x55"  # hex text: the device's bytes


def test_onenet_signature_is_over_the_msg_text_as_sent() -> None:
    # base64(MD5(token + nonce + msg)), the documented recipe
    assert onenet_signature("token", "nonce", "msg") == "77VNMqxzbLpx1cb7nYVrtA=="
    assert onenet_signed("token", "nonce", "msg", "77VNMqxzbLpx1cb7nYVrtA==")
    assert not onenet_signed("token", "nonce", "msg ", "77VNMqxzbLpx1cb7nYVrtA==")
    # A `+` that reached us as a space (an unencoded URL) still matches.
    assert onenet_signed("token", "1", "msg", "z9Xv IoOLDsGIksH v BYA==")
    body = b'{"msg": {"b": 1,  "a": [1,2]}, "nonce": "n", "msg_signature": "s"}'
    assert top_level_texts(body)["msg"][0] == '{"b": 1,  "a": [1,2]}'  # spacing kept


def test_iotda_property_report_and_status() -> None:
    document = json.loads((VECTORS / "iotda_property_report.json").read_text())
    [message] = iotda_messages(json.dumps(document).encode())
    assert message.external_id == "5f1e2c0d8e3c_868120000000003"
    assert message.ts_ms == 1449922332000  # 20151212T121212Z
    assert isinstance(message.payload, dict)
    assert message.payload["displacement_mm"] == 25.0
    status = {
        "resource": "device.status",
        "event": "update",
        "notify_data": {"header": {"device_id": "d1"}, "body": {"status": "OFFLINE"}},
    }
    [offline] = iotda_messages(json.dumps(status).encode())
    assert (offline.external_id, offline.online) == ("d1", False)
    del document["notify_data"]["body"]["services"]
    with pytest.raises(PushMalformed, match="services"):
        iotda_messages(json.dumps(document).encode())
