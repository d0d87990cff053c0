"""Registry data functions: units, roads, covers, devices and their bindings.

Every function is keyword-only, takes the caller's session and never commits: the caller
owns the transaction (`async with db.transaction(sessions) as session:`), so several
changes commit or fail together. Each change bumps the registry version in the same
transaction, which is how caches learn that they are stale. Records go in and come out
as the pydantic shapes of `core.registry_schemas`; ORM rows never leave this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Select, and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import utcnow
from core.registry_errors import Conflict, Invalid, NotFound
from core.registry_models import (
    CoverRow,
    DeviceBindingRow,
    DeviceRow,
    RegistryVersionRow,
    RoadRow,
    UnitRow,
    UnregisteredDeviceRow,
)
from core.registry_schemas import (
    UNKNOWN_OWNER_CLASS,
    Cover,
    CoverCreate,
    CoverUpdate,
    Device,
    DeviceBinding,
    DeviceCreate,
    DeviceUpdate,
    EndReason,
    Road,
    RoadCreate,
    ThresholdOverrides,
    Unit,
    UnitKind,
    UnitUpdate,
    changes,
    kind_code_of,
)

logger = logging.getLogger(__name__)

# The PostgreSQL notification channel on which registry changes are announced.
REGISTRY_CHANNEL = "smartcover_registry"
# The session.info key counting this transaction's registry versions.
VERSION_STEPS = "smartcover_registry_steps"

# -- the change counter -----------------------------------------------------------------


async def bump_version(*, session: AsyncSession) -> None:
    """Count one registry change; commits with the change itself.

    On PostgreSQL the change is also announced on `REGISTRY_CHANNEL`: the notification is
    delivered when (and only if) the transaction commits, so every other process's cache
    reloads within moments instead of at its next poll.
    """
    # The row lock also serialises registry writers on PostgreSQL, which is what we want:
    # registry changes are rare, and a cache must never miss one.
    await session.execute(
        update(RegistryVersionRow)
        .where(RegistryVersionRow.id == 1)
        .values(version=RegistryVersionRow.version + 1, changed_at=utcnow())
    )
    # How far this transaction moves the version: a cache that finds the registry moved
    # by exactly this much after the commit knows nobody else changed it meanwhile.
    session.info[VERSION_STEPS] = session.info.get(VERSION_STEPS, 0) + 1
    if session.get_bind().dialect.name == "postgresql":
        # One notification per transaction is enough: PostgreSQL folds identical ones.
        await session.execute(select(func.pg_notify(REGISTRY_CHANNEL, "changed")))


async def registry_version(*, session: AsyncSession) -> int:
    version: int | None = await session.scalar(select(RegistryVersionRow.version))
    if version is None:
        raise NotFound("registry version", "1")  # a database that was never migrated
    return version


async def _flush(session: AsyncSession, entity: str, key: str) -> None:
    """Flushes, turning a constraint the checks before could not see (a race) into Conflict."""
    try:
        await session.flush()
    except IntegrityError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        raise Conflict(entity, key, f"refused by the database: {reason}") from exc


# -- units ------------------------------------------------------------------------------


def _unit(row: UnitRow) -> Unit:
    return Unit(
        code=row.code,
        name=row.name,
        kind=UnitKind(row.kind),
        parent=row.parent,
        webhook_url=row.webhook_url,
        webhook_secret=SecretStr(row.webhook_secret) if row.webhook_secret is not None else None,
        supervisor_contact=row.supervisor_contact,
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


async def _unit_row(session: AsyncSession, code: str) -> UnitRow:
    row = await session.get(UnitRow, code)
    if row is None:
        raise NotFound("unit", code)
    return row


async def _check_unit_exists(session: AsyncSession, field: str, code: str | None) -> None:
    if code is not None and await session.get(UnitRow, code) is None:
        raise Invalid(field, f"unit {code!r} does not exist")


async def _check_parent(session: AsyncSession, code: str, parent: str | None) -> None:
    """The parent must exist and must not be the unit itself or one of its descendants."""
    seen = {code}
    while parent is not None:
        if parent in seen:
            raise Invalid("parent", f"unit {parent!r} would make the hierarchy a cycle")
        seen.add(parent)
        row = await session.get(UnitRow, parent)
        if row is None:
            raise Invalid("parent", f"unit {parent!r} does not exist")
        parent = row.parent


async def create_unit(*, session: AsyncSession, unit: Unit) -> Unit:
    if await session.get(UnitRow, unit.code) is not None:
        raise Conflict("unit", unit.code, "exists already")
    await _check_parent(session, unit.code, unit.parent)
    row = UnitRow(
        code=unit.code,
        name=unit.name,
        kind=unit.kind.value,
        parent=unit.parent,
        webhook_url=unit.webhook_url,
        webhook_secret=_secret(unit.webhook_secret),
        supervisor_contact=unit.supervisor_contact,
    )
    session.add(row)
    await _flush(session, "unit", unit.code)
    await bump_version(session=session)
    return _unit(row)


async def get_unit(*, session: AsyncSession, code: str) -> Unit:
    return _unit(await _unit_row(session, code))


async def list_units(*, session: AsyncSession, kind: UnitKind | None = None) -> list[Unit]:
    query = select(UnitRow).order_by(UnitRow.code)
    if kind is not None:
        query = query.where(UnitRow.kind == kind.value)
    return [_unit(row) for row in await session.scalars(query)]


async def update_unit(*, session: AsyncSession, code: str, update: UnitUpdate) -> Unit:
    row = await _unit_row(session, code)
    values = changes(update)
    if "parent" in values:
        await _check_parent(session, code, values["parent"])
    if "kind" in values and values["kind"] is not UnitKind.TOWNSHIP:
        await _check_not_a_fallback_owner(session, code)
    for name, value in values.items():
        stored = value.get_secret_value() if isinstance(value, SecretStr) else value
        setattr(row, name, stored.value if isinstance(stored, UnitKind) else stored)
    await _flush(session, "unit", code)
    await bump_version(session=session)
    return _unit(row)


async def _check_not_a_fallback_owner(session: AsyncSession, code: str) -> None:
    owned = await session.scalar(
        select(func.count())
        .select_from(CoverRow)
        .where(CoverRow.owner_unit == code, CoverRow.kind_code.endswith(UNKNOWN_OWNER_CLASS))
    )
    if owned:
        raise Invalid(
            "kind", f"unit {code!r} owns {owned} class-14 covers: it must stay a township"
        )
    road = await session.scalar(select(RoadRow.name).where(RoadRow.township_unit == code).limit(1))
    if road is not None:
        raise Invalid("kind", f"unit {code!r} is the township of road {road!r}: it must stay one")


# -- roads ------------------------------------------------------------------------------


async def _road(session: AsyncSession, row: RoadRow) -> Road:
    count = await session.scalar(
        select(func.count()).select_from(CoverRow).where(CoverRow.road_id == row.id)
    )
    return Road(id=row.id, name=row.name, township_unit=row.township_unit, covers=count or 0)


async def _road_row(session: AsyncSession, name: str) -> RoadRow | None:
    return await session.scalar(select(RoadRow).where(RoadRow.name == name))


async def create_road(*, session: AsyncSession, road: RoadCreate) -> Road:
    if await _road_row(session, road.name) is not None:
        raise Conflict("road", road.name, "exists already")
    await _check_township(session, road.township_unit)
    row = RoadRow(name=road.name, township_unit=road.township_unit)
    session.add(row)
    await _flush(session, "road", road.name)
    await bump_version(session=session)
    return await _road(session, row)


async def _check_township(session: AsyncSession, code: str | None) -> None:
    if code is None:
        return
    row = await session.get(UnitRow, code)
    if row is None:
        raise Invalid("township_unit", f"unit {code!r} does not exist")
    if row.kind != UnitKind.TOWNSHIP.value:
        raise Invalid("township_unit", f"unit {code!r} is a {row.kind} unit, not a township")


async def get_road(*, session: AsyncSession, name: str) -> Road:
    row = await _road_row(session, name)
    if row is None:
        raise NotFound("road", name)
    return await _road(session, row)


async def list_roads(*, session: AsyncSession) -> list[Road]:
    counts = (
        select(CoverRow.road_id, func.count().label("covers")).group_by(CoverRow.road_id).subquery()
    )
    query = (
        select(RoadRow, func.coalesce(counts.c.covers, 0))
        .outerjoin(counts, counts.c.road_id == RoadRow.id)
        .order_by(RoadRow.name)
    )
    return [
        Road(id=row.id, name=row.name, township_unit=row.township_unit, covers=covers)
        for row, covers in await session.execute(query)
    ]


async def set_road_township(*, session: AsyncSession, name: str, township_unit: str | None) -> Road:
    row = await _road_row(session, name)
    if row is None:
        raise NotFound("road", name)
    await _check_township(session, township_unit)
    row.township_unit = township_unit
    await _flush(session, "road", name)
    await bump_version(session=session)
    return await _road(session, row)


async def _road_for_cover(session: AsyncSession, name: str) -> RoadRow:
    """The road's record, opened on first mention (every cover is on a road)."""
    row = await _road_row(session, name)
    if row is None:
        row = RoadRow(name=name)
        session.add(row)
        await _flush(session, "road", name)
    return row


