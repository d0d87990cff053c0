"""The locked-down broker: the project's mosquitto.conf and ACL on a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from core import broker_auth, db, registry
from core.broker_auth import BrokerAuthError, BrokerUser
from core.registry_schemas import CoverCreate, DeviceCreate, Unit, UnitKind
from core.settings import MqttEndpoint
from ingest import mqtt
from ingest.errors import MqttError, MqttRefused
from tests.harness import reading, running_service, service_env, wait_until
from tests.servers import LOOPBACK, MOSQUITTO_CONF_D, InfluxServer, MosquittoServer, free_port

REPO = Path(__file__).resolve().parents[1]
PROJECT_CONF = REPO / "mosquitto" / "mosquitto.conf"
ACL_TEMPLATE = REPO / "mosquitto" / "acl"
SERVICE_ACL = REPO / "mosquitto" / "acl-service"

SERVICE_PASSWORD = "service-password-0123456789"  # noqa: S105 (a test broker's)
CREW_KEY = "crew-key-for-tests-0123456789"
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code of an ACL refusal
DEVICE_SECRETS = {"dev-a": "secret-of-device-a-0123", "dev-b": "secret-of-device-b-0123"}
COVERS = {"dev-a": "4112030101000001", "dev-b": "4112030102000001"}
UNITS = (
    Unit(code="W01", name="Water supply company", kind=UnitKind.WATER_SUPPLY),
    Unit(code="D02", name="Drainage company", kind=UnitKind.DRAINAGE),
)
# How long a test waits for a message that must not come, once its positive twin arrived.
QUIET_S = 0.5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the project's configuration on test ports ------------------------------------------


class ProjectBroker(MosquittoServer):
    """Mosquitto running mosquitto/mosquitto.conf itself, with the test's ports and paths."""

    def __init__(self, workdir: Path, *, password_file: Path, acl_file: Path) -> None:
        super().__init__(workdir, password_file=password_file, acl_file=acl_file)
        self.service_port = free_port()
        self.pid_file = self.workdir / "mosquitto.pid"

    def config_text(self) -> str:
        assert self.password_file is not None
        assert self.acl_file is not None
        text = PROJECT_CONF.read_text(encoding="utf-8")
        service_file = broker_auth.service_password_file(self.password_file)
        replacements = {
            r"^listener 1883$": f"listener {self.port} {LOOPBACK}",
            r"^listener 1884$": f"listener {self.service_port} {LOOPBACK}",
            r"^password_file .+/passwd$": f"password_file {self.password_file}",
            r"^password_file .+/passwd-service$": f"password_file {service_file}",
            r"^acl_file .+/acl$": f"acl_file {self.acl_file}",
            r"^acl_file .+/acl-service$": f"acl_file {SERVICE_ACL}",
            r"^persistence_location .+$": f"persistence_location {self.data_dir}/",
            r"^log_dest stdout$": f"log_dest file {self.log_path}",
        }
        for pattern, new in replacements.items():
            text, count = re.subn(pattern, new, text, flags=re.MULTILINE)
            assert count == 1, f"{pattern!r} is not in mosquitto.conf once"
        extra = [f"pid_file {self.pid_file}"]
        if os.geteuid() == 0:
            extra.append("user root")  # as in tests/servers.py: keep access to the temp dir
        include = f"include_dir {MOSQUITTO_CONF_D}"
        text, count = re.subn(
            r"^include_dir .+$", "\n".join([*extra, include]), text, flags=re.MULTILINE
        )
        assert count == 1
        return text

    def device_url(self, username: str, password: str) -> str:
        return f"mqtt://{username}:{password}@{self.host}:{self.port}"

    def service_url(self, password: str = SERVICE_PASSWORD) -> str:
        return f"mqtt://{broker_auth.SERVICE_USER}:{password}@{self.host}:{self.service_port}"


# -- the registry and the CLI --------------------------------------------------------------


