"""The simulated fleet: generated CJ/T 214 numbers, census CSVs (English or Chinese), passwords."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from core.contract import DEVICE_ID
from device_sim.errors import FleetError
from device_sim.fleet import (
    MINOR_CLASS_OWNER,
    SIM_SEQUENCE_FIRST,
    CredentialsFile,
    CsvFleet,
    GeneratedFleet,
    PasswordTemplate,
    cover_number,
)


def test_generated_covers_carry_valid_16_digit_numbers_and_matching_owners() -> None:
    covers = GeneratedFleet(300, seed=5).covers()
    assert len(covers) == 300
    assert len({cover.cover_id for cover in covers}) == 300
    assert len({cover.device_id for cover in covers}) == 300
    for cover in covers:
        number = cover.cover_id
        assert len(number) == 16
        assert number.isdigit()
        assert number[:6] == "411203"
        assert number[6:8] == "01"  # public facilities
        assert number[8:10] in MINOR_CLASS_OWNER
        assert cover.kind_code == number[6:10]
        assert cover.owner_unit == MINOR_CLASS_OWNER[number[8:10]]
        assert DEVICE_ID.fullmatch(cover.device_id)
        assert 120 <= cover.depth_cm <= 300
    # Sequence numbers count per class from the simulator's 900001, without gaps: a
    # district's own covers, numbered from 1, are never among them.
    for minor in MINOR_CLASS_OWNER:
        sequences = sorted(int(c.cover_id[10:]) for c in covers if c.cover_id[8:10] == minor)
        first = SIM_SEQUENCE_FIRST
        assert sequences == list(range(first, first + len(sequences)))
    assert {c.owner_unit for c in covers} >= {"drainage", "water_supply", "telecom"}


def test_generated_covers_lie_around_the_centre_in_runs_along_roads() -> None:
    centre = (114.30, 30.60)
    covers = GeneratedFleet(60, seed=2, centre=centre, radius_m=1500).covers()
    for cover in covers:
        dx = (cover.lon - centre[0]) * 111_320 * math.cos(math.radians(centre[1]))
        dy = (cover.lat - centre[1]) * 111_320
        assert math.hypot(dx, dy) < 1500 + 6 * 90  # the road may run out of the disc
    for start in range(0, 60, 6):
        run = covers[start : start + 6]
        assert len({cover.road for cover in run}) == 1
        assert len({cover.flood_prone for cover in run}) == 1  # a low-lying road floods as one
        gaps = [
            math.hypot(
                (b.lon - a.lon) * 111_320 * math.cos(math.radians(centre[1])),
                (b.lat - a.lat) * 111_320,
            )
            for a, b in itertools.pairwise(run)
        ]
        assert all(35 < gap < 95 for gap in gaps)
    assert covers[0].road != covers[6].road


def test_a_generated_fleet_is_reproducible_and_the_prefix_of_a_larger_one() -> None:
    small = GeneratedFleet(7, seed=9).covers()
    assert small == GeneratedFleet(7, seed=9).covers()
    assert GeneratedFleet(40, seed=9).covers()[:7] == small
    assert GeneratedFleet(7, seed=10).covers() != small


def test_generation_refuses_bad_codes_and_prefixes() -> None:
    with pytest.raises(FleetError, match="6 digits"):
        GeneratedFleet(3, admin_code="4112").covers()
    with pytest.raises(FleetError, match="device prefix"):
        GeneratedFleet(3, device_prefix="bad prefix").covers()
    with pytest.raises(FleetError, match="minor class"):
        cover_number("411203", "99", 1)
    assert cover_number("411203", "14", 42) == "4112030114000042"


CENSUS_EN = """\
cover_id,kind_code,owner_unit,maintainer_unit,road,grid,lon,lat,depth_cm,material,flood_prone,state,device_id,report_interval_s
4112030103000001,0103,drainage,,黄河路,G1,111.1001,34.7201,180,ductile iron,1,in_service,dev-a,60
4112030101000001,0101,water_supply,,黄河路,G1,111.1002,34.7202,,,false,,dev-b,
4112030102000001,0102,drainage,,甘棠路,G2,111.1003,34.7203,200,,0,abandoned,dev-c,300
4112030107000001,0107,telecom,,甘棠路,G2,111.1004,34.7204,150,,,in_service,,300
"""

CENSUS_ZH = """\ufeff编号,类别代码,权属单位,道路,经度,纬度,井深,易涝点,状态,设备编号,上报周期
4112030103000009,0103,drainage,召公路,111.2,34.8,220,是,在用,zh-1,120
4112030111000003,0111,gas,召公路,111.3,34.9,130,否,在用,zh-2,600
"""


def test_census_with_english_headers_gives_the_covers_with_sensors(tmp_path: Path) -> None:
    path = tmp_path / "census.csv"
    path.write_text(CENSUS_EN, encoding="utf-8")
    covers = CsvFleet(path).covers()
    assert [cover.device_id for cover in covers] == ["dev-a", "dev-b"]  # abandoned, no sensor
    first, second = covers
    assert first.cover_id == "4112030103000001"
    assert first.owner_unit == "drainage"
    assert first.road == "黄河路"
    assert (first.lon, first.lat) == (111.1001, 34.7201)
    assert first.report_interval_s == 60
    assert first.depth_cm == 180
    assert first.flood_prone
    assert first.kind_code == "0103"
    assert second.report_interval_s == 300  # defaults for empty cells
    assert second.depth_cm == 150
    assert not second.flood_prone


def test_census_with_chinese_headers_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "普查台账.csv"
    path.write_bytes(CENSUS_ZH.encode("utf-8"))
    covers = CsvFleet(path).covers()
    assert [(c.device_id, c.flood_prone, c.report_interval_s) for c in covers] == [
        ("zh-1", True, 120),
        ("zh-2", False, 600),
    ]
    assert covers[1].owner_unit == "gas"


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("41120301,0103,u,r,111,34,,,,d1,", [":2:", "cover_id", "16 digits"]),
        ("4112030103000001,0103,u,r,east,34,,,,d1,", [":2:", "lon", "'east'"]),
        ("4112030103000001,0103,u,r,111,95,,,,d1,", [":2:", "lat", "outside"]),
        ("4112030103000001,0103,u,r,111,34,,maybe,,d1,", [":2:", "flood_prone", "是/否"]),
        ("4112030103000001,0103,u,r,111,34,,,,bad id!,", [":2:", "device_id"]),
        ("4112030103000001,0103,,r,111,34,,,,d1,", [":2:", "owner_unit", "empty"]),
        ("4112030103000001,0103,u,r,111,34,,,,d1,0", [":2:", "report_interval_s"]),
    ],
)
def test_a_bad_census_row_names_file_line_and_column(
    tmp_path: Path, row: str, fragments: list[str]
) -> None:
    path = tmp_path / "census.csv"
    header = (
        "cover_id,kind_code,owner_unit,road,lon,lat,depth_cm,flood_prone,state,device_id,"
        "report_interval_s"
    )
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    with pytest.raises(FleetError) as raised:
        CsvFleet(path).covers()
    message = str(raised.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_a_census_without_required_columns_or_with_twice_the_same_device(tmp_path: Path) -> None:
    path = tmp_path / "census.csv"
    path.write_text("cover_id,road\n4112030103000001,r\n", encoding="utf-8")
    with pytest.raises(FleetError, match=r"missing column.*owner_unit"):
        CsvFleet(path).covers()
    path.write_text(
        "cover_id,owner_unit,road,lon,lat,device_id\n"
        "4112030103000001,u,r,111,34,same\n4112030103000002,u,r,111,34,same\n",
        encoding="utf-8",
    )
    with pytest.raises(FleetError, match=r":3: column device_id: also on line 2"):
        CsvFleet(path).covers()
    with pytest.raises(FleetError, match="cannot read"):
        CsvFleet(tmp_path / "absent.csv").covers()


def test_device_passwords_from_a_file_or_a_template(tmp_path: Path) -> None:
    path = tmp_path / "credentials.csv"
    path.write_text("device_id,password\ndev-a,s3cret,\ndev-b,{braces} stay\n", encoding="utf-8")
    loaded = CredentialsFile.load(path)
    assert loaded.password_for("dev-a") == "s3cret"
    assert loaded.password_for("dev-b") == "{braces} stay"
    assert loaded.password_for("dev-z") is None
    covers = GeneratedFleet(2, device_prefix="dev").covers()
    assert loaded.missing(covers) == ["dev-00000", "dev-00001"]
    template = PasswordTemplate("pw-{device_id}-{x}")
    assert template.password_for("dev-a") == "pw-dev-a-{x}"
    path.write_text("id,secret\nx,y\n", encoding="utf-8")
    with pytest.raises(FleetError, match=":2: expected columns device_id and password"):
        CredentialsFile.load(path)
