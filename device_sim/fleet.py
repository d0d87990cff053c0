"""The simulated fleet: covers with their sensors, read from a census CSV or generated."""

from __future__ import annotations

import csv
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.contract import DEVICE_ID
from device_sim.errors import FleetError

# CJ/T 214 component coding, DESIGN §6: the major class of public facilities, then the
# minor class of the cover, each with the unit kind that owns such covers (DESIGN §11).
# The registry holds the authoritative table; this one only has to produce valid numbers.
PUBLIC_FACILITIES = "01"
MINOR_CLASS_OWNER = {
    "01": "water_supply",
    "02": "drainage",  # sewage
    "03": "drainage",  # storm water
    "05": "power",
    "07": "telecom",
    "08": "broadcast_tv",
    "09": "telecom",  # network
    "10": "heating",
    "11": "gas",
    "12": "public_security",
    "14": "township",  # owner unknown: registered with the township (DESIGN §6)
}
# How often each class occurs in a pilot street: drainage dominates, unknown owners are rare.
_CLASS_WEIGHTS = {
    "01": 14,
    "02": 20,
    "03": 24,
    "05": 8,
    "07": 9,
    "08": 3,
    "09": 4,
    "10": 5,
    "11": 6,
    "12": 3,
    "14": 4,
}
_ROAD_NAMES = (
    "黄河路",
    "甘棠路",
    "召公路",
    "大营路",
    "陕州大道",
    "崤山路",
    "六峰路",
    "文明路",
    "湖滨路",
    "建设路",
    "和平路",
    "迎宾大道",
)
COVER_ID = re.compile(r"^\d{16}$")
ADMIN_CODE = re.compile(r"^\d{6}$")
# Shanzhou district (411203), the default administrative code's seat.
DEFAULT_CENTRE = (111.103, 34.720)
DEFAULT_REPORT_INTERVAL_S = 300
DEFAULT_DEPTH_CM = 150.0
# Generated covers take the sequence numbers from 900001 up in each class: a district
# numbers its covers from 1, so the simulator's do not meet them (and `--register`
# refuses any cover it did not create: device_sim.register).
SIM_SEQUENCE_FIRST = 900_001
MAX_GENERATED = 99_999  # every class could then still number them below 1,000,000
_METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True, slots=True)
class SimCover:
    """One cover with a sensor, as much of its census record as the simulator needs."""

    cover_id: str
    owner_unit: str
    road: str
    lon: float
    lat: float
    device_id: str
    report_interval_s: int = DEFAULT_REPORT_INTERVAL_S
    depth_cm: float = DEFAULT_DEPTH_CM
    flood_prone: bool = False
    kind_code: str = ""  # 4 digits (major + minor class), "" when the census omits it


class FleetSource(Protocol):
    """Where the fleet comes from: generated, a census CSV, later the registry's database."""

    def covers(self) -> list[SimCover]:
        """The covers with sensors, in a stable order (scenarios refer to them by index)."""
        ...


def cover_number(admin_code: str, minor_class: str, sequence: int) -> str:
    """The 16-digit standard number: admin code (6) + major (2) + minor (2) + sequence (6)."""
    if not ADMIN_CODE.match(admin_code):
        raise FleetError(f"administrative code must be 6 digits, not {admin_code!r}")
    if minor_class not in MINOR_CLASS_OWNER:
        raise FleetError(f"unknown minor class {minor_class!r}")
    if not 0 < sequence < 1_000_000:
        raise FleetError(f"sequence {sequence} does not fit in 6 digits")
    return f"{admin_code}{PUBLIC_FACILITIES}{minor_class}{sequence:06d}"


