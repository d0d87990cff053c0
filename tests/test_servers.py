"""The server fixtures start real brokers and databases that keep data across restarts."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx

from tests.servers import InfluxServer, MosquittoServer, PostgresServer, port_accepts


def _mqtt_args(broker: MosquittoServer) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.port), "-V", "mqttv311"]


def _publish(broker: MosquittoServer, topic: str, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", *_mqtt_args(broker), "-q", "1", "-t", topic, "-m", payload],
        check=True,
        timeout=10,
    )


def test_mosquitto_delivers_a_published_message(mosquitto: MosquittoServer) -> None:
    topic = f"covers/{uuid.uuid4().hex}/telemetry"
    with subprocess.Popen(
        ["mosquitto_sub", *_mqtt_args(mosquitto), "-q", "1", "-t", topic, "-C", "1", "-W", "10"],
        stdout=subprocess.PIPE,
        text=True,
    ) as sub:
        # The subscriber may not be subscribed yet when the first message goes out, so
        # publish until it has received one rather than guessing how long to wait.
        while True:
            _publish(mosquitto, topic, '{"seq": 1}')
            try:
                stdout, _ = sub.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
    assert sub.returncode == 0
    assert stdout.strip() == '{"seq": 1}'


def test_mosquitto_keeps_a_persistent_session_across_restart(mosquitto: MosquittoServer) -> None:
    topic = f"covers/{uuid.uuid4().hex}/telemetry"
    session = ["mosquitto_sub", *_mqtt_args(mosquitto), "-c", "-i", "persistent-sub", "-q", "1"]
    # -E: subscribe, wait for the broker's acknowledgement, disconnect, keep the session.
    subprocess.run([*session, "-t", topic, "-E"], check=True, timeout=10)
    _publish(mosquitto, topic, "queued while offline")
    port = mosquitto.port

    mosquitto.restart()

    assert mosquitto.port == port
    received = subprocess.run(
        [*session, "-t", topic, "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert received.stdout.strip() == "queued while offline"


def test_mosquitto_kill_and_stop_are_idempotent(mosquitto: MosquittoServer) -> None:
    mosquitto.kill()
    mosquitto.kill()
    mosquitto.stop()
    assert not mosquitto.running
    assert not port_accepts(mosquitto.port)

    mosquitto.start()

    assert port_accepts(mosquitto.port)


def test_influx_counts_a_written_point(influx_server: InfluxServer, influx_db: str) -> None:
    line = "cover_reading,device_id=dev-1 tilt_deg=1.5,displacement_mm=0,seq=7i 1700000000000"
    response = httpx.post(
        f"{influx_server.url}/write",
        params={"db": influx_db, "precision": "ms"},
        content=line,
        timeout=10,
    )

    assert response.status_code == 204, response.text
    assert influx_server.count(influx_db) == 1
    assert influx_server.points(influx_db) == [
        {
            "time": 1700000000000,
            "device_id": "dev-1",
            "displacement_mm": 0,
            "seq": 7,
            "tilt_deg": 1.5,
        }
    ]


def test_influx_count_is_zero_for_an_empty_database(
    influx_server: InfluxServer, influx_db: str
) -> None:
    assert influx_server.count(influx_db) == 0
    assert influx_server.points(influx_db) == []


def test_influx_keeps_points_across_restart(tmp_path: Path) -> None:
    with InfluxServer(tmp_path / "influxd") as server:
        server.create_database("smartcover")
        response = httpx.post(
            f"{server.url}/write",
            params={"db": "smartcover", "precision": "ms"},
            content="cover_reading,device_id=d tilt_deg=3,displacement_mm=1,seq=1i 1700000000000",
            timeout=10,
        )
        assert response.status_code == 204, response.text
        port = server.port

        server.restart()

        assert server.port == port
        assert server.count("smartcover") == 1


def test_postgres_creates_a_database_and_answers(postgres_server: PostgresServer) -> None:
    name = f"test_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)

    assert postgres_server.psql("select 1", dbname=name).strip() == "1"
    assert postgres_server.url(name).endswith(f":{postgres_server.port}/{name}")
