"""Files written whole or not at all: a temp file beside the target, then a rename over it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def existing_mode(path: Path, default: int) -> int:
    """The permission bits `path` has now, or `default` when it does not exist (or can't be read)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return default


def write_atomic(path: Path, text: str, mode: int = 0o644, *, exclusive: bool = False, parents: bool = False,
                 fsync: bool = False) -> None:
    """Write `text` to a temp file `.NAME.tmpPID` created with exactly `mode` (chmod'ed: the umask
    does not narrow it, nothing widens it: files holding credentials stay 0600), then rename it
    over `path`.  `exclusive`: refuse a temp file another run left behind (O_EXCL) instead of
    reusing it; `parents`: create missing directories; `fsync`: on disk before the rename.
    Any failure is one InputError, "cannot write PATH: ...", and no temp file is left."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if exclusive else 0)
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            if not exclusive:
                raise
            raise InputError(f"cannot write {path}: a stale temporary file {tmp} exists") from None
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
