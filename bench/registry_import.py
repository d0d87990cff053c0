"""`make bench` (registry import): a census imported through the API, then at once an alarm.

Starts a private PostgreSQL, influxd and Mosquitto and `smartcover serve` as a process,
with units and roads but no covers. Then:

1. a census of 100,000 covers with sensors (the one `bench.registry` writes, its planted
   broken rows included) goes to `POST /api/v1/covers/import?skip_invalid=true` as a CSV
   body;
2. as soon as the answer arrives, the first reading of the file's last device is
   published, displaced by 45 mm;
3. `GET /api/v1/alerts` is polled until its `cover_displaced` alert is there.

Reported: the import's duration, and the time from the import's answer to the alert
(seen through the API, and committed by the server, same clock). Before registry writes
refreshed the serving process's cache, that reading was stored but never evaluated; the
alert then never comes, which the bench reports as missed after a timeout.
`--service-tree` runs the service from another checkout (e.g. `git archive` of an older
commit) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from bench.alerting import _wait_ready, reading, start_service
from bench.registry import _prepare, write_census
from core.settings import MqttEndpoint
from ingest import mqtt
from tests.servers import InfluxServer, MosquittoServer, PostgresServer, free_port

DATABASE = "smartcover"
_ADMIN_KEY = "bench-registry-import-admin-key-0123456789"
_DISPLACED_MM = 45.0
# How long the bench waits for the alert before calling it missed: far beyond the 5 s
# timer the registry cache once refreshed on, so a late alert still shows as late.
_ALERT_TIMEOUT_S = 30.0
# How often the alerts are polled: the resolution of the figure.
_POLL_S = 0.01
# Importing 100,000 rows takes ~10 s on PostgreSQL; a generous bound for a loaded machine.
_IMPORT_TIMEOUT_S = 300.0


@dataclass
class Measured:
    """The figures of one import and its alarm, in ms from the import's answer."""

    import_s: float
    inserted: int
    rejected_rows: int
    answer_to_publish_acked_ms: float
    answer_to_alert_seen_ms: float | None  # None: no alert within the timeout
    answer_to_alert_committed_ms: float | None


@dataclass
class ImportAlarm:
    """One run: what was imported and struck, by which service, and what it measured."""

    covers: int
    device_id: str
    cover_id: str
    service_tree: str
    service_rss_mb: float
    measured: Measured


def last_row(census: Path) -> tuple[str, str]:
    """(cover_id, device_id) of the census file's last row: the last one imported."""
    lines = census.read_text(encoding="utf-8").splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    return last[header.index("cover_id")], last[header.index("device_id")]


async def publish_displaced(url: str, device_id: str) -> None:
    """The device's first reading, displaced; returns once the broker has it (PUBACK)."""
    options = mqtt.SessionOptions(f"bench-import-{os.getpid()}", clean_start=True)
    async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as connection:
        payload = reading(device_id, 0, displacement_mm=_DISPLACED_MM)
        await connection.publish(f"covers/{device_id}/telemetry", payload, qos=1)


def wait_alert(client: httpx.Client, cover_id: str) -> tuple[float, int] | None:
    """(time seen, committed_ms) of the cover's displacement alert, or None on timeout."""
    deadline = time.time() + _ALERT_TIMEOUT_S
    params = {"cover_id": cover_id, "kind": "cover_displaced"}
    while time.time() < deadline:
        items = client.get("/api/v1/alerts", params=params).raise_for_status().json()["items"]
        if items:
            return time.time(), int(items[0]["committed_ms"] or 0)
        time.sleep(_POLL_S)
    return None


def measure(census: Path, api_port: int, broker_url: str) -> Measured:
    """Imports the census through the API, then publishes and waits for the alert."""
    cover_id, device_id = last_row(census)
    headers = {"Authorization": f"Bearer {_ADMIN_KEY}", "Content-Type": "text/csv"}
    base = f"http://127.0.0.1:{api_port}"
    with httpx.Client(base_url=base, headers=headers, timeout=_IMPORT_TIMEOUT_S) as client:
        started = time.time()
        answer = client.post(
            "/api/v1/covers/import", params={"skip_invalid": "true"}, content=census.read_bytes()
        )
        answered = time.time()
        answer.raise_for_status()
        asyncio.run(publish_displaced(broker_url, device_id))
        acked = time.time()
        alert = wait_alert(client, cover_id)
    report = answer.json()
    return Measured(
        import_s=round(answered - started, 2),
        inserted=report["inserted"],
        rejected_rows=report["rejected_rows"],
        answer_to_publish_acked_ms=round((acked - answered) * 1000, 1),
        answer_to_alert_seen_ms=round((alert[0] - answered) * 1000, 1) if alert else None,
        answer_to_alert_committed_ms=(
            round(alert[1] - answered * 1000, 1) if alert and alert[1] else None
        ),
    )


