"""A revoked API key's live stream ends within seconds, also when another process
(`smartcover keys revoke`, writing the database) revokes it; other keys' streams go on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import select
from typer.testing import CliRunner

from api.models import ApiKeyRow
from core import db
from smartcover.keys_cli import app as keys_app
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import HOLDERS, RunningApi, running_api
from tests.test_api_stream import Events, stream

# StreamConfig.key_check_s (2 s) plus room for a slow machine: "within seconds".
ENDS_WITHIN_S = 6.0


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "stream_revoke")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


async def key_id_of(api: RunningApi, who: str) -> int:
    async with db.transaction(api.sessions, write=False) as session:
        key_id = await session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == HOLDERS[who]))
    assert key_id is not None
    return key_id


def revoke_from_the_cli(database_url: str, key_id: int) -> None:
    """`smartcover keys revoke`: its own engine and transaction, no signal to the API."""
    result = CliRunner().invoke(keys_app, ["revoke", str(key_id)])
    assert result.exit_code == 0, result.output


async def closing_comment(events: Events) -> str:
    """Reads the stream to its end; returns its last comment."""
    last = ""
    try:
        while True:
            item = await events.next()
            last = item.get("comment", last)
    except AssertionError:  # Events.next: the stream ended
        return last


@pytest.mark.asyncio
async def test_a_key_revoked_by_the_cli_ends_its_stream_and_no_other(
    api: RunningApi, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTCOVER_DATABASE_URL", database_url)
    monkeypatch.setenv("SMARTCOVER_LOG_LEVEL", "WARNING")
    viewer_id = await key_id_of(api, "viewer")
    async with stream(api, "viewer") as revoked, stream(api, "dispatcher") as kept:
        case_id = await api.strike("dev-1")
        assert len(await revoked.events(3)) == 3  # case opened, dispatched, alert raised
        assert len(await kept.events(3)) == 3
        await asyncio.to_thread(revoke_from_the_cli, database_url, viewer_id)
        revoked_at = time.monotonic()
        last = await asyncio.wait_for(closing_comment(revoked), ENDS_WITHIN_S)
        assert time.monotonic() - revoked_at < ENDS_WITHIN_S
        assert last == "stream closed: the API key was revoked"
        # The dispatcher's stream was not touched: the next events still reach it.
        moved = await api.client("crew").post(
            f"/api/v1/cases/{case_id}/transitions", json={"to": "acknowledged", "note": "on it"}
        )
        assert moved.status_code == 200, moved.text
        (event,) = await kept.events(1)
        assert event["event"] == "case.changed"
    # Reconnecting with the revoked key is refused.
    again = await api.client("viewer").get("/api/v1/stream")
    assert again.status_code == 401
