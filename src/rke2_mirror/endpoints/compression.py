"""Compressed tar streams as RKE2 and docker write them: detection from content (not the file name),
gzip and zstd decoders that refuse truncated or corrupt streams, and a deterministic parallel gzip
(the same input always gives the same bytes, so a rerun pushes the same digests)."""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rke2_mirror.model.errors import ArchiveError, MirrorError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_LEVEL = 3
CHUNK = 1024 * 1024


class StreamError(ArchiveError):
    """The file's compressed stream is truncated or corrupt: the whole file is refused (exit 2)."""


class LayerStreamError(MirrorError):
    """A compressed member (a layer) is truncated or corrupt: the images using it fail."""



# --------------------------------------------------------------------------- compression


def sniff(path: Path) -> str | None:
    """`gzip`, `zstd` or None (anything else) from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class _ZstdFrames:
    """Walks the frame structure of a zstd stream (RFC 8878) as its bytes go by, to tell a complete
    stream from a truncated one: libzstd's streaming reader just stops at the end of its input."""

    def __init__(self, what: str, err: type[MirrorError] = StreamError):
        self.what = what
        self.err = err
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._state = "magic"
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                if not self._skip:
                    self._after_skip()
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += mv[i:i + k]
            i += k
            if len(self._buf) == self._need:
                b = bytes(self._buf)
                self._buf.clear()
                self._step(b)

    def _after_skip(self) -> None:
        if self._state == "block-last":
            self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
            if not self._checksum:
                self.frames += 1
        elif self._state == "block":
            self._need = 3
        elif self._state == "skippable":
            self._state, self._need = "magic", 4

    def _step(self, b: bytes) -> None:
        st = self._state
        if st == "magic":
            if b == ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif b[0] & 0xF0 == 0x50 and b[1:] == b"\x2a\x4d\x18":
                self._state, self._need = "skipsize", 4
            else:
                raise self.err(f"{self.what}: corrupt zstd stream (no frame where one should start)")
        elif st == "skipsize":
            self._state, self._skip = "skippable", int.from_bytes(b, "little")
            if not self._skip:
                self._after_skip()
        elif st == "fhd":
            fhd = b[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            if rest:
                self._state, self._need = "header", rest
            else:
                self._state, self._need = "block", 3
        elif st == "header":
            self._state, self._need = "block", 3
        elif st == "block":
            v = int.from_bytes(b, "little")
            last, btype, size = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3:
                raise self.err(f"{self.what}: corrupt zstd stream (reserved block type)")
            self._skip = 1 if btype == 1 else size
            self._state = "block-last" if last else "block"
            if not self._skip:
                self._after_skip()
        elif st == "checksum":
            self._state, self._need = "magic", 4
            self.frames += 1

    def finish(self) -> None:
        if self._state != "magic" or self._buf or self._skip or not self.frames:
            raise self.err(f"{self.what}: truncated zstd stream (it ends inside a frame)")


class Tee:
    """A file object over `f` that passes every byte it reads to `sink`."""

    def __init__(self, f, sink: Callable[[bytes], None]):
        self._f = f
        self._sink = sink

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._sink(data)
        return data

    def readable(self) -> bool:
        return True


class GzipStream:
    """Decompressed view of a gzip stream (several members allowed, zero padding after the last
    ignored): `read(n)` returns at most n bytes, so memory stays flat whatever the ratio.  A stream
    that ends early or does not check out raises StreamError."""

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        self._raw = raw
        self.what = what
        self._err = err
        self._d = None
        self._tail = b""
        self._started = False
        self.padded = False

    def _input(self) -> bytes:
        if self._tail:
            t, self._tail = self._tail, b""
            return t
        return self._raw.read(CHUNK)

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        while True:
            if self._d is None:  # at a member boundary
                data = self._input()
                if not data:
                    if not self._started:
                        raise self._err(f"{self.what}: empty gzip stream")
                    return b""
                stripped = data.lstrip(b"\x00") if self._started else data
                if not stripped:
                    self.padded = True
                    continue
                if len(stripped) < 2:
                    more = self._raw.read(CHUNK)
                    if more:
                        self._tail = stripped + more
                        continue
                if not stripped.startswith(GZIP_MAGIC):
                    raise self._err(f"{self.what}: corrupt gzip stream (unexpected data after a gzip member)")
                if len(stripped) != len(data):
                    self.padded = True
                self._d = zlib.decompressobj(31)
                self._started = True
                self._tail = stripped
                continue
            data = self._d.unconsumed_tail or self._input()
            if not data:
                raise self._err(f"{self.what}: truncated gzip stream (it ends before its end marker)")
            try:
                out = self._d.decompress(data, n)
            except zlib.error as exc:
                raise self._err(f"{self.what}: corrupt gzip stream ({exc})") from None
            if self._d.eof:
                self._tail = self._d.unused_data
                self._d = None
            if out:
                return out


class ZstdStream:
    """Decompressed view of a zstd stream (several frames allowed); truncation raises StreamError."""

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        import zstandard

        self.what = what
        self._frames = _ZstdFrames(what, err)
        self._raw = Tee(raw, self._frames.feed)
        self._error = zstandard.ZstdError
        self._r = zstandard.ZstdDecompressor().stream_reader(self._raw, read_size=CHUNK, read_across_frames=True,
                                                            closefd=False)
        self.padded = False

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        try:
            out = self._r.read(n)
        except self._error as exc:
            msg = str(exc)
            hint = " (made with zstd --long? decompress it first: zstd -d --long=31)" if "window" in msg.lower() else ""
            raise self._frames.err(f"{self.what}: corrupt zstd stream ({msg}){hint}") from None
        if not out:
            while self._raw.read(CHUNK):  # whatever the reader left: it must be frames too
                pass
            self._frames.finish()
        return out


def decoder(kind: str, raw, what: str, err: type[MirrorError] = StreamError):
    return GzipStream(raw, what, err) if kind == "gzip" else ZstdStream(raw, what, err)


def kind_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


class RangeFile:
    """read() over bytes [offset, offset+size) of a file descriptor, with pread (thread-safe)."""

    def __init__(self, fd: int, offset: int, size: int):
        self._fd, self._off, self._end = fd, offset, offset + size

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._off
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._off)
        self._off += len(data)
        return data

    def readable(self) -> bool:
        return True


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown
GZIP_BLOCK = 1024 * 1024
_WINDOW = 32 * 1024
_pool_lock = threading.Lock()
_gzip_pool: ThreadPoolExecutor | None = None


