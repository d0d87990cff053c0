"""`smartcover sim`: the device simulator's command (fleet, scenarios, --check, load mode)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from core import logs
from core.settings import MqttEndpoint, Settings

if TYPE_CHECKING:
    from device_sim.check import CheckReport
    from device_sim.fleet import Credentials, SimCover
    from device_sim.runner import CaseCrew, RunResult
    from device_sim.runner import Progress as RunProgress
    from device_sim.scenario import Scenario
    from device_sim.service_api import ServiceApi
    from device_sim.timeline import Plan

console = Console()
DEFAULT_SERVICE = "http://127.0.0.1:8000"
# A fleet run without a scenario and without compression lasts as long as simulated time
# may (6 days), which is to say until Ctrl-C.
_FREE_RUN_COMPRESSED_S = 3600.0
_FREE_RUN_COVERS = 10
_STATUS_STYLE = {"pass": "green", "fail": "bold red", "not checkable": "yellow"}


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]{message}[/red]")
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _fail(f"Invalid settings:\n{exc}") from None


def sim(  # noqa: PLR0917 -- a command's options arrive as parameters
    scenario: Annotated[
        str | None, typer.Option(help="A shipped scenario's name, or a scenario .toml file.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Run the scenario against a service and judge it.")
    ] = False,
    service: Annotated[
        str, typer.Option(help="Base URL of the service that --check and --register use.")
    ] = DEFAULT_SERVICE,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SMARTCOVER_API_KEY",
            show_envvar=True,
            help="API key of the service (else SMARTCOVER_ADMIN_KEY): a viewer key reads "
            "alerts and cases, crew steps need a crew key, --register an admin key.",
        ),
    ] = None,
    register: Annotated[
        bool,
        typer.Option(
            "--register", help="Write the fleet into the service's registry first (its API)."
        ),
    ] = False,
    settle_timeout: Annotated[
        float, typer.Option(help="Seconds --check waits for the service to catch up.")
    ] = 30.0,
    list_scenarios: Annotated[
        bool, typer.Option("--list", help="List the shipped scenarios and exit.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be sent (JSON lines); no broker.")
    ] = False,
    fleet: Annotated[
        Path | None, typer.Option(help="Census CSV (DESIGN §11) to take the covers from.")
    ] = None,
    covers: Annotated[
        int | None, typer.Option(help="Generate this many covers (default: the scenario's).")
    ] = None,
    centre: Annotated[
        str, typer.Option(help="LON,LAT the generated covers are scattered around.")
    ] = "111.103,34.720",
    admin_code: Annotated[
        str, typer.Option(help="6-digit administrative code of generated cover numbers.")
    ] = "411203",
    device_prefix: Annotated[str, typer.Option(help="Prefix of generated device ids.")] = "sim",
    credentials: Annotated[
        Path | None, typer.Option(help="CSV of device_id,password for the devices.")
    ] = None,
    password_template: Annotated[
        str | None, typer.Option(help="Device passwords as a template, e.g. 'pw-{device_id}'.")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Time compression: 60 runs an hour in a minute.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Simulated seconds to run (without a scenario).")
    ] = None,
    interval: Annotated[
        int | None, typer.Option(help="Report interval in seconds (without a scenario).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The same seed sends the same messages.")] = 1,
    broker: Annotated[
        str | None, typer.Option(help="Broker URL instead of SMARTCOVER_MQTT_URL.")
    ] = None,
    load: Annotated[
        int | None, typer.Option(help="Load mode: publish this many readings at full speed.")
    ] = None,
    devices: Annotated[int, typer.Option(help="Load mode: spread over this many devices.")] = 1000,
    procs: Annotated[int, typer.Option(help="Load mode: publisher processes.")] = 2,
) -> None:
    """The device simulator: covers publishing per the wire contract, with faults on cue.

    Without --scenario the fleet reports normally (--list shows the scenarios).

    Simulated time starts in the past and catches up with the clock at the end,
    so with --speed every timestamp stays valid.

    Only the broker's address is taken from SMARTCOVER_MQTT_URL; devices log in
    as themselves with --credentials or --password-template.

    The service evaluates alerts only for devices in its registry: --register
    writes the fleet there (through the API, with an admin key).
    """
    from device_sim.errors import SimError  # noqa: PLC0415 -- keeps `--help` fast

    if list_scenarios:
        _list_scenarios()
        return
    settings = _settings()
    logs.configure(settings.log_level)
    url = broker or settings.mqtt_url.get_secret_value()
    if load is not None:
        if scenario or check or register:
            raise _fail("--load runs alone: no --scenario, --check or --register with it")
        _run_load(url, load, devices, procs, seed)
        return
    if check and not scenario:
        raise _fail("--check needs a --scenario")
    if register and dry_run:
        raise _fail("--register writes to the service; not with --dry-run")
    if scenario is not None and (duration is not None or interval is not None):
        raise _fail("--duration and --interval are the scenario's own; not with --scenario")
    try:
        declared = _load(scenario, speed)
        fleet_covers = _fleet(
            declared,
            fleet,
            covers,
            seed=seed,
            centre=centre,
            admin_code=admin_code,
            prefix=device_prefix,
        )
        chosen = declared or _free_run(len(fleet_covers), speed, duration, interval)
        device_credentials = _credentials(credentials, password_template, fleet_covers)
        if dry_run:
            _dry_run(chosen, fleet_covers, seed)
            return
        runner = _Runner(
            chosen,
            fleet_covers,
            seed,
            _device_endpoint(url),
            device_credentials,
            planned=_announce(chosen, fleet_covers, seed),
            protocol=settings.mqtt_protocol,
        )
        if check or register:
            target = _Service(service, api_key or settings.admin_key.get_secret_value())
            _with_service(
                target,
                chosen,
                runner,
                check=check,
                register=register,
                settle_timeout=settle_timeout,
            )
        else:
            _report_run(asyncio.run(runner.run()))
    except SimError as exc:
        raise _fail(str(exc)) from None


def _list_scenarios() -> None:
    from device_sim.scenario import load_scenario, shipped_scenarios  # noqa: PLC0415

    table = Table("scenario", "covers", "simulated", "speed", "what happens", show_lines=True)
    for name in shipped_scenarios():
        item = load_scenario(name)
        table.add_row(
            name,
            str(item.fleet_size),
            _duration(item.duration_s),
            f"{item.speed:g}x",
            " ".join(item.description.split()),
        )
    console.print(table)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} d"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _load(name: str | None, speed: float | None) -> Scenario | None:
    from device_sim.scenario import load_scenario  # noqa: PLC0415

    return None if name is None else load_scenario(name).with_speed(speed)


def _free_run(
    fleet_size: int, speed: float | None, duration: float | None, interval: int | None
) -> Scenario:
    """No scenario: the fleet reports normally for `duration` (or until Ctrl-C)."""
    from device_sim.scenario import MAX_DURATION_S, Scenario  # noqa: PLC0415

    compressed = speed is not None and speed > 1
    try:
        return Scenario(
            name="fleet",
            description="The fleet reporting normally.",
            fleet_size=max(fleet_size, 1),
            duration_s=duration or (_FREE_RUN_COMPRESSED_S if compressed else MAX_DURATION_S),
            speed=speed or 1.0,
            report_interval_s=interval,
        )
    except ValidationError as exc:
        raise _fail(f"invalid --speed, --duration or --interval:\n{exc}") from None


def _fleet(
    scenario: Scenario | None,
    census: Path | None,
    count: int | None,
    *,
    seed: int,
    centre: str,
    admin_code: str,
    prefix: str,
) -> list[SimCover]:
    """The scenario's covers (the first `fleet_size`), or the whole fleet without one."""
    from device_sim.errors import FleetError  # noqa: PLC0415
    from device_sim.fleet import CsvFleet, FleetSource, GeneratedFleet  # noqa: PLC0415

    wanted = count or (scenario.fleet_size if scenario else _FREE_RUN_COVERS)
    source: FleetSource
    if census is not None:
        source = CsvFleet(census)
    else:
        try:
            lon, lat = (float(part) for part in centre.split(","))
        except ValueError:
            raise FleetError(f"--centre must be LON,LAT, not {centre!r}") from None
        source = GeneratedFleet(
            wanted, seed=seed, admin_code=admin_code, centre=(lon, lat), device_prefix=prefix
        )
    found = source.covers()
    if scenario is None:
        return found[:count] if count else found
    if len(found) < scenario.fleet_size:
        raise FleetError(
            f"scenario {scenario.name} needs {scenario.fleet_size} covers with sensors, "
            f"the fleet has {len(found)}"
        )
    return found[: scenario.fleet_size]


def _credentials(
    path: Path | None, template: str | None, fleet_covers: list[SimCover]
) -> Credentials:
    from device_sim.errors import FleetError  # noqa: PLC0415
    from device_sim.fleet import CredentialsFile, NoCredentials, PasswordTemplate  # noqa: PLC0415

    if path is not None and template is not None:
        raise FleetError("give --credentials or --password-template, not both")
    if template is not None:
        return PasswordTemplate(template)
    if path is None:
        return NoCredentials()
    loaded = CredentialsFile.load(path)
    missing = loaded.missing(fleet_covers)
    if missing:
        raise FleetError(f"{path}: no password for {len(missing)} devices, e.g. {missing[0]}")
    return loaded


def _device_endpoint(url: str) -> MqttEndpoint:
    """The broker's address; the URL's user and password are the service's, not a device's."""
    from device_sim.errors import BrokerError  # noqa: PLC0415

    try:
        endpoint = MqttEndpoint.parse(url)
    except ValueError as exc:
        raise BrokerError(str(exc)) from None
    return endpoint.model_copy(update={"username": None, "password": None})


def _plan_now(scenario: Scenario, fleet_covers: list[SimCover], seed: int) -> Plan:
    from core.clock import wall_clock_ms  # noqa: PLC0415
    from device_sim.timeline import Plan, Timebase  # noqa: PLC0415

    timebase = Timebase.catching_up(
        real_start_ms=wall_clock_ms(), duration_s=scenario.duration_s, speed=scenario.speed
    )
    return Plan(scenario, tuple(fleet_covers), seed, timebase)