# -- covers -----------------------------------------------------------------------------


def resolve_owner(
    *,
    cover_id: str,
    owner: str | None,
    unit_kinds: Mapping[str, str],
    road: str,
    road_township: str | None,
) -> str:
    """The owner unit of a cover, applying DESIGN §6's rule for covers without an owner.

    A class-14 cover (无主井盖, owner unknown) belongs to its township unit: the road's
    township when no owner is given, and only a township unit when one is. Every other
    class needs an owner. `unit_kinds` maps unit codes to their kinds.
    """
    unknown_owner = kind_code_of(cover_id).endswith(UNKNOWN_OWNER_CLASS)
    if owner is None:
        if not unknown_owner:
            raise Invalid(
                "owner_unit", "required (only a class-14 cover falls back to its township)"
            )
        if road_township is None:
            raise Invalid(
                "owner_unit",
                f"empty, and road {road!r} has no township unit to fall back to",
            )
        return road_township
    kind = unit_kinds.get(owner)
    if kind is None:
        raise Invalid("owner_unit", f"unit {owner!r} does not exist")
    if unknown_owner and kind != UnitKind.TOWNSHIP.value:
        raise Invalid(
            "owner_unit",
            f"a class-14 cover (owner unknown) belongs to a township unit, not {kind} {owner!r}",
        )
    return owner


