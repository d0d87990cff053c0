"""`make bench` (soak): an hour at a steady rate through `smartcover serve`; leaks and losses.

Starts a private PostgreSQL, influxd and Mosquitto, registers N covers with sensors, and
runs `smartcover serve` as a process. A paced publisher (a process of its own) sends every
device's reading once per `covers / rate` seconds (10,000 covers at 2,000 readings/s:
every 5 s), a few readings every 20 ms, never a burst. Once a minute a random cover is
struck (displacement 45 mm); its next readings are normal again, so its alert clears.

Every minute the bench samples the service's RSS, open file descriptors and CPU, the
size of the PostgreSQL database, of influxd's data and WAL directories and of the spool.
At the end: readings acknowledged by the broker vs points stored in InfluxDB (nothing may
be lost), alerts raised vs strikes. Verdict: from the sample after the warm-up (five
minutes) to the last, RSS grows by less than 10 MB and descriptors not at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import func, select

from alerting.models import AlertRow
from bench.alerting import _wait_ready, load_device, prepare_registry, reading, start_service
from core.db import create_engine, session_factory, transaction
from core.settings import MqttEndpoint
from ingest import mqtt
from smartcover.seed import plan_pilot
from tests.servers import InfluxServer, MosquittoServer, PostgresServer, free_port

DATABASE = "smartcover"
# The publisher wakes this often and sends what is due: 40 readings at 2,000/s.
_TICK_S = 0.02
# Unacknowledged publishes allowed before the publisher waits: far below the 65,535
# packet ids, and a few seconds of load, so a stalled broker shows as a dip in the rate.
_WINDOW = 20_000
# The first strike comes after this long (the service has seen every device once by
# then at the default rate), then one every `strike_every_s`.
_FIRST_STRIKE_S = 30.0
# No strike this close to the end: its alert could not clear before the publisher stops.
_STRIKE_QUIET_END_S = 30.0
_STRIKE_DISPLACEMENT_MM = 45.0
# Normal readings after which a displacement alert clears (DESIGN §5).
_CLEAR_STREAK = 3
# The seeded devices report every 60 s: 3 × that without a reading is `device_silent`.
_SILENT_AFTER_S = 180.0
# Verdict (issue 12): RSS growth after the warm-up, in MB.
_RSS_GROWTH_LIMIT_MB = 10.0
# How long the service may take to store what was acknowledged once publishing stops.
_DRAIN_TIMEOUT_S = 300.0
# A count(*) over an hour of readings takes influxd a while.
_COUNT_TIMEOUT_S = 600.0
_MB = 2**20


# -- the paced publisher (runs in its own process) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Pace:
    """What the publisher process sends: whom, how fast, how often a strike, for how long."""

    url: str
    devices: tuple[str, ...]
    rate: float
    seconds: float
    strike_every_s: float
    seed: int = 1


@dataclass(slots=True)
class StrikePlan:
    """Which device's next reading is displaced, and what happened to each strike."""

    pace: Pace
    rng: random.Random
    next_at_s: float = _FIRST_STRIKE_S
    pending: set[str] = field(default_factory=set)
    struck: dict[str, float] = field(default_factory=dict)  # device → publish time, epoch s
    normal_after: Counter[str] = field(default_factory=Counter)

    def due(self, elapsed_s: float) -> None:
        """Picks the next cover to strike once its time has come."""
        if elapsed_s < self.next_at_s or elapsed_s > self.pace.seconds - _STRIKE_QUIET_END_S:
            return
        self.next_at_s += self.pace.strike_every_s
        # Each cover at most once, so every strike must raise an alert of its own.
        while (device := self.rng.choice(self.pace.devices)) in self.struck or (
            device in self.pending
        ):
            pass
        self.pending.add(device)

    def values(self, device: str) -> dict[str, float]:
        """The reading's overrides: a displacement for a pending strike, else nothing."""
        if device in self.pending:
            self.pending.discard(device)
            self.struck[device] = time.time()
            return {"displacement_mm": _STRIKE_DISPLACEMENT_MM}
        if device in self.struck:
            self.normal_after[device] += 1
        return {}

    def cleared_due(self) -> int:
        """Strikes followed by enough normal readings for their alert to clear."""
        return sum(1 for d in self.struck if self.normal_after[d] >= _CLEAR_STREAK)


