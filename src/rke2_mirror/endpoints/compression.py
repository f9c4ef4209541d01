"""Compressed tar streams as RKE2 and docker write them: detection from content (not the file name),
gzip, zstd, bzip2 and lz4 decoders that refuse truncated or corrupt streams, and a deterministic
parallel gzip (the same input always gives the same bytes, so a rerun pushes the same digests).

Every decoder has one shape (`_Decoder`): `Codec(raw, what, err)` over a file object `raw`; `read(n)`
returns at most n decompressed bytes (memory stays flat whatever the ratio), and b"" only at a complete
end.  A stream that ends early, fails its own checks (CRC, checksum) or has anything but more of itself
after its end raises `err`: StreamError (the whole file is refused) or LayerStreamError (a compressed
member: the images using it fail).  `DECODERS` maps each kind `kind_of` tells to its decoder."""

from __future__ import annotations

import bz2
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
BZIP2_MAGIC = b"BZh"  # then the block size ('1'..'9') and the magic of a block or of the end of the stream
BZIP2_BLOCKS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")  # pi, sqrt(pi)
LZ4_MAGIC = b"\x04\x22\x4d\x18"  # an LZ4 frame (the lz4 tool's format; not the legacy 02 21 4C 18)
HEAD = 10  # the bytes kind_of needs
GZIP_LEVEL = 3
CHUNK = 1024 * 1024


class StreamError(ArchiveError):
    """The file's compressed stream is truncated or corrupt: the whole file is refused (exit 2)."""


class LayerStreamError(MirrorError):
    """A compressed member (a layer) is truncated or corrupt: the images using it fail."""



# --------------------------------------------------------------------------- compression


def _is_bzip2(head: bytes) -> bool:
    """`BZh`, a block size digit, then a block's magic (or an empty stream's end): ten bytes, so a tar
    whose first member's name starts with "BZh" is not taken for bzip2."""
    return len(head) >= 10 and head.startswith(BZIP2_MAGIC) and 0x31 <= head[3] <= 0x39 and head[4:10] in BZIP2_BLOCKS


def _is_skippable(head: bytes) -> bool:
    """A skippable frame (zstd and lz4 share them: 0x184D2A50..5F)."""
    return head[:1] != b"" and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"


def kind_of(head: bytes) -> str:
    """`gzip`, `zstd`, `bzip2`, `lz4`, or `tar` (anything else: taken as uncompressed) from the first
    bytes of a stream (HEAD of them)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if _is_bzip2(head):
        return "bzip2"
    if head.startswith(LZ4_MAGIC):
        return "lz4"
    return "tar"


def sniff(path: Path) -> str | None:
    """`gzip`, `zstd`, `bzip2`, `lz4` or None (anything else) from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD)
    except OSError:
        return None
    kind = kind_of(head)
    return None if kind == "tar" else kind


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
            elif _is_skippable(b):
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


class _Decoder:
    """The shape of every decoder (see the module's doc)."""

    name = ""  # the kind: gzip, zstd, bzip2, lz4
    padded = False  # gzip: zero padding after the last member (a layer with some is not pushed as it is)

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        self._raw = raw
        self.what = what
        self.err = err

    def read(self, n: int = -1) -> bytes:
        raise NotImplementedError


