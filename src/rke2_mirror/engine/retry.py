"""The retry policy: which failures are tried again, how often, how long to wait in between.

Used at two depths, never both for one failure: the registry's transport wrapper retries single HTTP
exchanges (connection errors, 408, 429, 5xx; `Retry-After` honoured), and the engine retries what a
transport cannot replay: a blob stream that broke half-way (the copy restarts at the source's GET and
the target's upload POST).  An error that already used up its attempts below says so (`exhausted`),
so the engine does not multiply them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from rke2_mirror.engine.cancel import NEVER, Cancel

T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    """Temporary, and not already retried to the end by a layer below."""
    return bool(getattr(exc, "temporary", False)) and not getattr(exc, "exhausted", False)


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` per operation on transient errors, with exponential waits (`initial_wait`, doubling,
    at most `max_wait`; a server's Retry-After wins, capped the same way); `timeout` seconds to wait for a
    registry's next bytes (connecting: at most 15 s) before the attempt counts as failed."""

    attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 30.0
    timeout: float = 60.0

    def wait(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(float(retry_after), 0.0), self.max_wait)
        return min(self.initial_wait * (2 ** (attempt - 1)), self.max_wait)

    def call(self, fn: Callable[[], T], cancel: Cancel = NEVER) -> T:
        """Run fn, again after a pause while it raises a retryable error; the last error is raised as it
        is, marked `exhausted` when it was temporary (so no caller retries it once more)."""
        attempt = 1
        while True:
            cancel.check()
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - re-raised unless retryable
                if not retryable(exc):
                    raise
                if attempt >= self.attempts:
                    mark_exhausted(exc)
                    raise
                cancel.sleep(self.wait(attempt, exc))
                attempt += 1


def mark_exhausted(exc: BaseException) -> None:
    try:
        exc.exhausted = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
