"""Line protocol of `cover_reading` (DESIGN §4): exact lines, field types and tag escaping."""

from __future__ import annotations

import re

import pytest

from core.contract import Reading
from core.timeseries import MEASUREMENT, escape_tag, line_of

TS_MS = 1_800_000_000_123
COVER = "4112030102000001"
# A float field value as InfluxDB reads it: never an integer literal, never `i`-suffixed.
FLOAT_LITERAL = re.compile(r"^-?(\d+\.\d+(e[+-]?\d+)?|\d+(\.\d+)?e[+-]?\d+)$")


def required_only(**changes: float) -> Reading:
    fields: dict[str, float] = {"tilt_deg": 1.5, "displacement_mm": 0.25}
    fields.update(changes)
    return Reading(
        device_id="MH-0001",
        seq=7,
        ts_ms=TS_MS,
        tilt_deg=fields["tilt_deg"],
        displacement_mm=fields["displacement_mm"],
    )


FULL = Reading(
    device_id="MH-0001",
    seq=2**32 - 1,
    ts_ms=TS_MS,
    tilt_deg=12.5,
    displacement_mm=3.0,
    water_level_cm=120.0,
    battery_v=3.61,
    rssi_dbm=-87,
    temperature_c=-4.25,
)


@pytest.mark.parametrize(
    ("reading", "cover_id", "expected"),
    [
        pytest.param(
            required_only(),
            None,
            b"cover_reading,device_id=MH-0001 tilt_deg=1.5,displacement_mm=0.25,seq=7i "
            b"1800000000123",
            id="required-only",
        ),
        pytest.param(
            required_only(tilt_deg=3.0, displacement_mm=0.0),
            None,
            b"cover_reading,device_id=MH-0001 tilt_deg=3.0,displacement_mm=0.0,seq=7i "
            b"1800000000123",
            id="int-valued-floats-keep-their-point",
        ),
        pytest.param(
            required_only(),
            COVER,
            b"cover_reading,device_id=MH-0001,cover_id=4112030102000001 "
            b"tilt_deg=1.5,displacement_mm=0.25,seq=7i 1800000000123",
            id="bound-to-a-cover",
        ),
        pytest.param(
            required_only(),
            "",
            b"cover_reading,device_id=MH-0001 tilt_deg=1.5,displacement_mm=0.25,seq=7i "
            b"1800000000123",
            id="empty-cover-id-is-no-tag",
        ),
        pytest.param(
            FULL,
            COVER,
            b"cover_reading,device_id=MH-0001,cover_id=4112030102000001 "
            b"tilt_deg=12.5,displacement_mm=3.0,water_level_cm=120.0,battery_v=3.61,"
            b"rssi_dbm=-87.0,temperature_c=-4.25,seq=4294967295i 1800000000123",
            id="all-fields",
        ),
        pytest.param(
            Reading("MH-0001", 0, 0, 180.0, 0.0, rssi_dbm=0),
            None,
            b"cover_reading,device_id=MH-0001 tilt_deg=180.0,displacement_mm=0.0,"
            b"rssi_dbm=0.0,seq=0i 0",
            id="zeros-and-only-rssi",
        ),
        pytest.param(
            Reading("MH-0001", 9, TS_MS, 0.5, 0.0, water_level_cm=1e20, temperature_c=1e-7),
            None,
            b"cover_reading,device_id=MH-0001 tilt_deg=0.5,displacement_mm=0.0,"
            b"water_level_cm=1e+20,temperature_c=1e-07,seq=9i 1800000000123",
            id="exponent-floats",
        ),
        pytest.param(
            Reading("a b,c=d", 1, TS_MS, 1.0, 2.0),
            "x=1, y",
            b"cover_reading,device_id=a\\ b\\,c\\=d,cover_id=x\\=1\\,\\ y "
            b"tilt_deg=1.0,displacement_mm=2.0,seq=1i 1800000000123",
            id="escaped-tags",
        ),
    ],
)
def test_line_of(reading: Reading, cover_id: str | None, expected: bytes) -> None:
    assert line_of(reading, cover_id) == expected


@pytest.mark.parametrize(
    ("absent", "present"),
    [
        ("water_level_cm", ["battery_v", "rssi_dbm", "temperature_c"]),
        ("battery_v", ["water_level_cm", "rssi_dbm", "temperature_c"]),
        ("rssi_dbm", ["water_level_cm", "battery_v", "temperature_c"]),
        ("temperature_c", ["water_level_cm", "battery_v", "rssi_dbm"]),
    ],
)
def test_optional_field_is_omitted_when_none(absent: str, present: list[str]) -> None:
    values: dict[str, float | int | None] = {
        "water_level_cm": 10.0,
        "battery_v": 3.3,
        "rssi_dbm": -60,
        "temperature_c": 20.0,
    }
    values[absent] = None
    reading = Reading(
        "MH-0001",
        1,
        TS_MS,
        1.0,
        2.0,
        water_level_cm=values["water_level_cm"],
        battery_v=values["battery_v"],
        rssi_dbm=None if values["rssi_dbm"] is None else int(values["rssi_dbm"]),
        temperature_c=values["temperature_c"],
    )

    fields = parse_fields(line_of(reading, None))

    assert absent not in fields
    assert set(present) <= set(fields)


def parse_fields(line: bytes) -> dict[str, str]:
    """The field set of a line without escapes in it: `name=value` pairs."""
    series, field_set, timestamp = line.decode().split(" ")
    assert series.startswith(f"{MEASUREMENT},")
    assert timestamp.isdigit()
    return dict(pair.split("=", 1) for pair in field_set.split(","))


@pytest.mark.parametrize(
    "value", [0.0, 3.0, -4.0, 180.0, 0.1, 1 / 3, 123456789.0, 1e16, 1e20, 1e-7, 5e-324]
)
def test_float_fields_are_float_literals_at_full_precision(value: float) -> None:
    reading = Reading(
        "MH-0001",
        1,
        TS_MS,
        tilt_deg=abs(value),
        displacement_mm=abs(value),
        water_level_cm=abs(value),
        battery_v=value,
        rssi_dbm=-150,
        temperature_c=value,
    )

    fields = parse_fields(line_of(reading, COVER))

    assert fields.pop("seq") == "1i"
    assert fields.pop("rssi_dbm") == "-150.0"
    for name, literal in fields.items():
        assert FLOAT_LITERAL.match(literal), (name, literal)
        assert float(literal) == (value if name in ("battery_v", "temperature_c") else abs(value))


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("MH-0001", "MH-0001"),
        ("a,b", "a\\,b"),
        ("a b", "a\\ b"),
        ("a=b", "a\\=b"),
        ("x, y=z", "x\\,\\ y\\=z"),
        (",,", "\\,\\,"),
        ("", ""),
        ("窨井盖", "窨井盖"),
    ],
)
def test_escape_tag(raw: str, escaped: str) -> None:
    assert escape_tag(raw) == escaped
