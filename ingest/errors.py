"""The ingest domain's errors: one root, with data saying whether and when to retry."""

from __future__ import annotations


class IngestError(Exception):
    """Root of every error raised by the ingest package."""

    retryable: bool = False


class MqttError(IngestError):
    """The broker connection failed or the broker refused us; reconnecting may help."""

    retryable = True

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MqttRefused(MqttError):
    """The broker refused the connection for a reason that retrying will not fix soon."""

    retryable = False


class IngestUnavailable(IngestError):
    """Readings cannot be taken here now (a standby, stopping, or not made durable): the
    sender should deliver them again (HTTP push: 503)."""

    retryable = True
