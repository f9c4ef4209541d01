"""Tar plumbing for archives: parts of a split file, safe member names, a header scan that extracts
nothing, and a writer that copies files into a tar (or its parts) through the kernel.

Read: a tar (or numbered parts `FILE.part001`, `FILE.part002`, ... of one) is one byte range read with
pread(); member names are validated (absolute paths and `..` are refused).
Write: PAX headers, mode 0644, mtime 0, uid/gid 0 (the same content gives the same bytes), every file
under a temporary name, fsynced and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from rke2_mirror.model.errors import ArchiveError, InputError, WorkDirError

CHUNK = 1024 * 1024
MIN_SPLIT = 4096
_PART_RE = re.compile(r"^(?P<base>.+)\.part(?P<n>\d{3,})$")
COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
               (b"BZh", "bzip2", "bunzip2"), (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x04\x22\x4d\x18", "lz4", "lz4 -d"))


# --------------------------------------------------------------------------- sizes, parts


def parse_size(text: str) -> int:
    """`4G`, `700M`, `1.5G`, `4GB`, `4000MB`, `4GiB`, `123` (bytes).

    As split(1): K, M, G, T (and KiB, MiB, …) are powers of 1024; KB, MB, GB, TB powers of 1000.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(IB|B)?|B)?\s*", (text or "").upper())
    if not m:
        raise InputError(f"--split {text!r}: expected a size such as 4G, 700M, 4000MB or 1048576")
    number, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1000 if suffix == "B" else 1024
    size = int(number * base ** (" KMGT".index(unit) if unit else 0))
    if size < MIN_SPLIT:
        raise InputError(f"--split {text!r}: parts must be at least {MIN_SPLIT} bytes")
    return size


def part_name(output: Path, n: int) -> Path:
    return output.with_name(f"{output.name}.part{n:03d}")


def resolve_parts(path: Path) -> list[Path]:
    """The file(s) of an archive: FILE, or FILE.part001… (given FILE or any of its parts)."""
    path = Path(path)
    m = _PART_RE.match(path.name)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an archive file")
    if path.is_file() and not m:
        return [path]
    base = path.with_name(m.group("base")) if m else path
    if not m and not part_name(base, 1).is_file():
        raise InputError(f"{path}: no such file (nor {part_name(base, 1).name})")
    parts: list[Path] = []
    n = 1
    while part_name(base, n).is_file():
        parts.append(part_name(base, n))
        n += 1
    if not parts:
        raise InputError(f"{path}: {part_name(base, 1).name} is missing (parts are read from part001 on)")
    others = sorted(int(mm.group("n")) for p in base.parent.glob(base.name + ".part*")
                    if (mm := _PART_RE.match(p.name)) and mm.group("base") == base.name)
    if others and others[-1] > len(parts):
        raise InputError(f"{base}: part {len(parts) + 1:03d} is missing (found parts up to {others[-1]:03d})")
    return parts


def looks_like_archive(path: Path) -> bool:
    """A tar (ustar magic at 257) or the first of split parts: for `--since`, archive vs. image list."""
    path = Path(path)
    if not path.is_file():
        return bool(_PART_RE.match(path.name)) or part_name(path, 1).is_file()
    if _PART_RE.match(path.name):
        return True
    return is_plain_tar(path)


def is_plain_tar(path: Path) -> bool:
    """Does the file start with a tar header (ustar magic at 257)?  Compressed tars do not."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return len(head) == 512 and head[257:262] == b"ustar"


def tar_entries(tf: tarfile.TarFile, label: str) -> Iterator[tarfile.TarInfo]:
    """A tar's headers one by one (nothing extracted, nothing kept in tf.members); a broken header
    is one clear error."""
    while True:
        try:
            ti = tf.next()
        except (tarfile.TarError, ValueError) as exc:
            raise ArchiveError(f"{label}: truncated or corrupt tar ({exc})") from None
        if ti is None:
            return
        tf.members = []
        yield ti


# --------------------------------------------------------------------------- member names


def safe_member_name(name: str) -> str:
    """A member name normalized (`./` and empty parts dropped); absolute paths and `..` refused."""
    if "\x00" in name:
        raise ArchiveError(f"member name {name!r} contains a NUL byte")
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise ArchiveError(f"member {name!r} has an absolute path: refusing the archive")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r} points outside the archive ('..'): refusing the archive")
    return "/".join(parts)


# --------------------------------------------------------------------------- reading


class _PReadFile:
    """A read-only, seekable file object over the archive's pread(): what tarfile scans."""

    def __init__(self, reader):  # anything with .pread(offset, n), .size and .label
        self._r = reader
        self._pos = 0
        self.name = reader.label

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._r.size - self._pos
        data = self._r.pread(self._pos, n)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._r.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