async def seed_registry(database_url: str) -> None:
    """Two units, a cover of each, and devices dev-a and dev-b bound to them."""
    engine = db.create_engine(database_url)
    try:
        await db.upgrade(engine)
        async with db.transaction(db.session_factory(engine)) as session:
            for unit in UNITS:
                await registry.create_unit(session=session, unit=unit)
            for (device_id, cover_id), owner in zip(COVERS.items(), ("W01", "D02"), strict=True):
                await registry.create_cover(
                    session=session,
                    cover=CoverCreate(
                        cover_id=cover_id,
                        owner_unit=owner,
                        road="Kaixuan Road",
                        lon=112.4,
                        lat=34.6,
                    ),
                )
                await registry.create_device(
                    session=session,
                    device=DeviceCreate(device_id=device_id),
                    secret=DEVICE_SECRETS[device_id],
                )
                await registry.bind_device(session=session, device_id=device_id, cover_id=cover_id)
    finally:
        await engine.dispose()


def cli_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SMARTCOVER_")}
    env.update(
        SMARTCOVER_DATABASE_URL=database_url,
        SMARTCOVER_MQTT_URL=f"mqtt://smartcover:{SERVICE_PASSWORD}@127.0.0.1:1884",
        SMARTCOVER_BROKER_CREW_KEY=CREW_KEY,
        SMARTCOVER_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


async def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> CliResult:
    """`smartcover devices …` in a process of its own, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from smartcover.devices_cli import app; app()",
        *args,
        env=env,
        cwd=cwd,  # no stray .env from the repository
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


@dataclass
class World:
    broker: ProjectBroker
    database_url: str
    password_file: Path
    acl_file: Path
    workdir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.database_url, **extra)


@pytest_asyncio.fixture
async def world_files(tmp_path: Path) -> AsyncIterator[World]:
    """A registry and a broker on the files `smartcover devices passwords` wrote."""
    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    await seed_registry(database_url)
    auth = tmp_path / "broker-auth"
    auth.mkdir()
    broker = ProjectBroker(
        tmp_path / "mosquitto", password_file=auth / "passwd", acl_file=auth / "acl"
    )
    world = World(broker, database_url, auth / "passwd", auth / "acl", tmp_path)
    args = ["passwords", "--password-file", str(world.password_file)]
    args += ["--acl-file", str(world.acl_file), "--acl-template", str(ACL_TEMPLATE)]
    done = await run_cli(args, world.env(), tmp_path)
    assert done.code == 0, done.stderr
    assert "reads the new files when it starts" in done.stdout
    with broker:
        yield world


@dataclass
class Inbox:
    """Messages one client received, by topic."""

    messages: list[mqtt.Message] = field(default_factory=list)

    def __call__(self, message: mqtt.Message) -> None:
        self.messages.append(message)

    @property
    def topics(self) -> set[str]:
        return {message.topic for message in self.messages}


@asynccontextmanager
async def client(
    url: str, client_id: str, inbox: Inbox | None = None, *, protocol: int = 5
) -> AsyncIterator[mqtt.MqttConnection]:
    options = mqtt.SessionOptions(client_id=client_id, clean_start=True, protocol=protocol)
    async with mqtt.connect(MqttEndpoint.parse(url), options, inbox or Inbox()) as conn:
        yield conn


def payload(device_id: str, seq: int = 1) -> bytes:
    return json.dumps(reading(device_id, seq, now_ms())).encode()


# -- anonymous and wrong credentials ------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [5, 4])
async def test_anonymous_and_wrong_passwords_are_refused_on_both_listeners(
    world_files: World, protocol: int
) -> None:
    broker = world_files.broker
    for port in (broker.port, broker.service_port):
        for url in (
            f"mqtt://{broker.host}:{port}",
            f"mqtt://dev-a:wrong-password-0123@{broker.host}:{port}",
            f"mqtt://smartcover:{DEVICE_SECRETS['dev-a']}@{broker.host}:{port}",
        ):
            with pytest.raises(MqttRefused):
                async with client(url, "intruder", protocol=protocol):
                    pass
    async with client(broker.device_url("dev-a", DEVICE_SECRETS["dev-a"]), "x", protocol=protocol):
        pass


# -- devices ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_forged_topic_is_refused_and_nothing_is_stored(
    world_files: World, influx_server: InfluxServer, influx_db: str
) -> None:
    broker = world_files.broker
    env = service_env(
        broker,
        influx_server,
        influx_db,
        world_files.workdir,
        SMARTCOVER_MQTT_URL=broker.service_url(),
    )
    dev_a = broker.device_url("dev-a", DEVICE_SECRETS["dev-a"])
    async with running_service(env):
        async with client(dev_a, "dev-a") as conn:
            with pytest.raises(MqttError) as refused:
                await conn.publish("covers/dev-b/telemetry", payload("dev-b"), qos=1)
            assert refused.value.reason_code == NOT_AUTHORIZED
            await conn.publish("covers/dev-a/telemetry", payload("dev-a"), qos=1)
        # MQTT 3.1.1 has no way to refuse a PUBLISH: the broker acknowledges and drops it.
        async with client(dev_a, "dev-a", protocol=4) as conn:
            await conn.publish("covers/dev-b/telemetry", payload("dev-b", seq=2), qos=1)
            await conn.publish("covers/dev-a/telemetry", payload("dev-a", seq=2), qos=1)
        await wait_until(
            lambda: influx_server.count(influx_db) >= 2, timeout_s=15, what="dev-a's readings"
        )
    points = influx_server.points(influx_db)
    assert [(p["device_id"], p["seq"]) for p in points] == [("dev-a", 1), ("dev-a", 2)]


@pytest.mark.asyncio
async def test_a_device_reads_nothing_not_even_by_subscribing(world_files: World) -> None:
    broker = world_files.broker
    spy, service_inbox = Inbox(), Inbox()
    async with (
        client(broker.service_url(), "ingest-test", service_inbox) as service,
        client(broker.device_url("dev-a", DEVICE_SECRETS["dev-a"]), "dev-a", spy) as dev_a,
    ):
        await service.subscribe([("covers/+/telemetry", 1)])
        # Mosquitto 2.0 grants the SUBSCRIBE and checks read access at each delivery.
        for topic_filter in ("covers/+/telemetry", "covers/dev-b/telemetry", "#", "alerts/#"):
            with contextlib.suppress(MqttRefused):  # newer brokers may refuse outright
                await dev_a.subscribe([(topic_filter, 1)])
        async with client(broker.device_url("dev-b", DEVICE_SECRETS["dev-b"]), "dev-b") as dev_b:
            await dev_b.publish("covers/dev-b/telemetry", payload("dev-b"), qos=1)
        await service.publish("alerts/W01", b'{"type": "alert.raised"}', qos=1)
        await wait_until(lambda: bool(service_inbox.messages), timeout_s=5, what="the service")
        await asyncio.sleep(QUIET_S)
    assert service_inbox.topics == {"covers/dev-b/telemetry"}
    assert spy.messages == []


@pytest.mark.asyncio
async def test_a_device_cannot_take_over_the_service_session(world_files: World) -> None:
    broker = world_files.broker
    async with client(broker.service_url(), "smartcover-ingest") as service:
        # Same client id on the devices' listener: the broker renames it to the username.
        async with client(broker.device_url("dev-a", DEVICE_SECRETS["dev-a"]), "smartcover-ingest"):
            await asyncio.sleep(QUIET_S)
            assert service.is_open
        await service.publish("alerts/W01", b"{}", qos=1)  # still a working connection
    log = broker.log_path.read_text()
    assert re.search(r"New client connected .* as dev-a \(.*u'dev-a'\)", log)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [5, 4])
async def test_each_listener_knows_only_its_own_users(world_files: World, protocol: int) -> None:
    # The service listener keeps a client's own id: were a device's credentials valid
    # there, it could connect as smartcover-ingest and take over the service's session
    # (its queued readings, and a subscription of its choice left in that session).
    broker = world_files.broker
    on_service_port = f"mqtt://dev-a:{DEVICE_SECRETS['dev-a']}@{broker.host}:{broker.service_port}"
    crew = broker_auth.crew_username("W01")
    crew_password = broker_auth.crew_password(CREW_KEY, "W01")
    crew_on_service_port = f"mqtt://{crew}:{crew_password}@{broker.host}:{broker.service_port}"
    service_on_device_port = (
        f"mqtt://{broker_auth.SERVICE_USER}:{SERVICE_PASSWORD}@{broker.host}:{broker.port}"
    )
    for url in (on_service_port, crew_on_service_port, service_on_device_port):
        for client_id in ("smartcover-ingest", "dev-a"):
            with pytest.raises(MqttRefused):
                async with client(url, client_id, protocol=protocol):
                    pass
    async with client(broker.service_url(), "smartcover-ingest", protocol=protocol) as service:
        await service.publish("alerts/W01", b"{}", qos=1)


# -- crews ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_crew_reads_its_own_unit_alerts_only(world_files: World) -> None:
    broker = world_files.broker
    done = await run_cli(["crew", "W01"], world_files.env(), world_files.workdir)
    assert done.code == 0, done.stderr
    username = re.search(r"username\s+(\S+)", done.stdout)
    password = re.search(r"password\s+(\S+)", done.stdout)
    assert username is not None
    assert password is not None
    assert username.group(1) == "crew@W01"
    w01, d02 = Inbox(), Inbox()
    d02_password = broker_auth.crew_password(CREW_KEY, "D02")
    async with (
        client(broker.service_url(), "notifier") as service,
        client(broker.device_url(username.group(1), password.group(1)), "crew-1", w01) as crew,
        client(broker.device_url("crew@D02", d02_password), "crew-2", d02) as other,
    ):
        await crew.subscribe([("alerts/D02", 1), ("alerts/W01", 1), ("alerts/#", 1)])
        await other.subscribe([("alerts/D02", 1)])
        await service.publish("alerts/D02", b'{"unit": "D02"}', qos=1)
        await service.publish("alerts/W01", b'{"unit": "W01"}', qos=1)
        await wait_until(lambda: bool(w01.messages and d02.messages), timeout_s=5, what="alerts")
        await asyncio.sleep(QUIET_S)
        # Crews only listen: no alerts of their own, no telemetry, not even under their name.
        for topic in ("alerts/W01", "covers/crew@W01/telemetry", "covers/dev-a/telemetry"):
            with pytest.raises(MqttError) as refused:
                await crew.publish(topic, b"{}", qos=1)
            assert refused.value.reason_code == NOT_AUTHORIZED
    assert w01.topics == {"alerts/W01"}
    assert d02.topics == {"alerts/D02"}


# -- provisioning ---------------------------------------------------------------------


async def can_connect(url: str) -> bool:
    try:
        async with client(url, "probe"):
            return True
    except MqttRefused:
        return False


async def wait_for_login(url: str, *, accepted: bool, timeout_s: float = 5.0) -> None:
    """Waits for the broker's reload to accept (or refuse) these credentials."""
    deadline = time.monotonic() + timeout_s
    while await can_connect(url) != accepted:
        if time.monotonic() > deadline:
            verb = "accept" if accepted else "refuse"
            raise AssertionError(f"the broker did not {verb} {url} within {timeout_s} s")
        await asyncio.sleep(0.1)


def printed_password(stdout: str) -> str:
    found = re.search(r"^\s+password\s+(\S+)$", stdout, re.MULTILINE)
    assert found is not None, stdout
    return found.group(1)


@pytest.mark.asyncio
async def test_provision_creates_binds_and_the_broker_accepts_after_reload(
    world_files: World,
) -> None:
    broker = world_files.broker
    cover = COVERS["dev-b"]
    args = ["provision", "dev-new", "--cover", cover, "--interval", "300"]
    args += ["--password-file", str(world_files.password_file), "--pid-file", str(broker.pid_file)]
    done = await run_cli(args, world_files.env(), world_files.workdir)
    assert done.code == 0, done.stderr
    secret = printed_password(done.stdout)
    assert done.stdout.count(secret) == 1  # shown once
    assert secret not in done.stderr

    engine = db.create_engine(world_files.database_url)
    try:
        async with db.transaction(db.session_factory(engine), write=False) as session:
            device = await registry.get_device(session=session, device_id="dev-new")
            replaced = await registry.get_device(session=session, device_id="dev-b")
            assert await registry.device_secret_matches(
                session=session, device_id="dev-new", secret=secret
            )
    finally:
        await engine.dispose()
    assert (device.cover_id, device.report_interval_s, device.has_credentials) == (cover, 300, True)
    assert replaced.cover_id is None  # the cover's old device was unbound
    lines = broker_auth.parse_password_file(world_files.password_file.read_text())
    assert set(lines) == {"crew@W01", "crew@D02", "dev-a", "dev-b", "dev-new"}
    service_file = broker_auth.service_password_file(world_files.password_file)
    assert set(broker_auth.parse_password_file(service_file.read_text())) == {"smartcover"}
    assert registry.secret_matches(secret, lines["dev-new"])

    url = broker.device_url("dev-new", secret)
    await wait_for_login(url, accepted=True)
    async with client(url, "dev-new") as conn:
        await conn.publish("covers/dev-new/telemetry", payload("dev-new"), qos=1)

    # Again: the secret rotates, and the old one stops working at the reload.
    again = await run_cli(args, world_files.env(), world_files.workdir)
    assert again.code == 0, again.stderr
    rotated = printed_password(again.stdout)
    assert rotated != secret
    await wait_for_login(url, accepted=False)
    assert await can_connect(broker.device_url("dev-new", rotated))


@pytest.mark.asyncio
async def test_provision_refuses_what_would_break_the_broker(world_files: World) -> None:
    base = ["--cover", COVERS["dev-a"], "--password-file", str(world_files.password_file)]
    for device_id, reason in (
        ("a+b", "must be 1-64 characters"),
        ("a/b", "must be 1-64 characters"),
        ("smartcover", "the service's broker username"),
    ):
        done = await run_cli(
            ["provision", device_id, *base], world_files.env(), world_files.workdir
        )
        assert done.code == 2
        assert reason in done.stderr
    missing = ["--cover", COVERS["dev-a"], "--password-file", str(world_files.workdir / "none")]
    done = await run_cli(["provision", "dev-c", *missing], world_files.env(), world_files.workdir)
    assert done.code == 2
    assert "devices passwords` first" in done.stderr
    unknown_cover = [
        "--cover",
        "4112030103000009",
        "--password-file",
        str(world_files.password_file),
    ]
    done = await run_cli(
        ["provision", "dev-c", *unknown_cover], world_files.env(), world_files.workdir
    )
    assert done.code == 2
    assert "not found" in done.stderr
    assert "dev-c" not in broker_auth.parse_password_file(world_files.password_file.read_text())


@pytest.mark.asyncio
async def test_a_failed_reload_still_shows_the_secret_and_says_so(world_files: World) -> None:
    bad_pid = world_files.workdir / "stale.pid"
    bad_pid.write_text("999999999\n")
    args = ["provision", "dev-c", "--cover", COVERS["dev-a"], "--pid-file", str(bad_pid)]
    env = world_files.env(SMARTCOVER_BROKER_PASSWORD_FILE=str(world_files.password_file))
    done = await run_cli(args, env, world_files.workdir)
    assert done.code == 1
    assert "The broker was not reloaded" in done.stderr
    secret = printed_password(done.stdout)  # valid at the next reload: it must not be lost
    lines = broker_auth.parse_password_file(world_files.password_file.read_text())
    assert registry.secret_matches(secret, lines["dev-c"])


@pytest.mark.asyncio
async def test_passwords_needs_the_service_credentials_and_an_acl_for_crews(
    world_files: World,
) -> None:
    out = ["--password-file", str(world_files.workdir / "passwd2")]
    without_service = world_files.env(
        SMARTCOVER_MQTT_URL="mqtt://127.0.0.1:1884", SMARTCOVER_BROKER_CREW_KEY=""
    )
    done = await run_cli(["passwords", *out], without_service, world_files.workdir)
    assert done.code == 2
    assert "must hold the service's broker credentials" in done.stderr
    done = await run_cli(["passwords", *out], world_files.env(), world_files.workdir)
    assert done.code == 2
    assert "Crews need their ACL blocks" in done.stderr
    no_crews = world_files.env(SMARTCOVER_BROKER_CREW_KEY="")
    done = await run_cli(["passwords", *out], no_crews, world_files.workdir)
    assert done.code == 0, done.stderr
    assert "No crews" in done.stderr
    users = broker_auth.parse_password_file((world_files.workdir / "passwd2").read_text())
    assert set(users) == {"dev-a", "dev-b"}
    service = broker_auth.parse_password_file((world_files.workdir / "passwd2-service").read_text())
    assert set(service) == {"smartcover"}
    assert registry.secret_matches(SERVICE_PASSWORD, service["smartcover"])


# -- the files themselves -------------------------------------------------------------


def test_usernames_that_could_escape_an_acl_pattern_are_refused() -> None:
    for name in ("a+b", "a#", "a/b", "a:b", "a b", "a\nb", "", "x" * 129):
        with pytest.raises(BrokerAuthError):
            broker_auth.check_username(name)
    for device_id in ("a@b", "a+b", "x" * 65, "smartcover"):
        with pytest.raises(BrokerAuthError):
            broker_auth.check_device_id(device_id)
    with pytest.raises(BrokerAuthError):
        broker_auth.crew_username("W/01")
    assert broker_auth.crew_username("W01") == "crew@W01"


def test_crew_passwords_are_stable_per_unit_and_key() -> None:
    first = broker_auth.crew_password(CREW_KEY, "W01")
    assert first == broker_auth.crew_password(CREW_KEY, "W01")
    assert first != broker_auth.crew_password(CREW_KEY, "D02")
    assert first != broker_auth.crew_password(CREW_KEY + "x", "W01")
    assert len(first) >= registry.MIN_SECRET_CHARS
    with pytest.raises(BrokerAuthError):
        broker_auth.crew_password("short", "W01")


def test_password_file_lines_are_unique_and_replaced_in_place() -> None:
    hashed = registry.hash_secret("a-long-enough-secret")
    text = broker_auth.password_file_text([BrokerUser("a", hashed), BrokerUser("b", hashed)])
    assert broker_auth.parse_password_file(text) == {"a": hashed, "b": hashed}
    with pytest.raises(BrokerAuthError):
        broker_auth.password_file_text([BrokerUser("a", hashed), BrokerUser("a", hashed)])
    other = registry.hash_secret("another-long-secret")
    updated = broker_auth.with_user(text, BrokerUser("a", other))
    assert list(broker_auth.parse_password_file(updated).items()) == [("a", other), ("b", hashed)]
    with pytest.raises(BrokerAuthError):
        BrokerUser("a", "plaintext")


def test_the_acl_is_the_template_plus_one_block_per_crew() -> None:
    template = ACL_TEMPLATE.read_text(encoding="utf-8")
    acl = broker_auth.acl_text(template, ["W01", "D02"])
    assert acl.startswith(template.rstrip("\n"))
    assert "user crew@D02\ntopic read alerts/D02\ntopic deny covers/#" in acl
    assert "user crew@W01\ntopic read alerts/W01" in acl
    with pytest.raises(BrokerAuthError):
        broker_auth.acl_text(acl, [])  # a generated file is not a template
    with pytest.raises(BrokerAuthError):  # the service's rules belong in acl-service
        broker_auth.acl_text(SERVICE_ACL.read_text(encoding="utf-8"), [])


def test_reload_commands_report_failures(tmp_path: Path) -> None:
    assert broker_auth.reload_broker(pid_file=None, reload_cmd=None) is None
    assert broker_auth.reload_broker(pid_file=None, reload_cmd="true") == "ran true"
    with pytest.raises(BrokerAuthError):
        broker_auth.reload_broker(pid_file=None, reload_cmd="false")
    pid_file = tmp_path / "broker.pid"
    pid_file.write_text("garbage\n")
    with pytest.raises(BrokerAuthError):
        broker_auth.reload_broker(pid_file=pid_file, reload_cmd=None)
    with pytest.raises(BrokerAuthError):
        broker_auth.reload_broker(pid_file=tmp_path / "missing.pid", reload_cmd=None)


def test_the_password_file_is_replaced_atomically_and_private(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    broker_auth.write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no temporary left