@dataclass(frozen=True, slots=True)
class GeneratedFleet:
    """N covers along a few roads scattered around a centre; the same seed, the same fleet.

    Covers are placed in runs of `covers_per_road` along straight roads, so covers with
    neighbouring indexes are neighbours on one road (what a storm scenario floods). Each
    road and each cover draws from its own seeded generator, so a fleet of N covers is the
    first N covers of any larger fleet with the same seed.
    """

    count: int
    seed: int = 1
    admin_code: str = "411203"
    centre: tuple[float, float] = DEFAULT_CENTRE
    radius_m: float = 2000.0
    device_prefix: str = "sim"
    report_interval_s: int = DEFAULT_REPORT_INTERVAL_S
    covers_per_road: int = 6

    def covers(self) -> list[SimCover]:
        if not 0 <= self.count <= MAX_GENERATED:
            raise FleetError(f"cannot generate {self.count} covers (0 … {MAX_GENERATED:,})")
        if not DEVICE_ID.fullmatch(f"{self.device_prefix}-00000"):
            raise FleetError(f"device prefix {self.device_prefix!r} gives invalid device ids")
        sequences = dict.fromkeys(MINOR_CLASS_OWNER, SIM_SEQUENCE_FIRST - 1)
        classes, weights = zip(*_CLASS_WEIGHTS.items(), strict=True)
        fleet: list[SimCover] = []
        roads = (self._road(index) for index in itertools.count())
        for (road, low_lying, positions), index in zip(
            roads, range(0, self.count, self.covers_per_road), strict=False
        ):
            for lon, lat in positions[: self.count - index]:
                rng = random.Random(f"fleet/{self.seed}/cover/{len(fleet)}")
                minor = rng.choices(classes, weights)[0]
                sequences[minor] += 1
                fleet.append(
                    SimCover(
                        cover_id=cover_number(self.admin_code, minor, sequences[minor]),
                        owner_unit=MINOR_CLASS_OWNER[minor],
                        road=road,
                        lon=round(lon, 6),
                        lat=round(lat, 6),
                        device_id=f"{self.device_prefix}-{len(fleet):05d}",
                        report_interval_s=self.report_interval_s,
                        depth_cm=float(rng.randrange(120, 310, 10)),
                        flood_prone=low_lying,
                        kind_code=PUBLIC_FACILITIES + minor,
                    )
                )
        return fleet

    def _road(self, index: int) -> tuple[str, bool, list[tuple[float, float]]]:
        """A road's name, whether it is low-lying, and where its covers lie along it."""
        rng = random.Random(f"fleet/{self.seed}/road/{index}")
        lon0, lat0 = self.centre
        metres_per_lon = _METRES_PER_DEGREE * math.cos(math.radians(lat0))
        # A road starts somewhere in the disc and runs straight in a random direction.
        distance = self.radius_m * math.sqrt(rng.random())
        angle = rng.uniform(0, 2 * math.pi)
        x, y = distance * math.cos(angle), distance * math.sin(angle)
        bearing = rng.uniform(0, math.pi)
        low_lying = rng.random() < 0.25
        positions = []
        for _ in range(self.covers_per_road):
            positions.append((lon0 + x / metres_per_lon, lat0 + y / _METRES_PER_DEGREE))
            step = rng.uniform(40, 90)  # covers every 40-90 m along a street
            x += step * math.cos(bearing)
            y += step * math.sin(bearing)
        return _road_name(index), low_lying, positions


def _road_name(index: int) -> str:
    name = _ROAD_NAMES[index % len(_ROAD_NAMES)]
    return name if index < len(_ROAD_NAMES) else f"{name}{index // len(_ROAD_NAMES) + 1}段"


# Census columns the simulator reads (DESIGN §11), by English and Chinese header.
_CENSUS_COLUMNS = {
    "cover_id": "编号",
    "kind_code": "类别代码",
    "owner_unit": "权属单位",
    "road": "道路",
    "lon": "经度",
    "lat": "纬度",
    "depth_cm": "井深",
    "flood_prone": "易涝点",
    "state": "状态",
    "device_id": "设备编号",
    "report_interval_s": "上报周期",
}
_HEADER_ALIASES = {**{k: k for k in _CENSUS_COLUMNS}, **{v: k for k, v in _CENSUS_COLUMNS.items()}}
_REQUIRED = ("cover_id", "owner_unit", "road", "lon", "lat")
_TRUE = {"1", "true", "yes", "是"}
_FALSE = {"0", "false", "no", "否", ""}
_IN_SERVICE = {"", "in_service", "在用"}


