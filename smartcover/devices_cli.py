"""`smartcover devices …`: device credentials, the broker's password file and ACL, and
devices that report through an IoT platform (their source and external id)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import broker_auth, db, logs, registry
from core.broker_auth import SERVICE_USER, BrokerAuthError, BrokerUser
from core.registry_errors import NotFound, RegistryError
from core.registry_schemas import DeviceCreate, DeviceUpdate
from core.settings import Settings
from smartcover.cli_settings import load_settings

app = typer.Typer(
    help="Devices' broker credentials; the broker's password file and ACL.",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

# The settings these commands' options default to (see docker-compose.yml, service
# `broker-auth`); named here for the messages that point to them.
PWFILE_ENV = "SMARTCOVER_BROKER_PASSWORD_FILE"
ACL_FILE_ENV = "SMARTCOVER_BROKER_ACL_FILE"
ACL_TEMPLATE_ENV = "SMARTCOVER_BROKER_ACL_TEMPLATE"
PID_FILE_ENV = "SMARTCOVER_BROKER_PID_FILE"
RELOAD_CMD_ENV = "SMARTCOVER_BROKER_RELOAD_CMD"
# A setting only, never a flag: a flag would show in `ps` and shell history.
CREW_KEY_ENV = "SMARTCOVER_BROKER_CREW_KEY"
ENVVARS = frozenset(
    {PWFILE_ENV, ACL_FILE_ENV, ACL_TEMPLATE_ENV, PID_FILE_ENV, RELOAD_CMD_ENV, CREW_KEY_ENV}
)
DEFAULT_ACL_TEMPLATE = Path(__file__).resolve().parents[1] / "mosquitto" / "acl"

# Exit codes: 1 = done, but reloading the broker as asked failed; 2 = nothing usable done.
EXIT_NOT_RELOADED = 1
EXIT_UNUSABLE = 2

_T = TypeVar("_T")

PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(help=f"The broker's password file (Mosquitto `password_file`) [{PWFILE_ENV}]."),
]
PidFileOpt = Annotated[
    Path | None,
    typer.Option(help=f"Reload the broker by SIGHUP to the pid in this file [{PID_FILE_ENV}]."),
]
ReloadCmdOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Reload the broker with this command instead (no shell) [{RELOAD_CMD_ENV}].",
    ),
]


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]{message}[/red]", highlight=False)
    return typer.Exit(EXIT_UNUSABLE)


def _run(
    settings: Settings, work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[_T]]
) -> _T:
    """Runs `work` against the configured registry, which must be migrated."""

    async def main() -> _T:
        engine = db.create_engine(settings.database_url, must_exist=True)
        try:
            if not await db.is_up_to_date(engine):
                raise _fail("The database is not migrated: run `smartcover db upgrade` first.")
            return await work(db.session_factory(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (RegistryError, BrokerAuthError) as exc:
        raise _fail(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise _fail(f"Database {settings.database_url.split('@')[-1]}: {exc}") from None


def _password_file(flag: Path | None, settings: Settings) -> Path:
    found = flag or settings.broker_password_file
    if found is None:
        raise _fail(f"Which password file? Give --password-file or set {PWFILE_ENV}.")
    return found


def _reload(settings: Settings, pid_file: Path | None, reload_cmd: str | None) -> None:
    """Reloads the broker if told how; exits with EXIT_NOT_RELOADED if that fails."""
    try:
        how = broker_auth.reload_broker(
            pid_file=pid_file or settings.broker_pid_file,
            reload_cmd=reload_cmd or settings.broker_reload_cmd,
        )
    except BrokerAuthError as exc:
        errors.print(f"[red]The broker was not reloaded: {exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_NOT_RELOADED) from None
    if how is None:
        # Not an error: at a deployment's start the broker reads the files as it starts.
        console.print(
            "The broker reads the new files when it starts or on SIGHUP"
            " (`docker compose kill -s SIGHUP mosquitto`; or --pid-file, --reload-cmd).",
            highlight=False,
        )
    else:
        console.print(f"Broker reloaded ({how}).", highlight=False)


# -- provision --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Provisioned:
    created: bool
    password_hash: str


async def _provision_in_registry(
    sessions: async_sessionmaker[AsyncSession],
    *,
    device_id: str,
    cover_id: str,
    interval_s: int | None,
    model: str | None,
    secret: str,
) -> _Provisioned:
    """Creates the device (or gives it a new secret) and binds it, in one transaction."""
    async with db.transaction(sessions) as session:
        try:
            await registry.get_device(session=session, device_id=device_id)
        except NotFound:
            fields: dict[str, object] = {"device_id": device_id, "model": model}
            if interval_s is not None:
                fields["report_interval_s"] = interval_s
            device = DeviceCreate.model_validate(fields)
            await registry.create_device(session=session, device=device, secret=secret)
            created = True
        else:
            await registry.set_device_secret(session=session, device_id=device_id, secret=secret)
            changes: dict[str, object] = {}
            if interval_s is not None:
                changes["report_interval_s"] = interval_s
            if model is not None:
                changes["model"] = model
            if changes:
                update = DeviceUpdate.model_validate(changes)
                await registry.update_device(session=session, device_id=device_id, update=update)
            created = False
        await registry.bind_device(session=session, device_id=device_id, cover_id=cover_id)
        hashes = dict(await registry.credential_hashes(session=session))
    return _Provisioned(created=created, password_hash=hashes[device_id])


def _add_to_password_file(password_file: Path, user: BrokerUser) -> None:
    with broker_auth.locked(password_file):
        text = password_file.read_text(encoding="utf-8")
        broker_auth.write_atomically(password_file, broker_auth.with_user(text, user))


def _print_credentials(device_id: str, secret: str) -> None:
    # Plain echo, not rich: nothing may wrap, highlight or re-flow a secret.
    typer.echo(f"MQTT credentials of device {device_id} (shown once: store them in the device):")
    typer.echo(f"  username   {device_id}")
    typer.echo(f"  password   {secret}")
    typer.echo("  client id  any (the broker replaces it by the username)")
    typer.echo(f"  publish    covers/{device_id}/telemetry   QoS 1")
    typer.echo(f"             covers/{device_id}/status      QoS 1, retained, as Last Will")


@app.command()
def provision(
    device_id: Annotated[str, typer.Argument(help="The id the device publishes under.")],
    *,
    cover: Annotated[str, typer.Option(help="Standard number of the cover it is mounted on.")],
    password_file: PasswordFileOpt = None,
    interval: Annotated[
        int | None, typer.Option(help="Report interval in seconds (60-86400).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Sensor model.")] = None,
    pid_file: PidFileOpt = None,
    reload_cmd: ReloadCmdOpt = None,
) -> None:
    """Creates a device (or rotates its secret), binds it to a cover, prints its credentials.

    The secret is printed once and stored nowhere but as a hash, in the registry and in
    the broker's password file. Running it again for the same device rotates the secret.
    """
    settings = load_settings()
    logs.configure(settings.log_level)
    password_file = _password_file(password_file, settings)
    try:
        broker_auth.check_device_id(device_id)
    except BrokerAuthError as exc:
        raise _fail(str(exc)) from None
    if not password_file.is_file():
        # Without the service's and crews' lines the broker would lock them out at reload.
        raise _fail(f"{password_file} does not exist: run `smartcover devices passwords` first.")
    secret = registry.new_device_secret()

    async def work(sessions: async_sessionmaker[AsyncSession]) -> _Provisioned:
        try:
            return await _provision_in_registry(
                sessions,
                device_id=device_id,
                cover_id=cover,
                interval_s=interval,
                model=model,
                secret=secret,
            )
        except ValidationError as exc:
            raise _fail(f"Invalid device: {exc}") from None

    done = _run(settings, work)
    try:
        _add_to_password_file(password_file, BrokerUser(device_id, done.password_hash))
    except (BrokerAuthError, OSError) as exc:
        raise _fail(
            f"The registry has the device's new secret, but {password_file} could not be"
            f" updated ({exc}). The secret is not shown: fix this, then provision again"
            " (it rotates the secret)."
        ) from None
    verb = "registered" if done.created else "given a new secret"
    console.print(
        f"Device {device_id} {verb}, bound to cover {cover}; {password_file} updated.",
        highlight=False,
    )
    _print_credentials(device_id, secret)
    _reload(settings, pid_file, reload_cmd)


# -- register (devices that report through a platform) -----------------------------------


@app.command()
def register(
    device_id: Annotated[str, typer.Argument(help="The device's id in the registry.")],
    *,
    source: Annotated[
        str | None, typer.Option(help="The source it reports through (SMARTCOVER_SOURCES_FILE).")
    ] = None,
    external_id: Annotated[
        str | None, typer.Option(help="Its id on that source: IMEI, dev_id, device_id.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Device model (its codec).")] = None,
    interval: Annotated[
        int | None, typer.Option(help="Report interval in seconds (60-86400).")
    ] = None,
    cover: Annotated[
        str | None, typer.Option(help="Standard number of the cover it is mounted on.")
    ] = None,
) -> None:
    """Registers a device that reports through an IoT platform (no broker credentials),
    or updates its source, external id, model or interval; binds it to `--cover`."""
    settings = load_settings()
    logs.configure(settings.log_level)
    given = {"source": source, "external_id": external_id, "model": model}
    fields: dict[str, object] = {name: value for name, value in given.items() if value}
    if interval is not None:
        fields["report_interval_s"] = interval

    async def work(sessions: async_sessionmaker[AsyncSession]) -> bool:
        try:
            return await _register_in_registry(sessions, device_id, fields, cover)
        except ValidationError as exc:
            raise _fail(f"Invalid device: {exc}") from None

    created = _run(settings, work)
    mapping = f" as {source} id {external_id}" if source and external_id else ""
    bound = f", bound to cover {cover}" if cover else ""
    verb = "registered" if created else "updated"
    console.print(f"Device {device_id} {verb}{mapping}{bound}.", highlight=False)


async def _register_in_registry(
    sessions: async_sessionmaker[AsyncSession],
    device_id: str,
    fields: dict[str, object],
    cover_id: str | None,
) -> bool:
    """Creates or updates the device, and binds it, in one transaction; True if created."""
    async with db.transaction(sessions) as session:
        try:
            await registry.get_device(session=session, device_id=device_id)
        except NotFound:
            device = DeviceCreate.model_validate({"device_id": device_id, **fields})
            await registry.create_device(session=session, device=device)
            created = True
        else:
            if fields:
                update = DeviceUpdate.model_validate(fields)
                await registry.update_device(session=session, device_id=device_id, update=update)
            created = False
        if cover_id is not None:
            await registry.bind_device(session=session, device_id=device_id, cover_id=cover_id)
    return created


# -- passwords --------------------------------------------------------------------------


def _crew_key(settings: Settings) -> str | None:
    # Its length was checked with the other settings.
    return settings.broker_crew_key.get_secret_value() or None


def _service_user(settings: Settings) -> BrokerUser:
    endpoint = settings.mqtt
    if endpoint.username != SERVICE_USER or endpoint.password is None:
        raise _fail(
            f"SMARTCOVER_MQTT_URL must hold the service's broker credentials, as in"
            f" mqtt://{SERVICE_USER}:<password>@<broker>:1884 (the ACL grants `{SERVICE_USER}`)."
        )
    try:
        hashed = registry.hash_secret(endpoint.password.get_secret_value())
    except RegistryError as exc:
        raise _fail(f"The service's broker password: {exc}") from None
    return BrokerUser(SERVICE_USER, hashed)


@dataclass(frozen=True, slots=True)
class _RegistryUsers:
    unit_codes: list[str]
    devices: list[BrokerUser]


async def _registry_users(sessions: async_sessionmaker[AsyncSession]) -> _RegistryUsers:
    async with db.transaction(sessions, write=False) as session:
        units = await registry.list_units(session=session)
        hashes = await registry.credential_hashes(session=session)
    devices = []
    for device_id, hashed in hashes:
        broker_auth.check_device_id(device_id)  # a clash with the service is an error
        devices.append(BrokerUser(device_id, hashed))
    return _RegistryUsers([unit.code for unit in units], devices)


@app.command()
def passwords(
    *,
    password_file: PasswordFileOpt = None,
    acl_file: Annotated[
        Path | None,
        typer.Option(help=f"Write the broker's ACL here (crew blocks) [{ACL_FILE_ENV}]."),
    ] = None,
    acl_template: Annotated[
        Path | None,
        typer.Option(help=f"The ACL template [{ACL_TEMPLATE_ENV}; the project's]."),
    ] = None,
    pid_file: PidFileOpt = None,
    reload_cmd: ReloadCmdOpt = None,
) -> None:
    """Writes the password files and the ACL from scratch: crews and devices in the
    password file, the service alone in the one beside it (`<file>-service`), for the
    service's own listener.

    The service's password is the one in SMARTCOVER_MQTT_URL; crews' passwords derive from
    SMARTCOVER_BROKER_CREW_KEY (no crews without it); devices' hashes come from the registry.
    """
    settings = load_settings()
    logs.configure(settings.log_level)
    password_file = _password_file(password_file, settings)
    acl_file = acl_file or settings.broker_acl_file
    acl_template = acl_template or settings.broker_acl_template or DEFAULT_ACL_TEMPLATE
    crew_key = _crew_key(settings)
    if crew_key is not None and acl_file is None:
        raise _fail(f"Crews need their ACL blocks: give --acl-file ({ACL_FILE_ENV}).")
    service = _service_user(settings)
    found = _run(settings, _registry_users)
    crews = (
        broker_auth.crew_users(crew_key, found.unit_codes, registry.hash_secret)
        if crew_key is not None
        else []
    )
    service_file = broker_auth.service_password_file(password_file)
    try:
        text = broker_auth.password_file_text([*crews, *found.devices])
        with broker_auth.locked(password_file):
            if acl_file is not None:
                template = acl_template.read_text(encoding="utf-8")
                acl = broker_auth.acl_text(template, found.unit_codes if crews else [])
                broker_auth.write_atomically(acl_file, acl)
            broker_auth.write_atomically(service_file, broker_auth.password_file_text([service]))
            broker_auth.write_atomically(password_file, text)
    except (BrokerAuthError, OSError) as exc:
        raise _fail(f"Broker files not written: {exc}") from None
    console.print(
        f"{password_file}: {len(crews)} crews, {len(found.devices)} devices;"
        f" {service_file}: the service."
        + (f" {acl_file}: {len(crews)} crew blocks." if acl_file is not None else ""),
        highlight=False,
    )
    if crew_key is None:
        errors.print(f"No crews: {CREW_KEY_ENV} is not set.", highlight=False)
    _reload(settings, pid_file, reload_cmd)


# -- crew -------------------------------------------------------------------------------


@app.command()
def crew(unit: Annotated[str, typer.Argument(help="The unit's code.")]) -> None:
    """Prints the broker credentials of a unit's crew, to hand to its alert receiver.

    They follow from SMARTCOVER_BROKER_CREW_KEY; the crew may read alerts/<unit> only.
    """
    settings = load_settings()
    logs.configure(settings.log_level)
    crew_key = _crew_key(settings)
    if crew_key is None:
        raise _fail(f"{CREW_KEY_ENV} is not set: crews have no credentials.")

    async def work(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with db.transaction(sessions, write=False) as session:
            await registry.get_unit(session=session, code=unit)

    _run(settings, work)
    try:
        username = broker_auth.crew_username(unit)
        password = broker_auth.crew_password(crew_key, unit)
    except BrokerAuthError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"MQTT credentials of unit {unit}'s crew (keep them secret):")
    typer.echo(f"  username   {username}")
    typer.echo(f"  password   {password}")
    typer.echo(f"  subscribe  alerts/{unit}   QoS 1 (one connection per username at a time)")
