"""The dead-letter log: bounded, on disk, readable by `smartcover deadletters`.

Two JSON-lines files: the current one and the one before it. When the current file holds
half the capacity it replaces the older one, so the log keeps between half the capacity
and the whole of it, newest last, and never grows without bound. `prune` also removes
letters older than a given time, so none is kept past its age either.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Bytes of a bad payload kept in a dead letter: enough to see what was wrong.
PAYLOAD_EXCERPT_BYTES = 512


@dataclass(frozen=True, slots=True)
class DeadLetter:
    at_ms: int
    topic: str
    reason: str
    detail: str
    payload: str  # the first PAYLOAD_EXCERPT_BYTES bytes, decoded with replacement

    @classmethod
    def of(cls, *, at_ms: int, topic: str, reason: str, detail: str, payload: bytes) -> DeadLetter:
        excerpt = payload[:PAYLOAD_EXCERPT_BYTES].decode("utf-8", errors="replace")
        return cls(at_ms, topic, reason, detail[:500], excerpt)


class DeadLetterLog:
    """Append-only with rotation. Blocking file I/O: call it from a worker thread."""

    def __init__(self, path: Path, capacity: int) -> None:
        self._path = path
        self._previous = path.with_name(path.name + ".1")
        self._rotate_at = max(1, capacity // 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._count = self._count_lines(path)
        self._lock = threading.Lock()  # `append` and `prune` come from different threads

    @staticmethod
    def _count_lines(path: Path) -> int:
        if not path.exists():
            return 0
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Writes and fsyncs; the messages behind the letters may be acknowledged after."""
        with self._lock:
            self._append(letters)

    def _append(self, letters: Sequence[DeadLetter]) -> None:
        # One call never holds more than a file's worth: beyond that only the newest count.
        letters = letters[-self._rotate_at :]
        room = max(0, self._rotate_at - self._count)
        self._write(letters[:room])
        if letters and len(letters) >= room:
            # The current file is full: it becomes the previous one, and the rest starts anew.
            os.replace(self._path, self._previous)
            self._count = 0
            self._write(letters[room:])

    def _write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        lines = "".join(json.dumps(asdict(letter), ensure_ascii=False) + "\n" for letter in letters)
        with open(self._path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
        self._count += len(letters)

    def prune(self, before_ms: int) -> int:
        """Removes the letters written before `before_ms`; returns how many went."""
        with self._lock:
            removed = sum(_drop_old(path, before_ms) for path in (self._previous, self._path))
            self._count = self._count_lines(self._path)
        return removed

    def newest(self, limit: int) -> list[DeadLetter]:
        """The newest `limit` dead letters, newest first."""
        letters: list[DeadLetter] = []
        for path in (self._path, self._previous):
            if not path.exists():
                continue
            letters.extend(reversed(_read_letters(path)))
            if len(letters) >= limit:
                break
        return letters[:limit]


def _read_letters(path: Path) -> list[DeadLetter]:
    """The letters of one file, oldest first; a line cut short by a crash is skipped."""
    letters: list[DeadLetter] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                letters.append(DeadLetter(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return letters


def _is_old(line: bytes, before_ms: int) -> bool:
    """A letter from before `before_ms`, or a line cut short by a crash (never readable)."""
    try:
        at_ms = json.loads(line)["at_ms"]
    except (ValueError, TypeError, KeyError):
        return True
    return not isinstance(at_ms, int) or at_ms < before_ms


def _drop_old(path: Path, before_ms: int) -> int:
    """Removes the old lines at the head of one file (lines are in the order written, so
    the old ones come first); returns how many. The file is replaced whole and fsync'd."""
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    old = 0
    while old < len(lines) and _is_old(lines[old], before_ms):
        old += 1
    if old == len(lines):
        path.unlink(missing_ok=True)
    elif old:
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.writelines(lines[old:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    return old
