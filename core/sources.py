"""Ingress sources (DESIGN §12): the platforms and servers readings arrive through.

Read once at start-up from the TOML file SMARTCOVER_SOURCES_FILE, one `[sources.<name>]`
table each. A file that is not valid stops the start, naming the source and the problem.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from core.registry_schemas import SOURCE_NAME_PATTERN


class SourceKind(StrEnum):
    HTTP_JSON = "http-json"  # v1 JSON (or a codec's) pushed over HTTP with a token
    CTWING = "ctwing"  # China Telecom AIoT (天翼物联 CTWing): unsigned, token in the URL
    ONENET = "onenet"  # China Mobile OneNET: base64(MD5(token + nonce + msg))
    IOTDA = "iotda"  # Huawei Cloud IoTDA data forwarding (HTTP push)
    CHIRPSTACK = "chirpstack"  # LoRaWAN over MQTT: not yet consumed (issue 13)
    TTS = "tts"


PUSH_KINDS = frozenset(
    {SourceKind.HTTP_JSON, SourceKind.CTWING, SourceKind.ONENET, SourceKind.IOTDA}
)


class SourcesError(Exception):
    """The sources file cannot be used; the message names the file, source and problem."""


class Source(BaseModel):
    """One source. Secrets are SecretStr: never logged, never shown by the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SOURCE_NAME_PATTERN)
    kind: SourceKind
    # The push's shared secret: CTWing, IoTDA and http-json compare it with the URL's
    # `token` query parameter, OneNET signs with it.
    token: SecretStr | None = None
    # OneNET's optional AES mode: the message key, base64 of 16, 24 or 32 bytes.
    aes_key: SecretStr | None = None
    # Addresses pushes may come from (CIDRs); empty: any.
    allow: tuple[IPv4Network | IPv6Network, ...] = ()
    # The codec of devices that have no model of their own (DESIGN §12: default v1).
    model: str | None = None
    mqtt_url: str | None = None  # chirpstack and tts: their broker (default: ours)

    @model_validator(mode="after")
    def _push_needs_a_token(self) -> Self:
        if self.kind in PUSH_KINDS and not (self.token and self.token.get_secret_value()):
            raise ValueError(f"a {self.kind} source needs a token")
        if self.aes_key is not None and self.kind is not SourceKind.ONENET:
            raise ValueError("aes_key is for onenet sources only")
        return self

    def allows(self, address: str | None) -> bool:
        if not self.allow:
            return True
        try:
            parsed: IPv4Address | IPv6Address = ip_address(address or "")
        except ValueError:
            return False
        return any(parsed in network for network in self.allow)


def load_sources(path: Path | None) -> dict[str, Source]:
    """The sources of the file, by name; no file: none."""
    if path is None:
        return {}
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SourcesError(f"{path}: cannot read it: {exc}") from None
    tables = document.get("sources")
    if not isinstance(tables, dict) or set(document) != {"sources"}:
        raise SourcesError(f"{path}: expected only [sources.<name>] tables")
    sources: dict[str, Source] = {}
    for name, table in tables.items():
        try:
            sources[name] = Source.model_validate({**table, "name": name})
        except (ValidationError, TypeError) as exc:
            raise SourcesError(f"{path}: sources.{name}: {_problems(exc)}") from None
    return sources


def _problems(exc: Exception) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'table'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )
