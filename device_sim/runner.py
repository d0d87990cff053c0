"""Plays a plan through the devices' sessions, paced by the real clock, reporting progress."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.clock import wall_clock_ms
from core.settings import MqttEndpoint
from device_sim.devices import DeviceFleet, connected_fleet
from device_sim.errors import SimError
from device_sim.fleet import Credentials, SimCover
from device_sim.scenario import Scenario
from device_sim.timeline import CrewStep, LinkChange, Plan, Timebase

logger = logging.getLogger(__name__)

# Actions handled back to back before the loop gets a turn to write to the sockets.
_YIELD_EVERY = 20
PROGRESS_INTERVAL_S = 0.25
DRAIN_TIMEOUT_S = 30.0
# Every device must be connected within this time before the scenario starts.
CONNECT_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for the progress display."""

    planned: int | None  # telemetry messages the plan sends, when known
    published: int
    acknowledged: int
    online: int
    devices: int
    elapsed_s: float
    sim_ms: int  # how far the simulation has got, on the devices' clocks

    @property
    def rate(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class CrewOutcome:
    """What became of a crew step: the case moved, and why it stopped short if it did."""

    step: CrewStep
    cover_id: str
    case_id: int | None
    reached: tuple[str, ...]  # the states the case was moved to, in order
    problem: str = ""  # empty when every move was made

    @property
    def done(self) -> bool:
        return not self.problem


class CaseCrew(Protocol):
    """The owner unit's crew: moves a cover's open case through the service's API."""

    async def work(self, step: CrewStep, cover: SimCover) -> CrewOutcome:
        """Makes the step's moves; a refusal is reported in the outcome, not raised."""
        ...


@dataclass(frozen=True, slots=True)
class RunResult:
    plan: Plan
    published: int  # telemetry messages
    acknowledged: int  # … acknowledged by the broker (PUBACK)
    unacknowledged: int
    refused: int
    connects: int  # successful CONNACKs; more than the devices means reconnects
    seconds: float
    crew: tuple[CrewOutcome, ...] = ()  # in the order the steps finished


class _Player:
    def __init__(
        self,
        plan: Plan,
        fleet: DeviceFleet,
        planned: int | None,
        on_progress: ProgressCallback,
        crew: CaseCrew | None,
    ) -> None:
        self.plan = plan
        self.fleet = fleet
        self.planned = planned
        self.on_progress = on_progress
        self.crew = crew
        self.crew_done: list[CrewOutcome] = []
        self.started = time.monotonic()
        self.reported = 0.0
        self.sim_ms = plan.timebase.sim_start_ms

    def progress(self) -> Progress:
        stats = self.fleet.stats
        return Progress(
            planned=self.planned,
            published=stats.published,
            acknowledged=stats.acknowledged,
            online=self.fleet.online,
            devices=len(self.fleet.sessions),
            elapsed_s=time.monotonic() - self.started,
            sim_ms=self.sim_ms,
        )

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.reported >= PROGRESS_INTERVAL_S:
            self.reported = now
            self.on_progress(self.progress())

    async def sleep_until(self, due: float) -> None:
        """Sleeps until the loop's clock reads `due`, reporting progress meanwhile."""
        loop = asyncio.get_running_loop()
        while (delay := due - loop.time()) > 0:
            await asyncio.sleep(min(delay, PROGRESS_INTERVAL_S))
            self.report()

    async def play(self, clock_ms: Callable[[], int]) -> None:
        """Sends every action when due; returns once the crew's steps are done too."""
        failed: SimError | None = None
        # The crew works beside the devices: its API calls must not hold up their schedule.
        async with asyncio.TaskGroup() as crew:
            try:
                await self._send(clock_ms, crew)
            except SimError as exc:  # raised below as itself, not wrapped in a group
                failed = exc
        if failed is not None:
            raise failed

    async def _send(self, clock_ms: Callable[[], int], crew: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        timebase = self.plan.timebase
        # The loop's clock at the plan's real start (which may lie a moment behind us).
        origin = loop.time() - (clock_ms() - timebase.real_start_ms) / 1000
        for handled, action in enumerate(self.plan.actions()):
            due = origin + (timebase.real_ms(action.at_ms) - timebase.real_start_ms) / 1000
            if due > loop.time():
                await self.sleep_until(due)
            elif handled % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # lets the loop write to the sockets
                self.report()
            self.sim_ms = action.at_ms
            if isinstance(action, CrewStep):
                crew.create_task(self.crew_step(action))
                continue
            session = self.fleet.sessions[action.device]
            if isinstance(action, LinkChange):
                if action.online:
                    session.go_online()
                else:
                    session.go_offline()
            else:
                session.publish(action.topic, action.payload)
        self.sim_ms = self.plan.end_ms

    async def crew_step(self, step: CrewStep) -> None:
        cover = self.plan.covers[step.device]
        if self.crew is None:
            logger.warning(
                "crew step on cover %s skipped: the crew works through the service's API,"
                " which only --check uses",
                cover.cover_id,
            )
            outcome = CrewOutcome(step, cover.cover_id, None, (), "skipped: needs --check")
        else:
            outcome = await self.crew.work(step, cover)
        self.crew_done.append(outcome)

    async def drain(self, timeout_s: float) -> int:
        """Waits for the broker's PUBACKs; returns how many are still missing."""
        deadline = time.monotonic() + timeout_s
        while self.fleet.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            self.report()
        return self.fleet.pending


def _ignore(progress: Progress) -> None:
    pass


async def play(
    plan: Plan,
    fleet: DeviceFleet,
    *,
    planned: int | None = None,
    on_progress: ProgressCallback | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    clock_ms: Callable[[], int] = wall_clock_ms,
    crew: CaseCrew | None = None,
) -> RunResult:
    """Sends the plan's actions when they are due, then waits for the broker's PUBACKs.

    The crew's steps (if any) go to `crew`; the run ends once every step is done.
    """
    player = _Player(plan, fleet, planned, on_progress or _ignore, crew)
    await player.play(clock_ms)
    unacknowledged = await player.drain(drain_timeout_s)
    player.report(force=True)
    if unacknowledged:
        logger.warning("%d messages not acknowledged by the broker", unacknowledged)
    stats = fleet.stats
    return RunResult(
        plan=plan,
        published=stats.published,
        acknowledged=stats.acknowledged,
        unacknowledged=unacknowledged,
        refused=stats.refused,
        connects=stats.connects,
        seconds=time.monotonic() - player.started,
        crew=tuple(player.crew_done),
    )


async def run_scenario(
    scenario: Scenario,
    covers: Sequence[SimCover],
    *,
    seed: int,
    endpoint: MqttEndpoint,
    credentials: Credentials,
    protocol: int = 5,
    planned: int | None = None,
    on_progress: ProgressCallback | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    crew: CaseCrew | None = None,
) -> RunResult:
    """Connects the covers' devices, fixes the time base, plays the scenario, disconnects.

    The time base is taken once every device is connected, so connecting a large fleet
    does not eat into the scenario's schedule.
    """
    async with connected_fleet(
        covers, endpoint, credentials, protocol=protocol, connect_timeout_s=connect_timeout_s
    ) as fleet:
        timebase = Timebase.catching_up(
            real_start_ms=clock_ms(), duration_s=scenario.duration_s, speed=scenario.speed
        )
        plan = Plan(scenario, tuple(covers), seed, timebase)
        return await play(
            plan, fleet, planned=planned, on_progress=on_progress, clock_ms=clock_ms, crew=crew
        )
