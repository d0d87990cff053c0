"""The dashboard's server side: the page at / under a content security policy, its files
(every module the page imports) revalidated on each load, and GET /api/v1/me, which
tells a key's holder who they are. The browser tests are in test_dashboard.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from api.app import Readiness, create_app
from api.routes.dashboard import FILES
from tests.test_api_harness import HOLDERS, RunningApi, running_api

pytestmark = pytest.mark.asyncio
# `import … from "./x.js"` and `import("./x.js")` in the dashboard's modules.
_IMPORT = re.compile(r"""(?:from|import)\s*\(?\s*["'](\.{1,2}/[^"']+)["']""")
_ASSET = re.compile(r"""(?:src|href)="(dashboard/[^"]+)\"""")


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningApi]:
    async with running_api(f"sqlite:///{tmp_path / 'dashboard.db'}") as running:
        yield running


async def test_me_tells_each_key_its_holder_role_and_unit(api: RunningApi) -> None:
    for who, holder in HOLDERS.items():
        me = (await api.client(who).get("/api/v1/me")).json()
        role = "crew" if who.startswith("crew") else who
        unit = {"crew": "WATER", "crew_drain": "DRAIN"}.get(who)
        assert (me["name"], me["role"], me["unit_code"]) == (holder, role, unit)
        assert me["prefix"] == api.keys[who][:8]
        assert not {"key", "key_hash"} & me.keys()
    bootstrap = (await api.client("bootstrap").get("/api/v1/me")).json()
    assert (bootstrap["role"], bootstrap["unit_code"]) == ("admin", None)
    assert (await api.client().get("/api/v1/me")).status_code == 401
    revoked = {"Authorization": f"Bearer {api.revoked_key}"}
    assert (await api.client().get("/api/v1/me", headers=revoked)).status_code == 401


async def test_the_page_and_every_module_it_imports_are_served(api: RunningApi) -> None:
    client = api.client()  # the page and its files need no key: the API calls do
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-cache"
    pending = _ASSET.findall(page.text)
    assert "dashboard/js/main.js" in pending
    seen: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        answer = await client.get(f"/{path}")
        assert answer.status_code == 200, path
        assert answer.headers["cache-control"] == "no-cache", path
        if path.endswith(".js"):
            assert "javascript" in answer.headers["content-type"], path
            base = path.rsplit("/", 1)[0]
            pending += [_resolve(base, target) for target in _IMPORT.findall(answer.text)]
    on_disk = {f"dashboard/{p.relative_to(FILES)}" for p in FILES.rglob("*.js")}
    assert on_disk <= seen, f"modules nothing imports: {on_disk - seen}"


def _resolve(base: str, target: str) -> str:
    parts = base.split("/")
    for segment in target.split("/"):
        if segment == "..":
            parts.pop()
        elif segment != ".":
            parts.append(segment)
    return "/".join(parts)


async def test_files_revalidate_and_nothing_outside_is_served(api: RunningApi) -> None:
    client = api.client()
    first = await client.get("/dashboard/js/main.js")
    again = await client.get(
        "/dashboard/js/main.js", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    missing = await client.get("/dashboard/js/nothing.js")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    for escape in ("/dashboard/../routes/dashboard.py", "/dashboard/%2e%2e/app.py"):
        assert (await client.get(escape)).status_code == 404, escape


async def test_an_ingest_only_process_serves_no_dashboard() -> None:
    app = create_app(registry=CollectorRegistry(), readiness=lambda: Readiness({}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/dashboard/js/main.js")).status_code == 404
