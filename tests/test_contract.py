"""The MQTT wire contract v1 (DESIGN §3): decoding telemetry into readings and reason codes."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any, NamedTuple

import pytest

from core.contract import (
    MAX_PAYLOAD_BYTES,
    Decoded,
    Reading,
    Reason,
    TelemetryDecoder,
    device_id_from_topic,
)

DEVICE = "MH-0001.a_b"
# 2027-01-15T08:00:00Z: "now" for every case, so RFC 3339 strings below are easy to check.
NOW_MS = 1_800_000_000_000
MINUTE_MS = 60_000
DAY_MS = 24 * 60 * MINUTE_MS


def reading(**changes: Any) -> dict[str, Any]:
    """A valid single reading (required fields only), with `changes` applied; None drops."""
    document: dict[str, Any] = {
        "device_id": DEVICE,
        "seq": 7,
        "ts": NOW_MS,
        "tilt_deg": 1.5,
        "displacement_mm": 0.25,
    }
    document.update(changes)
    return {key: value for key, value in document.items() if value is not None}


def item(**changes: Any) -> dict[str, Any]:
    """A valid reading as it appears inside a batch: without `device_id`."""
    document = reading(**changes)
    del document["device_id"]
    return document


def batch(readings: Any, device_id: str = DEVICE) -> dict[str, Any]:
    return {"device_id": device_id, "readings": readings}


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def padded(document: dict[str, Any], size: int) -> bytes:
    """`document` as JSON of exactly `size` bytes, grown by an unknown (ignored) field."""
    bare = encode({**document, "pad": ""})
    payload = encode({**document, "pad": "x" * (size - len(bare))})
    assert len(payload) == size
    return payload


def decode(payload: bytes, topic_device_id: str = DEVICE) -> Decoded:
    return TelemetryDecoder().decode(topic_device_id, payload, NOW_MS)


# --- accepted readings -----------------------------------------------------------------


class Accepted(NamedTuple):
    name: str
    payload: bytes
    expected: Reading


def expect(**changes: Any) -> Reading:
    fields: dict[str, Any] = {
        "device_id": DEVICE,
        "seq": 7,
        "ts_ms": NOW_MS,
        "tilt_deg": 1.5,
        "displacement_mm": 0.25,
    }
    fields.update(changes)
    return Reading(**fields)


ALL_FIELDS = {
    "water_level_cm": 120.5,
    "battery_v": 3.61,
    "rssi_dbm": -87,
    "temperature_c": -4.25,
}

ACCEPTED = [
    Accepted("required-only", encode(reading()), expect()),
    Accepted("all-fields", encode(reading(**ALL_FIELDS)), expect(**ALL_FIELDS)),
    Accepted("ts-epoch-ms", encode(reading(ts=NOW_MS - 1234)), expect(ts_ms=NOW_MS - 1234)),
    Accepted("ts-rfc3339-z", encode(reading(ts="2027-01-15T08:00:00Z")), expect()),
    Accepted("ts-rfc3339-offset", encode(reading(ts="2027-01-15T16:00:00+08:00")), expect()),
    Accepted(
        "ts-rfc3339-negative-offset",
        encode(reading(ts="2027-01-15T03:30:00-04:30")),
        expect(),
    ),
    Accepted(
        "ts-rfc3339-fraction-ms",
        encode(reading(ts="2027-01-15T08:00:00.250Z")),
        expect(ts_ms=NOW_MS + 250),
    ),
    Accepted(
        "ts-rfc3339-fraction-us-offset",
        encode(reading(ts="2027-01-15T16:00:00.123456+08:00")),
        expect(ts_ms=NOW_MS + 123),
    ),
    Accepted(
        "ts-rfc3339-fraction-one-digit",
        encode(reading(ts="2027-01-15T07:59:59.5Z")),
        expect(ts_ms=NOW_MS - 500),
    ),
    # RFC 3339 §5.6: "T" and "Z" may alternatively be lower case.
    Accepted("ts-rfc3339-lower-case", encode(reading(ts="2027-01-15t08:00:00z")), expect()),
    Accepted(
        "unknown-fields-ignored",
        encode(reading(firmware="1.2.3", extra={"a": [1, 2]}, flag=True)),
        expect(),
    ),
    Accepted(
        "int-for-float-fields",
        encode(
            reading(
                tilt_deg=3,
                displacement_mm=0,
                water_level_cm=12,
                battery_v=4,
                temperature_c=-7,
            )
        ),
        expect(
            tilt_deg=3.0,
            displacement_mm=0.0,
            water_level_cm=12.0,
            battery_v=4.0,
            temperature_c=-7.0,
        ),
    ),
    Accepted("tilt-0", encode(reading(tilt_deg=0)), expect(tilt_deg=0.0)),
    Accepted("tilt-180", encode(reading(tilt_deg=180)), expect(tilt_deg=180.0)),
    Accepted("seq-0", encode(reading(seq=0)), expect(seq=0)),
    Accepted("seq-max", encode(reading(seq=2**32 - 1)), expect(seq=2**32 - 1)),
    Accepted("battery-0", encode(reading(battery_v=0)), expect(battery_v=0.0)),
    Accepted("battery-5", encode(reading(battery_v=5.0)), expect(battery_v=5.0)),
    Accepted("rssi-0", encode(reading(rssi_dbm=0)), expect(rssi_dbm=0)),
    Accepted("rssi-minus-150", encode(reading(rssi_dbm=-150)), expect(rssi_dbm=-150)),
    Accepted("temperature-100", encode(reading(temperature_c=100)), expect(temperature_c=100.0)),
    Accepted(
        "temperature-minus-50", encode(reading(temperature_c=-50)), expect(temperature_c=-50.0)
    ),
    Accepted("water-0", encode(reading(water_level_cm=0)), expect(water_level_cm=0.0)),
    Accepted(
        "future-9-min",
        encode(reading(ts=NOW_MS + 9 * MINUTE_MS)),
        expect(ts_ms=NOW_MS + 9 * MINUTE_MS),
    ),
    Accepted(
        "future-exactly-10-min",
        encode(reading(ts=NOW_MS + 10 * MINUTE_MS)),
        expect(ts_ms=NOW_MS + 10 * MINUTE_MS),
    ),
    Accepted(
        "stale-6-days",
        encode(reading(ts=NOW_MS - 6 * DAY_MS)),
        expect(ts_ms=NOW_MS - 6 * DAY_MS),
    ),
    Accepted(
        "stale-exactly-7-days",
        encode(reading(ts=NOW_MS - 7 * DAY_MS)),
        expect(ts_ms=NOW_MS - 7 * DAY_MS),
    ),
    Accepted("exactly-8-KiB", padded(reading(), MAX_PAYLOAD_BYTES), expect()),
    Accepted("batch-of-one", encode(batch([item(seq=3)])), expect(seq=3)),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.name)
def test_accepted(case: Accepted) -> None:
    decoded = decode(case.payload)

    assert decoded.rejections == []
    assert decoded.readings == [case.expected]
    assert_types(decoded.readings[0])


def assert_types(found: Reading) -> None:
    """Equality alone would let 3 pass for 3.0; the store needs each field's own type."""
    floats = [found.tilt_deg, found.displacement_mm, found.water_level_cm, found.battery_v]
    floats.append(found.temperature_c)
    assert all(value is None or type(value) is float for value in floats)
    assert found.rssi_dbm is None or type(found.rssi_dbm) is int
    assert type(found.seq) is int
    assert type(found.ts_ms) is int


