"""The registry domain's errors: one root, each carrying what the API or CLI shows."""

from __future__ import annotations


class RegistryError(Exception):
    """Root of every error raised by the registry, census import and registry cache."""


class NotFound(RegistryError):
    """A record that the operation names does not exist (HTTP 404)."""

    def __init__(self, entity: str, key: str) -> None:
        super().__init__(f"{entity} {key!r} not found")
        self.entity = entity
        self.key = key


class Conflict(RegistryError):
    """The operation clashes with a record that exists (HTTP 409)."""

    def __init__(self, entity: str, key: str, reason: str) -> None:
        super().__init__(f"{entity} {key!r}: {reason}")
        self.entity = entity
        self.key = key
        self.reason = reason


class Invalid(RegistryError):
    """A value breaks a registry rule that its schema alone cannot check (HTTP 422)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
