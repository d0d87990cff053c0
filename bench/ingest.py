"""`make bench`: end-to-end ingest throughput against the broker and InfluxDB limits.

Starts a private Mosquitto (the project's configuration) and influxd, then measures in
the same run, alternating, so a noisy machine shifts all figures alike:

- broker limit: `mosquitto_sub -q 1` taking the whole load;
- InfluxDB write limit: the same points as 5,000-line batches, one POST after another;
- smartcover: `smartcover serve` as a process, from the first publish to the last point
  stored, with its peak RSS and CPU seconds.

The load is N QoS 1 readings from D devices, published from P processes as fast as the
broker accepts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from bench.alerting import prepare_registry
from core.contract import Reading
from core.timeseries import line_of
from device_sim.load import LoadPlan, reading_payload, run_load
from tests.servers import InfluxServer, MosquittoServer, free_port

# Points per POST for the InfluxDB write limit: the batch size the service uses too.
_INFLUX_BATCH = 5000
# How often the service's RSS is sampled and its progress polled.
_SAMPLE_INTERVAL_S = 0.05


@dataclass
class ServiceRun:
    seconds: float
    rate: float
    peak_rss_mb: float
    cpu_s: float
    stored: int
    broker_cpu_s: float = 0.0  # what the other processes spent meanwhile: the profile of
    influx_cpu_s: float = 0.0  # the machine, to see which process bounds the rate


def _cpu_s(pid: int | None) -> float:
    return sum(psutil.Process(pid).cpu_times()[:2]) if pid else 0.0


class RssSampler(threading.Thread):
    """Samples a process's resident memory until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._process = psutil.Process(pid)
        self._stop_event = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(_SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def broker_limit(workdir: Path, plan: LoadPlan) -> float:
    """Readings/s that `mosquitto_sub` takes from the broker at QoS 1."""
    with MosquittoServer(workdir) as broker:
        plan = LoadPlan(
            url=broker.url, readings=plan.readings, devices=plan.devices, processes=plan.processes
        )
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                "covers/+/telemetry",
                "-C",
                str(plan.readings),
                "-i",
                "bench-sub",
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let it subscribe
        started: list[float] = []
        run_load(plan, on_start=lambda: started.append(time.monotonic()))
        sub.wait(timeout=300)
        return plan.readings / (time.monotonic() - started[0])


def influx_limit(influx: InfluxServer, plan: LoadPlan) -> float:
    """Readings/s InfluxDB takes as 5,000-line batches, one POST after another."""
    database = f"limit_{time.monotonic_ns()}"
    influx.create_database(database)
    now_ms = time.time_ns() // 1_000_000
    lines = [
        line_of(
            Reading(
                plan.device_id(i % plan.devices),
                i // plan.devices,
                now_ms - 3_600_000 + i,
                1.5,
                2.0,
                40.0,
                3.6,
                -85,
                12.5,
            ),
            None,
        )
        for i in range(plan.readings)
    ]
    started = time.monotonic()
    with httpx.Client(base_url=influx.url, timeout=60) as client:
        for offset in range(0, len(lines), _INFLUX_BATCH):
            body = b"\n".join(lines[offset : offset + _INFLUX_BATCH])
            response = client.post(
                "/write", params={"db": database, "precision": "ms"}, content=body
            )
            response.raise_for_status()
    elapsed = time.monotonic() - started
    influx.drop_database(database)
    return plan.readings / elapsed


def _stored(api_port: int) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("smartcover_ingest_readings_stored_total "):
            return float(line.split()[1])
    return 0.0


def service_run(workdir: Path, influx: InfluxServer, plan: LoadPlan) -> ServiceRun:
    """Publishes the load through `smartcover serve`; times it until the last point is stored."""
    database = f"bench_{time.monotonic_ns()}"
    # Every publishing device is registered on a cover, so each reading is evaluated by
    # the alert rules too: the figure is the service's, alerting on.
    database_url = f"sqlite:///{workdir / 'smartcover.db'}"
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(prepare_registry(database_url, plan.devices, webhook=None))
    with MosquittoServer(workdir / "mosquitto") as broker:
        api_port = free_port()
        env = {
            **os.environ,
            "SMARTCOVER_MQTT_URL": broker.url,
            "SMARTCOVER_DATABASE_URL": database_url,
            "SMARTCOVER_INFLUX_URL": influx.url,
            "SMARTCOVER_INFLUX_DB": database,
            "SMARTCOVER_SPOOL_DIR": str(workdir / "spool"),
            "SMARTCOVER_API_PORT": str(api_port),
            "SMARTCOVER_LOG_LEVEL": "WARNING",
        }
        log_path = workdir / "service.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "smartcover", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            return _measure(
                proc,
                log_path,
                broker=broker,
                api_port=api_port,
                influx=influx,
                database=database,
                plan=plan,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            influx.drop_database(database)


def _measure(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    *,
    broker: MosquittoServer,
    api_port: int,
    influx: InfluxServer,
    database: str,
    plan: LoadPlan,
) -> ServiceRun:
    deadline = time.monotonic() + 30
    while _connected(api_port) is False:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    sampler = RssSampler(proc.pid)
    sampler.start()
    cpu_before = _cpu_s(proc.pid)
    others_before = (_cpu_s(broker.pid), _cpu_s(influx.pid))
    load = LoadPlan(
        url=broker.url, readings=plan.readings, devices=plan.devices, processes=plan.processes
    )
    start_times: list[float] = []
    publisher = threading.Thread(
        target=run_load, args=(load, lambda: start_times.append(time.monotonic())), daemon=True
    )
    publisher.start()
    while _stored(api_port) < plan.readings:
        if publisher.is_alive() is False and not start_times:
            raise RuntimeError("the publishers failed to start")
        if start_times and time.monotonic() - start_times[0] > 600:
            raise RuntimeError("service did not store the load within 10 minutes")
        time.sleep(_SAMPLE_INTERVAL_S)
    elapsed = time.monotonic() - start_times[0]
    cpu_s = _cpu_s(proc.pid) - cpu_before
    broker_cpu = _cpu_s(broker.pid) - others_before[0]
    influx_cpu = _cpu_s(influx.pid) - others_before[1]
    sampler.stop()
    publisher.join()
    stored = influx.count(database)
    return ServiceRun(
        elapsed,
        plan.readings / elapsed,
        sampler.peak / 2**20,
        cpu_s,
        stored,
        broker_cpu,
        influx_cpu,
    )


def _connected(api_port: int) -> bool:
    try:
        answer = httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=2)
    except httpx.HTTPError:
        return False
    return bool(answer.json().get("checks", {}).get("broker") == "ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=3, help="publisher processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    plan = LoadPlan(url="", readings=args.readings, devices=args.devices, processes=args.procs)
    print(
        f"load: {plan.readings:,} QoS 1 readings from {plan.devices:,} devices, "
        f"{plan.processes} publisher processes, {args.rounds} rounds; payload "
        f"{len(reading_payload('load-00000', 0, 0, __import__('random').Random(1)))} bytes"
    )
    brokers, influxes, services = [], [], []
    with tempfile.TemporaryDirectory(prefix="smartcover-bench-") as tmp:
        root = Path(tmp)
        with InfluxServer(root / "influxd") as influx:
            for round_no in range(args.rounds):
                brokers.append(broker_limit(root / f"broker-{round_no}", plan))
                influxes.append(influx_limit(influx, plan))
                services.append(service_run(root / f"service-{round_no}", influx, plan))
                last = services[-1]
                print(
                    f"round {round_no + 1}: broker {brokers[-1]:,.0f}/s, influx "
                    f"{influxes[-1]:,.0f}/s, smartcover {last.rate:,.0f}/s "
                    f"(rss {last.peak_rss_mb:.0f} MB, stored {last.stored:,})"
                )
                print(
                    f"  CPU during the smartcover run: service {last.cpu_s:.1f} s, Mosquitto "
                    f"{last.broker_cpu_s:.1f} s, influxd {last.influx_cpu_s:.1f} s, in "
                    f"{last.seconds:.1f} s on {psutil.cpu_count()} cores (publishers: the rest)"
                )
    report(brokers, influxes, services, args.json)


def report(
    brokers: list[float], influxes: list[float], services: list[ServiceRun], json_path: Path | None
) -> None:
    broker, influx = statistics.median(brokers), statistics.median(influxes)
    rate = statistics.median(run.rate for run in services)
    peak = max(run.peak_rss_mb for run in services)
    cpu_per_reading_us = statistics.median(run.cpu_s / run.stored * 1e6 for run in services)
    lost = [run for run in services if run.stored != services[0].stored]
    figures = {
        "smartcover_readings_per_s": round(rate),
        "broker_limit_per_s": round(broker),
        "influx_limit_per_s": round(influx),
        "ratio_to_broker": round(rate / broker, 2),
        "ratio_to_influx": round(rate / influx, 2),
        "peak_rss_mb": round(peak, 1),
        "service_cpu_us_per_reading": round(cpu_per_reading_us, 1),
        "runs": [asdict(run) for run in services],
    }
    print("\nmedian of rounds:")
    print(f"  smartcover end to end   {rate:>10,.0f} readings/s   (target ≥ 20,000)")
    print(f"  broker limit            {broker:>10,.0f} readings/s   ratio {rate / broker:.2f}")
    print(
        f"  InfluxDB write limit    {influx:>10,.0f} readings/s   ratio {rate / influx:.2f}"
        "   (target ≥ 0.35)"
    )
    print(f"  service peak RSS        {peak:>10.0f} MB           (target ≤ 150)")
    print(f"  service CPU             {cpu_per_reading_us:>10.1f} µs/reading")
    if lost:
        print("  WARNING: not every run stored the whole load")
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