def _dry_run(scenario: Scenario, fleet_covers: list[SimCover], seed: int) -> None:
    from device_sim.timeline import CrewStep, Publication  # noqa: PLC0415

    plan = _plan_now(scenario, fleet_covers, seed)
    for action in plan.actions():
        line: dict[str, object] = {
            "sim_time": datetime.fromtimestamp(action.at_ms / 1000, UTC).isoformat(),
            "device_id": fleet_covers[action.device].device_id,
        }
        if isinstance(action, Publication):
            line |= {
                "intent": action.intent,
                "topic": action.topic,
                "payload": action.payload.decode(errors="replace"),
            }
        elif isinstance(action, CrewStep):
            line |= {"crew": list(action.moves), "cover_id": fleet_covers[action.device].cover_id}
        else:
            line["link"] = "online" if action.online else "offline (Last Will)"
        typer.echo(json.dumps(line, ensure_ascii=False))


def _announce(scenario: Scenario, fleet_covers: list[SimCover], seed: int) -> int | None:
    """Says what will run; for a scenario, warns when its counts will not come out."""
    from device_sim.outcome import differences, predict, timing_problems  # noqa: PLC0415

    real_s = scenario.duration_s / scenario.speed
    lasting = f"= {real_s:,.0f} s" if real_s < 86400 else "(until Ctrl-C)"
    console.print(
        f"[bold]{scenario.name}[/bold]: {len(fleet_covers)} devices, "
        f"{_duration(scenario.duration_s)} simulated at {scenario.speed:g}x {lasting}, seed {seed}"
    )
    if scenario.expect is None:
        return None
    outcome = predict(_plan_now(scenario, fleet_covers, seed))
    for problem in differences(scenario.expect, outcome):
        console.print(f"[yellow]warning: with these options, expected {problem} (predicted)")
    for problem in timing_problems(scenario):
        console.print(f"[yellow]warning: {problem}")
    return outcome.acknowledged


class _Runner:
    """Runs a scenario with a progress display; `--check` calls it between observations."""

    def __init__(
        self,
        scenario: Scenario,
        fleet_covers: list[SimCover],
        seed: int,
        endpoint: MqttEndpoint,
        credentials: Credentials,
        *,
        planned: int | None,
        protocol: int,
    ) -> None:
        self.scenario = scenario
        self.covers = fleet_covers
        self.seed = seed
        self.endpoint = endpoint
        self.credentials = credentials
        self.planned = planned
        self.protocol = protocol

    async def run(self, crew: CaseCrew | None = None) -> RunResult:
        from device_sim.runner import run_scenario  # noqa: PLC0415

        with _ProgressDisplay(self.planned) as update:
            return await run_scenario(
                self.scenario,
                self.covers,
                seed=self.seed,
                endpoint=self.endpoint,
                credentials=self.credentials,
                protocol=self.protocol,
                planned=self.planned,
                on_progress=update,
                crew=crew,
            )


