"""Devices' per-source external ids (DESIGN §12): registry, census import, uniqueness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.census import import_census, read_census
from core.registry_errors import Conflict
from core.registry_schemas import DeviceCreate, DeviceUpdate
from tests.db_fixtures import BACKENDS, add_units, fresh_database_url, migrated_sessions

pytestmark = pytest.mark.asyncio

HEADER = "编号,类别代码,权属单位,道路,经度,纬度,设备编号,型号,来源,外部编号"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "sources")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated_sessions(database_url) as made:
        await add_units(made)
        yield made


async def test_an_external_id_maps_to_its_device_and_only_one(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with db.transaction(sessions) as session:
        created = await registry.create_device(
            session=session,
            device=DeviceCreate(
                device_id="NB-1", model="vendor-m20-hex", source="ctwing", external_id="8686"
            ),
        )
        # The same id on another platform is another device's.
        await registry.create_device(
            session=session,
            device=DeviceCreate(device_id="NB-2", source="onenet", external_id="8686"),
        )
    assert (created.source, created.external_id) == ("ctwing", "8686")
    async with db.transaction(sessions, write=False) as session:
        assert (
            await registry.device_of_external_id(
                session=session, source="ctwing", external_id="8686"
            )
            == "NB-1"
        )
        assert (
            await registry.device_of_external_id(
                session=session, source="ctwing", external_id="9999"
            )
            is None
        )
    with pytest.raises(Conflict, match="ctwing id '8686' is NB-1's already"):
        async with db.transaction(sessions) as session:
            await registry.create_device(
                session=session,
                device=DeviceCreate(device_id="NB-3", source="ctwing", external_id="8686"),
            )
    with pytest.raises(Conflict, match="onenet id '8686' is NB-2's already"):
        async with db.transaction(sessions) as session:
            await registry.update_device(
                session=session, device_id="NB-1", update=DeviceUpdate(source="onenet")
            )


async def test_the_census_sets_model_source_and_external_id(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    rows = [
        "4112030101000001,0101,WATER,Zhongzhou Road,112.45,34.61,NB-1,vendor-m20-hex,ctwing,8686",
        "4112030102000001,0102,DRAIN,Zhongzhou Road,112.45,34.62,NB-2,,,",
    ]
    data = ("\r\n".join([HEADER, *rows]) + "\r\n").encode()
    async with db.transaction(sessions) as session:
        report = await import_census(session=session, table=read_census(data))
    assert report.errors == []
    async with db.transaction(sessions, write=False) as session:
        one = await registry.get_device(session=session, device_id="NB-1")
        two = await registry.get_device(session=session, device_id="NB-2")
    assert (one.model, one.source, one.external_id) == ("vendor-m20-hex", "ctwing", "8686")
    assert (two.model, two.source, two.external_id) == (None, None, None)

    # NB-1's id given to NB-2 is refused on its row, whether NB-1 is in the file or not;
    # NB-1's empty cells change nothing.
    taken = rows[1][:-3] + ",x,ctwing,8686"
    for again, expected in (
        ([taken], (2, "外部编号", "ctwing id '8686' is NB-1's")),
        (
            [rows[0].replace(",vendor-m20-hex,ctwing,8686", ",,,"), taken],
            (3, "外部编号", "8686 is also in row 2"),
        ),
    ):
        data = ("\r\n".join([HEADER, *again]) + "\r\n").encode()
        async with db.transaction(sessions) as session:
            report = await import_census(session=session, table=read_census(data))
        assert [(e.row, e.column, e.reason) for e in report.errors] == [expected]
    async with db.transaction(sessions, write=False) as session:
        one = await registry.get_device(session=session, device_id="NB-1")
    assert (one.model, one.source, one.external_id) == ("vendor-m20-hex", "ctwing", "8686")


async def test_a_census_device_column_without_a_device_is_an_error(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    row = "4112030101000001,0101,WATER,Zhongzhou Road,112.45,34.61,,m,ctwing,8686"
    data = ("\r\n".join([HEADER, row]) + "\r\n").encode()
    async with db.transaction(sessions) as session:
        report = await import_census(session=session, table=read_census(data))
    assert [(e.column, e.reason) for e in report.errors] == [
        ("型号", "given without a device_id"),
        ("来源", "given without a device_id"),
        ("外部编号", "given without a device_id"),
    ]
