"""The batch writer against InfluxDB's answers (DESIGN §10), with the HTTP faked at its seam."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from core.contract import Reading, Reason
from core.deadletters import DeadLetter, DeadLetterLog
from core.timeseries import InfluxConfig, InfluxStore, line_of
from ingest.metrics import IngestMetrics
from ingest.spool import Spool
from ingest.writer import Batch, BatchWriter

NOW_MS = 1_800_000_000_000
DEADLINE_S = 0.3
# How long a test waits for the replayer before it gives up: generous, it is a failure path.
WAIT_S = 10.0

# What the fake store answers to one /write, given the lines of its body.
Answer = Callable[[list[bytes]], httpx.Response]


def status(code: int, **headers: str) -> Answer:
    def answer(lines: list[bytes]) -> httpx.Response:
        if code == 204:
            return httpx.Response(204, headers=headers)
        return httpx.Response(code, headers=headers, json={"error": f"fake answer {code}"})

    return answer


def raising(error: type[httpx.TransportError]) -> Answer:
    def answer(lines: list[bytes]) -> httpx.Response:
        raise error("fake transport failure")

    return answer


class FakeInflux:
    """InfluxDB's v1 HTTP API as far as the writer uses it; scripted answers, recorded bodies."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []  # used first, one per /write
        self.default: Answer = status(204)
        self.writes: list[list[bytes]] = []  # the lines of every /write, in order
        self.write_times: list[float] = []
        self.stored: list[bytes] = []  # the lines of every /write answered 204
        self.queries: list[str] = []  # `q` of every POST /query

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/query":
            form = urllib.parse.parse_qs(request.content.decode())
            self.queries.extend(form["q"])
            return httpx.Response(200, json={"results": [{"statement_id": 0}]})
        if request.url.path == "/ping":
            return httpx.Response(self.default([]).status_code)
        assert request.method == "POST"
        assert request.url.path == "/write"
        assert request.url.params["db"] == "db"
        assert request.url.params["precision"] == "ms"
        lines = request.content.split(b"\n")
        self.writes.append(lines)
        self.write_times.append(time.monotonic())
        response = (self.answers.pop(0) if self.answers else self.default)(lines)
        if response.status_code == 204:
            self.stored.extend(lines)
        return response


@dataclass
class Rig:
    fake: FakeInflux
    writer: BatchWriter
    spool: Spool
    spool_dir: Path
    log: DeadLetterLog
    metrics: IngestMetrics

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fake = FakeInflux()
    store = InfluxStore(
        InfluxConfig(url="http://influx.test", database="db"),
        transport=httpx.MockTransport(fake),
    )
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    log = DeadLetterLog(tmp_path / "deadletters.jsonl", capacity=1000)
    metrics = IngestMetrics(CollectorRegistry())
    writer = BatchWriter(
        store=store,
        spool=spool,
        dead_letters=log,
        metrics=metrics,
        deadline_s=DEADLINE_S,
        clock_ms=lambda: NOW_MS,
    )
    yield Rig(fake, writer, spool, spool_dir, log, metrics)
    await store.close()


def reading(seq: int, device_id: str = "MH-0001") -> Reading:
    return Reading(device_id, seq, NOW_MS + seq, tilt_deg=1.0 + seq, displacement_mm=0.5)


def readings(first: int, count: int, device_id: str = "MH-0001") -> list[Reading]:
    return [reading(seq, device_id) for seq in range(first, first + count)]


def lines(batch: list[Reading]) -> list[bytes]:
    return [line_of(one, None) for one in batch]


def bad_json_letter(n: int) -> DeadLetter:
    return DeadLetter.of(
        at_ms=NOW_MS,
        topic="covers/MH-0002/telemetry",
        reason=Reason.BAD_JSON,
        detail="expected value at line 1 column 1",
        payload=f"garbage {n}".encode(),
    )


