"""Stopping a run: a token the CLI sets on SIGINT/SIGTERM, and the exception that unwinds the main thread.

The engine never starts a new image or blob once the token is set; workers check it between chunks and
before each request; sleeps between retries wake up at once.  The main thread gets `Interrupted` (a
BaseException, like KeyboardInterrupt, so no `except Exception` swallows it): outside the engine it
unwinds through every `finally` (spool directories, partial files, locks); inside, the engine catches it,
drains what is running for a short grace period and reports the unfinished images as `interrupted`.
"""

from __future__ import annotations

import signal
import threading

from rke2_mirror.model.errors import MirrorError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """Raised in the main thread by the signal handler (and by `Cancel.check` in workers)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + int(self.signum))


class Cancelled(MirrorError):
    """What a worker raises when the run was interrupted: the image is `interrupted`, not failed."""


class Cancel:
    """A run-wide stop flag (thread-safe).  `signum` says which signal set it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int = signal.SIGINT) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise `Cancelled` when the run was interrupted (workers call this between steps)."""
        if self._event.is_set():
            raise Cancelled("interrupted")

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (and raising `Cancelled`) when the run is interrupted."""
        if seconds > 0 and self._event.wait(seconds):
            raise Cancelled("interrupted")
        self.check()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum or signal.SIGINT, 130)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


NEVER = Cancel()  # a token nobody sets: the default where no caller gave one
