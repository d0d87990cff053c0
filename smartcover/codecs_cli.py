"""`smartcover codecs`: the device models known, and decoding one payload to check a codec."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console

from core.clock import wall_clock_ms
from ingest.codecs.base import Envelope, Payload, decode_payload
from ingest.codecs.registry import CodecConfigError, CodecRegistry, UnknownModel, load_codecs
from smartcover.cli_settings import load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()
# A payload that fails to decode: the exit code says so to scripts.
EXIT_DECODE_FAILED = 1
EXIT_BAD_CONFIG = 2
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2}[\s:]?)+")


def payload_from_text(text: str) -> Payload:
    """A payload as typed: JSON (starts with `{`), hex (`AA 55 01…`), else base64."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return stripped.encode()
    if _HEX.fullmatch(stripped):
        return bytes.fromhex(re.sub(r"[\s:]", "", stripped))
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise typer.BadParameter("give JSON, hex bytes or base64") from None


def _registry() -> CodecRegistry:
    try:
        return load_codecs(load_settings().codecs_dir)
    except CodecConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_BAD_CONFIG) from None


@app.command("list")
def list_models() -> None:
    """The device models this installation decodes (built in, files, entry points)."""
    for model in _registry().models:
        console.print(model)


@app.command("test")
def decode_one(
    model: Annotated[str, typer.Argument(help="The device model, e.g. vendor-m20-hex.")],
    payload: Annotated[str, typer.Argument(help="JSON, hex bytes or base64.")],
    device: Annotated[str, typer.Option(help="Device id the reading is given.")] = "test-device",
    seq: Annotated[int | None, typer.Option(help="seq when the payload has none.")] = None,
    ts: Annotated[
        int | None, typer.Option(help="ts (epoch ms) when it has none; default now.")
    ] = None,
) -> None:
    """Decodes one payload and prints the reading(s), or the exact reason it fails."""
    try:
        codec = _registry().get(model)
    except UnknownModel as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_BAD_CONFIG) from None
    now_ms = wall_clock_ms()
    envelope = Envelope(
        device_id=device, now_ms=now_ms, seq=seq, ts_ms=now_ms if ts is None else ts
    )
    decoded = decode_payload(codec, payload_from_text(payload), envelope)
    for reading in decoded.readings:
        typer.echo(json.dumps(asdict(reading)))
    for rejection in decoded.rejections:
        typer.echo(f"{rejection.reason}: {rejection.detail}", err=True)
    if decoded.rejections or not decoded.readings:
        raise typer.Exit(EXIT_DECODE_FAILED)
