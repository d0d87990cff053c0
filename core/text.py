"""Text taken from outside (request bodies, path and query parameters, census cells): no
NUL and no other control characters, refused the same way whichever database is behind.

PostgreSQL cannot store U+0000 and fails the statement; SQLite stores it. Checked before
the database, the same request gets the same 422 on both. The other C0 and C1 controls
have no place in names, codes, numbers or URLs either: they hide or rewrite text where it
is shown again (a terminal, a log line, a ledger's spreadsheet cell).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, SecretStr
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

# C0 (U+0000-U+001F), DEL (U+007F) and C1 (U+0080-U+009F).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Free text (a note typed on site) keeps its layout: tab, line feed, carriage return.
_CONTROL_BUT_LAYOUT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# The same rules as JSON Schema patterns, so that the OpenAPI schema states them (and a
# schema-driven client or fuzzer sends what will be accepted).
PLAIN_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
FREE_TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"


def control_character_problem(text: str, *, layout_allowed: bool = False) -> str | None:
    """Why `text` is refused (its first control character and where), or None."""
    found = (_CONTROL_BUT_LAYOUT if layout_allowed else _CONTROL).search(text)
    if found is None:
        return None
    allowed = " (tab and line breaks are)" if layout_allowed else ""
    return (
        f"control character U+{ord(found.group()):04X} at position {found.start()}:"
        f" NUL and other control characters are not allowed{allowed}"
    )


@dataclass(frozen=True, slots=True)
class NoControlCharacters:
    """Pydantic metadata for `Annotated[str, NoControlCharacters()]` (or SecretStr): the
    value is refused when it holds a control character, and the schema says so."""

    layout_allowed: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if json_schema.get("type") == "string":
            pattern = FREE_TEXT_PATTERN if self.layout_allowed else PLAIN_PATTERN
            json_schema.setdefault("pattern", pattern)  # a stricter pattern of its own stays
        return json_schema

    def _check(self, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str):
            problem = control_character_problem(text, layout_allowed=self.layout_allowed)
            if problem is not None:
                # Not the value itself: it may be a secret, and it is what was wrong.
                raise PydanticCustomError("control_character", problem)
        return value


PLAIN = NoControlCharacters()
FREE_TEXT = NoControlCharacters(layout_allowed=True)
