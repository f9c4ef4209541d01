"""Throttling: a per-registry request-rate cap, and Docker Hub's pull budget."""

from __future__ import annotations

import re
import threading
import time

import httpx


class RequestRateLimiter:
    """Callable; each call waits for its slot so all threads together stay under `max_rps`."""

    def __init__(self, max_rps: float, clock=time.monotonic, sleep=time.sleep):
        if max_rps <= 0:
            raise ValueError("max_rps must be positive")
        self.interval = 1.0 / max_rps
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def __call__(self) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


_FIRST_INT = re.compile(r"^\s*(\d+)")


def _header_int(value: str | None) -> int | None:
    m = _FIRST_INT.match(value or "")
    return int(m.group(1)) if m else None


class PullBudget:
    """Reads `ratelimit-remaining` / `ratelimit-limit` (Docker Hub: `76;w=21600`) and 429s.

    `exhausted()` gives the reason to stop starting new images once the remaining pulls reach
    `floor`, or a 429 said the limit was hit, so a run stops cleanly and leaves pulls for others.
    """

    def __init__(self, floor: int = 0):
        self.floor = floor
        self.remaining: int | None = None
        self.limit: int | None = None
        self.hit_429 = False
        self._lock = threading.Lock()

    def observe(self, response: httpx.Response) -> None:
        remaining = _header_int(response.headers.get("ratelimit-remaining"))
        limit = _header_int(response.headers.get("ratelimit-limit"))
        with self._lock:
            if remaining is not None:
                self.remaining = remaining if self.remaining is None else min(self.remaining, remaining)
            if limit is not None:
                self.limit = limit
            # A 429 with Retry-After is throttling (retried after the pause); one without, or with the
            # budget at 0, is the pull limit itself: nothing more can be pulled until it resets.
            if (response.status_code == 429 and "/manifests/" in response.request.url.path
                    and (remaining == 0 or "retry-after" not in response.headers)):
                self.hit_429 = True

    def exhausted(self) -> str | None:
        with self._lock:
            if self.hit_429:
                return "the source answered 429 Too Many Requests (pull rate limit reached)"
            if self.remaining is not None and self.remaining <= self.floor:
                return (f"the source's pull budget is down to {self.remaining}"
                        f"{f' of {self.limit}' if self.limit else ''} (floor {self.floor})")
            return None

    def to_json(self) -> dict:
        return {"remaining": self.remaining, "limit": self.limit, "floor": self.floor}