class _Inflate:
    """zlib's gzip decoder with the interface of bz2.BZ2Decompressor (what `_Units` drives)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(31)

    @property
    def needs_input(self) -> bool:
        return not self._z.unconsumed_tail

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def unused_data(self) -> bytes:
        return self._z.unused_data

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._z.decompress(data or self._z.unconsumed_tail, max_length)


class _Units(_Decoder):
    """A stream of units one after the other (gzip members, bzip2 streams, lz4 frames), each decoded by
    a fresh `_unit()`: an object as bz2.BZ2Decompressor (decompress(data, max_length), needs_input,
    eof, unused_data).  The stream must end right after a unit: ending inside one is truncation, and
    anything but the start of another unit after one is corruption (as for zstd, here); gzip alone
    ignores zero padding after a member, as gzip(1) does (bzip2(1) only warns about trailing garbage:
    refused here all the same)."""

    unit = ""  # "a gzip member": for messages
    head = 4  # the bytes `_starts` needs
    pads = False  # zero padding between or after units is ignored
    errors: tuple[type[BaseException], ...] = ()  # what `_unit().decompress` raises on corrupt data

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        super().__init__(raw, what, err)
        self._d = None
        self._tail = b""
        self._started = False
        self.padded = False

    def _starts(self, head: bytes) -> bool:
        raise NotImplementedError

    def _unit(self):
        raise NotImplementedError

    def _input(self) -> bytes:
        if self._tail:
            t, self._tail = self._tail, b""
            return t
        return self._raw.read(CHUNK)

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        if n == 0:
            return b""
        while True:
            if self._d is None:  # between units
                data = self._input()
                if not data:
                    if not self._started:
                        raise self.err(f"{self.what}: empty {self.name} stream")
                    return b""
                stripped = data.lstrip(b"\x00") if self._started and self.pads else data
                if not stripped:
                    self.padded = True
                    continue
                if len(stripped) < self.head:
                    more = self._raw.read(CHUNK)
                    if more:
                        self._tail = stripped + more
                        continue
                if not self._starts(stripped):
                    why = (f"unexpected data after {self.unit}" if self._started
                           else f"it does not start with {self.unit}")
                    raise self.err(f"{self.what}: corrupt {self.name} stream ({why})")
                if len(stripped) != len(data):
                    self.padded = True
                self._d = self._unit()
                self._started = True
                self._tail = stripped
                continue
            data = b""
            if self._d.needs_input:
                data = self._input()
                if not data:
                    raise self.err(f"{self.what}: truncated {self.name} stream (it ends inside {self.unit})")
            try:
                out = self._d.decompress(data, n)
            except self.errors as exc:
                raise self.err(f"{self.what}: corrupt {self.name} stream ({exc})") from None
            if self._d.eof:
                self._tail = self._d.unused_data or b""
                self._d = None
            if out:
                return out


class GzipStream(_Units):
    """gzip: several members allowed, zero padding after the last ignored (`padded` tells)."""

    name, unit, head, pads = "gzip", "a gzip member", 2, True
    errors = (zlib.error,)

    def _starts(self, head: bytes) -> bool:
        return head.startswith(GZIP_MAGIC)

    def _unit(self) -> _Inflate:
        return _Inflate()


class Bzip2Stream(_Units):
    """bzip2: several streams allowed (pbzip2 writes one per block, `cat a.bz2 b.bz2` two), each
    checked by libbz2 (block and stream CRCs)."""

    name, unit, head = "bzip2", "a bzip2 stream", 10
    errors = (OSError, EOFError)  # libbz2: "Invalid data stream"

    def _starts(self, head: bytes) -> bool:
        return _is_bzip2(head)

    def _unit(self) -> bz2.BZ2Decompressor:
        return bz2.BZ2Decompressor()


class Lz4Stream(_Units):
    """lz4 frames as the lz4 tool writes them: several allowed, skippable frames skipped; each frame
    checked against its content checksum when it has one (the lz4 tool's default)."""

    name, unit, head = "lz4", "an lz4 frame", 4
    errors = (RuntimeError,)  # python-lz4: "LZ4F_decompress failed with code: ERROR_..."

    def _starts(self, head: bytes) -> bool:
        return head.startswith(LZ4_MAGIC) or _is_skippable(head)

    def _unit(self):
        try:
            import lz4.frame
        except ImportError:
            raise self.err(f"{self.what}: lz4-compressed, but the Python package lz4 is not installed "
                           "(pip install lz4)") from None
        return lz4.frame.LZ4FrameDecompressor()


class ZstdStream(_Decoder):
    """zstd: several frames allowed, skippable frames too; truncation (which libzstd's streaming reader
    does not report) is told by walking the frame structure as the bytes go by (_ZstdFrames)."""

    name = "zstd"

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        import zstandard

        super().__init__(raw, what, err)
        self._frames = _ZstdFrames(what, err)
        self._raw = Tee(raw, self._frames.feed)
        self._error = zstandard.ZstdError
        self._r = zstandard.ZstdDecompressor().stream_reader(self._raw, read_size=CHUNK, read_across_frames=True,
                                                            closefd=False)

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        if n == 0:
            return b""
        try:
            out = self._r.read(n)
        except self._error as exc:
            msg = str(exc)
            hint = " (made with zstd --long? decompress it first: zstd -d --long=31)" if "window" in msg.lower() else ""
            raise self.err(f"{self.what}: corrupt zstd stream ({msg}){hint}") from None
        if not out:
            while self._raw.read(CHUNK):  # whatever the reader left: it must be frames too
                pass
            self._frames.finish()
        return out


DECODERS: dict[str, type[_Decoder]] = {"gzip": GzipStream, "zstd": ZstdStream, "bzip2": Bzip2Stream, "lz4": Lz4Stream}


def decoder(kind: str, raw, what: str, err: type[MirrorError] = StreamError) -> _Decoder:
    """The decompressed view of `raw`, a `kind` stream (a kind `kind_of` tells, not `tar`)."""
    return DECODERS[kind](raw, what, err)


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
