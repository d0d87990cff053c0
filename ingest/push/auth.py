"""How each platform's push is authenticated, in constant time (DESIGN §12)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def token_matches(given: str | None, token: str) -> bool:
    """CTWing, IoTDA and http-json: the token the push URL carries (`?token=`)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def onenet_signature(token: str, nonce: str, msg: str) -> str:
    """OneNET's: base64(MD5(token + nonce + msg)), msg being the message's JSON text."""
    digest = hashlib.md5((token + nonce + msg).encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def onenet_signed(token: str, nonce: str, msg: str, signature: str) -> bool:
    expected = onenet_signature(token, nonce, msg).encode()
    # In a URL a `+` of base64 may arrive as a space when the platform did not encode it.
    return any(
        hmac.compare_digest(expected, candidate.encode())
        for candidate in {signature, signature.replace(" ", "+")}
    )


def top_level_texts(body: bytes) -> dict[str, tuple[str, Any]]:
    """The top-level members of a JSON object as (raw text, value): OneNET signs the text
    of `msg` exactly as sent, which re-serialising the parsed value would not give back.
    ValueError when the body is not a JSON object."""
    text = body.decode()
    decoder = json.JSONDecoder()
    index = _skip(text, 0)
    if text[index : index + 1] != "{":
        raise ValueError("not a JSON object")
    members: dict[str, tuple[str, Any]] = {}
    index = _skip(text, index + 1)
    if text[index : index + 1] == "}":
        return members
    while True:
        key, index = decoder.raw_decode(text, index)
        index = _skip(text, index)
        if text[index : index + 1] != ":" or not isinstance(key, str):
            raise ValueError(f"expected ':' at {index}")
        start = _skip(text, index + 1)
        value, end = decoder.raw_decode(text, start)
        members[key] = (text[start:end], value)
        index = _skip(text, end)
        if text[index : index + 1] == "}":
            return members
        if text[index : index + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at {index}")
        index = _skip(text, index + 1)


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index
