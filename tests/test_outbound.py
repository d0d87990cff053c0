"""Outgoing URLs: non-public addresses refused as a webhook URL is written and as it is
delivered to, unless their network is allowed (SMARTCOVER_OUTBOUND_ALLOW_NETS)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.dispatcher import delivery_summary
from alerting.notifiers import DeliveryError, DictUnitContacts, OutboxEvent, UnitContact
from alerting.notifiers import WebhookNotifier as Webhooks
from alerting.outbox import WEBHOOK_CHANNEL
from core.db import Base, create_engine, session_factory
from core.outbound import ALLOW_SETTING, OutboundPolicy, address_kind
from core.settings import Settings
from tests.test_api_harness import RunningApi, running_api
from tests.test_notifications import (
    Receiver,
    ScaledClock,
    add_events,
    dispatcher,
    eventually,
    running,
    secret_of,
)

BLOCKED = {
    "127.0.0.1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.10": "private",
    "100.64.0.1": "carrier-grade NAT",
    "169.254.169.254": "link-local",  # the cloud's metadata service
    "0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "ff02::1": "multicast",
    "::ffff:10.0.0.1": "private",  # IPv4-mapped: judged as the IPv4 address it is
    "::ffff:169.254.169.254": "link-local",
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
}
PUBLIC = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450::1"]
# Written hosts refused without DNS: IP literals in all their spellings, and local names.
REFUSED_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:5432/",
    "http://10.0.0.5/hook",
    "https://[fe80::1]/hook",
    "https://[::ffff:127.0.0.1]:8443/hook",
    "http://[::1]/",
    "http://127.1/",  # inet_aton spellings, which getaddrinfo also accepts
    "http://2130706433/",
    "http://0x7f000001/",
    "http://localhost:8080/hook",
    "http://LocalHost./hook",
    "http://robot.localhost/hook",
]
T0 = 1_800_000_000_000


def test_addresses_are_judged_without_the_network() -> None:
    kinds = {text: address_kind(ip_address(text)) for text in BLOCKED}
    assert kinds == BLOCKED
    assert [address_kind(ip_address(text)) for text in PUBLIC] == [None] * len(PUBLIC)
    everything_blocked = OutboundPolicy()
    assert all(everything_blocked.allows(ip_address(text)) for text in PUBLIC)
    assert not any(everything_blocked.allows(ip_address(text)) for text in BLOCKED)


def test_allowed_networks_open_only_themselves() -> None:
    policy = OutboundPolicy.allowing("127.0.0.0/8", "10.20.0.0/16", "fd00::/8")
    allowed = ["127.0.0.1", "127.9.9.9", "10.20.3.4", "::ffff:10.20.0.1", "fd12:3456::1"]
    refused = ["10.21.0.1", "169.254.169.254", "::1", "192.168.1.10", "fe80::1"]
    assert [policy.allows(ip_address(a)) for a in allowed] == [True] * len(allowed)
    assert [policy.allows(ip_address(a)) for a in refused] == [False] * len(refused)


def test_written_urls_are_checked_for_literals_and_local_names() -> None:
    policy = OutboundPolicy()
    for url in REFUSED_URLS:
        assert ALLOW_SETTING in (policy.url_problem(url) or ""), url
    # A name needs DNS: checked when it is used, not when it is written.
    assert policy.url_problem("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=x") is None
    assert policy.url_problem("https://93.184.215.14/hook") is None
    loopback = OutboundPolicy.allowing("127.0.0.0/8", "::1/128")
    assert loopback.url_problem("http://localhost:8080/hook") is None
    assert loopback.url_problem("http://127.0.0.1:5432/") is None
    assert loopback.url_problem("http://169.254.169.254/") is not None


def test_the_setting_takes_cidrs_separated_by_commas() -> None:
    settings = Settings.model_validate({"outbound_allow_nets": "127.0.0.0/8, 10.20.0.0/16,::1/128"})
    policy = OutboundPolicy.from_settings(settings)
    assert [str(net) for net in policy.allow_nets] == ["127.0.0.0/8", "10.20.0.0/16", "::1/128"]
    assert Settings.model_validate({}).outbound_allow_nets == ()
    with pytest.raises(ValueError, match="host bits set"):
        Settings.model_validate({"outbound_allow_nets": "10.20.0.1/16"})


# -- delivery --------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.start()
    yield running
    running.stop()


def event() -> OutboxEvent:
    return OutboxEvent(1, str(uuid.uuid4()), "case.opened", "WATER", T0, {})


def contacts(url: str) -> DictUnitContacts:
    return DictUnitContacts({"WATER": UnitContact(url, secret_of("WATER"))})


async def refusal(url: str, policy: OutboundPolicy) -> DeliveryError:
    async with Webhooks(contacts(url), outbound=policy, timeout_s=2) as webhooks:
        with pytest.raises(DeliveryError) as caught:
            await webhooks.deliver(event())
    return caught.value


@pytest.mark.asyncio
async def test_a_local_receiver_is_refused_unless_its_network_is_allowed(
    receiver: Receiver,
) -> None:
    refused = await refusal(receiver.url, OutboundPolicy())
    assert refused.retryable is False
    assert "127.0.0.1 is a loopback address" in str(refused)
    assert ALLOW_SETTING in str(refused)
    assert receiver.snapshot() == []  # refused before connecting
    allowed = OutboundPolicy.allowing("127.0.0.0/8")
    async with Webhooks(contacts(receiver.url), outbound=allowed, timeout_s=2) as webhooks:
        await webhooks.deliver(event())
    assert len(receiver.accepted()) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_refused_addresses_are_refused_at_delivery_too(url: str) -> None:
    # Units written before the check, or straight into the database, are refused here.
    refused = await refusal(url, OutboundPolicy())
    assert refused.retryable is False
    assert ALLOW_SETTING in str(refused)


@pytest.mark.asyncio
async def test_a_name_is_refused_when_any_address_it_resolves_to_is(receiver: Receiver) -> None:
    # ::1 allowed lets the name `localhost` past the written check; what it resolves to
    # (127.0.0.1 at least) is then checked, and refused: the name answers for every address.
    url = receiver.url.replace("127.0.0.1", "localhost")
    refused = await refusal(url, OutboundPolicy.allowing("::1/128"))
    assert "localhost resolves to 127.0.0.1, a loopback address" in str(refused)
    assert receiver.snapshot() == []


@pytest.mark.asyncio
async def test_environment_proxies_do_not_carry_webhooks_past_the_check(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would resolve and connect in our place; the client ignores the environment.
    monkeypatch.setenv("HTTP_PROXY", receiver.url)
    monkeypatch.setenv("ALL_PROXY", receiver.url)
    refused = await refusal("http://10.0.0.5/hook", OutboundPolicy())
    assert "10.0.0.5 is a private address" in str(refused)
    assert receiver.snapshot() == []


# -- writing a unit's webhook URL through the API ---------------------------------------


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningApi]:
    async with running_api(f"sqlite:///{tmp_path / 'outbound.db'}") as running:
        yield running


def unit(code: str, webhook_url: str) -> dict[str, str]:
    return {"code": code, "name": "Gas", "kind": "gas", "webhook_url": webhook_url}


@pytest.mark.asyncio
async def test_an_api_write_of_a_refused_url_is_a_422_naming_the_setting(
    api: RunningApi,
) -> None:
    admin = api.client("admin")
    for number, url in enumerate(REFUSED_URLS):
        made = await admin.post("/api/v1/units", json=unit(f"GAS-{number}", url))
        assert (made.status_code, made.json()["code"]) == (422, "outbound_refused"), url
        assert ALLOW_SETTING in made.json()["message"]
        assert made.json()["details"]["field"] == "webhook_url"
        assert (await admin.get(f"/api/v1/units/GAS-{number}")).status_code == 404
        changed = await admin.patch("/api/v1/units/WATER", json={"webhook_url": url})
        assert changed.status_code == 422, url
    water = await admin.get("/api/v1/units/WATER")
    assert water.json()["webhook_url"] is None
    public = await admin.patch("/api/v1/units/WATER", json={"webhook_url": "https://gas.example/h"})
    assert public.status_code == 200


@pytest.mark.asyncio
async def test_an_allowed_network_may_be_written(tmp_path: Path) -> None:
    allowed = OutboundPolicy.allowing("127.0.0.0/8")
    async with running_api(f"sqlite:///{tmp_path / 'o.db'}", outbound=allowed) as api:
        admin = api.client("admin")
        local = await admin.patch("/api/v1/units/WATER", json={"webhook_url": REFUSED_URLS[1]})
        metadata = await admin.patch("/api/v1/units/WATER", json={"webhook_url": REFUSED_URLS[0]})
    assert (local.status_code, metadata.status_code) == (200, 422)


@pytest.mark.asyncio
async def test_a_refused_delivery_shows_where_failing_deliveries_show(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = session_factory(engine)
    clock = ScaledClock()
    try:
        [event_id] = await add_events(
            sessions, "WATER", 1, clock=clock, channels=(WEBHOOK_CHANNEL,)
        )
        metadata = contacts("http://169.254.169.254/latest/meta-data/")
        async with Webhooks(metadata) as webhooks:
            outbox = dispatcher(sessions, {WEBHOOK_CHANNEL: webhooks}, clock)
            async with running(outbox.run()):
                await eventually(
                    lambda: failing(sessions), what="the refused delivery among the failing"
                )
        [shown] = (await delivery_summary(sessions))["failing"]
    finally:
        await engine.dispose()
    assert shown["event_id"] == event_id
    assert "169.254.169.254 is a link-local address" in (shown["last_error"] or "")


async def failing(sessions: async_sessionmaker[AsyncSession]) -> bool:
    return bool((await delivery_summary(sessions))["failing"])
