"""The device models smartcover can decode, from code, codec files and entry points.

Built in: `v1` and `chirpstack-object` (Python), and the files in `ingest/codecs/models`.
The operator adds files in SMARTCOVER_CODECS_DIR (`*.toml`, one model each), and packages
add codecs through the `smartcover.codecs` entry-point group (a Codec, or a callable
returning one). A model defined twice, or a file that is not a valid layout, stops the
start with a message naming the file and the problem.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ingest.codecs.base import Codec
from ingest.codecs.binary import BinaryCodecFile, BinaryLayoutCodec
from ingest.codecs.builtin import V1_MODEL, ChirpStackObjectCodec, V1Codec
from ingest.codecs.json_paths import JsonCodecFile, JsonPathCodec

BUILTIN_DIR = Path(__file__).parent / "models"
ENTRY_POINT_GROUP = "smartcover.codecs"


class CodecConfigError(Exception):
    """A codec file or entry point that cannot be used; the message names it and why."""


class UnknownModel(LookupError):
    """No codec for that device model."""


class CodecRegistry:
    def __init__(self, codecs: dict[str, Codec]) -> None:
        self._codecs = codecs

    def get(self, model: str | None) -> Codec:
        """The model's codec; a device without a model speaks v1 (DESIGN §12)."""
        name = model or V1_MODEL
        codec = self._codecs.get(name)
        if codec is None:
            raise UnknownModel(
                f"no codec for device model {name!r}; known: {', '.join(self.models)}"
            )
        return codec

    def knows(self, model: str | None) -> bool:
        return model is not None and model in self._codecs

    @property
    def models(self) -> list[str]:
        return sorted(self._codecs)


def load_codec_file(path: Path) -> Codec:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CodecConfigError(f"{path}: cannot read it: {exc}") from None
    return codec_from_document(document, str(path))


def codec_from_document(document: dict[str, Any], where: str) -> Codec:
    kind = document.get("kind")
    try:
        if kind == "json":
            return JsonPathCodec(JsonCodecFile.model_validate(document))
        if kind == "binary":
            return BinaryLayoutCodec(BinaryCodecFile.model_validate(document))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise CodecConfigError(f"{where}: {problems}") from None
    raise CodecConfigError(f"{where}: kind must be 'json' or 'binary', not {kind!r}")


def _from_entry_points() -> Iterable[tuple[str, Codec]]:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name} ({point.value})"
        try:
            loaded = point.load()
        except Exception as exc:  # whatever importing a plug-in raises, named at start
            raise CodecConfigError(f"{where}: cannot load it: {exc!r}") from exc
        # A codec object, or a class or factory making one (a class passes the protocol's
        # check by its attributes: instantiate it).
        if isinstance(loaded, type) or not isinstance(loaded, Codec):
            if not callable(loaded):
                raise CodecConfigError(f"{where}: is neither a codec nor returns one")
            loaded = loaded()
        codec = loaded
        if not isinstance(codec, Codec):
            raise CodecConfigError(f"{where}: is neither a codec nor returns one")
        yield where, codec


def load_codecs(extra_dir: Path | None = None) -> CodecRegistry:
    codecs: dict[str, Codec] = {}
    origin: dict[str, str] = {}

    def add(where: str, codec: Codec) -> None:
        if codec.model in codecs:
            raise CodecConfigError(
                f"{where}: model {codec.model!r} is already defined by {origin[codec.model]}"
            )
        codecs[codec.model] = codec
        origin[codec.model] = where

    add("built-in", V1Codec())
    add("built-in", ChirpStackObjectCodec())
    folders = [BUILTIN_DIR] + ([extra_dir] if extra_dir is not None else [])
    for folder in folders:
        if not folder.is_dir():
            raise CodecConfigError(f"{folder}: codecs directory does not exist")
        for path in sorted(folder.glob("*.toml")):
            add(str(path), load_codec_file(path))
    for where, codec in _from_entry_points():
        add(where, codec)
    return CodecRegistry(codecs)