def spooled(rig: Rig) -> list[list[bytes]]:
    """Every spooled segment's points, oldest first, read from disk without consuming them."""
    paths = sorted(rig.spool_dir.glob("segment-*.lp"))
    return [[line for line in path.read_bytes().split(b"\n") if line] for path in paths]


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- the store answers ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_204_stores_the_batch(rig: Rig) -> None:
    batch = readings(1, 3)

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert rig.fake.writes == [lines(batch)]
    assert rig.fake.stored == lines(batch)
    assert rig.spool.segment_count() == 0
    assert rig.metrics.totals.stored == 3
    assert rig.metrics.totals.spooled == 0
    assert rig.sample("smartcover_store_up") == 1
    assert not rig.writer.health.down


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "failure",
    [
        status(500),
        status(502),
        status(503),
        status(429),
        raising(httpx.ConnectError),
        raising(httpx.ReadTimeout),
    ],
    ids=["500", "502", "503", "429", "refused", "timeout"],
)
async def test_transient_failure_then_204_is_stored_after_a_retry(
    rig: Rig, failure: Answer
) -> None:
    rig.fake.answers = [failure]
    batch = readings(1, 3)

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert rig.fake.writes == [lines(batch), lines(batch)]
    assert rig.fake.stored == lines(batch)
    assert rig.spool.segment_count() == 0
    assert rig.metrics.totals.stored == 3
    assert not rig.writer.health.down


@pytest.mark.asyncio
async def test_store_down_spools_after_the_deadline_then_spools_at_once(rig: Rig) -> None:
    rig.fake.default = status(503)
    first, second = readings(1, 3), readings(4, 2)

    started = time.monotonic()
    await rig.writer.persist(Batch(connection_id=1, readings=first))
    elapsed = time.monotonic() - started

    assert len(rig.fake.writes) > 1  # retried before giving up
    assert elapsed < DEADLINE_S + 0.5
    assert rig.writer.health.down
    assert not rig.writer.health.auth_failed
    assert rig.spool.segment_count() == 1
    assert spooled(rig) == [lines(first)]
    assert rig.sample("smartcover_store_up") == 0

    calls = len(rig.fake.writes)
    started = time.monotonic()
    await rig.writer.persist(Batch(connection_id=1, readings=second))

    assert len(rig.fake.writes) == calls  # the store was not asked again
    assert time.monotonic() - started < DEADLINE_S
    assert spooled(rig) == [lines(first), lines(second)]
    assert rig.metrics.totals.spooled == 5
    assert rig.metrics.totals.stored == 0
    assert rig.sample("smartcover_spool_segments") == 2
    assert rig.sample("smartcover_spool_bytes") == rig.spool.size_bytes > 0


@pytest.mark.asyncio
@pytest.mark.parametrize("retry_after", [0.05, 0.15])
@pytest.mark.parametrize("code", [429, 503])
async def test_retry_after_is_honoured(rig: Rig, code: int, retry_after: float) -> None:
    rig.fake.answers = [status(code, **{"Retry-After": str(retry_after)})]
    batch = readings(1, 2)

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    first, second = rig.fake.write_times
    assert second - first >= retry_after * 0.9
    assert rig.fake.stored == lines(batch)
    assert rig.spool.segment_count() == 0


@pytest.mark.asyncio
async def test_retry_after_beyond_the_deadline_spools_at_once(rig: Rig) -> None:
    rig.fake.default = status(503, **{"Retry-After": "30"})
    batch = readings(1, 2)

    started = time.monotonic()
    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert time.monotonic() - started < DEADLINE_S
    assert len(rig.fake.writes) == 1
    assert spooled(rig) == [lines(batch)]
    assert rig.writer.health.down


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [401, 403])
async def test_auth_failure_spools_at_once_and_alarms(rig: Rig, code: int) -> None:
    rig.fake.default = status(code)
    first, second = readings(1, 3), readings(4, 1)

    await rig.writer.persist(Batch(connection_id=1, readings=first))

    assert len(rig.fake.writes) == 1  # not retried: the credentials will not get better
    assert rig.writer.health.down
    assert rig.writer.health.auth_failed
    assert str(code) in rig.writer.health.last_error
    assert spooled(rig) == [lines(first)]

    await rig.writer.persist(Batch(connection_id=1, readings=second))

    assert len(rig.fake.writes) == 1
    assert spooled(rig) == [lines(first), lines(second)]
    assert rig.metrics.totals.dead_lettered == 0  # spooled, never dropped