# --- rejected messages -----------------------------------------------------------------


class Rejected(NamedTuple):
    name: str
    payload: bytes
    reason: Reason


FUTURE_MS = NOW_MS + 10 * MINUTE_MS + 1000
STALE_MS = NOW_MS - 7 * DAY_MS - 1000
VALID = encode(reading())

REJECTED = [
    # bad_json
    Rejected("bad-json-empty", b"", Reason.BAD_JSON),
    Rejected("bad-json-garbage", b"tilt=3 seq=1", Reason.BAD_JSON),
    Rejected("bad-json-truncated", VALID[: len(VALID) // 2], Reason.BAD_JSON),
    Rejected("bad-json-trailing-garbage", VALID + b" }", Reason.BAD_JSON),
    Rejected("bad-json-invalid-utf8", b"\xff\xfe\xfd", Reason.BAD_JSON),
    Rejected(
        "bad-json-invalid-utf8-in-string",
        VALID[:-1] + b', "note": "\xc3\x28"}',
        Reason.BAD_JSON,
    ),
    Rejected("bad-json-single-quotes", b"{'device_id': 'x'}", Reason.BAD_JSON),
    # not_object
    Rejected("not-object-array", encode([reading()]), Reason.NOT_OBJECT),
    Rejected("not-object-empty-array", b"[]", Reason.NOT_OBJECT),
    Rejected("not-object-number", b"42", Reason.NOT_OBJECT),
    Rejected("not-object-string", b'"hello"', Reason.NOT_OBJECT),
    Rejected("not-object-null", b"null", Reason.NOT_OBJECT),
    Rejected("not-object-bool", b"true", Reason.NOT_OBJECT),
    # schema
    Rejected("schema-missing-device-id", encode(reading(device_id=None)), Reason.SCHEMA),
    Rejected("schema-missing-seq", encode(reading(seq=None)), Reason.SCHEMA),
    Rejected("schema-missing-ts", encode(reading(ts=None)), Reason.SCHEMA),
    Rejected("schema-missing-tilt", encode(reading(tilt_deg=None)), Reason.SCHEMA),
    Rejected("schema-missing-displacement", encode(reading(displacement_mm=None)), Reason.SCHEMA),
    Rejected("schema-empty-object", b"{}", Reason.SCHEMA),
    Rejected("schema-string-tilt", encode(reading(tilt_deg="3.0")), Reason.SCHEMA),
    Rejected("schema-bool-tilt", encode(reading(tilt_deg=True)), Reason.SCHEMA),
    Rejected("schema-bool-seq", encode(reading(seq=True)), Reason.SCHEMA),
    Rejected("schema-float-seq", encode(reading(seq=1.5)), Reason.SCHEMA),
    Rejected("schema-string-seq", encode(reading(seq="7")), Reason.SCHEMA),
    Rejected("schema-float-rssi", encode(reading(rssi_dbm=-70.5)), Reason.SCHEMA),
    Rejected("schema-string-water", encode(reading(water_level_cm="high")), Reason.SCHEMA),
    Rejected("schema-ts-float", encode(reading(ts=1.8e12)), Reason.SCHEMA),
    Rejected("schema-ts-bool", encode(reading(ts=True)), Reason.SCHEMA),
    Rejected("schema-ts-without-offset", encode(reading(ts="2027-01-15T08:00:00")), Reason.SCHEMA),
    Rejected("schema-ts-date-only", encode(reading(ts="2027-01-15")), Reason.SCHEMA),
    Rejected("schema-ts-not-a-time", encode(reading(ts="yesterday")), Reason.SCHEMA),
    Rejected("schema-ts-bad-date", encode(reading(ts="2027-02-30T08:00:00Z")), Reason.SCHEMA),
    Rejected("schema-device-id-number", encode(reading(device_id=42)), Reason.SCHEMA),
    Rejected("schema-device-id-list", encode(reading(device_id=[DEVICE])), Reason.SCHEMA),
    Rejected("schema-readings-object", encode(batch({"0": item()})), Reason.SCHEMA),
    Rejected("schema-readings-string", encode(batch("none")), Reason.SCHEMA),
    Rejected("schema-readings-null", encode(batch(None)), Reason.SCHEMA),
    Rejected(
        "schema-over-100-readings",
        encode(batch([item(seq=n) for n in range(101)])),
        Reason.SCHEMA,
    ),
    Rejected("schema-batch-without-device-id", encode({"readings": [item()]}), Reason.SCHEMA),
    # topic_mismatch
    Rejected("topic-mismatch-single", encode(reading(device_id="MH-0002")), Reason.TOPIC_MISMATCH),
    Rejected(
        "topic-mismatch-case", encode(reading(device_id=DEVICE.lower())), Reason.TOPIC_MISMATCH
    ),
    Rejected("topic-mismatch-batch", encode(batch([item()], "MH-0002")), Reason.TOPIC_MISMATCH),
    # out_of_range
    Rejected("range-tilt-181", encode(reading(tilt_deg=181)), Reason.OUT_OF_RANGE),
    Rejected("range-tilt-just-over", encode(reading(tilt_deg=180.001)), Reason.OUT_OF_RANGE),
    Rejected("range-tilt-minus-1", encode(reading(tilt_deg=-1)), Reason.OUT_OF_RANGE),
    Rejected(
        "range-displacement-negative", encode(reading(displacement_mm=-0.1)), Reason.OUT_OF_RANGE
    ),
    Rejected("range-battery-5.1", encode(reading(battery_v=5.1)), Reason.OUT_OF_RANGE),
    Rejected("range-battery-negative", encode(reading(battery_v=-0.1)), Reason.OUT_OF_RANGE),
    Rejected("range-rssi-1", encode(reading(rssi_dbm=1)), Reason.OUT_OF_RANGE),
    Rejected("range-rssi-minus-151", encode(reading(rssi_dbm=-151)), Reason.OUT_OF_RANGE),
    Rejected("range-temperature-101", encode(reading(temperature_c=101)), Reason.OUT_OF_RANGE),
    Rejected("range-temperature-minus-51", encode(reading(temperature_c=-51)), Reason.OUT_OF_RANGE),
    Rejected("range-seq-minus-1", encode(reading(seq=-1)), Reason.OUT_OF_RANGE),
    Rejected("range-seq-2-pow-32", encode(reading(seq=2**32)), Reason.OUT_OF_RANGE),
    Rejected("range-water-minus-1", encode(reading(water_level_cm=-1)), Reason.OUT_OF_RANGE),
    Rejected("range-in-batch", encode(batch([item(tilt_deg=200)])), Reason.OUT_OF_RANGE),
    # too_large
    Rejected("too-large-valid-json", padded(reading(), MAX_PAYLOAD_BYTES + 1), Reason.TOO_LARGE),
    Rejected("too-large-garbage", b"x" * (MAX_PAYLOAD_BYTES * 4), Reason.TOO_LARGE),
    # future_ts
    Rejected("future-10-min-1-s", encode(reading(ts=FUTURE_MS)), Reason.FUTURE_TS),
    Rejected("future-rfc3339", encode(reading(ts="2027-01-15T08:10:01Z")), Reason.FUTURE_TS),
    Rejected("future-in-batch", encode(batch([item(ts=FUTURE_MS)])), Reason.FUTURE_TS),
    # stale_ts
    Rejected("stale-7-days-1-s", encode(reading(ts=STALE_MS)), Reason.STALE_TS),
    Rejected("stale-rfc3339", encode(reading(ts="2027-01-08T07:59:59+00:00")), Reason.STALE_TS),
    Rejected("stale-epoch-0", encode(reading(ts=0)), Reason.STALE_TS),
    Rejected("stale-in-batch", encode(batch([item(ts=STALE_MS)])), Reason.STALE_TS),
]


@pytest.mark.parametrize("case", REJECTED, ids=lambda case: case.name)
def test_rejected(case: Rejected) -> None:
    decoded = decode(case.payload)

    assert decoded.readings == []
    assert [rejection.reason for rejection in decoded.rejections] == [case.reason]
    assert decoded.rejections[0].detail


def test_every_decode_reason_is_produced_by_a_case() -> None:
    produced = {case.reason for case in REJECTED}

    # store_rejected comes from the store, rate_limited from the ingest's rate guard, the
    # ingress reasons from HTTP push and codecs (tests/test_codecs.py, test_push.py).
    ingress = {Reason.BAD_SIGNATURE, Reason.UNKNOWN_DEVICE, Reason.DECODE_FAILED}
    assert produced == set(Reason) - {Reason.STORE_REJECTED, Reason.RATE_LIMITED} - ingress


@pytest.mark.parametrize(
    "device_id",
    ["dev 1", "dev,1", "dev=1", "dev-1\n", "d\u00e9v", "a" * 65, ""],
    ids=["space", "comma", "equals", "newline", "non-ascii", "65-chars", "empty"],
)
def test_device_id_outside_the_contract_is_rejected(device_id: str) -> None:
    """DESIGN §3: a device_id is 1-64 of [A-Za-z0-9_.-], even when topic and payload agree."""
    for payload in (encode(reading(device_id=device_id)), encode(batch([item()], device_id))):
        decoded = decode(payload, topic_device_id=device_id)

        assert decoded.readings == []
        assert [rejection.reason for rejection in decoded.rejections] in (
            [Reason.SCHEMA],
            [Reason.TOPIC_MISMATCH],
        )


# --- batches ---------------------------------------------------------------------------


def test_batch_keeps_good_readings_and_rejects_each_bad_one() -> None:
    payload = encode(
        batch(
            [
                item(seq=10, ts=NOW_MS - 2 * MINUTE_MS),
                item(seq=11, tilt_deg=181),
                item(seq=12, displacement_mm=None),
                5,
                item(seq=14, ts=FUTURE_MS),
                item(seq=15, ts="2027-01-15T07:59:00Z", rssi_dbm=-90),
            ]
        )
    )

    decoded = decode(payload)

    assert decoded.readings == [
        expect(seq=10, ts_ms=NOW_MS - 2 * MINUTE_MS),
        expect(seq=15, ts_ms=NOW_MS - MINUTE_MS, rssi_dbm=-90),
    ]
    assert Counter(rejection.reason for rejection in decoded.rejections) == Counter(
        [Reason.OUT_OF_RANGE, Reason.SCHEMA, Reason.NOT_OBJECT, Reason.FUTURE_TS]
    )


def test_batch_readings_take_the_batch_device_id() -> None:
    payload = encode(batch([item(seq=1), {**item(seq=2), "device_id": "someone-else"}]))

    decoded = decode(payload)

    assert [found.device_id for found in decoded.readings] == [DEVICE, DEVICE]
    assert decoded.rejections == []


def test_batch_of_100_readings_is_accepted() -> None:
    payload = encode(
        batch([{"seq": n, "ts": NOW_MS, "tilt_deg": 0, "displacement_mm": 0} for n in range(100)])
    )

    decoded = decode(payload)

    assert [found.seq for found in decoded.readings] == list(range(100))
    assert decoded.rejections == []


def test_empty_batch_gives_nothing() -> None:
    decoded = decode(encode(batch([])))

    assert decoded == Decoded([], [])


# --- never raises ----------------------------------------------------------------------

FIELD_NAMES = [
    "device_id",
    "seq",
    "ts",
    "tilt_deg",
    "displacement_mm",
    "water_level_cm",
    "battery_v",
    "rssi_dbm",
    "temperature_c",
    "readings",
    "other",
]


def random_value(rng: random.Random, depth: int) -> Any:
    choice = rng.randrange(10 if depth < 3 else 7)
    scalars: list[Any] = [
        None,
        rng.choice([True, False]),
        rng.randint(-(2**40), 2**40),
        rng.uniform(-1e6, 1e6),
        rng.choice([NOW_MS, FUTURE_MS, STALE_MS, 0, -1, 2**32, 2**64]),
        rng.choice(
            [
                DEVICE,
                "",
                "2027-01-15T08:00:00Z",
                "2027-01-15T08:00:00",
                "0001-01-01T00:00:00+23:59",
                "9999-12-31T23:59:59-23:59",
                "T",
                "\u00e9\x00",
            ]
        ),
        rng.choice([0, 180, 181, -1, 5.1, -150, 1e308, -0.0]),
    ]
    if choice < len(scalars):
        return scalars[choice]
    if choice == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = rng.sample(FIELD_NAMES, rng.randrange(len(FIELD_NAMES)))
    return {key: random_value(rng, depth) for key in keys}


def random_payloads(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)  # noqa: S311 -- reproducible fuzz input, not cryptography
    payloads: list[bytes] = []
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:  # noise
            payloads.append(rng.randbytes(rng.randrange(64)))
        elif kind == 1:  # a random JSON value shaped like a reading or a batch
            document = random_object(rng, 0)
            if rng.random() < 0.5:
                document["device_id"] = DEVICE
            payloads.append(json.dumps(document).encode())
        elif kind == 2:  # a valid reading or batch with a few bytes damaged
            base = bytearray(
                encode(rng.choice([reading(**ALL_FIELDS), batch([item(), item(seq=8)])]))
            )
            for _ in range(rng.randrange(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            payloads.append(bytes(base))
        elif kind == 3:  # a valid reading with one field given a random value
            document = reading(**ALL_FIELDS)
            document[rng.choice(FIELD_NAMES[1:9])] = random_value(rng, 2)
            payloads.append(encode(document))
        else:  # a batch of random items
            items = [
                rng.choice([item(seq=n), random_value(rng, 1)]) for n in range(rng.randrange(8))
            ]
            payloads.append(encode(batch(items)))
    return payloads


def check_invariants(decoded: Decoded) -> None:
    assert isinstance(decoded, Decoded)
    for rejection in decoded.rejections:
        assert rejection.reason in set(Reason) - {Reason.STORE_REJECTED}
    for found in decoded.readings:
        assert found.device_id == DEVICE
        assert 0 <= found.seq <= 2**32 - 1
        assert NOW_MS - 7 * DAY_MS <= found.ts_ms <= NOW_MS + 10 * MINUTE_MS
        assert 0 <= found.tilt_deg <= 180
        assert found.displacement_mm >= 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decode_never_raises_on_random_input(seed: int) -> None:
    for payload in random_payloads(seed, 300):
        check_invariants(decode(payload))


# --- topics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("covers/MH-0001.a_b/telemetry", "MH-0001.a_b"),
        ("covers/7/telemetry", "7"),
        (f"covers/{'a' * 64}/telemetry", "a" * 64),
        (f"covers/{'a' * 65}/telemetry", None),
        ("cover/dev-1/telemetry", None),
        ("devices/dev-1/telemetry", None),
        ("/covers/dev-1/telemetry", None),
        ("covers/dev-1/telemetry/extra", None),
        ("covers/dev-1/x/telemetry", None),
        ("covers/dev-1", None),
        ("covers/dev-1/config", None),
        ("covers//telemetry", None),
        ("covers/dev 1/telemetry", None),
        ("covers/dev+1/telemetry", None),
        ("covers/dev#/telemetry", None),
        ("covers/d\u00e9v/telemetry", None),
        ("covers/dev-1\n/telemetry", None),
        ("", None),
    ],
)
def test_device_id_from_topic(topic: str, expected: str | None) -> None:
    assert device_id_from_topic(topic) == expected
