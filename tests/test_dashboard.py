"""The dashboard in a real browser (Debian's Chromium, driven by Playwright's sync API)
against `smartcover serve` on real Mosquitto and InfluxDB: a displaced cover turns red
without a reload and is announced, a crew acknowledges its case from a phone and both
screens show the timeline move, the progress page shows the API's figures.

`smartcover serve` runs as a child process, so the browser, the service and the test
each have their own event loop (Playwright's sync API refuses to run inside one).
Screenshots of the main views are left in each test's tmp_path; set DASHBOARD_SCREENSHOT
to a path (docs/dashboard.png) to copy the map with a cover's card there.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from core.db import create_engine, session_factory, upgrade
from core.settings import MqttEndpoint
from ingest import mqtt
from smartcover.seed import SeededCover, plan_pilot, seed_pilot
from tests.harness import ServiceProcess, service_env
from tests.servers import InfluxServer, MosquittoServer

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, headless, with nothing that phones home or waits for a network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COVERS = 120  # 20 a road: a map that looks like a pilot, seeded in a second or two
DESKTOP: ViewportSize = {"width": 1440, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000  # each wait for a selector; a reading becomes red within a second
# Counts the oscillators started, i.e. the tones of the alert chime (Web Audio API).
COUNT_TONES = """
window.__tones = 0;
const start = OscillatorNode.prototype.start;
OscillatorNode.prototype.start = function (...args) {
  window.__tones += 1;
  return start.apply(this, args);
};
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is needed")