@pytest.mark.asyncio
async def test_404_creates_the_database_and_writes_again(rig: Rig) -> None:
    rig.fake.answers = [status(404)]
    batch = readings(1, 3)

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert rig.fake.queries == ['CREATE DATABASE "db"']
    assert rig.fake.writes == [lines(batch), lines(batch)]
    assert rig.fake.stored == lines(batch)
    assert rig.spool.segment_count() == 0
    assert rig.metrics.totals.stored == 3


@pytest.mark.asyncio
@pytest.mark.parametrize(("count", "limit"), [(2, 1), (9, 2), (16, 3), (33, 4)])
async def test_413_splits_until_every_point_is_stored(rig: Rig, count: int, limit: int) -> None:
    def answer(body: list[bytes]) -> httpx.Response:
        return status(413 if len(body) > limit else 204)(body)

    rig.fake.default = answer
    batch = readings(1, count)

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert sorted(rig.fake.stored) == sorted(lines(batch))
    assert len(rig.fake.stored) == count  # each point stored once
    assert rig.spool.segment_count() == 0
    assert rig.metrics.totals.stored == count
    assert rig.metrics.totals.dead_lettered == 0


def rejecting(marker: bytes) -> Answer:
    """400 for any body holding a line with `marker`, as InfluxDB answers a bad point."""

    def answer(body: list[bytes]) -> httpx.Response:
        if any(marker in line for line in body):
            return httpx.Response(400, json={"error": "partial write: field type conflict"})
        return httpx.Response(204)

    return answer


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad_positions",
    [[0], [7], [3], [2, 5], [0, 1, 2, 3, 4, 5, 6, 7]],
    ids=["first", "last", "middle", "two", "all"],
)
async def test_400_dead_letters_only_the_rejected_points(
    rig: Rig, bad_positions: list[int]
) -> None:
    rig.fake.default = rejecting(b"device_id=bad")
    batch = [reading(seq, "bad" if seq in bad_positions else "MH-0001") for seq in range(8)]
    bad = [line_of(one, None) for one in batch if one.device_id == "bad"]
    good = [line_of(one, None) for one in batch if one.device_id != "bad"]

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    assert sorted(rig.fake.stored) == sorted(good)
    letters = rig.log.newest(100)
    assert sorted(letter.payload.encode() for letter in letters) == sorted(bad)
    assert {letter.reason for letter in letters} == {Reason.STORE_REJECTED}
    assert all("partial write" in letter.detail for letter in letters)
    assert rig.spool.segment_count() == 0
    assert rig.metrics.totals.stored == len(good)
    assert rig.metrics.totals.dead_letters_by_reason == {"store_rejected": len(bad)}
    assert rig.sample("smartcover_deadletters_total", reason="store_rejected") == len(bad)
    assert not rig.writer.health.down


@pytest.mark.asyncio
async def test_rejected_point_is_dead_lettered_under_its_device_topic(rig: Rig) -> None:
    """The letter names the telemetry topic of the point's device, as a decode letter does."""
    rig.fake.default = rejecting(b"device_id=bad")
    batch = [reading(1), reading(2, "bad")]

    await rig.writer.persist(Batch(connection_id=1, readings=batch))

    (letter,) = rig.log.newest(10)
    assert letter.topic == "covers/bad/telemetry"
    assert letter.reason == Reason.STORE_REJECTED