@dataclass(frozen=True, slots=True)
class CsvFleet:
    """The covers of a census CSV (UTF-8, BOM or not) that have a sensor bound to them.

    Only the columns the simulator needs are read; the others are the importer's business.
    Rows without a `device_id`, or of covers not in service, are skipped.
    """

    path: Path

    def covers(self) -> list[SimCover]:
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as file:
                rows = list(csv.reader(file))
        except (OSError, UnicodeDecodeError) as exc:
            raise FleetError(f"{self.path}: cannot read the census: {exc}") from None
        if not rows:
            raise FleetError(f"{self.path}: empty file, expected a header row")
        columns = self._columns(rows[0])
        fleet: list[SimCover] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            values = {name: _cell(row, index) for name, index in columns.items()}
            cover = self._cover(values, line)
            if cover is None:
                continue
            if cover.device_id in seen:
                raise self._error(line, "device_id", f"also on line {seen[cover.device_id]}")
            seen[cover.device_id] = line
            fleet.append(cover)
        return fleet

    def _columns(self, header: list[str]) -> dict[str, int]:
        columns: dict[str, int] = {}
        for index, name in enumerate(header):
            key = _HEADER_ALIASES.get(name.strip())
            if key is not None:
                columns[key] = index
        missing = [name for name in _REQUIRED if name not in columns]
        if missing:
            raise FleetError(f"{self.path}:1: missing column(s) {', '.join(missing)}")
        return columns

    def _cover(self, values: dict[str, str], line: int) -> SimCover | None:
        if not values.get("device_id") or values.get("state", "") not in _IN_SERVICE:
            return None
        device_id = values["device_id"]
        if not DEVICE_ID.fullmatch(device_id):
            raise self._error(line, "device_id", f"{device_id!r} is not 1-64 of [A-Za-z0-9_.-]")
        if not COVER_ID.match(values["cover_id"]):
            raise self._error(line, "cover_id", f"{values['cover_id']!r} is not 16 digits")
        return SimCover(
            cover_id=values["cover_id"],
            owner_unit=self._required(values, "owner_unit", line),
            road=self._required(values, "road", line),
            lon=self._number(values, name="lon", line=line, low=-180, high=180),
            lat=self._number(values, name="lat", line=line, low=-90, high=90),
            device_id=device_id,
            report_interval_s=int(
                self._number(
                    values,
                    name="report_interval_s",
                    line=line,
                    low=1,
                    high=86400,
                    default=DEFAULT_REPORT_INTERVAL_S,
                )
            ),
            depth_cm=self._number(
                values, name="depth_cm", line=line, low=1, high=10000, default=DEFAULT_DEPTH_CM
            ),
            flood_prone=self._flag(values, "flood_prone", line),
            kind_code=values.get("kind_code", ""),
        )

    def _required(self, values: dict[str, str], name: str, line: int) -> str:
        if not values.get(name):
            raise self._error(line, name, "is empty")
        return values[name]

    def _number(
        self,
        values: dict[str, str],
        *,
        name: str,
        line: int,
        low: float,
        high: float,
        default: float | None = None,
    ) -> float:
        text = values.get(name, "")
        if not text and default is not None:
            return default
        try:
            number = float(text)
        except ValueError:
            raise self._error(line, name, f"{text!r} is not a number") from None
        if not low <= number <= high:
            raise self._error(line, name, f"{number:g} is outside {low:g} … {high:g}")
        return number

    def _flag(self, values: dict[str, str], name: str, line: int) -> bool:
        text = values.get(name, "").strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise self._error(line, name, f"{text!r} is not 1/0, true/false or 是/否")

    def _error(self, line: int, column: str, problem: str) -> FleetError:
        return FleetError(f"{self.path}:{line}: column {column}: {problem}")


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


class Credentials(Protocol):
    """A device's MQTT password (its user name is its device id), or None for none."""

    def password_for(self, device_id: str) -> str | None: ...


class NoCredentials:
    def password_for(self, device_id: str) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class PasswordTemplate:
    """Passwords derived from the device id: `{device_id}` in the template is replaced."""

    template: str

    def password_for(self, device_id: str) -> str | None:
        # Not str.format: a brace elsewhere in a password must not be interpreted.
        return self.template.replace("{device_id}", device_id)


@dataclass(frozen=True, slots=True)
class CredentialsFile:
    """A CSV of `device_id,password` rows (header required), as `devices provision` writes."""

    passwords: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> CredentialsFile:
        try:
            with path.open(encoding="utf-8-sig", newline="") as file:
                rows = list(csv.DictReader(file))
        except (OSError, UnicodeDecodeError) as exc:
            raise FleetError(f"{path}: cannot read the credentials: {exc}") from None
        passwords: dict[str, str] = {}
        for line, row in enumerate(rows, start=2):
            device_id, password = row.get("device_id"), row.get("password")
            if not device_id or password is None:
                raise FleetError(f"{path}:{line}: expected columns device_id and password")
            passwords[device_id.strip()] = password
        return cls(passwords)

    def password_for(self, device_id: str) -> str | None:
        return self.passwords.get(device_id)

    def missing(self, covers: list[SimCover]) -> list[str]:
        return [cover.device_id for cover in covers if cover.device_id not in self.passwords]
