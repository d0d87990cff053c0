"""`sim --register`: the simulated fleet written into the service's registry, by its API.

The service evaluates alerts only for devices bound to covers in its registry, so a
generated fleet must be registered before a check can see its alerts. The fleet goes in
as a census file (DESIGN §11) through `POST /api/v1/covers/import`, which creates or
updates covers and devices and binds them; owner units it lacks are created first
(`POST /api/v1/units`). Registering the same fleet again changes nothing.

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

from device_sim.fleet import MINOR_CLASS_OWNER, PUBLIC_FACILITIES, SimCover
from device_sim.service_api import ServiceApi

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


async def register_fleet(
    api: ServiceApi, covers: Sequence[SimCover], intervals: Sequence[int]
) -> Registration:
    """Creates the owner units the registry lacks, then imports the fleet as a census."""
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
        devices_created=int(report.get("devices_created", 0)),
        devices_updated=int(report.get("devices_updated", 0)),
        bindings_made=int(report.get("bindings_made", 0)),
    )