# --------------------------------------------------------------------------- writing


class _PartWriter:
    """A write-only file object over FILE.partial, or FILE.partNNN.partial parts of at most
    `split` bytes; `commit()` fsyncs and renames them into place, `abort()` removes them."""

    def __init__(self, output: Path, split: int | None):
        self.output = output
        self.split = split
        self.finals: list[Path] = []
        self.temps: list[Path] = []
        self._f = None
        self._in_part = 0
        self._pos = 0
        # the ways to copy file -> file this platform has (macOS: no copy_file_range, and its
        # sendfile wants a socket: ENOTSOCK, caught below), the portable one last
        self._copy_modes = tuple(m for m in ("copy_file_range", "sendfile") if hasattr(os, m)) + ("pread",)
        if split is None:
            self._open(output)

    def _open(self, final: Path) -> None:
        tmp = final.with_name(final.name + ".partial")
        self.finals.append(final)
        self.temps.append(tmp)
        # A stale FILE.partial (a killed run's, or a link someone planted) is removed, never written through:
        # the new one is created exclusively and without following a link.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._f = open(fd, "wb", buffering=0)  # unbuffered: copy_from() writes to the fd directly
        self._in_part = 0

    def _next_part(self) -> None:
        if self._f is not None:
            self._close_current()
        self._open(part_name(self.output, len(self.finals) + 1))

    def _close_current(self) -> None:
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def _room(self, want: int) -> int:
        """Bytes that go into the current part (opening the next one when this one is full)."""
        if self._f is None or (self.split is not None and self._in_part >= self.split):
            self._next_part()
        return want if self.split is None else min(want, self.split - self._in_part)

    def _advance(self, n: int) -> None:
        self._in_part += n
        self._pos += n

    def write(self, data) -> int:
        view = memoryview(data)
        total = len(view)
        while view:
            room = self._room(len(view))
            n = self._f.write(view[:room])
            self._advance(n)
            view = view[n:]
        return total

    def copy_from(self, src_fd: int, size: int) -> None:
        """Append the first `size` bytes of the open file `src_fd`, copied by the kernel
        (copy_file_range, else sendfile, else read/write) without passing through Python."""
        off = 0
        while off < size:
            room = self._room(size - off)
            n = self._copy(src_fd, off, room)
            if n == 0:
                raise WorkDirError(f"a work-dir file ended after {off} of {size} bytes; run again")
            self._advance(n)
            off += n

    def _copy(self, src_fd: int, off: int, count: int) -> int:
        dst = self._f.fileno()
        count = min(count, 1 << 30)
        while True:
            mode = self._copy_modes[0]
            try:
                if mode == "copy_file_range":
                    return os.copy_file_range(src_fd, dst, count, off)
                if mode == "sendfile":
                    return os.sendfile(dst, src_fd, off, count)
                data = os.pread(src_fd, min(count, CHUNK), off)
                return self._f.write(data) if data else 0
            except OSError as exc:
                if mode == "pread" or exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._copy_modes = self._copy_modes[1:]  # not on this file system / kernel: the next way

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def commit(self) -> list[Path]:
        if self._f is None and not self.finals:
            self._next_part()
        if self._f is not None:
            self._close_current()
        if self.split is not None:  # parts of an earlier, longer run would be read as ours
            n = len(self.finals) + 1
            while part_name(self.output, n).exists():
                part_name(self.output, n).unlink()
                n += 1
        for tmp, final in reversed(list(zip(self.temps, self.finals))):  # part001 last
            os.replace(tmp, final)
        _fsync_dir(self.output.parent)
        for stale in self.output.parent.glob(self.output.name + ".part*.partial"):  # left by a killed run
            stale.unlink(missing_ok=True)
        return list(self.finals)

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        for tmp in self.temps:
            try:
                tmp.unlink()
            except OSError:
                pass


