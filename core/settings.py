"""Typed settings, read once from the environment (or `.env`) at start-up and passed down."""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.broker_auth import MIN_CREW_KEY_CHARS

# An MQTT client id that also works as a Mosquitto ACL pattern: no wildcards, no slash.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Shortest bootstrap admin key accepted outside development (128 bits of base64 text).
_MIN_ADMIN_KEY_CHARS = 22


Severity = Literal["critical", "major", "minor"]
Milestone = Literal["acknowledged", "on_site", "resolved"]
PositiveMinutes = Annotated[float, Field(gt=0)]


def _default_deadlines() -> dict[Severity, dict[Milestone, PositiveMinutes]]:
    return {
        "critical": {"acknowledged": 10, "on_site": 30, "resolved": 360},
        "major": {"acknowledged": 30, "resolved": 1440},
        "minor": {"resolved": 4320},
    }


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class MqttEndpoint(BaseModel, frozen=True):
    """The broker address taken apart: `mqtt[s]://user:password@host:port`."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: SecretStr | None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, not {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("MQTT URL has no host")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
        )


class Settings(BaseSettings):
    """Everything configurable; names are DESIGN §9's, prefixed `SMARTCOVER_`."""

    model_config = SettingsConfigDict(
        env_prefix="SMARTCOVER_", env_file=".env", extra="ignore", frozen=True
    )

    env: Environment = Environment.DEVELOPMENT
    log_level: str = "INFO"

    mqtt_url: SecretStr = SecretStr("mqtt://127.0.0.1:1883")
    mqtt_client_id: str = "smartcover-ingest"
    # Empty: a plain subscription. A name: `$share/<name>/…`, to spread load over workers.
    mqtt_share_group: str = ""
    # How long the broker keeps our session (and queues our messages) while we are away.
    mqtt_session_expiry_s: Annotated[int, Field(ge=60, le=0xFFFFFFFF)] = 7 * 24 * 3600
    # MQTT 5 Receive Maximum: un-acknowledged messages the broker may have out to us.
    # It must cover the batch being written plus the one filling up, with room to spare.
    mqtt_receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 30000
    # 5 (MQTT 5), or 4 (MQTT 3.1.1) for a broker that speaks nothing newer.
    mqtt_protocol: Literal[4, 5] = 5

    influx_url: str = ""
    influx_db: str = "smartcover"
    influx_token: SecretStr = SecretStr("")
    influx_user: str = ""
    influx_password: SecretStr = SecretStr("")
    influx_create_db: bool = True
    influx_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # The embedded time-series store, used when SMARTCOVER_INFLUX_URL is empty.
    timeseries_path: Path = Path("./smartcover-ts.db")
    # Raw readings are kept this long (a rainy season plus a year to compare it with);
    # hourly aggregates forever. Above 9: hours are aggregated once no late reading can
    # come (the 7-day stale limit), before their raw readings go.
    retention_raw_days: Annotated[int, Field(ge=10, le=36500)] = 400

    database_url: str = "sqlite:///./smartcover.db"
    spool_dir: Path = Path("./spool")
    # A day of a pilot's readings while the store is down: 10,000 covers reporting every
    # 5 min are 2.9 M readings of ~200 bytes (580 MB), with room for alarm bursts. When it
    # is full, ingest stops acknowledging and the broker keeps the rest.
    spool_max_mb: Annotated[float, Field(gt=0)] = 1024.0
    deadletter_capacity: Annotated[int, Field(ge=100)] = 10000
    deadletter_keep_days: Annotated[float, Field(gt=0)] = 90.0
    # Delivered outbox events are kept this long: the live stream resumes from them.
    outbox_keep_days: Annotated[float, Field(ge=1)] = 30.0

    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    admin_key: SecretStr = SecretStr("")
    # Heavy requests (ledger exports, census imports) running at once: per key, and in
    # all for the viewer keys and for the keys of each other role (429 beyond).
    heavy_per_key: Annotated[int, Field(ge=1)] = 2
    heavy_viewer_total: Annotated[int, Field(ge=1)] = 2
    heavy_role_total: Annotated[int, Field(ge=1)] = 4

    # A batch is written when it holds this many readings or is this old, whichever first.
    batch_size: Annotated[int, Field(ge=1, le=20000)] = 5000
    batch_max_age_ms: Annotated[int, Field(ge=1, le=60000)] = 200
    # Retries of a failing write before the batch goes to the local spool instead.
    write_deadline_s: Annotated[float, Field(gt=0)] = 3.0
    shutdown_deadline_s: Annotated[float, Field(gt=0)] = 15.0
    # Per device: telemetry messages a second sustained, and at once (a backlog after an
    # outage); the excess is dead-lettered as `rate_limited`. A rate of 0: no guard.
    device_rate_per_s: Annotated[float, Field(ge=0)] = 10.0
    device_rate_burst: Annotated[int, Field(ge=1)] = 600
    # Per API key, in memory per process: requests a second sustained and at once, and
    # live streams open at once; beyond, 429 with Retry-After. 0: no limit.
    api_rate_per_s: Annotated[float, Field(ge=0)] = 20.0
    api_rate_burst: Annotated[int, Field(ge=1)] = 100
    api_streams_per_key: Annotated[int, Field(ge=0)] = 5

    tilt_confirm_s: Annotated[float, Field(gt=0)] = 30.0
    verify_window_s: Annotated[float, Field(gt=0)] = 1800.0
    verify_min_readings: Annotated[int, Field(ge=1)] = 3
    # Case deadlines in minutes after opening, by severity and milestone (DESIGN §6), as
    # JSON in the environment, e.g. {"critical": {"acknowledged": 5, ...}, ...}.
    case_deadlines_min: dict[Severity, dict[Milestone, PositiveMinutes]] = Field(
        default_factory=_default_deadlines
    )
    # An unacknowledged critical case is notified again this often (a bounded rate).
    renotify_every_s: Annotated[float, Field(ge=60)] = 300.0
    # Networks that webhooks and other outgoing URLs may reach although they are not
    # public (loopback, link-local, private, CGNAT…), as CIDRs separated by commas, e.g.
    # `10.20.0.0/16` for an on-premises receiver. Empty: only public addresses.
    outbound_allow_nets: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()

    # Device models the operator adds (`*.toml` codec files) to the built-in ones, and the
    # ingress sources (DESIGN §12: `[sources.<name>]` tables). Unset: none of either.
    codecs_dir: Path | None = None
    sources_file: Path | None = None
    # An HTTP push not durable and evaluated within this is answered 503 (the platform
    # delivers it again): CTWing pauses subscribers that answer slowly.
    push_deadline_s: Annotated[float, Field(gt=0)] = 5.0

    # `smartcover devices …` only: the broker's files and how to make it re-read them
    # (flags override). Unset ACL template: the project's `mosquitto/acl`.
    broker_password_file: Path | None = None
    broker_acl_file: Path | None = None
    broker_acl_template: Path | None = None
    broker_pid_file: Path | None = None
    broker_reload_cmd: str | None = None
    # Crews' broker passwords derive from it; empty: no crews. Never a flag (`ps` shows those).
    broker_crew_key: SecretStr = SecretStr("")

    @field_validator("mqtt_client_id")
    @classmethod
    def _client_id_is_fixed(cls, value: str) -> str:
        # A persistent session is found again by its client id: it must be set and stable.
        if not _CLIENT_ID.match(value):
            raise ValueError("must be 1-64 characters of [A-Za-z0-9_.-] (persistent session id)")
        return value

    @field_validator(
        "broker_password_file",
        "broker_acl_file",
        "broker_acl_template",
        "broker_pid_file",
        "broker_reload_cmd",
        "codecs_dir",
        "sources_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `VAR=` in a .env or compose file means "not set", not the current directory.
        return None if value == "" else value

    @field_validator("mqtt_protocol", mode="before")
    @classmethod
    def _protocol_from_text(cls, value: object) -> object:
        # The environment gives "4", which a Literal of ints would refuse as a string.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("broker_crew_key")
    @classmethod
    def _crew_key_is_long(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value()) < MIN_CREW_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_CREW_KEY_CHARS} characters, or empty")
        return value

    @field_validator("outbound_allow_nets", mode="before")
    @classmethod
    def _nets_from_commas(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        nets = [net for net in re.split(r"[\s,]+", value) if net]
        try:
            return tuple(ip_network(net) for net in nets)
        except ValueError as exc:  # ip_network's text names the culprit (host bits set…)
            raise ValueError(f"must be CIDRs separated by commas: {exc}") from None

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url_parses(cls, value: SecretStr) -> SecretStr:
        MqttEndpoint.parse(value.get_secret_value())
        return value

    @field_validator("influx_url")
    @classmethod
    def _influx_url_is_http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, or empty for the embedded store")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _safe_outside_development(self) -> Self:
        if self.env is Environment.DEVELOPMENT:
            return self
        if len(self.admin_key.get_secret_value()) < _MIN_ADMIN_KEY_CHARS:
            raise ValueError(
                f"SMARTCOVER_ADMIN_KEY must be at least {_MIN_ADMIN_KEY_CHARS} random characters"
                " outside development (try: python -c 'import secrets;"
                " print(secrets.token_urlsafe(24))')"
            )
        return self

    @model_validator(mode="after")
    def _window_covers_two_batches(self) -> Self:
        # With fewer un-acknowledged messages allowed than two batches, the broker stops
        # sending before a batch fills, and every batch waits for its age limit.
        if self.mqtt_receive_maximum < 2 * self.batch_size:
            raise ValueError(
                "SMARTCOVER_MQTT_RECEIVE_MAXIMUM must be at least twice the batch size"
            )
        return self

    @property
    def mqtt(self) -> MqttEndpoint:
        return MqttEndpoint.parse(self.mqtt_url.get_secret_value())
