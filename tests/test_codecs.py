"""Codecs per device model: declarative JSON and binary layouts, the built-ins, loading."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.contract import Reason
from ingest.codecs.base import Envelope, decode_payload
from ingest.codecs.binary import crc16_modbus, sum8
from ingest.codecs.registry import CodecConfigError, CodecRegistry, load_codec_file, load_codecs
from smartcover.cli import app

NOW_MS = 1_800_000_000_000
ENVELOPE = Envelope(device_id="MH-1", now_ms=NOW_MS, seq=41, ts_ms=NOW_MS - 1000)


@pytest.fixture(scope="module")
def codecs() -> CodecRegistry:
    return load_codecs()


def m20_frame(*, seq: int = 7, tilt_cdeg: int = 1250, temp_dc: int = -50, rssi: int = -75) -> bytes:
    """The README's M20 frame, built field by field (big-endian), with its sum8."""
    body = bytes.fromhex("AA550102") + struct.pack(
        ">IhHHHhb", seq, tilt_cdeg, 35, 1200, 3600, temp_dc, rssi
    )
    return body + bytes([sum8(body)])


def test_the_readme_m20_frame_decodes_field_by_field(codecs: CodecRegistry) -> None:
    frame = bytes.fromhex("AA5501020000000704E2002304B00E10FFCEB566")
    assert frame == m20_frame()
    decoded = decode_payload(codecs.get("vendor-m20-hex"), frame, ENVELOPE)
    assert decoded.rejections == []
    (reading,) = decoded.readings
    assert (reading.device_id, reading.seq, reading.ts_ms) == ("MH-1", 7, NOW_MS - 1000)
    assert reading.tilt_deg == 12.5
    assert reading.displacement_mm == 3.5
    assert reading.water_level_cm == 120.0
    assert reading.battery_v == 3.6
    assert reading.temperature_c == -5.0  # negative, signed 16 bits
    assert reading.rssi_dbm == -75  # negative, signed 8 bits


@pytest.mark.parametrize(
    ("frame", "detail"),
    [
        (m20_frame()[:19], "frame is 19 bytes, the layout needs 20"),
        (m20_frame() + b"\x00", "frame is 21 bytes, the layout needs 20"),
        (b"", "frame is 0 bytes, the layout needs 20"),
        (m20_frame()[:19] + b"\x00", "sum8 over bytes 0..18: frame carries 0x00, computed 0x66"),
        (b"\xab" + m20_frame()[1:], "bytes at 0: expected AA5501, got AB5501"),
    ],
)
def test_a_bad_frame_fails_with_the_exact_reason(
    codecs: CodecRegistry, frame: bytes, detail: str
) -> None:
    decoded = decode_payload(codecs.get("vendor-m20-hex"), frame, ENVELOPE)
    assert decoded.readings == []
    (rejection,) = decoded.rejections
    assert rejection.reason is Reason.DECODE_FAILED
    assert rejection.detail == f"vendor-m20-hex: {detail}"


def test_a_negative_tilt_decodes_and_is_refused_by_the_contract(codecs: CodecRegistry) -> None:
    decoded = decode_payload(codecs.get("vendor-m20-hex"), m20_frame(tilt_cdeg=-300), ENVELOPE)
    (rejection,) = decoded.rejections
    assert rejection.reason is Reason.OUT_OF_RANGE
    assert "tilt_deg" in rejection.detail


def _layout(tmp_path: Path, endian: str, checksum: str = "") -> Path:
    path = tmp_path / f"le-{endian}.toml"
    path.write_text(
        f'model = "t-{endian}"\nkind = "binary"\nlength = 9\nendian = "{endian}"\n'
        '[[expect]]\noffset = 0\nhex = "7E"\n'
        f"{checksum}"
        '[fields.seq]\noffset = 1\ntype = "u16"\n'
        '[fields.tilt_deg]\noffset = 3\ntype = "u16"\nscale = 0.1\n'
        '[fields.displacement_mm]\noffset = 5\ntype = "u8"\n'
        '[fields.temperature_c]\noffset = 6\ntype = "i8"\n'
        '[fields.rssi_dbm]\noffset = 7\ntype = "i16"\nendian = "big"\n'
    )
    return path