class _ProgressDisplay:
    """A rich progress bar of published and acknowledged messages, rate and simulated time."""

    def __init__(self, total: int | None) -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("published {task.fields[published]:,} acknowledged {task.completed:,.0f}"),
            TextColumn("{task.fields[rate]:,.0f}/s"),
            TextColumn("online {task.fields[online]}"),
            TextColumn("sim {task.fields[sim]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = TaskID(0)
        self._total = total

    def __enter__(self) -> Callable[[RunProgress], None]:
        self._bar.start()
        self._task = self._bar.add_task(
            "sim", total=self._total, published=0, rate=0.0, online="-", sim="-"
        )
        return self._update

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def _update(self, progress: RunProgress) -> None:
        sim_time = datetime.fromtimestamp(progress.sim_ms / 1000, UTC).strftime("%m-%d %H:%M")
        self._bar.update(
            self._task,
            completed=progress.acknowledged,
            published=progress.published,
            rate=progress.rate,
            online=f"{progress.online}/{progress.devices}",
            sim=sim_time,
        )


def _report_run(result: RunResult) -> None:
    console.print(
        f"published {result.published:,}, acknowledged by the broker {result.acknowledged:,} "
        f"in {result.seconds:.1f} s"
    )
    if result.unacknowledged or result.refused:
        raise _fail(
            f"{result.unacknowledged} not acknowledged, {result.refused} refused by the broker", 1
        )


@dataclass(frozen=True)
class _Service:
    url: str
    api_key: str


def _with_service(
    target: _Service,
    scenario: Scenario,
    runner: _Runner,
    *,
    check: bool,
    register: bool,
    settle_timeout: float,
) -> None:
    """--register and --check: the fleet registered, then the run judged (or just run)."""
    from device_sim.check import CheckReport  # noqa: PLC0415
    from device_sim.check import check as judge  # noqa: PLC0415
    from device_sim.service_api import ServiceApi  # noqa: PLC0415

    expect = scenario.expect
    if check and expect is None:
        raise _fail(f"scenario {scenario.name} declares no [expect]: nothing to check")

    async def main() -> CheckReport | RunResult:
        async with ServiceApi(target.url, api_key=target.api_key) as api:
            if register:
                await _register(api, scenario, runner.covers)
            if expect is None or not check:
                return await runner.run()
            return await judge(
                expect,
                runner.covers,
                lambda: runner.run(crew=api),
                api,
                settle_timeout_s=settle_timeout,
            )

    outcome = asyncio.run(main())
    if isinstance(outcome, CheckReport):
        _report_check(scenario.name, outcome)
    else:
        _report_run(outcome)


async def _register(api: ServiceApi, scenario: Scenario, covers: list[SimCover]) -> None:
    from device_sim.register import register_fleet, service_interval_s  # noqa: PLC0415

    intervals = [
        service_interval_s(scenario.report_interval_s or cover.report_interval_s, scenario.speed)
        for cover in covers
    ]
    done = await register_fleet(api, covers, intervals)
    # No wait: the service has the new registry before its API answers (and other
    # processes of it within moments), so the first reading is evaluated.
    console.print(f"registered with {api.base_url}: {done.summary()}")


def _report_check(name: str, report: CheckReport) -> None:
    table = Table("expectation", "expected", "observed", "result", "note", title=name)
    for verdict in report.verdicts:
        style = _STATUS_STYLE[verdict.status.value]
        table.add_row(
            verdict.what,
            verdict.expected,
            verdict.observed,
            f"[{style}]{verdict.status.value}[/{style}]",
            verdict.note,
        )
    console.print(table)
    if not report.passed:
        raise _fail(f"{name}: FAILED", 1)
    console.print(f"[green]{name}: passed[/green]")


def _run_load(url: str, readings: int, devices: int, procs: int, seed: int) -> None:
    from device_sim.load import LoadPlan, run_load  # noqa: PLC0415

    plan = LoadPlan(url=url, readings=readings, devices=devices, processes=procs, seed=seed)
    started: list[float] = []

    def on_progress(published: int, acknowledged: int) -> None:
        elapsed = time.monotonic() - started[0] if started else 0.0
        update(published, acknowledged, acknowledged / elapsed if elapsed else 0.0)

    bar = Progress(
        TextColumn("[bold]load"),
        BarColumn(),
        TextColumn("published {task.fields[published]:,} acknowledged {task.completed:,.0f}"),
        TextColumn("{task.fields[rate]:,.0f}/s"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("load", total=readings, published=0, rate=0.0)

        def update(published: int, acknowledged: int, rate: float) -> None:
            bar.update(task, completed=acknowledged, published=published, rate=rate)

        result = run_load(plan, lambda: started.append(time.monotonic()), on_progress=on_progress)
        update(result.published, result.acknowledged, result.rate)
    console.print(
        f"published {result.published:,}, acknowledged by the broker "
        f"{result.acknowledged:,} in {result.seconds:.1f} s ({result.rate:,.0f}/s)"
    )
    if result.acknowledged != result.published:
        raise typer.Exit(1)