@pytest.mark.asyncio
async def test_decode_dead_letters_are_written_to_the_log(rig: Rig) -> None:
    letters = [bad_json_letter(1), bad_json_letter(2)]
    batch = readings(1, 2)

    await rig.writer.persist(Batch(connection_id=1, readings=batch, dead_letters=letters))

    assert rig.log.newest(10) == letters[::-1]
    assert rig.fake.stored == lines(batch)
    assert rig.metrics.totals.dead_letters_by_reason == {"bad_json": 2}
    assert rig.sample("smartcover_deadletters_total", reason="bad_json") == 2


@pytest.mark.asyncio
async def test_batch_of_dead_letters_only_does_not_call_the_store(rig: Rig) -> None:
    await rig.writer.persist(Batch(connection_id=1, dead_letters=[bad_json_letter(1)]))

    assert rig.fake.writes == []
    assert rig.log.newest(10) == [bad_json_letter(1)]
    assert rig.spool.segment_count() == 0


@pytest.mark.asyncio
async def test_dead_letters_are_kept_while_the_store_is_down(rig: Rig) -> None:
    rig.fake.default = status(503)
    batch = readings(1, 2)

    await rig.writer.persist(
        Batch(connection_id=1, readings=batch, dead_letters=[bad_json_letter(1)])
    )

    assert rig.log.newest(10) == [bad_json_letter(1)]
    assert spooled(rig) == [lines(batch)]


# --- replaying the spool ---------------------------------------------------------------


async def spool_while_down(rig: Rig, batches: list[list[Reading]]) -> None:
    rig.fake.default = status(503)
    for batch in batches:
        await rig.writer.persist(Batch(connection_id=1, readings=batch))
    assert spooled(rig) == [lines(batch) for batch in batches]


@pytest.mark.asyncio
async def test_replay_drains_the_spool_oldest_first(rig: Rig) -> None:
    batches = [readings(1, 3), readings(4, 2), readings(6, 4)]
    await spool_while_down(rig, batches)
    writes_while_down = len(rig.fake.writes)
    rig.fake.default = status(204)

    async with asyncio.TaskGroup() as tasks:
        replay = tasks.create_task(rig.writer.replay_forever())
        await eventually(lambda: rig.spool.segment_count() == 0, "the spool to drain")
        replay.cancel()

    assert rig.fake.writes[writes_while_down:] == [lines(batch) for batch in batches]
    assert rig.fake.stored == [line for batch in batches for line in lines(batch)]
    assert rig.spool.size_bytes == 0
    assert rig.metrics.totals.replayed == 9
    assert rig.metrics.totals.stored == 9
    assert rig.sample("smartcover_spool_segments") == 0
    assert rig.sample("smartcover_spool_bytes") == 0
    assert not rig.writer.health.down

    after = readings(10, 1)
    await rig.writer.persist(Batch(connection_id=1, readings=after))
    assert rig.fake.stored[-1:] == lines(after)  # straight to the store again


@pytest.mark.asyncio
async def test_replay_keeps_segments_until_the_store_takes_them(rig: Rig) -> None:
    batches = [readings(1, 2), readings(3, 2)]
    await spool_while_down(rig, batches)

    async with asyncio.TaskGroup() as tasks:
        replay = tasks.create_task(rig.writer.replay_forever())
        writes = len(rig.fake.writes)
        await eventually(lambda: len(rig.fake.writes) > writes, "a replay attempt")
        assert spooled(rig) == [lines(batch) for batch in batches]
        assert rig.metrics.totals.replayed == 0

        rig.fake.default = status(204)
        await eventually(lambda: rig.spool.segment_count() == 0, "the spool to drain")
        replay.cancel()

    assert rig.fake.stored == [line for batch in batches for line in lines(batch)]
    assert rig.metrics.totals.replayed == 4