def _deflate(block: bytes, zdict: bytes, last: bool) -> bytes:
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=zdict) if zdict else \
        zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """Deterministic gzip on every core, as pigz does it: the input is cut into 1 MiB blocks, each
    deflated on its own (level 3, the 32 KiB before it as its dictionary) in a thread pool, and the
    pieces are joined, in order, into one gzip member (mtime 0, no name).  The same input gives the
    same bytes whatever the number of threads or how the input arrives.  At most a few blocks per
    stream are in flight: memory stays flat."""

    def __init__(self) -> None:
        global _gzip_pool
        with _pool_lock:
            if _gzip_pool is None:
                _gzip_pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="gzip")
        self._pool = _gzip_pool
        self._ahead = max(2, (os.cpu_count() or 1) + 1)
        self._buf = bytearray()
        self._prev = b""
        self._pending: list = []
        self._crc = 0
        self._size = 0
        self._started = False

    def _submit(self, block: bytes, last: bool) -> None:
        self._pending.append(self._pool.submit(_deflate, block, self._prev, last))
        self._prev = block[-_WINDOW:]

    def _collect(self, wait: bool) -> bytes:
        out = [] if self._started else [_GZIP_HEADER]
        self._started = True
        while self._pending and (wait or self._pending[0].done() or len(self._pending) > self._ahead):
            out.append(self._pending.pop(0).result())
        return b"".join(out)

    def compress(self, data: bytes) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buf += data
        while len(self._buf) >= GZIP_BLOCK:
            self._submit(bytes(self._buf[:GZIP_BLOCK]), False)
            del self._buf[:GZIP_BLOCK]
        return self._collect(False)

    def flush(self) -> bytes:
        self._submit(bytes(self._buf), True)
        self._buf.clear()
        return self._collect(True) + (self._crc & 0xFFFFFFFF).to_bytes(4, "little") + \
            (self._size & 0xFFFFFFFF).to_bytes(4, "little")


def gzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The gzip blob pushed for uncompressed content (see ParallelGzip)."""
    gz = ParallelGzip()
    for chunk in chunks:
        out = gz.compress(chunk)
        if out:
            yield out
    yield gz.flush()


def read_chunks(f) -> Iterator[bytes]:
    while True:
        data = f.read(CHUNK)
        if not data:
            return
        yield data


class Sink:
    """Hashes (and optionally writes to a file) what goes through it: a blob as it will be pushed."""

    def __init__(self, out: Callable[[bytes], object] | None = None):
        self.hash = hashlib.sha256()
        self.size = 0
        self._out = out

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()
