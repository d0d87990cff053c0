"""What a plan should make the service count, predicted with the service's own decoder."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from core.contract import TelemetryDecoder, device_id_from_topic
from device_sim.scenario import CrewEvent, Expectations, Scenario
from device_sim.timeline import Plan


@dataclass(frozen=True, slots=True)
class Outcome:
    """Counts of what the ingest service does with a plan's telemetry."""

    readings_stored: int = 0
    acknowledged: int = 0  # telemetry messages
    dead_letters: dict[str, int] = field(default_factory=dict)


def predict(plan: Plan) -> Outcome:
    """Decodes every telemetry message as the service would when it arrives on time."""
    decoder = TelemetryDecoder()
    stored = messages = 0
    reasons: Counter[str] = Counter()
    for publication in plan.publications():
        if not publication.is_telemetry:
            continue
        device_id = device_id_from_topic(publication.topic)
        assert device_id is not None, publication.topic  # the plan builds its own topics
        now_ms = round(plan.timebase.real_ms(publication.at_ms))
        decoded = decoder.decode(device_id, publication.payload, now_ms)
        messages += 1
        stored += len(decoded.readings)
        reasons.update(rejection.reason.value for rejection in decoded.rejections)
    return Outcome(stored, messages, dict(reasons))


def differences(expect: Expectations, outcome: Outcome) -> list[str]:
    """Where a scenario's declared counts differ from an outcome (empty when they agree)."""
    found = []
    if expect.readings_stored != outcome.readings_stored:
        found.append(f"readings_stored {expect.readings_stored} != {outcome.readings_stored}")
    if expect.acknowledged is not None and expect.acknowledged != outcome.acknowledged:
        found.append(f"acknowledged {expect.acknowledged} != {outcome.acknowledged}")
    declared = {reason.value: count for reason, count in expect.dead_letters.items() if count}
    if declared != outcome.dead_letters:
        found.append(f"dead_letters {declared} != {outcome.dead_letters}")
    return found


def timing_problems(scenario: Scenario) -> list[str]:
    """Expectations that this scenario's time compression keeps from coming out."""
    expect = scenario.expect
    if expect is None or scenario.speed <= 1:
        return []
    fixed = any(
        isinstance(event, CrewEvent) and "resolved" in event.to for event in scenario.events
    )
    verified = any(case.status == "verified" for case in expect.cases)
    if fixed and verified:
        # The service counts a reading for verification only if the device stamped it
        # after the fix was reported (its own clock); compressed time stamps the past.
        return [
            f"a fix is verified by readings stamped after it on the service's clock; at "
            f"{scenario.speed:g}x they are stamped in the past: run at --speed 1"
        ]
    return []
