"""The time-series store: line protocol for `cover_reading`, and the InfluxDB v1 HTTP client."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from core.contract import Reading
from core.settings import Settings

logger = logging.getLogger(__name__)

MEASUREMENT = "cover_reading"
# Hourly aggregates of `cover_reading`, kept forever in a retention policy of their own.
HOURLY_MEASUREMENT = "cover_reading_hourly"
HOURLY_POLICY = "forever"
DAY_MS = 86_400_000
_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
# Longest error text from the store we keep in a log line or dead letter.
_MAX_ERROR_TEXT = 300


class TimeSeriesError(Exception):
    """Root of the store's errors. `retryable`/`retry_after` tell the writer what to do."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(TimeSeriesError):
    """Refused, timed out, 5xx or 429: try again later (after `retry_after` if given)."""


class StoreAuthFailed(TimeSeriesError):
    """401/403: credentials are wrong. Not retried soon; raised loudly on /readyz."""

    retryable = False


class StoreRejected(TimeSeriesError):
    """400: the store refused the points (unparsable line, field type conflict)."""

    retryable = False


class BatchTooLarge(TimeSeriesError):
    """413: the body is over the store's limit; split it."""

    retryable = False


class ReadingStore(Protocol):
    """What the ingest writer needs of a time-series store.

    `encode` turns readings into the store's wire form, one item per reading (the spool
    keeps that form). `write` stores encoded points or raises a `TimeSeriesError`; writing a
    point again with the same tags and time overwrites it, so retries are harmless.
    `close` is called once, after the last `write`.
    """

    def encode(
        self, readings: Sequence[Reading], cover_ids: Sequence[str | None]
    ) -> list[bytes]: ...

    async def write(self, points: Sequence[bytes]) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def escape_tag(value: str) -> str:
    return value.translate(_TAG_ESCAPES)


def line_of(reading: Reading, cover_id: str | None) -> bytes:
    """One `cover_reading` point in line protocol, timestamp in ms (DESIGN §4)."""
    tags = f"device_id={escape_tag(reading.device_id)}"
    if cover_id:
        tags += f",cover_id={escape_tag(cover_id)}"
    # Every measurement is written as a float (repr keeps full precision and always has a
    # '.' or exponent) so a field never changes type; seq is the one integer field.
    fields = f"tilt_deg={reading.tilt_deg!r},displacement_mm={reading.displacement_mm!r}"
    if reading.water_level_cm is not None:
        fields += f",water_level_cm={reading.water_level_cm!r}"
    if reading.battery_v is not None:
        fields += f",battery_v={reading.battery_v!r}"
    if reading.rssi_dbm is not None:
        fields += f",rssi_dbm={float(reading.rssi_dbm)!r}"
    if reading.temperature_c is not None:
        fields += f",temperature_c={reading.temperature_c!r}"
    return f"{MEASUREMENT},{tags} {fields},seq={reading.seq}i {reading.ts_ms}".encode()


@dataclass(frozen=True, slots=True)
class InfluxConfig:
    url: str
    database: str
    token: str = ""
    username: str = ""
    password: str = ""
    create_database: bool = True
    timeout_s: float = 10.0
    raw_retention_days: int = 400

    @classmethod
    def from_settings(cls, settings: Settings) -> InfluxConfig:
        return cls(
            url=settings.influx_url,
            database=settings.influx_db,
            token=settings.influx_token.get_secret_value(),
            username=settings.influx_user,
            password=settings.influx_password.get_secret_value(),
            create_database=settings.influx_create_db,
            timeout_s=settings.influx_timeout_s,
            raw_retention_days=settings.retention_raw_days,
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _error_text(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
        text = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        text = response.text
    return text[:_MAX_ERROR_TEXT]


class InfluxStore:
    """InfluxDB through its v1 HTTP API (1.x natively, 2.x/3.x via v1 compatibility)."""

    def __init__(self, config: InfluxConfig, *, transport: httpx.AsyncBaseTransport | None = None):
        self._config = config
        headers = {"Authorization": f"Token {config.token}"} if config.token else {}
        auth = (config.username, config.password) if config.username else None
        self._http = httpx.AsyncClient(
            base_url=config.url,
            headers=headers,
            auth=auth,
            timeout=config.timeout_s,
            transport=transport,
        )

    @property
    def database(self) -> str:
        return self._config.database

    @property
    def config(self) -> InfluxConfig:
        return self._config

    @property
    def raw_retention_ms(self) -> int:
        """How far back raw readings are kept; older ones only as hourly aggregates."""
        return self._config.raw_retention_days * DAY_MS

    def encode(self, readings: Sequence[Reading], cover_ids: Sequence[str | None]) -> list[bytes]:
        return [line_of(reading, cover) for reading, cover in zip(readings, cover_ids, strict=True)]

    async def write(self, points: Sequence[bytes]) -> None:
        if not points:
            return
        body = b"\n".join(points)
        response = await self._post_write(body)
        if response.status_code == 404 and self._config.create_database:
            await self.create_database()
            response = await self._post_write(body)
        self._raise_for(response)

    async def _post_write(self, body: bytes) -> httpx.Response:
        try:
            return await self._http.post(
                "/write", params={"db": self._config.database, "precision": "ms"}, content=body
            )
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        status = response.status_code
        if status in (200, 204):
            return
        text = _error_text(response)
        if status == 400:
            raise StoreRejected(f"InfluxDB rejected points: {text}")
        if status in (401, 403):
            raise StoreAuthFailed(f"InfluxDB refused our credentials ({status}): {text}")
        if status == 413:
            raise BatchTooLarge(f"InfluxDB: request too large: {text}")
        if status == 404:
            raise StoreUnavailable(f"InfluxDB database not found (creation disabled): {text}")
        raise StoreUnavailable(
            f"InfluxDB answered {status}: {text}", retry_after=_retry_after(response)
        )

    async def create_database(self) -> None:
        name = self._config.database.replace("\\", "\\\\").replace('"', '\\"')
        logger.warning("InfluxDB database %r not found: creating it", self._config.database)
        try:
            response = await self._http.post("/query", data={"q": f'CREATE DATABASE "{name}"'})
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from exc
        self._raise_for(response)

    async def query(self, influxql: str, *, params: dict[str, Any] | None = None) -> Any:
        """Runs an InfluxQL query (epoch ms times); returns the decoded JSON answer."""
        request_params: dict[str, Any] = {"db": self._config.database, "q": influxql, "epoch": "ms"}
        if params:
            request_params["params"] = json.dumps(params)  # InfluxQL bound parameters
        try:
            response = await self._http.get("/query", params=request_params)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from exc
        self._raise_for(response)
        return response.json()

    async def execute(self, influxql: str) -> Any:
        """Runs a statement that changes something (POST /query: DDL, SELECT INTO)."""
        data = {"db": self._config.database, "q": influxql}
        try:
            response = await self._http.post("/query", data=data)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from exc
        self._raise_for(response)
        return response.json()

    async def ping(self) -> None:
        try:
            response = await self._http.get("/ping")
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from exc
        if response.status_code != 204:
            raise StoreUnavailable(f"InfluxDB /ping answered {response.status_code}")

    async def close(self) -> None:
        await self._http.aclose()
