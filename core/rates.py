"""Rate limits per key in bounded memory: the generic cell rate algorithm (GCRA)."""

from __future__ import annotations

import time
from collections.abc import Callable

# Sums of intervals carry float rounding: an event due within this is on time.
_ON_TIME_S = 1e-9


class RateTable:
    """At most `burst` events at once per key, and `rate_per_s` a second sustained.

    A token bucket kept as one float per key, the GCRA's "theoretical arrival time": when
    the key's bucket will be full again. A key absent from the table has a full bucket, so
    an entry untouched for `burst / rate_per_s` seconds can be forgotten. Entries live in
    two generations swapped every such period: a key seen in neither is dropped without a
    sweep, so each event costs a dict look-up and some arithmetic. `max_keys` caps a
    generation: past it the swap comes early, forgetting only keys idle since the last
    swap (a flooding key is seen in every generation and stays).
    """

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate table needs a positive rate and a burst of at least 1")
        self._interval = 1.0 / rate_per_s
        self._window = burst * self._interval  # how far ahead of now a key may run
        self._max_keys = max_keys
        self._clock = clock
        self._current: dict[str, float] = {}
        self._previous: dict[str, float] = {}
        self._swap_at = clock() + self._window

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def admit(self, key: str) -> float:
        """0.0 when one more event of `key` is admitted (and counted); otherwise the
        seconds until one would be (a refused event is not counted)."""
        now = self._clock()
        if now >= self._swap_at or len(self._current) >= self._max_keys:
            self._swap(now)
        full_at = self._current.get(key)
        if full_at is None:
            full_at = self._previous.pop(key, now)
        after = max(full_at, now) + self._interval
        wait = after - self._window - now
        if wait > _ON_TIME_S:
            self._current[key] = full_at
            return wait
        self._current[key] = after
        return 0.0

    def _swap(self, now: float) -> None:
        self._previous = self._current
        self._current = {}
        self._swap_at = now + self._window