def service_env(
    root: Path,
    servers: tuple[PostgresServer, InfluxServer, MosquittoServer],
    api_port: int,
    tree: Path | None,
) -> dict[str, str]:
    postgres, influx, broker = servers
    env = {
        **os.environ,
        "SMARTCOVER_MQTT_URL": broker.url,
        "SMARTCOVER_INFLUX_URL": influx.url,
        "SMARTCOVER_DATABASE_URL": postgres.url(DATABASE),
        "SMARTCOVER_SPOOL_DIR": str(root / "spool"),
        "SMARTCOVER_API_PORT": str(api_port),
        "SMARTCOVER_ADMIN_KEY": _ADMIN_KEY,
        "SMARTCOVER_LOG_LEVEL": "WARNING",
    }
    if tree is not None:
        # Ahead of the editable install of this checkout on the service's path; and not
        # the working directory, which `python -m` would otherwise put first.
        env["PYTHONPATH"] = str(tree.resolve())
        env["PYTHONSAFEPATH"] = "1"
        _check_tree(env, tree)
    return env


def _check_tree(env: dict[str, str], tree: Path) -> None:
    """Fails unless the service would import its code from `tree`."""
    where = subprocess.run(
        [sys.executable, "-c", "import smartcover; print(smartcover.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the service would run {where}, not the code in {tree}")


def run(args: argparse.Namespace, root: Path) -> ImportAlarm:
    census = root / "census.csv"
    write_census(census, args.covers)
    with (
        PostgresServer(root / "pg") as postgres,
        InfluxServer(root / "influxd") as influx,
        MosquittoServer(root / "mosquitto") as broker,
    ):
        postgres.create_database(DATABASE)
        asyncio.run(_prepare(postgres.url(DATABASE)))  # migrations, units and roads
        api_port = free_port()
        env = service_env(root, (postgres, influx, broker), api_port, args.service_tree)
        service = start_service(env, root / "service.log")
        try:
            asyncio.run(_wait_ready(api_port))
            figures = measure(census, api_port, broker.url)
            rss_mb = psutil.Process(service.pid).memory_info().rss / 2**20
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(60)
    cover_id, device_id = last_row(census)
    return ImportAlarm(
        covers=args.covers,
        device_id=device_id,
        cover_id=cover_id,
        service_tree=str(args.service_tree or "this checkout"),
        service_rss_mb=round(rss_mb, 1),
        measured=figures,
    )


def report(result: ImportAlarm, json_path: Path | None) -> bool:
    m = result.measured
    print(
        f"import of {result.covers:,} covers through the API: {m.import_s:.1f} s"
        f" ({m.inserted:,} inserted, {m.rejected_rows} rows rejected as planted);"
        f" service RSS {result.service_rss_mb:.0f} MB"
    )
    print(
        f"first reading of {result.device_id} (the last imported), 45 mm: PUBACK"
        f" {m.answer_to_publish_acked_ms:.0f} ms after the import's answer"
    )
    seen = m.answer_to_alert_seen_ms
    if seen is None:
        print(f"  alert: MISSED (not raised within {_ALERT_TIMEOUT_S:.0f} s)")
    else:
        print(
            f"  alert committed {m.answer_to_alert_committed_ms} ms, seen through the API"
            f" {seen:.0f} ms after the import's answer"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(asdict(result), indent=2))
    return seen is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--covers", type=int, default=100_000)
    parser.add_argument("--service-tree", type=Path, help="run the service from this checkout")
    parser.add_argument("--json", type=Path, default=Path("bench-results/registry_import.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smartcover-bench-import-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # as root, PostgreSQL runs as another user who must reach it
        result = run(args, root)
    if not report(result, args.json):
        sys.exit(1)


if __name__ == "__main__":
    main()
