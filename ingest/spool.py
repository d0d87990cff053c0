"""The durable local spool: encoded points kept on disk while the time-series store is down.

Each spooled batch is one segment file, written to a temporary name, fsync'd, renamed and
the directory fsync'd, so a segment either exists whole or not at all (a `kill -9` halfway
leaves only a `.tmp` file, whose messages were never acknowledged and come again).
Segments are replayed oldest first and deleted only after the store has taken them.
The spool has a size limit: `has_room` says whether a batch still fits, and the writer
waits instead of spooling past it (the broker keeps what is not acknowledged meanwhile).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^segment-(\d{12})\.lp$")


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    points: list[bytes]


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """Segments on disk, oldest first. Blocking file I/O: call it from a worker thread."""

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        """`max_bytes`: the limit `has_room` keeps to; None for no limit."""
        self._directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob("segment-*.tmp"):
            leftover.unlink()  # a write that never completed: its messages were not acked
        numbers = [int(m.group(1)) for m in map(_SEGMENT.match, self._names()) if m]
        self._next_number = max(numbers, default=0) + 1
        self._bytes = sum(path.stat().st_size for path in self._segments())

    def _names(self) -> list[str]:
        return sorted(os.listdir(self._directory))

    def _segments(self) -> list[Path]:
        return [self._directory / name for name in self._names() if _SEGMENT.match(name)]

    def append(self, points: Sequence[bytes]) -> Path:
        """Stores points durably; when this returns, they survive a crash of the machine."""
        name = f"segment-{self._next_number:012d}"
        self._next_number += 1
        temporary = self._directory / f"{name}.tmp"
        final = self._directory / f"{name}.lp"
        body = b"\n".join(points) + b"\n"
        with open(temporary, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(final)
        _fsync_directory(self._directory)
        self._bytes += len(body)
        return final

    def oldest(self) -> Segment | None:
        segments = self._segments()
        if not segments:
            return None
        path = segments[0]
        return Segment(path, [line for line in path.read_bytes().split(b"\n") if line])

    def remove(self, segment: Segment) -> None:
        size = segment.path.stat().st_size
        segment.path.unlink()
        self._bytes = max(0, self._bytes - size)

    def has_room(self, points: Sequence[bytes]) -> bool:
        """Whether `points` fit under the limit. An empty spool takes any one batch, so a
        batch larger than the limit cannot wait forever."""
        if self.max_bytes is None or self._bytes == 0:
            return True
        return self._bytes + sum(len(point) + 1 for point in points) <= self.max_bytes

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def segment_count(self) -> int:
        return len(self._segments())