@pytest.mark.parametrize("endian", ["big", "little"])
def test_endianness_is_the_files_and_a_field_may_override_it(tmp_path: Path, endian: str) -> None:
    codec = load_codec_file(_layout(tmp_path, endian))
    order = ">" if endian == "big" else "<"
    frame = b"\x7e" + struct.pack(f"{order}HH", 300, 455) + struct.pack(">Bbh", 12, -20, -90)
    (reading,) = decode_payload(codec, frame, ENVELOPE).readings
    assert (reading.seq, reading.tilt_deg, reading.displacement_mm) == (300, 45.5, 12.0)
    assert (reading.temperature_c, reading.rssi_dbm) == (-20.0, -90)


def test_a_little_endian_crc16_modbus_is_checked(tmp_path: Path) -> None:
    checksum = '[checksum]\nalgorithm = "crc16-modbus"\noffset = 7\nendian = "little"\n'
    path = tmp_path / "crc.toml"
    path.write_text(
        _layout(tmp_path, "big")
        .read_text()
        .replace('[fields.rssi_dbm]\noffset = 7\ntype = "i16"\nendian = "big"\n', "")
        .replace("[[expect]]", checksum + "[[expect]]")
    )
    codec = load_codec_file(path)
    body = b"\x7e" + struct.pack(">HHBb", 1, 100, 0, 5)
    assert crc16_modbus(b"123456789") == 0x4B37  # the CRC catalogue's check value
    good = body + struct.pack("<H", crc16_modbus(body))
    assert len(decode_payload(codec, good, ENVELOPE).readings) == 1
    bad = body + struct.pack(">H", crc16_modbus(body))
    (rejection,) = decode_payload(codec, bad, ENVELOPE).rejections
    assert rejection.reason is Reason.DECODE_FAILED
    assert "crc16-modbus over bytes 0..6" in rejection.detail


VENDOR_JSON = (
    b'{"imei": "868120000000001", "sn": 9, "time": 1799999990,'
    b' "data": {"angle": 4650, "offset_mm": "2.5", "level_mm": 1830, "bat_mv": 3310,'
    b' "csq": -97, "temp": 18.4}}'
)


def test_the_vendor_json_takes_its_own_names_and_units(codecs: CodecRegistry) -> None:
    decoded = decode_payload(codecs.get("vendor-jc300-json"), VENDOR_JSON, ENVELOPE)
    assert decoded.rejections == []
    (reading,) = decoded.readings
    assert reading.seq == 9  # its own, not the envelope's
    assert reading.ts_ms == 1_799_999_990_000  # epoch seconds
    assert reading.tilt_deg == 46.5  # centidegrees
    assert reading.displacement_mm == 2.5  # a number sent as text
    assert reading.water_level_cm == 183.0  # millimetres
    assert reading.battery_v == 3.31  # millivolts
    assert (reading.rssi_dbm, reading.temperature_c) == (-97, 18.4)


def test_the_vendor_json_missing_a_required_field_is_a_schema_rejection(
    codecs: CodecRegistry,
) -> None:
    payload = VENDOR_JSON.replace(b'"angle": 4650, ', b"")
    (rejection,) = decode_payload(codecs.get("vendor-jc300-json"), payload, ENVELOPE).rejections
    assert rejection.reason is Reason.SCHEMA
    assert "tilt_deg" in rejection.detail


def test_the_vendor_json_with_a_word_for_a_number_fails_to_decode(codecs: CodecRegistry) -> None:
    payload = VENDOR_JSON.replace(b"4650", b'"high"')
    (rejection,) = decode_payload(codecs.get("vendor-jc300-json"), payload, ENVELOPE).rejections
    assert rejection.reason is Reason.DECODE_FAILED
    assert rejection.detail == "vendor-jc300-json: tilt_deg: expected a number, got 'high'"


def test_v1_takes_the_envelope_for_what_it_lacks_and_base64_too(codecs: CodecRegistry) -> None:
    import base64  # noqa: PLC0415

    plain = b'{"tilt_deg": 1.5, "displacement_mm": 0}'
    for payload in (plain, base64.b64encode(plain)):
        (reading,) = decode_payload(codecs.get("v1"), payload, ENVELOPE).readings
        assert (reading.seq, reading.ts_ms, reading.tilt_deg) == (41, NOW_MS - 1000, 1.5)
    other = (
        b'{"device_id": "MH-2", "seq": 1, "ts": 1799999999000, "tilt_deg": 1, "displacement_mm": 0}'
    )
    (rejection,) = decode_payload(codecs.get(None), other, ENVELOPE).rejections
    assert rejection.reason is Reason.TOPIC_MISMATCH


