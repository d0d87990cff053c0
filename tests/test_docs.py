"""The API docs work without the internet: /docs and /redoc name no other host, and the
scripts, styles and icon they load come from the app itself, with their right types."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from api.app import Readiness, create_app
from tests.test_api_harness import serve

pytestmark = pytest.mark.asyncio

# What a browser needs before it runs a file of each kind (with nosniff it insists).
EXPECTED_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}
ANY_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")


class _References(HTMLParser):
    """The URLs a page makes the browser load: scripts, styles, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def references(page: str) -> list[str]:
    parser = _References()
    parser.feed(page)
    return parser.urls


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The app of an ingest-only process (the docs are there without a database too),
    served by uvicorn on loopback."""
    app = create_app(registry=CollectorRegistry(), readiness=lambda: Readiness({}))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield http


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_name_no_other_host(client: httpx.AsyncClient, page: str) -> None:
    answer = await client.get(page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    own = urlsplit(str(client.base_url)).netloc
    foreign = [url for url in ANY_URL.findall(answer.text) if urlsplit(url).netloc != own]
    assert foreign == []
    loaded = references(answer.text)
    assert any(url.endswith(".js") for url in loaded)
    assert all(url.startswith("/docs/assets/") for url in loaded), loaded


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_assets_are_served_with_their_types(
    client: httpx.AsyncClient, page: str
) -> None:
    for url in references((await client.get(page)).text):
        answer = await client.get(url)
        assert answer.status_code == 200, url
        suffix = url[url.rindex(".") :]
        media_type = answer.headers["content-type"].split(";")[0]
        assert media_type in EXPECTED_TYPES[suffix], (url, media_type)
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert len(answer.content) > 1000  # the file, not an error page


async def test_swagger_ui_sends_the_schema_to_no_validator(client: httpx.AsyncClient) -> None:
    # Swagger UI's default asks a public validator for a badge, naming the schema's URL.
    page = (await client.get("/docs")).text
    assert '"validatorUrl": null' in page
    assert "url: '/openapi.json'" in page