@dataclass(frozen=True)
class Dashboard:
    """The running service, its pilot and the keys the tests sign in with."""

    url: str
    admin_key: str
    crew_key: str
    viewer_key: str
    crew_unit: str
    broker_url: str
    covers: list[SeededCover]
    service: ServiceProcess

    def owner(self, index: int) -> str:
        """The pilot's owner units in order: each test works in one of its own (the
        crew's is the first), so that they can run in any order."""
        return list(dict.fromkeys(c.owner_unit for c in self.covers))[index]

    def covers_of(self, unit: str) -> list[SeededCover]:
        return [c for c in self.covers if c.owner_unit == unit]

    def api(self, path: str, key: str | None = None, **params: Any) -> Any:
        answer = httpx.get(
            f"{self.url}api/v1/{path}",
            params=params,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            timeout=10,
        )
        answer.raise_for_status()
        return answer.json()

    def move(self, case_id: int, to: str, note: str = "") -> None:
        answer = httpx.post(
            f"{self.url}api/v1/cases/{case_id}/transitions",
            json={"to": to, "note": note},
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        answer.raise_for_status()


def create_key(env: dict[str, str], *args: str) -> str:
    """A key made by `smartcover keys create`, the way an operator makes one."""
    done = subprocess.run(
        [sys.executable, "-m", "smartcover", "keys", "create", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip().splitlines()[-1]


def wait_ready(url: str, service: ServiceProcess, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the service did not become ready:\n{service.log()[-3000:]}")


@pytest.fixture(scope="module")
def dashboard(
    tmp_path_factory: pytest.TempPathFactory, influx_server: InfluxServer
) -> Iterator[Dashboard]:
    workdir = tmp_path_factory.mktemp("dashboard")
    covers = plan_pilot(COVERS)
    database_url = f"sqlite:///{workdir / 'smartcover.db'}"

    async def seed() -> None:
        engine = create_engine(database_url)
        await upgrade(engine)
        await seed_pilot(session_factory(engine), covers)
        await engine.dispose()

    asyncio.run(seed())
    database = f"dashboard_{uuid.uuid4().hex[:8]}"
    influx_server.create_database(database)
    admin_key = secrets.token_urlsafe(24)
    with MosquittoServer(workdir / "mosquitto") as broker:
        env = service_env(
            broker,
            influx_server,
            database,
            workdir,
            SMARTCOVER_DATABASE_URL=database_url,
            SMARTCOVER_ADMIN_KEY=admin_key,
        )
        crew_unit = covers[0].owner_unit  # Dashboard.owner(0)
        crew_key = create_key(env, "--role", "crew", "--unit", crew_unit, "--name", "crew Zhang")
        viewer_key = create_key(env, "--role", "viewer", "--name", "bureau viewer")
        service = ServiceProcess(env, workdir / "service.log")
        service.start()
        url = f"http://127.0.0.1:{env['SMARTCOVER_API_PORT']}/"
        try:
            wait_ready(url, service)
            yield Dashboard(
                url, admin_key, crew_key, viewer_key, crew_unit, broker.url, covers, service
            )
        finally:
            service.close()
            influx_server.drop_database(database)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Screens:
    """Browser contexts a test opens (each with its own sessionStorage, so its own key)."""

    def __init__(self, browser: Browser) -> None:
        self._browser = browser
        self._contexts: list[BrowserContext] = []
        self.errors: list[str] = []  # uncaught errors and console errors in any page

    def open(self, *, phone: bool = False) -> Page:
        context = self._browser.new_context(
            viewport=PHONE if phone else DESKTOP,
            is_mobile=phone,
            has_touch=phone,
            device_scale_factor=2 if phone else 1,
            locale="zh-CN",
            timezone_id="Asia/Shanghai",
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(COUNT_TONES)
        self._contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        # Refused keys and a stopped service fail requests on purpose; anything else
        # (a script error, a content-security-policy violation) is a fault.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def close(self) -> None:
        for context in self._contexts:
            context.close()


@pytest.fixture
def screens(browser: Browser) -> Iterator[Screens]:
    opened = Screens(browser)
    yield opened
    opened.close()
    assert opened.errors == [], f"errors in the page: {opened.errors}"


def sign_in(page: Page, dashboard: Dashboard, key: str, route: str = "") -> None:
    page.goto(dashboard.url + route)
    page.fill("#login-key", key)
    page.click("form.login button[type=submit]")
    page.wait_for_selector("#who")
    page.wait_for_selector("#live[data-live=true]")


def reading(device_id: str, seq: int, ts_ms: int, **values: float) -> dict[str, object]:
    return {
        "device_id": device_id,
        "seq": seq,
        "ts": ts_ms,
        "tilt_deg": round(0.4 + 0.1 * (seq % 3), 2),
        "displacement_mm": round(0.8 + 0.2 * (seq % 4), 2),
        "water_level_cm": 40.0 + seq % 5,
        "battery_v": 3.6,
        **values,
    }


def history(cover: SeededCover, minutes: int = 50) -> list[dict[str, object]]:
    """A reading a minute up to a minute ago: something to draw."""
    now = time.time_ns() // 1_000_000
    return [reading(cover.device_id, i, now - (minutes - i) * 60_000) for i in range(minutes)]


def publish(url: str, readings: list[dict[str, object]]) -> None:
    """Publishes over MQTT (QoS 1) from a thread of its own: this thread's event loop,
    if any, is Playwright's."""

    async def send() -> None:
        options = mqtt.SessionOptions(f"test-{uuid.uuid4().hex[:8]}", clean_start=True)
        async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as conn:
            for item in readings:
                topic = f"covers/{item['device_id']}/telemetry"
                await conn.publish(topic, json.dumps(item).encode(), qos=1)

    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(send())
        except BaseException as exc:  # handed to the test's thread, raised there
            failures.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    if failures:
        raise failures[0]


def displace(dashboard: Dashboard, cover: SeededCover) -> int:
    """Publishes a displacement over the limit and returns the case it opened."""
    publish(
        dashboard.broker_url,
        [reading(cover.device_id, 1000, time.time_ns() // 1_000_000, displacement_mm=42.0)],
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        items = dashboard.api("cases", cover_id=cover.cover_id)["items"]
        # The case can be committed a batch before the reading reaches the time-series
        # store (the two are written side by side): wait for both, as the card shows both.
        points = dashboard.api(f"covers/{cover.cover_id}/readings")["points"]
        if items and any(p["displacement_mm"] == 42.0 for p in points):
            return int(items[0]["id"])
        time.sleep(0.1)
    raise AssertionError(f"no case opened, or reading stored, for {cover.cover_id}")


def shoot(page: Page, path: Path) -> Path:
    page.screenshot(path=str(path))
    return path


def test_a_crew_acknowledges_a_displaced_cover_seen_live(
    dashboard: Dashboard, screens: Screens, tmp_path: Path
) -> None:
    cover = dashboard.covers_of(dashboard.crew_unit)[0]
    publish(dashboard.broker_url, history(cover))
    desk = screens.open()
    sign_in(desk, dashboard, dashboard.admin_key)
    dot = f'circle.cover[data-cover-id="{cover.cover_id}"]'
    expect(desk.locator(dot)).to_have_attribute("data-state", "normal")

    displace(dashboard, cover)

    # No reload: the live stream turns it red, and announces it with a banner and a chime.
    desk.wait_for_selector(f'{dot}[data-state="critical"]')
    expect(desk.locator(f'.announcement[data-cover-id="{cover.cover_id}"]')).to_be_visible()
    assert desk.evaluate("window.__tones") >= 2
    shoot(desk, tmp_path / "map.png")

    desk.click(dot)
    desk.wait_for_selector('#cover-panel .card-latest dd:has-text("42")')
    desk.click('#cover-panel button[data-range="1h"]')
    desk.wait_for_selector('#cover-panel figure[data-field="displacement_mm"] path.mean')
    expect(desk.locator("#cover-panel .card-alerts [data-kind=cover_displaced]")).to_have_count(1)
    card = shoot(desk, tmp_path / "cover-card.png")
    if target := os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copyfile(card, target)

    desk.click("#cover-panel a.case-link")
    desk.wait_for_selector("#case-panel .timeline li[data-action=open]")
    case_id = int(desk.url.rsplit("/", 1)[1])
    shoot(desk, tmp_path / "case-desk.png")

    # The crew, on a phone: its unit's board, the case, acknowledge with a note.
    phone = screens.open(phone=True)
    sign_in(phone, dashboard, dashboard.crew_key, "#/cases")
    phone.wait_for_selector(f".case-card[data-case-id='{case_id}'] .countdown[data-deadline]")
    shoot(phone, tmp_path / "cases-phone.png")
    phone.click(f".case-card[data-case-id='{case_id}']")
    expect(phone.locator("#case-panel button[data-to]")).to_have_count(1)  # crews only ack
    phone.fill("#case-note", "on my way, 10 minutes")
    phone.click("#case-panel button[data-to=acknowledged]")
    moved = "#case-panel .timeline li[data-to=acknowledged]"
    expect(phone.locator(moved)).to_contain_text("on my way, 10 minutes")
    expect(phone.locator(moved)).to_contain_text("crew Zhang")
    expect(phone.locator("#case-panel button[data-to=on_site]")).to_be_visible()
    shoot(phone, tmp_path / "case-phone.png")

    # The dispatcher's screen follows without a reload.
    expect(desk.locator(moved)).to_contain_text("on my way, 10 minutes")
    expect(desk.locator("#case-panel .badge.status")).to_have_attribute(
        "data-status", "acknowledged"
    )
    [event] = [
        e for e in dashboard.api(f"cases/{case_id}")["timeline"] if e["to_status"] == "acknowledged"
    ]
    assert (event["actor"], event["note"]) == ("crew Zhang", "on my way, 10 minutes")


def test_progress_page_shows_the_apis_figures(
    dashboard: Dashboard, screens: Screens, tmp_path: Path
) -> None:
    # Two problem covers of one unit, one of them fixed and verified: 50 %.
    unit = dashboard.owner(1)
    fixed, broken = dashboard.covers_of(unit)[:2]
    case_id = displace(dashboard, fixed)
    for status in ("acknowledged", "on_site", "resolved", "verified"):
        dashboard.move(case_id, status, note=f"{status} by the test")
    displace(dashboard, broken)

    page = screens.open()
    sign_in(page, dashboard, dashboard.admin_key, "#/progress")
    page.wait_for_selector(f"table.stats tr[data-unit='{unit}']")
    stats = dashboard.api("stats/units")
    assert page.input_value("input[name=month]") == stats["month"]
    for expected in stats["units"]:
        row = page.locator(f"table.stats tr[data-unit='{expected['unit_code']}']")
        for field in ("rank", "covers", "problem_covers", "remediated_covers", "overdue_cases"):
            shown = row.locator(f"td[data-field={field}]").inner_text()
            assert shown == ("–" if expected[field] is None else str(expected[field])), field
        share = row.locator("td[data-field=remediated_share]")
        assert json.loads(share.get_attribute("data-value") or "") == expected["remediated_share"]
        if expected["remediated_share"] is not None:
            assert share.inner_text() == f"{expected['remediated_share'] * 100:.1f}%"
    ours = next(u for u in stats["units"] if u["unit_code"] == unit)
    assert (ours["problem_covers"], ours["remediated_covers"]) == (2, 1)
    bar = page.locator(f"svg.bars .bar[data-unit='{unit}']")
    expect(bar).to_have_class("bar meets")
    expect(bar).to_contain_text("50.0%")

    # In English, and a ledger downloaded with the key: the month's problems.
    page.click("button[lang=en]")
    expect(page.locator("table.stats th").first).to_have_text("Rank")
    shoot(page, tmp_path / "progress.png")
    with page.expect_download() as download:
        page.click("button[data-ledger=problems][data-format=csv]")
    body = Path(download.value.path()).read_text(encoding="utf-8-sig")
    covers = {row["cover_id"] for row in csv.DictReader(io.StringIO(body))}
    assert {fixed.cover_id, broken.cover_id} <= covers
    expect(page.locator(".ledgers [role=status]")).to_contain_text(
        download.value.suggested_filename
    )


def test_a_viewer_reads_but_cannot_move_and_a_wrong_key_is_refused(
    dashboard: Dashboard, screens: Screens, tmp_path: Path
) -> None:
    page = screens.open()
    page.goto(dashboard.url)
    page.fill("#login-key", "sck_not-a-key")
    page.click("form.login button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("密钥无效或已吊销。")

    cover = dashboard.covers_of(dashboard.owner(2))[0]
    case_id = displace(dashboard, cover)
    sign_in(page, dashboard, dashboard.viewer_key, f"#/cases/{case_id}")
    page.wait_for_selector("#case-panel .timeline li[data-action=open]")
    expect(page.locator("#case-panel .actions")).to_contain_text("只读")
    expect(page.locator("#case-panel button[data-to]")).to_have_count(0)
    shoot(page, tmp_path / "case-viewer.png")


def test_an_alert_raised_while_disconnected_is_announced_on_reconnect(
    dashboard: Dashboard, screens: Screens, tmp_path: Path
) -> None:
    """The page resumes the stream after the last event it saw (Last-Event-ID): an alert
    raised while the service was down is announced, not only coloured by a re-read."""
    first, second = dashboard.covers_of(dashboard.owner(3))[:2]
    page = screens.open()
    sign_in(page, dashboard, dashboard.admin_key)
    displace(dashboard, first)
    page.wait_for_selector(f'.announcement[data-cover-id="{first.cover_id}"]')

    dashboard.service.signal(signal.SIGTERM)
    assert dashboard.service.wait(30) == 0
    page.wait_for_selector("#live[data-live=false]")
    # The broker keeps the reading for the service's persistent session.
    publish(
        dashboard.broker_url,
        [reading(second.device_id, 1000, time.time_ns() // 1_000_000, displacement_mm=35.0)],
    )
    dashboard.service.start()
    wait_ready(dashboard.url, dashboard.service)

    page.wait_for_selector(f'.announcement[data-cover-id="{second.cover_id}"]')
    page.wait_for_selector(f'circle.cover[data-cover-id="{second.cover_id}"][data-state=critical]')
    expect(page.locator("#live")).to_have_attribute("data-live", "true")
    assert page.evaluate("window.__tones") >= 4  # two chimes of two tones
    shoot(page, tmp_path / "reconnected.png")
