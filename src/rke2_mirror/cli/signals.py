"""SIGINT and SIGTERM while a command runs (only the command line knows signals).

`interrupts()` installs a handler for both for the duration of a command and yields the run's
`Cancel` token, which goes to the jobs (`CopyOptions(cancel=...)`, `sync(cancel=...)`):

- first signal: the token is set (no new image or blob starts; workers stop at their next chunk or
  request) and `Interrupted` is raised in the main thread.  It is a BaseException: it unwinds through
  every `finally` (spool dirs, partial files, locks); the engine catches it in its wait loop, drains and
  returns a Report whose unfinished images are `interrupted`, which `finish()` still prints;
- second signal: stdout and stderr are flushed and the process ends at once, `os._exit`.

Exit status 130 for SIGINT, 143 for SIGTERM (`Cancel.exit_code`).  `main()` ends an interrupted
command with `hard_exit()`: worker threads may still sit in a blocking read.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rke2_mirror.cli.util import PROG
from rke2_mirror.engine.cancel import EXIT_CODES, Cancel, Cancelled, Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: Cancel | None = None  # the token of the `interrupts()` that owns the handlers


class Reported(Interrupted):
    """An interrupted run whose summary, report and failed list are out already: `main()` only ends
    the process, with the signal's exit status."""


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum or signal.SIGINT).name
    except ValueError:
        return f"signal {signum}"


def hard_exit(code: int, message: str | None = None) -> NoReturn:
    """Flush what was printed, say `message` on stderr, and end the process now (no waiting for threads)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a signal arrived in the middle of a write to it: what is buffered is lost
            pass
    if message:
        try:
            os.write(2, (message + "\n").encode())
        except OSError:
            pass
    os._exit(code)


@contextmanager
def interrupts() -> Iterator[Cancel]:
    """Handle SIGINT and SIGTERM inside the block (see the module doc); yields the run's Cancel token.

    Nested (a command inside `run_command`, which enters it for every command), the inner block shares
    the outer token.  Outside the main thread (signals are delivered to it only), the token is one no
    signal sets.  A `Cancelled` (a job's own check of the token) that leaves the block once the token is
    set becomes `Interrupted`, as a signal would have raised it."""
    global _active
    if _active is not None:
        yield _active
        return
    cancel = Cancel()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, frame: object) -> None:
        if cancel.is_set():
            hard_exit(EXIT_CODES.get(signum, 128 + signum),
                      f"{PROG}: interrupted again ({signal_name(signum)}): exiting at once")
        cancel.set(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _active = cancel
    try:
        yield cancel
    except Cancelled:
        if cancel.is_set():
            raise Interrupted(cancel.signum or signal.SIGINT) from None
        raise
    finally:
        _active = None
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


__all__ = ["Reported", "SIGNALS", "hard_exit", "interrupts", "signal_name"]