@pytest.mark.asyncio
async def test_replay_dead_letters_points_the_store_rejects(rig: Rig) -> None:
    batch = [reading(1), reading(2, "bad"), reading(3)]
    await spool_while_down(rig, [batch])
    rig.fake.default = rejecting(b"device_id=bad")

    async with asyncio.TaskGroup() as tasks:
        replay = tasks.create_task(rig.writer.replay_forever())
        await eventually(lambda: rig.spool.segment_count() == 0, "the spool to drain")
        replay.cancel()

    assert sorted(rig.fake.stored) == sorted(lines([batch[0], batch[2]]))
    assert [letter.payload.encode() for letter in rig.log.newest(10)] == lines([batch[1]])
    assert rig.log.newest(10)[0].reason == Reason.STORE_REJECTED
    assert rig.metrics.totals.replayed == 2
    assert rig.metrics.totals.dead_letters_by_reason == {"store_rejected": 1}


# --- a full spool: back-pressure ---------------------------------------------------------


@pytest.fixture
def small_spool(rig: Rig) -> Rig:
    """The rig's spool limited to two batches of 3 readings (a little more: the lines of
    later readings are a byte or two longer)."""
    rig.spool.max_bytes = 2 * sum(len(line) + 1 for line in lines(readings(1, 3))) + 10
    return rig


@pytest.mark.asyncio
async def test_full_spool_holds_the_batch_until_the_store_is_back(
    small_spool: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = small_spool
    await spool_while_down(rig, [readings(1, 3), readings(4, 3)])
    held = readings(7, 3)

    async with asyncio.TaskGroup() as tasks:
        persisting = tasks.create_task(rig.writer.persist(Batch(connection_id=1, readings=held)))
        await eventually(lambda: rig.sample("smartcover_spool_full") == 1, "the spool to fill")
        assert not persisting.done()  # not durable, so not acknowledged
        assert len(spooled(rig)) == 2
        assert rig.spool.size_bytes <= (rig.spool.max_bytes or 0)

        rig.fake.default = status(204)
        replay = tasks.create_task(rig.writer.replay_forever())
        await persisting
        await eventually(lambda: rig.spool.segment_count() == 0, "the spool to drain")
        replay.cancel()

    assert sorted(rig.fake.stored) == sorted(lines(readings(1, 9)))
    assert rig.sample("smartcover_spool_full") == 0
    assert rig.metrics.totals.spooled == 6
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("spool full") for message in messages)
    assert any(message.startswith("spool no longer full") for message in messages)


@pytest.mark.asyncio
async def test_full_spool_takes_the_batch_once_replay_makes_room(small_spool: Rig) -> None:
    rig = small_spool
    await spool_while_down(rig, [readings(1, 3), readings(4, 3)])
    # The store takes one write (the oldest segment's replay), then is down again.
    rig.fake.answers = [status(204)]

    async with asyncio.TaskGroup() as tasks:
        persisting = tasks.create_task(
            rig.writer.persist(Batch(connection_id=1, readings=readings(7, 3)))
        )
        await eventually(lambda: rig.sample("smartcover_spool_full") == 1, "the spool to fill")
        replay = tasks.create_task(rig.writer.replay_forever())
        await persisting
        replay.cancel()

    assert rig.fake.stored == lines(readings(1, 3))
    assert spooled(rig) == [lines(readings(4, 3)), lines(readings(7, 3))]
    assert rig.sample("smartcover_spool_full") == 0


@pytest.mark.asyncio
async def test_pruning_dead_letters_counts_and_logs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.writer")
    old = DeadLetter.of(at_ms=NOW_MS - 100, topic="t", reason="schema", detail="", payload=b"")
    rig.log.append([old, bad_json_letter(1)])

    assert await rig.writer.prune_dead_letters(NOW_MS - 1) == 1

    assert rig.log.newest(10) == [bad_json_letter(1)]
    assert rig.sample("smartcover_deadletters_pruned_total") == 1
    assert any(m.startswith("pruned 1 dead letters written before") for m in caplog.messages)
