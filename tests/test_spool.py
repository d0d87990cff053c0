"""The durable spool: segments in order, size accounting, and what a restart finds."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.spool import Spool


def points_of(batch: int, count: int = 3) -> list[bytes]:
    line = "cover_reading,device_id=MH-{} tilt_deg={}.5,displacement_mm=0.0,seq={}i {}"
    return [line.format(batch, k, k, k).encode() for k in range(count)]


def stored_size(points: list[bytes]) -> int:
    """Bytes a segment of `points` takes on disk: one line per point."""
    return sum(len(point) + 1 for point in points)


def drain(spool: Spool) -> list[list[bytes]]:
    drained: list[list[bytes]] = []
    while (segment := spool.oldest()) is not None:
        drained.append(segment.points)
        spool.remove(segment)
    return drained


def test_empty_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    assert spool.oldest() is None
    assert spool.size_bytes == 0
    assert spool.segment_count() == 0


@pytest.mark.parametrize("batches", [1, 2, 25])
def test_order_is_kept_oldest_first(tmp_path: Path, batches: int) -> None:
    spool = Spool(tmp_path)
    appended = [points_of(n, count=1 + n % 4) for n in range(batches)]
    for points in appended:
        spool.append(points)

    assert spool.segment_count() == batches
    assert drain(spool) == appended
    assert spool.oldest() is None
    assert spool.segment_count() == 0


def test_remove_then_next(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(points_of(1))
    spool.append(points_of(2))

    first = spool.oldest()
    assert first is not None
    assert first.points == points_of(1)
    assert spool.oldest() == first  # looking does not consume

    spool.remove(first)
    second = spool.oldest()

    assert second is not None
    assert second.points == points_of(2)
    assert not first.path.exists()


def test_append_returns_the_durable_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    path = spool.append(points_of(1))

    assert path.parent == tmp_path
    assert path.suffix == ".lp"
    assert path.read_bytes().splitlines() == points_of(1)
    assert list(tmp_path.glob("*.tmp")) == []


def test_size_accounting(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    batches = [points_of(n, count=n + 1) for n in range(5)]
    expected = 0
    for points in batches:
        spool.append(points)
        expected += stored_size(points)
        assert spool.size_bytes == expected

    assert expected == sum(path.stat().st_size for path in tmp_path.iterdir())
    for points in batches:
        segment = spool.oldest()
        assert segment is not None
        spool.remove(segment)
        expected -= stored_size(points)
        assert spool.size_bytes == expected
    assert spool.size_bytes == 0


def test_reopened_spool_sees_old_segments_and_numbers_after_them(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    old_paths = [first.append(points_of(n)) for n in range(3)]
    first.remove(first.oldest() or pytest.fail("no segment"))

    reopened = Spool(tmp_path)
    assert reopened.segment_count() == 2
    assert reopened.size_bytes == first.size_bytes == 2 * stored_size(points_of(0))

    new_path = reopened.append(points_of(3))

    assert new_path not in old_paths
    assert new_path.name > old_paths[-1].name
    assert drain(reopened) == [points_of(1), points_of(2), points_of(3)]


def test_reopened_spool_continues_after_twelve_segments(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    for n in range(12):
        first.append(points_of(n, count=1))

    reopened = Spool(tmp_path)
    reopened.append(points_of(12, count=1))

    assert drain(reopened) == [points_of(n, count=1) for n in range(13)]


def test_leftover_tmp_segment_is_deleted_on_open(tmp_path: Path) -> None:
    Spool(tmp_path).append(points_of(1))
    leftover = tmp_path / "segment-000000000002.tmp"
    leftover.write_bytes(b"cover_reading,device_id=half-writ")
    unrelated = tmp_path / "README.txt"
    unrelated.write_text("not a segment")

    spool = Spool(tmp_path)

    assert not leftover.exists()
    assert unrelated.exists()
    assert spool.segment_count() == 1
    assert spool.size_bytes == stored_size(points_of(1))
    assert drain(spool) == [points_of(1)]


def test_spool_creates_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"

    Spool(directory).append(points_of(1))

    assert Spool(directory).segment_count() == 1


def test_room_is_measured_against_the_limit(tmp_path: Path) -> None:
    first, second = points_of(1), points_of(2)
    spool = Spool(tmp_path, max_bytes=stored_size(first) + stored_size(second))

    assert spool.has_room(first)
    spool.append(first)
    assert spool.has_room(second)
    spool.append(second)
    assert not spool.has_room(points_of(3, count=1))
    oldest = spool.oldest()
    assert oldest is not None
    spool.remove(oldest)
    assert spool.has_room(points_of(3))


def test_an_empty_spool_takes_a_batch_larger_than_the_limit(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10)

    assert spool.has_room(points_of(1, count=100))
    spool.append(points_of(1, count=100))
    assert not spool.has_room(points_of(2, count=1))


def test_no_limit_always_has_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(points_of(1, count=1000))

    assert spool.has_room(points_of(2, count=1000))
