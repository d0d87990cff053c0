"""Declarative JSON codecs: each reading field taken from a path in the vendor's JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import field_validator

from ingest.codecs.base import CodecError, Fields, Payload
from ingest.codecs.spec import CodecFile, FieldName, Scaled, convert

# A path: names separated by dots, each optionally followed by list indexes, `a.b[0].c`.
_STEP = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def parse_path(path: str) -> tuple[str | int, ...]:
    steps: list[str | int] = []
    for part in path.split("."):
        match = _STEP.fullmatch(part)
        if match is None:
            raise ValueError(f"path {path!r}: {part!r} is not a name with optional [index]")
        steps.append(match.group(1))
        steps.extend(int(index) for index in re.findall(r"\d+", match.group(2)))
    return tuple(steps)


class JsonField(Scaled):
    path: str

    @field_validator("path")
    @classmethod
    def _path_parses(cls, value: str) -> str:
        parse_path(value)
        return value


class JsonCodecFile(CodecFile):
    # Where a list of readings is, when the vendor batches them; fields' paths are then
    # relative to each item. None: the document is one reading.
    readings: str | None = None
    fields: dict[FieldName, JsonField]


_MISSING = object()


def _walk(document: Any, steps: tuple[str | int, ...]) -> Any:
    node = document
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                return _MISSING
            node = node[step]
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            return _MISSING
    return node


def as_json_object(payload: Payload) -> dict[str, Any]:
    if isinstance(payload, dict):
        return payload
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CodecError(f"top level is {type(document).__name__}, not an object")
    return document


class JsonPathCodec:
    """A vendor's JSON read by the paths of its codec file."""

    def __init__(self, spec: JsonCodecFile) -> None:
        self._spec = spec
        self._paths = {name: parse_path(field.path) for name, field in spec.fields.items()}
        self._readings = parse_path(spec.readings) if spec.readings else None

    @property
    def model(self) -> str:
        return self._spec.model

    def decode(self, payload: Payload) -> list[Fields]:
        document = as_json_object(payload)
        if self._readings is None:
            return [self._one(document)]
        items = _walk(document, self._readings)
        if not isinstance(items, list):
            raise CodecError(f"{self._spec.readings}: no list of readings there")
        return [self._one(item) for item in items]

    def _one(self, document: Any) -> Fields:
        fields: Fields = {}
        for name, steps in self._paths.items():
            value = _walk(document, steps)
            if value is _MISSING or value is None:
                continue  # the contract says whether it was required
            fields[name] = convert(name, self._spec.fields[name], value)
        return fields
