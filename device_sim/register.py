"""`sim --register`: the simulated fleet written into the service's registry, by its API.

The service evaluates alerts only for devices bound to covers in its registry, so a
generated fleet must be registered before a check can see its alerts. The fleet goes in
as a census file (DESIGN §11) through `POST /api/v1/covers/import`, which creates or
updates covers and devices and binds them; owner units it lacks are created first
(`POST /api/v1/units`). Registering the same fleet again changes nothing.

It never touches what it did not create. Its devices are created first, under the model
`smartcover-sim` (`SIM_MODEL`), the mark by which a later run knows them. Before writing
anything it reads the registry: a device of the fleet registered under another model, or
a cover of the fleet whose device (or, with none on it, any device it ever had) is not
one of the simulator's, is someone else's, and registration stops there, naming it
(`RegistrationError`). Its generated covers are numbered where a district's are not
(device_sim.fleet), so that this is an accident, not the rule.

The report interval registered is the one the service will see: the device's interval
divided by the time compression, and at least the registry's minimum of a minute. The
service's silence timer (3 intervals without a reading) then runs on that interval.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from device_sim.errors import RegistrationError
from device_sim.fleet import MINOR_CLASS_OWNER, PUBLIC_FACILITIES, SimCover
from device_sim.service_api import ServiceApi

# The model the simulator registers its devices under: its mark on the registry.
SIM_MODEL = "smartcover-sim"

# The registry refuses report intervals under a minute (core.registry_schemas).
MIN_REPORT_INTERVAL_S = 60
_UNKNOWN_OWNER_CLASS = "14"
_UNIT_KINDS = frozenset(MINOR_CLASS_OWNER.values())
_CENSUS_HEADER = (
    "cover_id",
    "kind_code",
    "owner_unit",
    "road",
    "lon",
    "lat",
    "depth_cm",
    "flood_prone",
    "device_id",
    "report_interval_s",
)


@dataclass(frozen=True, slots=True)
class Registration:
    """What registering the fleet changed in the service's registry."""

    covers: int
    units_created: tuple[str, ...]
    covers_created: int
    covers_updated: int
    devices_created: int
    devices_updated: int
    bindings_made: int

    @property
    def changed(self) -> bool:
        return any(
            (
                self.units_created,
                self.covers_created,
                self.covers_updated,
                self.devices_created,
                self.devices_updated,
                self.bindings_made,
            )
        )

    def summary(self) -> str:
        units = f"units created: {', '.join(self.units_created)}; " if self.units_created else ""
        return (
            f"{self.covers} covers: {units}covers {self.covers_created} new, "
            f"{self.covers_updated} updated; devices {self.devices_created} new, "
            f"{self.devices_updated} updated; {self.bindings_made} bindings"
        )


def service_interval_s(interval_s: float, speed: float) -> int:
    """The report interval the service sees: compressed, and at least the registry's minimum."""
    return max(MIN_REPORT_INTERVAL_S, math.ceil(interval_s / speed))


def census_csv(covers: Sequence[SimCover], intervals: Sequence[int]) -> bytes:
    """The fleet as a census file (DESIGN §11) with each device's registered interval."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CENSUS_HEADER)
    for cover, interval in zip(covers, intervals, strict=True):
        writer.writerow(
            (
                cover.cover_id,
                cover.kind_code or cover.cover_id[6:10],
                cover.owner_unit,
                cover.road,
                repr(cover.lon),  # exactly, so that registering again changes nothing
                repr(cover.lat),
                repr(cover.depth_cm),
                "1" if cover.flood_prone else "0",
                cover.device_id,
                str(interval),
            )
        )
    return out.getvalue().encode("utf-8")


def unit_kind(code: str, covers: Sequence[SimCover]) -> str:
    """The kind of a unit the fleet names: a generated fleet names its owners by their
    kind; a census's unknown unit owning a class-14 cover must be a township (DESIGN §6)."""
    if code in _UNIT_KINDS:
        return code
    unknown_owner = PUBLIC_FACILITIES + _UNKNOWN_OWNER_CLASS
    owned = [cover for cover in covers if cover.owner_unit == code]
    if any((cover.kind_code or cover.cover_id[6:10]) == unknown_owner for cover in owned):
        return "township"
    return "other"


def _foreign_device(device_id: str, record: dict[str, object]) -> RegistrationError:
    cover = f", on cover {record['cover_id']}" if record.get("cover_id") else ""
    return RegistrationError(
        f"device {device_id} is in the registry and was not created by the simulator"
        f" (model {record.get('model')!r}{cover}): --register never rebinds it. Give the"
        " fleet other device ids (--device-prefix), or leave --register out."
    )


def _foreign_cover(cover_id: str, device_id: object) -> RegistrationError:
    holder = f"device {device_id} on it" if device_id else "no device on it"
    return RegistrationError(
        f"cover {cover_id} is in the registry and was not created by the simulator"
        f" ({holder}): --register never overwrites it. Number the fleet elsewhere"
        " (--admin-code), take covers the registry lacks, or leave --register out."
    )


async def _own_devices(api: ServiceApi, covers: Sequence[SimCover]) -> set[str]:
    """The fleet's devices the registry holds, all of them the simulator's; raises
    `RegistrationError` on the first device or cover of the fleet that is someone else's."""
    own: set[str] = set()
    for cover in covers:
        record = await api.registered("devices", cover.device_id)
        if record is None:
            continue
        if record.get("model") != SIM_MODEL:
            raise _foreign_device(cover.device_id, record)
        own.add(cover.device_id)
    for cover in covers:
        record = await api.registered("covers", cover.cover_id)
        if record is None:
            continue
        bound = record.get("device_id")
        if not await _is_sim_cover(api, cover.cover_id, bound, own):
            raise _foreign_cover(cover.cover_id, bound)
    return own


async def _is_sim_cover(api: ServiceApi, cover_id: str, bound: object, own: set[str]) -> bool:
    """Whether the simulator made this cover: its device is the simulator's, or, with
    none on it now (a later fleet took it), every device it ever had was."""
    devices = [bound] if isinstance(bound, str) else await api.devices_ever_on(cover_id)
    for device_id in devices:
        if device_id not in own and not await _is_sim_device(api, device_id):
            return False
    return bool(devices)


async def _is_sim_device(api: ServiceApi, device_id: str) -> bool:
    record = await api.registered("devices", device_id)
    return record is not None and record.get("model") == SIM_MODEL


async def register_fleet(
    api: ServiceApi, covers: Sequence[SimCover], intervals: Sequence[int]
) -> Registration:
    """Refuses a fleet that would touch covers or devices the simulator did not create;
    else creates its devices and the owner units the registry lacks, then imports the
    fleet as a census (which binds the devices)."""
    own = await _own_devices(api, covers)
    devices_created = 0
    for cover, interval in zip(covers, intervals, strict=True):
        if cover.device_id in own:
            continue
        if await api.create_device(cover.device_id, model=SIM_MODEL, report_interval_s=interval):
            devices_created += 1
    created = []
    for code in sorted({cover.owner_unit for cover in covers}):
        if not await api.unit_exists(code):
            await api.create_unit(code, f"{code} (simulated fleet)", unit_kind(code, covers))
            created.append(code)
    report = await api.import_census(census_csv(covers, intervals))
    return Registration(
        covers=len(covers),
        units_created=tuple(created),
        covers_created=int(report.get("inserted", 0)),
        covers_updated=int(report.get("updated", 0)),
        devices_created=devices_created + int(report.get("devices_created", 0)),
        devices_updated=int(report.get("devices_updated", 0)),
        bindings_made=int(report.get("bindings_made", 0)),
    )