def test_chirpstack_object_passes_through(codecs: CodecRegistry) -> None:
    decoded = decode_payload(
        codecs.get("chirpstack-object"),
        {"tilt_deg": 50.0, "displacement_mm": 25.0, "water_level_cm": 12.0, "other": "x"},
        ENVELOPE,
    )
    (reading,) = decoded.readings
    assert (reading.tilt_deg, reading.displacement_mm, reading.seq) == (50.0, 25.0, 41)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'model = "x"\nkind = "binary"\nlength = 4\n'
            '[fields.tilt_deg]\noffset = 3\ntype = "u16"\n'
            '[fields.displacement_mm]\noffset = 0\ntype = "u8"\n',
            "fields.tilt_deg: bytes 3..5 are not inside a 4-byte frame",
        ),
        (
            'model = "x"\nkind = "binary"\nlength = 4\n'
            '[fields.tilt_deg]\noffset = 0\ntype = "u12"\n',
            "fields.tilt_deg.type",
        ),
        ('model = "x"\nkind = "json"\n[fields.tilt]\npath = "a"\n', "fields.tilt"),
        ('model = "x"\nkind = "json"\n[fields.tilt_deg]\npath = "a..b"\n', "is not a name"),
        ('model = "x"\nkind = "json"\n[fields.ts]\npath = "t"\n', "ts needs it"),
        ('model = "x"\nkind = "json"\nscael = 2\n[fields.tilt_deg]\npath = "a"\n', "scael"),
        ('model = "x"\nkind = "csv"\n', "kind must be 'json' or 'binary'"),
        (
            'model = "x"\nkind = "binary"\nlength = 4\n[[expect]]\noffset = 0\nhex = "ZZ"\n'
            "[fields]\n",
            "is not hex bytes",
        ),
        ("model = [", "cannot read it"),
    ],
)
def test_a_bad_codec_file_is_refused_at_load_naming_file_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CodecConfigError) as refused:
        load_codecs(tmp_path)
    assert str(path) in str(refused.value)
    assert problem in str(refused.value)


def test_an_operator_file_adds_a_model_and_may_not_redefine_one(tmp_path: Path) -> None:
    _layout(tmp_path, "little")
    assert "t-little" in load_codecs(tmp_path).models
    (tmp_path / "dup.toml").write_text(
        'model = "v1"\nkind = "json"\n[fields.tilt_deg]\npath = "a"\n'
    )
    with pytest.raises(CodecConfigError, match="model 'v1' is already defined by built-in"):
        load_codecs(tmp_path)


def test_cli_prints_the_reading_or_the_exact_failure() -> None:
    runner = CliRunner()
    good = runner.invoke(
        app,
        ["codecs", "test", "vendor-m20-hex", "AA55 0102 0000 0007 04E2 0023 04B0 0E10 FFCE B566"],
    )
    assert good.exit_code == 0, good.output
    assert '"tilt_deg": 12.5' in good.stdout
    bad = runner.invoke(app, ["codecs", "test", "vendor-m20-hex", "AA5501"])
    assert bad.exit_code == 1
    assert "decode_failed: vendor-m20-hex: frame is 3 bytes, the layout needs 20" in bad.output
    unknown = runner.invoke(app, ["codecs", "test", "nope", "{}"])
    assert unknown.exit_code == 2
    assert "no codec for device model 'nope'" in unknown.output


def _distribution(root: Path, module: str, entry: str) -> None:
    """An installed distribution, as pip leaves one: a module and its dist-info."""
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[smartcover.codecs]\n{entry}\n")


def test_an_entry_point_adds_a_python_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "acme_codec.py").write_text(
        "class Codec:\n"
        "    model = 'acme-x1'\n"
        "    def decode(self, payload):\n"
        "        level = int.from_bytes(payload[:2], 'big')\n"
        "        return [{'tilt_deg': 0.0, 'displacement_mm': 0.0, 'water_level_cm': level}]\n"
    )
    _distribution(tmp_path, "acme_codec", "acme-x1 = acme_codec:Codec")
    monkeypatch.syspath_prepend(str(tmp_path))
    codecs = load_codecs()
    (reading,) = decode_payload(codecs.get("acme-x1"), b"\x00\x7b", ENVELOPE).readings
    assert reading.water_level_cm == 123.0


def test_an_entry_point_that_does_not_load_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _distribution(tmp_path, "broken_codec", "broken = broken_codec:missing")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CodecConfigError, match=r"entry point broken \(broken_codec:missing\)"):
        load_codecs()