async def _unit_kinds(session: AsyncSession, *codes: str | None) -> dict[str, str]:
    wanted = {code for code in codes if code is not None}
    if not wanted:
        return {}
    rows = await session.execute(select(UnitRow.code, UnitRow.kind).where(UnitRow.code.in_(wanted)))
    return dict(rows.all())


def _cover_query() -> Select[CoverRow, str, str]:
    # The device id is null for a cover without a device (outer join), whatever the type says.
    return (
        select(CoverRow, RoadRow.name, DeviceBindingRow.device_id)
        .join(RoadRow, RoadRow.id == CoverRow.road_id)
        .outerjoin(
            DeviceBindingRow,
            and_(
                DeviceBindingRow.cover_id == CoverRow.cover_id,
                DeviceBindingRow.unbound_at.is_(None),
            ),
        )
    )


def _cover(row: CoverRow, road: str, device_id: str | None) -> Cover:
    return Cover(
        cover_id=row.cover_id,
        kind_code=row.kind_code,
        owner_unit=row.owner_unit,
        maintainer_unit=row.maintainer_unit,
        road=road,
        grid=row.grid,
        lon=row.lon,
        lat=row.lat,
        depth_cm=row.depth_cm,
        material=row.material,
        installed_on=row.installed_on,
        flood_prone=row.flood_prone,
        anti_fall=row.anti_fall,
        state=row.state,
        thresholds=None if row.thresholds is None else ThresholdOverrides(**row.thresholds),
        device_id=device_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def thresholds_json(overrides: ThresholdOverrides | None) -> dict[str, Any] | None:
    """What the `thresholds` column stores: only the overridden values, null for none."""
    if overrides is None or overrides.empty:
        return None
    return overrides.model_dump(exclude_none=True)


async def create_cover(*, session: AsyncSession, cover: CoverCreate) -> Cover:
    if await session.get(CoverRow, cover.cover_id) is not None:
        raise Conflict("cover", cover.cover_id, "exists already")
    road = await _road_for_cover(session, cover.road)
    kinds = await _unit_kinds(session, cover.owner_unit)
    owner = resolve_owner(
        cover_id=cover.cover_id,
        owner=cover.owner_unit,
        unit_kinds=kinds,
        road=cover.road,
        road_township=road.township_unit,
    )
    await _check_unit_exists(session, "maintainer_unit", cover.maintainer_unit)
    fields = cover.model_dump(exclude={"cover_id", "kind_code", "owner_unit", "road", "thresholds"})
    row = CoverRow(
        cover_id=cover.cover_id,
        kind_code=kind_code_of(cover.cover_id),
        owner_unit=owner,
        road_id=road.id,
        thresholds=thresholds_json(cover.thresholds),
        **fields,
    )
    session.add(row)
    await _flush(session, "cover", cover.cover_id)
    await bump_version(session=session)
    return _cover(row, road.name, None)


async def get_cover(*, session: AsyncSession, cover_id: str) -> Cover:
    found = (await session.execute(_cover_query().where(CoverRow.cover_id == cover_id))).first()
    if found is None:
        raise NotFound("cover", cover_id)
    return _cover(*found)


async def list_covers(
    *,
    session: AsyncSession,
    owner_unit: str | None = None,
    road: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Cover]:
    """Covers in number order, optionally of one owner or on one road; a page at a time."""
    query = _cover_query().order_by(CoverRow.cover_id).limit(limit).offset(offset)
    if owner_unit is not None:
        query = query.where(CoverRow.owner_unit == owner_unit)
    if road is not None:
        query = query.where(RoadRow.name == road)
    return [_cover(*found) for found in (await session.execute(query))]


async def count_covers(*, session: AsyncSession, owner_unit: str | None = None) -> int:
    query = select(func.count()).select_from(CoverRow)
    if owner_unit is not None:
        query = query.where(CoverRow.owner_unit == owner_unit)
    return await session.scalar(query) or 0


async def update_cover(*, session: AsyncSession, cover_id: str, update: CoverUpdate) -> Cover:
    row = await session.get(CoverRow, cover_id)
    if row is None:
        raise NotFound("cover", cover_id)
    values = changes(update)
    road = await session.get_one(RoadRow, row.road_id)
    if "road" in values:
        road = await _road_for_cover(session, values.pop("road"))
        row.road_id = road.id
    if "owner_unit" in values:
        owner = values.pop("owner_unit")
        row.owner_unit = resolve_owner(
            cover_id=cover_id,
            owner=owner,
            unit_kinds=await _unit_kinds(session, owner),
            road=road.name,
            road_township=road.township_unit,
        )
    if "maintainer_unit" in values:
        await _check_unit_exists(session, "maintainer_unit", values["maintainer_unit"])
    if "thresholds" in values:
        row.thresholds = thresholds_json(values.pop("thresholds"))
    for name, value in values.items():
        setattr(row, name, value)
    await _flush(session, "cover", cover_id)
    await bump_version(session=session)
    return await get_cover(session=session, cover_id=cover_id)


# -- devices ----------------------------------------------------------------------------

# Mosquitto's PBKDF2-SHA512 password format (`$7$iterations$salt$hash`), so a device's
# stored hash can go straight into the broker's password file. Device secrets are random
# tokens of 128 bits or more (`new_device_secret`), so stretching guards little: the
# iteration count only has to keep the broker's check on every connect cheap.
_HASH_ITERATIONS = 1000
_SALT_BYTES = 12
MIN_SECRET_CHARS = 16


def new_device_secret() -> str:
    """A fresh random device password (the only time it exists in clear)."""
    return secrets.token_urlsafe(24)


def hash_secret(secret: str, *, iterations: int = _HASH_ITERATIONS) -> str:
    """A salted PBKDF2-SHA512 hash in Mosquitto's password-file format."""
    if len(secret) < MIN_SECRET_CHARS:
        raise Invalid("secret", f"must be at least {MIN_SECRET_CHARS} characters")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def secret_matches(secret: str, hashed: str) -> bool:
    try:
        _, scheme, iterations, salt, digest = hashed.split("$")
        if scheme != "7":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac(
            "sha512", secret.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _device(row: DeviceRow, cover_id: str | None) -> Device:
    return Device(
        device_id=row.device_id,
        model=row.model,
        report_interval_s=row.report_interval_s,
        source=row.source,
        external_id=row.external_id,
        online=row.online,
        status_at=row.status_at,
        cover_id=cover_id,
        has_credentials=row.credential_hash is not None,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _device_query() -> Select[DeviceRow, str]:
    # The cover id is null for a device on no cover (outer join), whatever the type says.
    return select(DeviceRow, DeviceBindingRow.cover_id).outerjoin(
        DeviceBindingRow,
        and_(
            DeviceBindingRow.device_id == DeviceRow.device_id, DeviceBindingRow.unbound_at.is_(None)
        ),
    )


async def _device_row(session: AsyncSession, device_id: str) -> DeviceRow:
    row = await session.get(DeviceRow, device_id)
    if row is None:
        raise NotFound("device", device_id)
    return row


async def create_device(
    *, session: AsyncSession, device: DeviceCreate, secret: str | None = None
) -> Device:
    """Registers a device, with its MQTT password hashed when one is given."""
    if await session.get(DeviceRow, device.device_id) is not None:
        raise Conflict("device", device.device_id, "exists already")
    row = DeviceRow(
        device_id=device.device_id,
        model=device.model,
        report_interval_s=device.report_interval_s,
        source=device.source,
        external_id=device.external_id,
        credential_hash=hash_secret(secret) if secret is not None else None,
    )
    await _check_external_id_free(session, row)
    session.add(row)
    # Registered now: should it be seen unregistered again one day, that is news again.
    unregistered = await session.get(UnregisteredDeviceRow, device.device_id)
    if unregistered is not None:
        await session.delete(unregistered)
    await _flush(session, "device", device.device_id)
    await bump_version(session=session)
    return _device(row, None)


async def _check_external_id_free(session: AsyncSession, row: DeviceRow) -> None:
    """One device per id on a source: a second is a conflict naming the first."""
    if row.source is None or row.external_id is None:
        return
    with session.no_autoflush:
        holder = await device_of_external_id(
            session=session, source=row.source, external_id=row.external_id
        )
    if holder is not None and holder != row.device_id:
        raise Conflict(
            "device", row.device_id, f"{row.source} id {row.external_id!r} is {holder}'s already"
        )


async def device_of_external_id(
    *, session: AsyncSession, source: str, external_id: str
) -> str | None:
    """The registry device a source's external id maps to, if any."""
    query = select(DeviceRow.device_id).where(
        DeviceRow.source == source, DeviceRow.external_id == external_id
    )
    found: str | None = await session.scalar(query)
    return found


async def get_device(*, session: AsyncSession, device_id: str) -> Device:
    query = _device_query().where(DeviceRow.device_id == device_id)
    found = (await session.execute(query)).first()
    if found is None:
        raise NotFound("device", device_id)
    return _device(*found)


async def list_devices(
    *, session: AsyncSession, bound: bool | None = None, limit: int = 100, offset: int = 0
) -> list[Device]:
    """Devices in id order; `bound` keeps only those on a cover (True) or not (False)."""
    query = _device_query().order_by(DeviceRow.device_id).limit(limit).offset(offset)
    if bound is not None:
        column = DeviceBindingRow.cover_id
        query = query.where(column.is_not(None) if bound else column.is_(None))
    return [_device(*found) for found in (await session.execute(query))]


async def update_device(*, session: AsyncSession, device_id: str, update: DeviceUpdate) -> Device:
    row = await _device_row(session, device_id)
    for name, value in changes(update).items():
        setattr(row, name, value)
    await _check_external_id_free(session, row)
    await _flush(session, "device", device_id)
    await bump_version(session=session)
    return await get_device(session=session, device_id=device_id)


async def set_device_secret(*, session: AsyncSession, device_id: str, secret: str) -> None:
    """Replaces the device's MQTT password; only its hash is stored."""
    row = await _device_row(session, device_id)
    row.credential_hash = hash_secret(secret)
    await _flush(session, "device", device_id)


async def device_secret_matches(*, session: AsyncSession, device_id: str, secret: str) -> bool:
    row = await session.get(DeviceRow, device_id)
    if row is None or row.credential_hash is None:
        return False
    return secret_matches(secret, row.credential_hash)


async def credential_hashes(*, session: AsyncSession) -> list[tuple[str, str]]:
    """(device_id, hash) of every device with credentials: a Mosquitto password file."""
    rows = await session.execute(
        select(DeviceRow.device_id, DeviceRow.credential_hash)
        .where(DeviceRow.credential_hash.is_not(None))
        .order_by(DeviceRow.device_id)
    )
    return [(device_id, hashed) for device_id, hashed in rows if hashed is not None]


# -- bindings ---------------------------------------------------------------------------


def _binding(row: DeviceBindingRow) -> DeviceBinding:
    return DeviceBinding(
        device_id=row.device_id,
        cover_id=row.cover_id,
        bound_at=row.bound_at,
        unbound_at=row.unbound_at,
        end_reason=EndReason(row.end_reason) if row.end_reason is not None else None,
    )


async def _open_bindings(
    session: AsyncSession, *, device_id: str, cover_id: str
) -> Sequence[DeviceBindingRow]:
    query = select(DeviceBindingRow).where(
        DeviceBindingRow.unbound_at.is_(None),
        (DeviceBindingRow.device_id == device_id) | (DeviceBindingRow.cover_id == cover_id),
    )
    return (await session.scalars(query)).all()


async def bind_device(
    *, session: AsyncSession, device_id: str, cover_id: str, at: datetime | None = None
) -> DeviceBinding:
    """Mounts a device on a cover, ending what it replaces; the history keeps both.

    A device already on another cover moves (its old binding ends `moved`); a cover that
    had another device gets this one instead (that binding ends `replaced`). Binding a
    device to the cover it is on changes nothing.
    """
    await _device_row(session, device_id)
    if await session.get(CoverRow, cover_id) is None:
        raise NotFound("cover", cover_id)
    when = at or utcnow()
    for row in await _open_bindings(session, device_id=device_id, cover_id=cover_id):
        if row.device_id == device_id and row.cover_id == cover_id:
            return _binding(row)
        row.unbound_at = when
        row.end_reason = (
            EndReason.MOVED if row.device_id == device_id else EndReason.REPLACED
        ).value
    # The ended bindings must reach the database before the new one: the unique index
    # on open bindings would refuse them in the other order.
    await _flush(session, "binding", device_id)
    row = DeviceBindingRow(device_id=device_id, cover_id=cover_id, bound_at=when)
    session.add(row)
    await _flush(session, "binding", device_id)
    await bump_version(session=session)
    logger.info("device %s bound to cover %s", device_id, cover_id)
    return _binding(row)


async def unbind_device(
    *, session: AsyncSession, device_id: str, at: datetime | None = None
) -> DeviceBinding:
    """Takes a device off its cover; NotFound when it is on none."""
    row = await session.scalar(
        select(DeviceBindingRow).where(
            DeviceBindingRow.device_id == device_id, DeviceBindingRow.unbound_at.is_(None)
        )
    )
    if row is None:
        raise NotFound("binding of device", device_id)
    row.unbound_at = at or utcnow()
    row.end_reason = EndReason.UNBOUND.value
    await _flush(session, "binding", device_id)
    await bump_version(session=session)
    return _binding(row)


async def binding_history(
    *, session: AsyncSession, cover_id: str | None = None, device_id: str | None = None
) -> list[DeviceBinding]:
    """Bindings of a cover or of a device (or both), oldest first."""
    query = select(DeviceBindingRow).order_by(DeviceBindingRow.bound_at, DeviceBindingRow.id)
    if cover_id is not None:
        query = query.where(DeviceBindingRow.cover_id == cover_id)
    if device_id is not None:
        query = query.where(DeviceBindingRow.device_id == device_id)
    return [_binding(row) for row in await session.scalars(query)]