def _packets(pace: Pace, strikes: StrikePlan, first: int, last: int) -> bytes:
    """PUBLISH packets of readings number `first` to `last - 1`, round-robin over devices."""
    count = len(pace.devices)
    packets = []
    for number in range(first, last):
        device = pace.devices[number % count]
        body = reading(device, number // count, **strikes.values(device))
        packets.append(
            mqtt.publish_packet(
                f"covers/{device}/telemetry",
                body,
                qos=1,
                packet_id=number % 65535 + 1,
                retain=False,
            )
        )
    return b"".join(packets)


async def _publish_paced(
    pace: Pace, counts: SynchronizedArray[int], stop: ProcessEvent
) -> StrikePlan:
    strikes = StrikePlan(pace, random.Random(pace.seed))  # noqa: S311 -- not cryptography
    options = mqtt.SessionOptions(f"bench-soak-{os.getpid()}", clean_start=True)
    async with mqtt.connect(MqttEndpoint.parse(pace.url), options, lambda _: None) as connection:
        started, sent = time.monotonic(), 0
        while not stop.is_set():
            elapsed = time.monotonic() - started
            strikes.due(elapsed)
            due = int(elapsed * pace.rate)
            while due - connection.pipelined_acks > _WINDOW:
                await connection.pipelined_acks_advance()
            if due > sent:
                connection.send(_packets(pace, strikes, sent, due))
                sent = due
            counts[0], counts[1], counts[2] = sent, connection.pipelined_acks, len(strikes.struck)
            await asyncio.sleep(_TICK_S)
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            while connection.pipelined_acks < sent:
                await connection.pipelined_acks_advance()
        counts[0], counts[1], counts[2] = sent, connection.pipelined_acks, len(strikes.struck)
    return strikes


def _publisher_main(
    pace: Pace,
    counts: SynchronizedArray[int],
    stop: ProcessEvent,
    results: multiprocessing.Queue[tuple[dict[str, float], int]],
) -> None:
    strikes = asyncio.run(_publish_paced(pace, counts, stop))
    results.put((strikes.struck, strikes.cleared_due()))


# -- what the bench samples --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One minute's look at the service and its stores."""

    minute: float
    rss_mb: float
    fds: int
    cpu_pct: float  # of one core, since the previous sample
    pg_mb: float
    influx_mb: float  # data and WAL directories
    spool_kb: float
    published: int  # acknowledged by the broker
    stored: int  # the service's stored counter
    # fd → what it is (a file's path; a socket's ends, servers by name): a leak's evidence.
    descriptors: dict[int, str] = field(default_factory=dict, repr=False)


def dir_bytes(path: Path) -> int:
    """Total size of the files under a directory (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:  # a WAL segment compacted away meanwhile
                continue
    return total


def _end(address: Any, ports: dict[int, str]) -> str:
    if not address:
        return "-"
    if isinstance(address, str):
        return address or "-"
    return ports.get(address.port, f"{address.ip}:{address.port}")


def describe_fds(process: psutil.Process, ports: dict[int, str]) -> dict[int, str]:
    """What each open descriptor of a process is: a path, a pipe, a socket's two ends."""
    described: dict[int, str] = {}
    fd_dir = Path(f"/proc/{process.pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            described[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:  # closed since the directory was listed
            continue
    for conn in process.net_connections(kind="all"):
        if conn.fd in described:
            ends = f"{_end(conn.laddr, ports)} -> {_end(conn.raddr, ports)}"
            described[conn.fd] = f"{conn.type.name} {ends} {conn.status}".strip()
    return described


def metric(api_port: int, name: str) -> float:
    """One unlabelled value from the service's /metrics (0 when absent or unreachable)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


@dataclass(slots=True)
class Probe:
    """Takes samples of one running service and its servers."""

    service: psutil.Process
    api_port: int
    postgres: PostgresServer
    influx: InfluxServer
    spool: Path
    ports: dict[int, str]  # the servers' ports by name, to say what a socket talks to
    started: float = field(default_factory=time.monotonic)
    _cpu_s: float = 0.0
    _at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._cpu_s = sum(self.service.cpu_times()[:2])  # CPU % counts from here

    def sample(self, published: int) -> Sample:
        # Process figures first: the /metrics request below opens a socket in the service.
        rss, fds = self.service.memory_info().rss, describe_fds(self.service, self.ports)
        cpu_s, now = sum(self.service.cpu_times()[:2]), time.monotonic()
        cpu_pct = 100 * (cpu_s - self._cpu_s) / max(now - self._at, 1e-9)
        self._cpu_s, self._at = cpu_s, now
        pg_bytes = int(self.postgres.psql(f"SELECT pg_database_size('{DATABASE}')").strip())
        influx_bytes = dir_bytes(self.influx.workdir / "data") + dir_bytes(
            self.influx.workdir / "wal"
        )
        return Sample(
            minute=round((now - self.started) / 60, 2),
            rss_mb=round(rss / _MB, 1),
            fds=len(fds),
            cpu_pct=round(cpu_pct, 1),
            pg_mb=round(pg_bytes / _MB, 1),
            influx_mb=round(influx_bytes / _MB, 1),
            spool_kb=round(dir_bytes(self.spool) / 1024, 1),
            published=published,
            stored=int(metric(self.api_port, "smartcover_ingest_readings_stored_total")),
            descriptors=fds,
        )


# -- the run -----------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """Everything the run observed, as written to the JSON file."""

    minutes: float
    rate: float
    covers: int
    samples: list[Sample]
    published: int = 0
    stored_influx: int = 0
    strikes: int = 0
    alerts: dict[str, int] = field(default_factory=dict)
    alerts_active: int = 0
    clears_due: int = 0
    pg_tables: dict[str, str] = field(default_factory=dict)  # the largest, at the end
    service_warnings: list[str] = field(default_factory=list)
    service_exit: int | None = None
    verdict: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Servers:
    """The private servers of one run."""

    postgres: PostgresServer
    influx: InfluxServer
    broker: MosquittoServer


def service_env(servers: Servers, root: Path, api_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "SMARTCOVER_MQTT_URL": servers.broker.url,
        "SMARTCOVER_INFLUX_URL": servers.influx.url,
        "SMARTCOVER_INFLUX_DB": DATABASE,
        "SMARTCOVER_DATABASE_URL": servers.postgres.url(DATABASE),
        "SMARTCOVER_SPOOL_DIR": str(root / "spool"),
        "SMARTCOVER_API_PORT": str(api_port),
        "SMARTCOVER_LOG_LEVEL": "WARNING",
    }


def soak(args: argparse.Namespace, servers: Servers, root: Path) -> Outcome:
    """Registers the covers, runs the service under the paced load, and judges the run."""
    covers = plan_pilot(args.covers, device_id=load_device)
    started = time.monotonic()
    asyncio.run(prepare_registry(servers.postgres.url(DATABASE), args.covers, webhook=None))
    print(f"registry: {args.covers:,} covers with sensors in {time.monotonic() - started:.0f} s")
    api_port = free_port()
    log_path = root / "service.log"
    service = start_service(service_env(servers, root, api_port), log_path)
    outcome = Outcome(args.minutes, args.rate, args.covers, [])
    try:
        asyncio.run(_wait_ready(api_port))
        pace = Pace(
            url=servers.broker.url,
            devices=tuple(c.device_id for c in covers),
            rate=args.rate,
            seconds=args.minutes * 60,
            strike_every_s=args.strike_every,
        )
        probe = Probe(
            psutil.Process(service.pid),
            api_port,
            servers.postgres,
            servers.influx,
            root / "spool",
            ports={
                servers.postgres.port: "postgres",
                servers.influx.port: "influxd",
                servers.broker.port: "mosquitto",
                api_port: "api",
            },
        )
        _run_load(pace, probe, outcome, args.sample_s)
        _drain(api_port, outcome.published)
        outcome.samples.append(probe.sample(outcome.published))
        print_sample(outcome.samples[-1], args.sample_s, args.rate, label="drained")
    finally:
        service.send_signal(signal.SIGTERM)
        outcome.service_exit = service.wait(60)
    servers.influx.http_timeout_s = _COUNT_TIMEOUT_S
    outcome.stored_influx = servers.influx.count(DATABASE)
    outcome.alerts, outcome.alerts_active = asyncio.run(_alerts(servers.postgres.url(DATABASE)))
    outcome.pg_tables = _largest_tables(servers.postgres)
    outcome.service_warnings = _warnings(log_path)
    # Kept beside the JSON: the temporary directory goes, and the log explains a failure.
    args.json.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, args.json.with_suffix(".service.log"))
    return outcome


def _run_load(pace: Pace, probe: Probe, outcome: Outcome, sample_s: float) -> None:
    """Runs the publisher for the planned time, sampling at every interval."""
    context = multiprocessing.get_context("spawn")
    counts = context.Array("q", 3)
    stop = context.Event()
    results: multiprocessing.Queue[tuple[dict[str, float], int]] = context.Queue()
    publisher = context.Process(target=_publisher_main, args=(pace, counts, stop, results))
    print_header()
    outcome.samples.append(probe.sample(0))
    print_sample(outcome.samples[-1], sample_s, pace.rate)
    publisher.start()
    try:
        for number in range(1, int(pace.seconds // sample_s) + 1):
            time.sleep(max(0.0, probe.started + number * sample_s - time.monotonic()))
            if not publisher.is_alive():
                raise RuntimeError(f"the publisher exited with {publisher.exitcode}")
            outcome.samples.append(probe.sample(counts[1]))
            print_sample(outcome.samples[-1], sample_s, pace.rate, outcome.samples[-2])
        stop.set()
        struck, outcome.clears_due = results.get(timeout=_DRAIN_TIMEOUT_S + 30)
    finally:
        stop.set()
        publisher.join(timeout=30)
        if publisher.is_alive():
            publisher.kill()
    outcome.published, outcome.strikes = counts[1], len(struck)
    if counts[0] != counts[1]:
        print(f"WARNING: {counts[0] - counts[1]:,} readings sent but never acknowledged")


def _drain(api_port: int, published: int) -> None:
    """Waits until the service has stored everything the broker acknowledged."""
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    while metric(api_port, "smartcover_ingest_readings_stored_total") < published:
        if time.monotonic() > deadline:
            print(f"WARNING: not everything stored {_DRAIN_TIMEOUT_S:.0f} s after the end")
            return
        time.sleep(0.5)


async def _alerts(database_url: str) -> tuple[dict[str, int], int]:
    """Alerts raised by kind, and how many are still active."""
    engine = create_engine(database_url)
    try:
        async with transaction(session_factory(engine), write=False) as session:
            rows = await session.execute(
                select(AlertRow.kind, AlertRow.status, func.count()).group_by(
                    AlertRow.kind, AlertRow.status
                )
            )
            by_kind: Counter[str] = Counter()
            active = 0
            for kind, status, count in rows:
                by_kind[kind] += count
                active += count if status == "active" else 0
            return dict(by_kind), active
    finally:
        await engine.dispose()


def _largest_tables(postgres: PostgresServer) -> dict[str, str]:
    """What the database's size is made of: the largest tables, with their live rows."""
    rows = postgres.psql(
        "SELECT relname, pg_total_relation_size(relid), n_live_tup, n_dead_tup"
        " FROM pg_stat_user_tables ORDER BY 2 DESC LIMIT 8",
        DATABASE,
    )
    tables = {}
    for row in rows.splitlines():
        name, size, live, dead = row.split("|")
        tables[name] = f"{int(size) / _MB:.1f} MB, {int(live):,} rows ({int(dead):,} dead)"
    return tables


def _warnings(log_path: Path) -> list[str]:
    """The service logs at WARNING: every line it wrote is worth a look."""
    return [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]


# -- the report --------------------------------------------------------------------------


def print_header() -> None:
    print(
        f"{'min':>6} {'RSS MB':>7} {'fds':>4} {'CPU %':>6} {'PG MB':>7} {'influx MB':>9}"
        f" {'spool KB':>8} {'published':>11} {'stored':>11} {'rate/s':>7}"
    )


def print_sample(
    sample: Sample, sample_s: float, rate: float, previous: Sample | None = None, label: str = ""
) -> None:
    per_s = (sample.published - previous.published) / sample_s if previous else 0.0
    print(
        f"{sample.minute:>6.1f} {sample.rss_mb:>7.1f} {sample.fds:>4} {sample.cpu_pct:>6.1f}"
        f" {sample.pg_mb:>7.1f} {sample.influx_mb:>9.1f} {sample.spool_kb:>8.1f}"
        f" {sample.published:>11,} {sample.stored:>11,} {per_s:>7,.0f} {label}",
        flush=True,
    )


def _changed(before: dict[int, str], after: dict[int, str]) -> list[str]:
    """Descriptors open in `after` that were not (or were something else) in `before`."""
    return [f"{fd}: {what}" for fd, what in sorted(after.items()) if before.get(fd) != what]


def judge(outcome: Outcome, warmup_min: float) -> bool:
    """The verdict: no growth after the warm-up, nothing lost, every strike alerted."""
    during = [s for s in outcome.samples[1:-1] if s.minute >= warmup_min - 0.01] or [
        outcome.samples[-2]
    ]
    base, last = during[0], during[-1]
    displaced = outcome.alerts.get("cover_displaced", 0)
    others = {k: n for k, n in outcome.alerts.items() if k != "cover_displaced"}
    checks: dict[str, Any] = {
        "rss_growth_mb": round(last.rss_mb - base.rss_mb, 1),
        "rss_peak_after_warmup_mb": max(s.rss_mb for s in during),
        "fds_growth": last.fds - base.fds,
        "fds_max_after_warmup": max(s.fds for s in during),
        "fds_opened": _changed(base.descriptors, last.descriptors),
        "fds_closed": _changed(last.descriptors, base.descriptors),
        "lost": outcome.published - outcome.stored_influx,
        "alerts_missing": outcome.strikes - displaced,
        "unexpected_alerts": others,
        "baseline_minute": base.minute,
    }
    ok = (
        checks["rss_growth_mb"] < _RSS_GROWTH_LIMIT_MB
        and checks["fds_growth"] <= 0
        and checks["lost"] == 0
        and checks["alerts_missing"] == 0
        and not others
    )
    outcome.verdict = {**checks, "ok": ok}
    return ok


def report(outcome: Outcome, warmup_min: float, json_path: Path) -> bool:
    ok = judge(outcome, warmup_min)
    v = outcome.verdict
    print(
        f"\npublished (acknowledged by the broker) {outcome.published:,}; stored in InfluxDB"
        f" {outcome.stored_influx:,}; lost {v['lost']:,}"
    )
    print(
        f"strikes {outcome.strikes}; cover_displaced alerts {outcome.strikes - v['alerts_missing']}"
        f" (other kinds: {v['unexpected_alerts'] or 'none'}); still active"
        f" {outcome.alerts_active} (due to clear: {outcome.clears_due} of {outcome.strikes})"
    )
    print(
        f"after minute {v['baseline_minute']:.0f}: RSS grew {v['rss_growth_mb']:+.1f} MB"
        f" (limit {_RSS_GROWTH_LIMIT_MB:.0f}; peak {v['rss_peak_after_warmup_mb']:.1f}),"
        f" descriptors {v['fds_growth']:+d} (max {v['fds_max_after_warmup']})"
    )
    for change in ("opened", "closed"):
        for line in v[f"fds_{change}"]:
            print(f"  descriptor {change} after the warm-up: {line}")
    print("largest PostgreSQL tables at the end:")
    for name, size in outcome.pg_tables.items():
        print(f"  {name:<24} {size}")
    print(f"service log lines at WARNING or above: {len(outcome.service_warnings)}")
    for line in outcome.service_warnings[:10]:
        print(f"  {line[:200]}")
    print(f"service exit code {outcome.service_exit}; verdict: {'ok' if ok else 'FAILED'}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    figures = asdict(outcome)
    figures["service_warnings"] = outcome.service_warnings[:100]
    json_path.write_text(json.dumps(figures, indent=2))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="readings/s, steady")
    parser.add_argument("--covers", type=int, default=10_000, help="each reports in turn")
    parser.add_argument("--strike-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline")
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--json", type=Path, default=Path("bench-results/soak.json"))
    args = parser.parse_args()
    interval_s = args.covers / args.rate
    if interval_s >= _SILENT_AFTER_S:
        parser.error(f"each device would report every {interval_s:.0f} s: it would be silent")
    print(
        f"soak: {args.minutes:g} min at {args.rate:,.0f} readings/s from {args.covers:,} covers"
        f" (each every {interval_s:.1f} s), a strike every {args.strike_every:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="smartcover-bench-soak-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # as root, PostgreSQL runs as another user who must reach it
        with (
            PostgresServer(root / "pg") as postgres,
            InfluxServer(root / "influxd") as influx,
            MosquittoServer(root / "mosquitto") as broker,
        ):
            postgres.create_database(DATABASE)
            outcome = soak(args, Servers(postgres, influx, broker), root)
    if not report(outcome, args.warmup, args.json):
        sys.exit(1)


if __name__ == "__main__":
    main()