# A compressed tar is written with the codec its file name says (what RKE2 goes by: rancher/wharfie
# pkg/tarfile GetOpener and k3s's image import pick the decoder from the extension, case-insensitively).
OUTPUT_COMPRESSION = {".tar": None, ".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tzst": "zstd"}
# zstd as a node decodes it: wharfie's reader runs klauspost/compress with WithDecoderMaxMemory(1 << 25)
# (pkg/tarfile/tarfile.go `MaxDecoderMemory`), which caps the window at 32 MiB (zstd/framedec.go
# setOptions): a frame with a larger window fails there (ErrWindowSizeExceeded).  So window_log is set
# explicitly (never left to a level that may raise it), and the size is never given to the encoder (a
# single-segment frame, with no window descriptor, is refused when larger than the cap too).
ZSTD_WINDOW_LOG = 25
ZSTD_LEVEL = 3


def output_compression(path: Path) -> str | None:
    """The codec for a file named `path` (None: a plain tar); an unknown suffix is an InputError."""
    name = Path(path).name.lower()
    for suffix in sorted(OUTPUT_COMPRESSION, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return OUTPUT_COMPRESSION[suffix]
    raise InputError(f"{Path(path).name}: the name must end in {', '.join(OUTPUT_COMPRESSION)} "
                     "(it says how the file is compressed; a node reads it by its name)")


def _encoder(kind: str):
    """An object with compress(bytes) -> bytes and flush() -> bytes: deterministic for the same input."""
    if kind == "gzip":
        from rke2_mirror.endpoints.compression import ParallelGzip
        return ParallelGzip()  # pigz-style, every core, one gzip member (Go's gzip reads it)
    if kind == "zstd":
        import zstandard
        params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG,
                                                                write_checksum=True)
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    raise ValueError(f"unknown compression {kind!r}")


class _CompressingWriter:
    """The `_PartWriter` interface (write, copy_from, tell, commit, abort, temps) over a compressor:
    the tar's bytes go through `kind`'s encoder into FILE.partial, renamed into place by `commit()`.
    Memory stays flat (the encoders stream); `tell()` is the position in the tar, not in the file."""

    def __init__(self, output: Path, kind: str):
        self._out = _PartWriter(output, None)
        self._enc = _encoder(kind)
        self._pos = 0

    @property
    def temps(self) -> list[Path]:
        return self._out.temps

    def write(self, data) -> int:
        n = len(data)
        out = self._enc.compress(bytes(data))
        if out:
            self._out.write(out)
        self._pos += n
        return n

    def copy_from(self, src_fd: int, size: int) -> None:
        off = 0
        while off < size:
            data = os.pread(src_fd, min(CHUNK, size - off), off)
            if not data:
                raise WorkDirError(f"a work-dir file ended after {off} of {size} bytes; run again")
            self.write(data)
            off += len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def commit(self) -> list[Path]:
        self._out.write(self._enc.flush())
        return self._out.commit()

    def abort(self) -> None:
        self._out.abort()


def open_tar_writer(output: Path, split: int | None = None, compression: str | None = None):
    """Where a tar is written: FILE (or its parts) as it is, or through `compression` (gzip, zstd)."""
    if compression is None:
        return _PartWriter(output, split)
    if split is not None:
        raise InputError("a compressed file cannot be split")
    return _CompressingWriter(output, compression)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# "this way of copying does not work here" (not "the disk is full"): try the next way
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EPERM,
                   errno.EBADF, errno.ENOTSOCK}


def _file_digest(fd: int, size: int) -> str:
    h = hashlib.sha256()
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK, size - off), off)
        if not data:
            break
        h.update(data)
        off += len(data)
    return "sha256:" + h.hexdigest()


def _tar_header(writer: _PartWriter, ti: tarfile.TarInfo) -> None:
    writer.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def _tar_pad(writer: _PartWriter, size: int) -> None:
    if size % tarfile.BLOCKSIZE:
        writer.write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))


def _tar_end(writer: _PartWriter) -> None:
    """Two zero blocks, then zeros up to a whole record (as tar and Python's tarfile end a file)."""
    writer.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
    if writer.tell() % tarfile.RECORDSIZE:
        writer.write(tarfile.NUL * (tarfile.RECORDSIZE - writer.tell() % tarfile.RECORDSIZE))


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = 0 if directory else size
    ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    ti.mode = 0o755 if directory else 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti
