"""The deployment without a Docker engine: compose file, image, broker and Grafana files."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from core import broker_auth, db
from core.settings import Settings
from smartcover import devices_cli
from tests.servers import InfluxServer, PostgresServer

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
MOSQUITTO_CONF = REPO / "mosquitto" / "mosquitto.conf"
GRAFANA = REPO / "deploy" / "grafana" / "provisioning"
DASHBOARD = GRAFANA / "dashboards" / "pilot.json"
GRAFANA_READER_SCRIPT = REPO / "deploy" / "postgres" / "initdb" / "10-grafana-reader.sh"
SMARTCOVER_IMAGE = "smartcover:local"

# `${NAME}`, `${NAME:?message}`, `${NAME:-default}` and the like, as compose spells them.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?+-])([^}]*))?\}")
# Where each stateful service keeps its data.
STATEFUL = {
    "postgres": "/var/lib/postgresql/data",
    "influxdb": "/var/lib/influxdb",
    "mosquitto": "/mosquitto/data",
    "grafana": "/var/lib/grafana",
}


# -- reading the files ------------------------------------------------------------------


def compose_variables() -> dict[str, str]:
    """Every variable the compose file interpolates → its operator (`:?`, `:-`, or '')."""
    return {name: operator or "" for name, operator, _ in _VARIABLE.findall(COMPOSE.read_text())}


def example_variables() -> dict[str, str]:
    """Variables .env.example lists (commented optional ones included) → their value."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def fake_secret(name: str) -> str:
    return f"{name.lower().replace('_', '-')}-0123456789abcdefghij"


