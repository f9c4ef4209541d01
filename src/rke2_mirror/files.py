"""Files written whole or not at all: a fresh temp file beside the target, then a rename over it."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from rke2_mirror.model.errors import InputError


def existing_mode(path: Path, default: int) -> int:
    """The permission bits `path` has now, or `default` when it does not exist (or can't be read)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return default


def write_atomic(path: Path, text: str | bytes, mode: int = 0o644, *, parents: bool = False) -> None:
    """Put `text` (str: UTF-8; or bytes) at `path` whole or not at all, with permission bits exactly `mode`.

    The temp file gets an unpredictable name in the target's directory (`.NAME.<random>.tmp`, never
    ending in the target's suffix, so a reader globbing `*.prom` never sees it) and is created with
    O_CREAT|O_EXCL|O_NOFOLLOW (`tempfile.mkstemp`): nothing planted in the directory, a symlink
    included, is followed or reused.  Then: fchmod to `mode` (the umask does not narrow it, nothing
    widens it: files holding credentials stay 0600), write, fsync, rename over `path` (a symlink at
    `path` is replaced, not followed), fsync the directory.  `parents`: create missing directories.

    Any failure is one InputError, "cannot write PATH: ...", and no temp file is left."""
    path = Path(path)
    try:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}") from None
    write_stream(path, [data], mode)


def write_stream(path: Path, chunks: Iterable[bytes], mode: int = 0o644,
                 check: Callable[[str, int], None] | None = None) -> tuple[str, int]:
    """`write_atomic` for a stream: the chunks hashed (sha256) while written to the same kind of temp file;
    `check(hexdigest, size)` may raise to refuse the content before the rename.  Returns (hexdigest, size).
    An OSError is one InputError, "cannot write PATH: ..."; any failure leaves no temp file."""
    path = Path(path)
    h = hashlib.sha256()
    n = 0
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            for data in chunks:
                h.update(data)
                n += len(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(h.hexdigest(), n)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return h.hexdigest(), n


def _fsync_dir(directory: Path) -> None:
    """The rename on disk too.  A file system that cannot fsync a directory (EINVAL) is not an error."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def read_capped(path: Path | str, limit: int, what: str, error: type[InputError] = InputError) -> bytes:
    """A file we did not write (a list, a config), reading no more than `limit` + 1 bytes of it (the caller
    refuses more than `limit`); a missing file, a directory or a read error is one `error` naming it."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{what} {path}: is a directory") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
