"""The lock of a sync run: one run per config (and shard) at a time."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

from rke2_mirror.jobs.sync.report import EXIT_LOCKED
from rke2_mirror.model.errors import InputError, MirrorError

Log = Callable[[str], None]


class LockHeld(MirrorError):
    """Another run of the same config holds the lock (exit 3)."""

    exit_code = EXIT_LOCKED


class SyncLock:
    """`fcntl.flock` on a lock file holding ``pid=… host=… started=…`` for the message.

    The kernel drops a flock when its process dies, so a lock file left behind by a dead process
    never blocks: the next run takes it over (and says so)."""

    def __init__(self, path: Path, what: str = "sync"):
        self.path = path
        self.what = what
        self._fd: int | None = None
        self.previous: dict[str, str] = {}

    @staticmethod
    def _parse(text: str) -> dict[str, str]:
        return dict(p.split("=", 1) for p in text.split() if "=" in p)

    def acquire(self, log: Log = lambda s: None) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(f"cannot create the lock file {self.path}: {exc.strerror or exc} "
                             "(set 'lock: PATH' in the config or --lock PATH to a writable place)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started") if k in holder) or "unknown holder"
            raise LockHeld(f"another {self.what} is running ({who}; lock {self.path}): exiting") from None
        self._fd = fd
        self.previous = self._parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if self.previous.get("pid"):
            alive = _pid_alive(self.previous["pid"]) and self.previous.get("host") == socket.gethostname()
            state = "no longer running" if not alive else "not holding it"
            log(f"taking over the lock {self.path} left by pid {self.previous['pid']}"
                + (f" (started {self.previous['started']})" if "started" in self.previous else "") + f", {state}")
        info = (f"pid={os.getpid()} host={socket.gethostname()} "
                f"started={_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the file stays (unlinking a lock file races with the next opener)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "SyncLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
