"""Declarative binary codecs: a frame's fixed layout, its header bytes and its checksum."""

from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Literal, Self

from pydantic import field_validator, model_validator

from ingest.codecs.base import CodecError, Fields, Payload
from ingest.codecs.spec import CodecFile, FieldName, Scaled, Strict, convert

Endian = Literal["big", "little"]
IntType = Literal["u8", "i8", "u16", "i16", "u24", "i24", "u32", "i32"]
_WIDTHS = {"8": 1, "16": 2, "24": 3, "32": 4}


def width_of(kind: str) -> int:
    return _WIDTHS[kind[1:]]


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def xor8(data: bytes) -> int:
    result = 0
    for byte in data:
        result ^= byte
    return result


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS: polynomial 0xA001 (reflected 0x8005), initial 0xFFFF."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial 0xFFFF, not reflected."""
    return binascii.crc_hqx(data, 0xFFFF)


CHECKSUMS: dict[str, tuple[Callable[[bytes], int], int]] = {
    "sum8": (sum8, 1),
    "xor8": (xor8, 1),
    "crc16-modbus": (crc16_modbus, 2),
    "crc16-ccitt": (crc16_ccitt, 2),
}


class BinaryField(Scaled):
    offset: int
    type: IntType
    endian: Endian | None = None  # None: the file's

    @property
    def end(self) -> int:
        return self.offset + width_of(self.type)


class Expected(Strict):
    """Bytes that must be there: a frame header (magic), a version, a frame type."""

    offset: int
    hex: str

    @field_validator("hex")
    @classmethod
    def _is_hex(cls, value: str) -> str:
        try:
            bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{value!r} is not hex bytes, e.g. 'AA55'") from None
        return value

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.hex)


class Checksum(Strict):
    algorithm: Literal["sum8", "xor8", "crc16-modbus", "crc16-ccitt"]
    offset: int  # where the frame carries it
    start: int = 0  # the bytes it covers: start ≤ i < end (end: the checksum's offset)
    end: int | None = None
    endian: Endian = "big"  # of a 16-bit checksum (Modbus sends its CRC little-endian)

    @property
    def covered_end(self) -> int:
        return self.offset if self.end is None else self.end

    @property
    def width(self) -> int:
        return CHECKSUMS[self.algorithm][1]


class BinaryCodecFile(CodecFile):
    length: int  # the frame's exact length in bytes
    endian: Endian = "big"
    expect: tuple[Expected, ...] = ()
    checksum: Checksum | None = None
    fields: dict[FieldName, BinaryField]

    @model_validator(mode="after")
    def _inside_the_frame(self) -> Self:
        spans = [(f"fields.{name}", f.offset, f.end) for name, f in self.fields.items()]
        spans += [(f"expect at {e.offset}", e.offset, e.offset + len(e.raw)) for e in self.expect]
        if self.checksum is not None:
            check = self.checksum
            spans.append(("checksum", check.offset, check.offset + check.width))
            spans.append(("checksum's range", check.start, check.covered_end))
        for what, start, end in spans:
            if start < 0 or end > self.length or start > end:
                raise ValueError(
                    f"{what}: bytes {start}..{end} are not inside a {self.length}-byte frame"
                )
        return self


def _hex(data: bytes) -> str:
    return data.hex().upper()


class BinaryLayoutCodec:
    """A fixed-length binary frame read by the layout of its codec file."""

    def __init__(self, spec: BinaryCodecFile) -> None:
        self._spec = spec

    @property
    def model(self) -> str:
        return self._spec.model

    def decode(self, payload: Payload) -> list[Fields]:
        if isinstance(payload, dict):
            raise CodecError("a binary frame is expected, not a JSON object")
        spec = self._spec
        if len(payload) != spec.length:
            raise CodecError(f"frame is {len(payload)} bytes, the layout needs {spec.length}")
        for expected in spec.expect:
            found = payload[expected.offset : expected.offset + len(expected.raw)]
            if found != expected.raw:
                raise CodecError(
                    f"bytes at {expected.offset}: expected {_hex(expected.raw)}, got {_hex(found)}"
                )
        if spec.checksum is not None:
            _check(spec.checksum, payload)
        fields: Fields = {}
        for name, field in spec.fields.items():
            raw = int.from_bytes(
                payload[field.offset : field.end],
                field.endian or spec.endian,
                signed=field.type.startswith("i"),
            )
            fields[name] = convert(name, field, raw)
        return [fields]


def _check(checksum: Checksum, frame: bytes) -> None:
    compute, width = CHECKSUMS[checksum.algorithm]
    covered = frame[checksum.start : checksum.covered_end]
    expected = compute(covered)
    carried = int.from_bytes(frame[checksum.offset : checksum.offset + width], checksum.endian)
    if carried != expected:
        digits = 2 * width
        raise CodecError(
            f"{checksum.algorithm} over bytes {checksum.start}..{checksum.covered_end - 1}: "
            f"frame carries 0x{carried:0{digits}X}, computed 0x{expected:0{digits}X}"
        )
