"""The dead-letter log: newest first, bounded on disk, and still there after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.deadletters import PAYLOAD_EXCERPT_BYTES, DeadLetter, DeadLetterLog


def letter(n: int) -> DeadLetter:
    return DeadLetter.of(
        at_ms=n,
        topic=f"covers/MH-{n}/telemetry",
        reason="schema",
        detail=f"letter {n}",
        payload=f'{{"seq": {n}}}'.encode(),
    )


def lines_on_disk(path: Path) -> int:
    files = [path, path.with_name(path.name + ".1")]
    return sum(len(file.read_bytes().splitlines()) for file in files if file.exists())


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b'{"seq": 1}', '{"seq": 1}', id="short"),
        pytest.param(b"", "", id="empty"),
        pytest.param(b"x" * 512, "x" * 512, id="exactly-512"),
        pytest.param(b"x" * 600, "x" * 512, id="truncated"),
        pytest.param(b"\xff\xfeabc", "\ufffd\ufffdabc", id="bad-utf8"),
        pytest.param("é".encode() * 300, "é" * 256, id="multibyte-cut-on-boundary"),
        pytest.param(b"a" + "é".encode() * 300, "a" + "é" * 255 + "\ufffd", id="multibyte-cut"),
        pytest.param("窨井盖".encode(), "窨井盖", id="chinese"),
    ],
)
def test_payload_excerpt(payload: bytes, expected: str) -> None:
    found = DeadLetter.of(at_ms=1, topic="t", reason="bad_json", detail="d", payload=payload)

    assert found.payload == expected
    assert found.payload == payload[:PAYLOAD_EXCERPT_BYTES].decode("utf-8", errors="replace")


def test_detail_is_bounded() -> None:
    found = DeadLetter.of(at_ms=1, topic="t", reason="schema", detail="x" * 10_000, payload=b"")

    assert 0 < len(found.detail) <= 500


def test_letter_fields_are_kept(tmp_path: Path) -> None:
    log = DeadLetterLog(tmp_path / "deadletters.jsonl", capacity=100)
    written = DeadLetter.of(
        at_ms=1_800_000_000_000,
        topic="covers/MH-1/telemetry",
        reason="out_of_range",
        detail="tilt_deg: Input should be less than or equal to 180",
        payload=b'{"tilt_deg": 181, "note": "\xff"}',
    )

    log.append([written])

    assert log.newest(1) == [written]


def test_newest_first(tmp_path: Path) -> None:
    log = DeadLetterLog(tmp_path / "deadletters.jsonl", capacity=100)
    log.append([letter(0), letter(1)])
    log.append([letter(2)])
    log.append([])
    log.append([letter(3), letter(4)])

    assert [found.at_ms for found in log.newest(3)] == [4, 3, 2]
    assert [found.at_ms for found in log.newest(100)] == [4, 3, 2, 1, 0]
    assert log.newest(0) == []


def test_empty_log(tmp_path: Path) -> None:
    assert DeadLetterLog(tmp_path / "none" / "deadletters.jsonl", capacity=10).newest(5) == []


@pytest.mark.parametrize("capacity", [10, 100])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 13])
def test_bounded(tmp_path: Path, capacity: int, chunk: int) -> None:
    """Between half the capacity and all of it stays on disk, whatever the append sizes."""
    path = tmp_path / "deadletters.jsonl"
    log = DeadLetterLog(path, capacity)
    total = 10 * capacity
    written = 0
    while written < total:
        size = min(chunk, total - written)
        log.append([letter(n) for n in range(written, written + size)])
        written += size
        assert lines_on_disk(path) <= capacity, f"after {written} letters"

    assert capacity // 2 <= lines_on_disk(path) <= capacity
    assert log.newest(1) == [letter(total - 1)]
    newest = log.newest(capacity // 2)
    assert [found.at_ms for found in newest] == list(
        range(total - 1, total - 1 - capacity // 2, -1)
    )


def test_rotation_keeps_the_newest_across_both_files(tmp_path: Path) -> None:
    log = DeadLetterLog(tmp_path / "deadletters.jsonl", capacity=10)
    for n in range(11):  # the current file turns into the previous one every fifth letter
        log.append([letter(n)])

    assert [found.at_ms for found in log.newest(3)] == [10, 9, 8]
    assert [found.at_ms for found in log.newest(20)] == [10, 9, 8, 7, 6, 5]


def test_reopened_log_continues(tmp_path: Path) -> None:
    path = tmp_path / "deadletters.jsonl"
    capacity = 10
    first = DeadLetterLog(path, capacity)
    for n in range(13):
        first.append([letter(n)])

    reopened = DeadLetterLog(path, capacity)
    assert reopened.newest(3) == [letter(12), letter(11), letter(10)]
    for n in range(13, 13 + 10 * capacity):
        reopened.append([letter(n)])
        assert lines_on_disk(path) <= capacity

    last = 13 + 10 * capacity - 1
    assert [found.at_ms for found in reopened.newest(3)] == [last, last - 1, last - 2]
    assert capacity // 2 <= lines_on_disk(path) <= capacity


def test_prune_removes_letters_older_than_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "deadletters.jsonl"
    log = DeadLetterLog(path, capacity=10)
    for n in range(8):  # 0-4 rotated into the previous file, 5-7 in the current one
        log.append([letter(n)])

    assert log.prune(before_ms=3) == 3
    assert [found.at_ms for found in log.newest(20)] == [7, 6, 5, 4, 3]
    assert lines_on_disk(path) == 5

    assert log.prune(before_ms=6) == 3  # the previous file goes whole, the current in part
    assert not path.with_name(path.name + ".1").exists()
    assert [found.at_ms for found in log.newest(20)] == [7, 6]
    assert log.prune(before_ms=6) == 0


def test_prune_of_everything_then_append(tmp_path: Path) -> None:
    path = tmp_path / "deadletters.jsonl"
    log = DeadLetterLog(path, capacity=10)
    log.append([letter(n) for n in range(4)])

    assert log.prune(before_ms=100) == 4
    assert log.newest(10) == []

    for n in range(100, 106):  # counting starts again: rotation after five
        log.append([letter(n)])
    assert [found.at_ms for found in log.newest(20)] == list(range(105, 99, -1))
    assert lines_on_disk(path) == 6


def test_prune_drops_a_line_cut_short_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deadletters.jsonl"
    log = DeadLetterLog(path, capacity=100)
    log.append([letter(1)])
    with open(path, "ab") as handle:
        handle.write(b'{"at_ms": 2, "topic": "cov\n')
    log.append([letter(3)])

    assert log.prune(before_ms=2) == 2
    assert log.newest(10) == [letter(3)]
