"""Restart delays and restart intensity, as pure objects driven by an injected clock.

``Backoff`` gives the delay before the n-th consecutive restart: exponential from
``min_backoff``, jittered by ±``jitter``, and never above ``max_backoff`` (jitter
included: the bound is hard). ``RestartIntensity`` is OTP's: more than ``max_restarts``
restarts within ``window`` seconds means restarting is not helping, so the supervisor
escalates instead of spinning.
"""

from __future__ import annotations

import random
from collections import deque


class Backoff:
    def __init__(
        self, min_backoff: float, max_backoff: float, jitter: float, rng: random.Random
    ) -> None:
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(
                f"need 0 < min_backoff <= max_backoff, got {min_backoff}, {max_backoff}"
            )
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self._rng = rng

    def delay(self, restart: int) -> float:
        """Seconds to wait before consecutive restart number ``restart`` (from 1)."""
        if restart < 1:
            raise ValueError(f"restarts count from 1, got {restart}")
        base = min(self.max_backoff, self.min_backoff * 2 ** min(restart - 1, 62))
        spread = base * self.jitter
        jittered = base + float(self._rng.uniform(-spread, spread))
        return float(min(self.max_backoff, max(0.0, jittered)))


def outage_pause(outage: int) -> float:
    """Seconds to wait before trying again, the ``outage``-th time in a row (from 1), while
    the store or the broker is down: 0.5 s, doubled each time, at most 30 s."""
    return float(min(30.0, 0.5 * 2 ** min(max(outage, 1) - 1, 6)))


class RestartIntensity:
    """Counts restarts in a sliding window; ``record`` says whether the limit is exceeded."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times) > self.max_restarts

    @property
    def recent(self) -> int:
        return len(self._times)