def interpolate(text: str) -> str:
    """The compose file as compose would see it with every required variable set."""

    def value(match: re.Match[str]) -> str:
        name, operator, rest = match.groups()
        if operator in (":-", "-"):
            return rest
        return fake_secret(name)

    return _VARIABLE.sub(value, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text()))
    return loaded


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def jobs(compose: dict[str, Any]) -> set[str]:
    """Services others wait for to *finish* (migrations, broker files): one-shot jobs."""
    return {
        name
        for service in services(compose).values()
        for name, condition in (service.get("depends_on") or {}).items()
        if condition.get("condition") == "service_completed_successfully"
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so keys can be checked"
    return {str(key): str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source (a named volume, or a ./path) of a service's volumes."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def conf_options(path: Path) -> list[tuple[str, str]]:
    """(option, value) of a Mosquitto configuration file, comments left out."""
    options = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            option, _, value = line.partition(" ")
            options.append((option, value))
    return options


def conf_value(option: str) -> str:
    values = [value for name, value in conf_options(MOSQUITTO_CONF) if name == option]
    assert len(values) == 1, f"{option} given {len(values)} times"
    return values[0]


def host_path(service: dict[str, Any], container_path: str) -> Path | str:
    """What backs a container path: a repository path, or the name of a volume."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            relative = path.relative_to(target)
            return (REPO / source / relative) if source.startswith(".") else source
    raise AssertionError(f"{container_path} is not on any volume of the service")


# -- docker-compose.yml -----------------------------------------------------------------


def test_the_compose_file_parses_and_has_the_whole_stack(compose: dict[str, Any]) -> None:
    found = services(compose)
    assert {"mosquitto", "influxdb", "postgres", "smartcover", "grafana"} <= set(found)
    assert found["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert found["influxdb"]["image"] == "influxdb:1.8"
    assert found["smartcover"]["build"] == "."
    assert found["smartcover"].get("command") is None  # the image's default: `serve`


def test_every_secret_comes_from_a_required_variable_listed_in_env_example() -> None:
    variables = compose_variables()
    listed = example_variables()
    assert set(variables) == set(listed), "compose variables and .env.example differ"
    for name, operator in variables.items():
        assert operator in (":?", ":-"), f"${{{name}}} needs :? (required) or :- (default)"
        if operator == ":?":
            assert listed[name] == "", f".env.example must not hold a value for {name}"
    text = COMPOSE.read_text()
    for match in re.finditer(
        r"^\s+([A-Z_]*(?:PASSWORD|KEY|SECRET|TOKEN)[A-Z_]*): (.+)$", text, re.M
    ):
        if not match.group(1).endswith("_FILE"):  # a path to secrets, not a secret
            assert "${" in match.group(2), f"{match.group(1)} is written in the compose file"
    assert not (REPO / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()


def test_the_service_environment_is_exactly_settings(compose: dict[str, Any]) -> None:
    known = {f"SMARTCOVER_{name.upper()}" for name in Settings.model_fields}
    users = {name: s for name, s in services(compose).items() if s.get("image") == SMARTCOVER_IMAGE}
    assert {"smartcover", "migrate", "broker-auth"} <= set(users)
    for name, service in users.items():
        extra = set(environment(service)) - known
        allowed = devices_cli.ENVVARS if name == "broker-auth" else set()
        assert extra <= allowed, f"{name}: {sorted(extra - allowed)} are not settings"
    env = environment(services(compose)["smartcover"])
    fields = {key.removeprefix("SMARTCOVER_").lower(): value for key, value in env.items()}
    settings = Settings.model_validate(fields)  # production: refuses unsafe values
    assert settings.env.value == "production"
    endpoint = settings.mqtt
    assert (endpoint.username, endpoint.host, endpoint.port) == (
        broker_auth.SERVICE_USER,
        "mosquitto",
        1884,
    )
    assert settings.database_url.startswith("postgresql://")
    assert settings.influx_url == "http://influxdb:8086"
    assert settings.api_host == "0.0.0.0"
    spool = host_path(services(compose)["smartcover"], str(settings.spool_dir))
    assert spool in compose["volumes"], "the spool must be on a named volume"


def test_the_ha_profile_adds_a_second_node_of_the_same_deployment(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    first, second = found["smartcover"], found["smartcover-b"]
    assert second.get("profiles") == ["ha"] and "profiles" not in first
    # Same client id and database: they compete for one advisory lock (core.leadership).
    assert environment(first) == environment(second)
    assert first["healthcheck"] == second["healthcheck"]
    assert first["depends_on"] == second["depends_on"]
    spools = [mounts(node)["/var/lib/smartcover/spool"] for node in (first, second)]
    assert spools[0] != spools[1], "each node needs a spool of its own"
    ports = [node["ports"][0].rsplit(":", 1) for node in (first, second)]
    assert ports[0][0] != ports[1][0] and ports[0][1] == ports[1][1] == "8000"


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    one_shot = jobs(compose)
    assert one_shot == {"migrate", "broker-auth"}
    for name, service in services(compose).items():
        if name in one_shot:
            assert service["restart"] == "no"  # a job that exits has no health to check
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no health check"
        assert service.get("restart") == "unless-stopped"


def test_stateful_services_keep_their_data_on_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, path in STATEFUL.items():
        source = mounts(services(compose)[name]).get(path)
        assert source in declared, f"{name} keeps {path} on {source!r}, not a named volume"
    assert conf_value("persistence_location") == STATEFUL["mosquitto"] + "/"
    used = {
        source
        for service in services(compose).values()
        for source in mounts(service).values()
        if not source.startswith(".")
    }
    assert used == declared


def test_every_file_the_stack_refers_to_exists(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for source in mounts(service).values():
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").is_file()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert GRAFANA_READER_SCRIPT.stat().st_mode & 0o111, "the initdb script must be executable"


def test_only_the_devices_listener_is_published(compose: dict[str, Any]) -> None:
    mosquitto = services(compose)["mosquitto"]
    published = [port.rsplit(":", 1)[-1] for port in mosquitto["ports"]]
    assert published == ["1883"]


# -- the broker's configuration ---------------------------------------------------------


def test_the_broker_is_locked_down_with_files_the_jobs_write(compose: dict[str, Any]) -> None:
    options = conf_options(MOSQUITTO_CONF)
    assert options[0] == ("per_listener_settings", "true")  # before any other option
    assert options[-1][0] == "include_dir"
    listeners = [i for i, (name, _) in enumerate(options) if name == "listener"]
    devices = dict(options[listeners[0] : listeners[1]])
    service = dict(options[listeners[1] : -1])
    assert (devices["listener"], service["listener"]) == ("1883", "1884")
    # Each listener its own users: a device's credentials are not valid on the service's.
    for listener in (devices, service):
        assert listener["allow_anonymous"] == "false"
    assert devices["use_username_as_clientid"] == "true"
    assert "use_username_as_clientid" not in service

    mosquitto, job = services(compose)["mosquitto"], services(compose)["broker-auth"]
    job_env = environment(job)
    written = {
        devices["password_file"]: job_env[devices_cli.PWFILE_ENV],
        devices["acl_file"]: job_env[devices_cli.ACL_FILE_ENV],
        service["password_file"]: str(
            broker_auth.service_password_file(Path(job_env[devices_cli.PWFILE_ENV]))
        ),
    }
    for path, by_the_job in written.items():
        assert path == by_the_job, f"the job writes {path} elsewhere"
        assert host_path(mosquitto, path) == host_path(job, path) == "broker-auth"
    assert host_path(mosquitto, service["acl_file"]) == REPO / "mosquitto" / "acl-service"
    assert host_path(mosquitto, conf_value("include_dir")) == REPO / "mosquitto" / "conf.d"
    assert host_path(job, job_env[devices_cli.ACL_TEMPLATE_ENV]) == REPO / "mosquitto" / "acl"
    assert job["user"] == "1883:1883"  # the broker's uid reads the files it writes


def test_the_tls_listener_template_is_there_commented_out() -> None:
    lines = MOSQUITTO_CONF.read_text().splitlines()
    for option in ("listener 8883", "cafile", "certfile", "keyfile", "use_username_as_clientid"):
        assert any(line.startswith(f"#{option}") for line in lines), option


# -- the image --------------------------------------------------------------------------


def test_the_image_installs_the_lock_with_hashes_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"pip install --require-hashes .*-r requirements\.lock", text)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["smartcover"]' in text
    assert 'CMD ["serve"]' in text
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert f"COPY {package}/ {package}/" in text, f"the image lacks package {package}"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".env", ".venv", ".git"} <= set(ignored), "secrets and the venv stay out of the build"


# -- Grafana ------------------------------------------------------------------------------


def datasources() -> dict[str, dict[str, Any]]:
    loaded = yaml.safe_load((GRAFANA / "datasources" / "smartcover.yml").read_text())
    return {source["uid"]: source for source in loaded["datasources"]}


def dashboard_targets() -> Iterator[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        yield from panel.get("targets", [])


def test_grafana_is_provisioned_with_both_stores_and_the_pilot_dashboard(
    compose: dict[str, Any],
) -> None:
    sources = datasources()
    assert {source["type"] for source in sources.values()} == {
        "influxdb",
        "grafana-postgresql-datasource",
    }
    grafana = services(compose)["grafana"]
    env = environment(grafana)
    for source in sources.values():
        secret = source["secureJsonData"]["password"]
        assert secret.startswith("$"), "a provisioned password must come from the environment"
        assert secret.removeprefix("$") in env
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "smartcover-pilot"
    targets = list(dashboard_targets())
    assert {target["datasource"]["uid"] for target in targets} <= set(sources)
    influx_queries = [target["query"] for target in targets if "query" in target]
    assert all('"cover_reading"' in query for query in influx_queries)
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Tilt", "Alerts raised, by kind", "Ingest rate"} <= titles
    provider = yaml.safe_load((GRAFANA / "dashboards" / "smartcover.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert host_path(grafana, path) == DASHBOARD.parent


def grafana_influxql(query: str) -> str:
    """A dashboard query with Grafana's macros as Grafana would expand them."""
    return (
        query.replace("$timeFilter", "time > now() - 2h")
        .replace("$__interval_ms", "60000")
        .replace("$__interval", "1m")
        .replace("$cover", ".*")
    )


def test_the_dashboard_queries_run_on_influxdb(influx_server: InfluxServer, influx_db: str) -> None:
    now_s = int(time.time())
    lines = [
        f"cover_reading,device_id=d{i},cover_id=41120301010000{i:02d}"
        f" tilt_deg=1.5,displacement_mm=0.5,water_level_cm=40,battery_v=3.6,seq={n}i"
        f" {now_s - 60 * n}"
        for i in range(2)
        for n in range(5)
    ]
    response = httpx.post(
        f"{influx_server.url}/write",
        params={"db": influx_db, "precision": "s"},
        content="\n".join(lines),
        timeout=10,
    )
    assert response.status_code == 204, response.text
    template = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["query"]
    covers = influx_server.query(template, influx_db)["series"][0]["values"]
    assert len(covers) == 2
    for target in dashboard_targets():
        if "query" not in target:
            continue
        result = influx_server.query(grafana_influxql(target["query"]), influx_db)
        assert result.get("series"), f"no data for {target['query']}"
    reporting = next(t for t in dashboard_targets() if "last" in t.get("query", ""))
    answer = influx_server.query(grafana_influxql(reporting["query"]), influx_db)
    assert answer["series"][0]["values"][0][1] == 2


def test_grafana_reads_alerts_through_functions_and_no_table(
    postgres_server: PostgresServer,
) -> None:
    name = f"deploy_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    engine = db.create_engine(postgres_server.url(name))

    async def migrate() -> None:
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    env = {
        "PATH": f"{postgres_server.bindir}:/usr/bin:/bin",
        "PGHOST": postgres_server.host,
        "PGPORT": str(postgres_server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": name,
        "GRAFANA_DB_PASSWORD": "grafana-reader-password",
    }
    done = subprocess.run(
        [str(GRAFANA_READER_SCRIPT)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    postgres_server.psql(
        "INSERT INTO alerts (cover_id, kind, severity, status, raised_ms) VALUES"
        " ('4112030101000001', 'cover_open', 'critical', 'active', 1764000000000),"
        " ('4112030101000002', 'battery_low', 'minor', 'cleared', 1764000000000)",
        name,
    )

    def as_grafana(sql: str) -> subprocess.CompletedProcess[str]:
        command = [str(postgres_server.bindir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        command += ["-h", postgres_server.host, "-p", str(postgres_server.port)]
        command += ["-U", "grafana_reader", "-d", name, "-c", sql]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    window = as_grafana(
        "SELECT kind, status FROM grafana.alerts(1763999999000, 1764000001000) ORDER BY kind"
    )
    assert window.stdout.split() == ["battery_low|cleared", "cover_open|active"], window.stderr
    active = as_grafana("SELECT kind, count(*) FROM grafana.active_alerts() GROUP BY kind")
    assert active.stdout.split() == ["cover_open|1"], active.stderr
    for table in ("alerts", "units", "api_keys"):
        denied = as_grafana(f"SELECT * FROM public.{table}")  # noqa: S608 (a fixed name)
        assert denied.returncode != 0
        assert "permission denied" in denied.stderr
