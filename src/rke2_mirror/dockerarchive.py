"""`load` and `inspect` for the tarballs people already have: docker archives (`docker save`,
`rancher-save-images.sh`, RKE2's `rke2-images*.linux-<arch>.tar.zst` / `.tar.gz` release assets,
skopeo `docker-archive:`), plain, gzip- or zstd-compressed (detected from the content).

A docker archive holds `manifest.json` (`[{"Config", "RepoTags", "Layers"}]`), each image's config
and its layers as tars, but not the registry's manifests: `load` rebuilds a Docker schema2 manifest
per image (config as stored, so the image ID is kept; layers as stored when gzip-compressed, else
gzip-compressed once, deterministically: see ParallelGzip), so the pushed digest is new; the report
says so.  Every layer's uncompressed content is checked against the config's `rootfs.diff_ids`;
an image with a missing member or a mismatching layer fails (nothing of it is tagged), the others load.

How the file is read (memory stays flat; nothing is extracted):
- plain `.tar`: the tar headers are scanned once for member offsets, members are read in place with
  pread().  The gzip digest of an uncompressed layer is computed in a first read (hash only), and the
  layer is compressed again, identically, while it is uploaded: no temporary space, twice the gzip CPU.
- `.tar.gz` / `.tar.zst` (a stream cannot be seeked): pass 1 decompresses and reads the tar once,
  keeping only the small JSON members (manifest.json, configs) and hashing every member (diff_ids
  checked here, before anything is written or pushed); pass 2 decompresses again and spools the layers
  the selected images need, as they will be pushed (gzip), into a private directory under `--tmp-dir`
  (default `$TMPDIR`, else /var/tmp), removed at the end.  Temporary space: about the size of the
  layers gzip-compressed (roughly a `.tar.gz` of the same images; 1-1.5x a `.tar.zst`).
- A name whose tag at the target already holds the same image (same config, i.e. image ID), as a
  manifest or inside a multi-platform index, is skipped before anything is compressed: a rerun costs
  pass 1 only, and an index put there by `mirror` is not replaced by one platform's manifest.

OCI layouts (`index.json`; newer `docker save` writes one beside manifest.json) are read by
`archive.ArchiveReader` when the tar is plain: digests preserved.  A compressed tar with only an OCI
layout is refused with a hint to decompress it.  `open_archive` decides; `load` and `inspect` take
either kind of reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import archive, jobs
from .archive import ArchiveReader, human, resolve_parts, safe_member_name
from .layout import parse_name_option
from .copy import CopyOptions, CopyTask, ImageResult, Progress, Report
from .errors import ArchiveError, InputError, MirrorError, NotFound
from .layout import is_digest, ref_key
from .oci import DOCKER_MANIFEST, Descriptor, DigestingReader, Platform, parse_manifest
from .reference import ImageRef, RegistryURL, target_ref
from .routing import TargetLocator

Log = Callable[[str], None]

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
NOTE = "new digest (rebuilt from a docker archive)"
NOTE_PRESENT = "already at the target with this image ID (rebuilt from a docker archive)"
FORMAT = "docker archive (docker save)"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_LEVEL = 3
CHUNK = 1024 * 1024
MAX_JSON_MEMBER = 16 * 1024 * 1024  # manifest.json, configs: kept in memory
MAX_JSON_TOTAL = 256 * 1024 * 1024
DEFAULT_TMP = "/var/tmp"

_HEX64 = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")
_ARCH_IN_NAME = re.compile(r"(?:^|[.\-_])(amd64|arm64|s390x)(?:[.\-_]|$)")


class ImageProblem(MirrorError):
    """One image of a docker archive cannot be loaded (missing member, diff_id mismatch, bad config)."""


class StreamError(ArchiveError):
    """The file's compressed stream is truncated or corrupt: the whole file is refused (exit 2)."""


class LayerStreamError(MirrorError):
    """A compressed member (a layer) is truncated or corrupt: the images using it fail."""


class _SpoolWriteError(Exception):
    def __init__(self, exc: OSError):
        super().__init__(str(exc))
        self.exc = exc


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


class _Tee:
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


class _GzipStream:
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


class _ZstdStream:
    """Decompressed view of a zstd stream (several frames allowed); truncation raises StreamError."""

    def __init__(self, raw, what: str, err: type[MirrorError] = StreamError):
        import zstandard

        self.what = what
        self._frames = _ZstdFrames(what, err)
        self._raw = _Tee(raw, self._frames.feed)
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


def _decoder(kind: str, raw, what: str, err: type[MirrorError] = StreamError):
    return _GzipStream(raw, what, err) if kind == "gzip" else _ZstdStream(raw, what, err)


def _kind(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


class _RangeFile:
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


def _gzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The gzip blob pushed for uncompressed content (see ParallelGzip)."""
    gz = ParallelGzip()
    for chunk in chunks:
        out = gz.compress(chunk)
        if out:
            yield out
    yield gz.flush()


def _read_chunks(f) -> Iterator[bytes]:
    while True:
        data = f.read(CHUNK)
        if not data:
            return
        yield data


class _Sink:
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


@dataclass
class _Facts:
    digest: str  # sha256 of the member's bytes
    size: int
    diff_id: str  # sha256 of the uncompressed content
    usize: int
    padded: bool = False
    blob: Descriptor | None = None  # the blob as pushed, when computed


def _process(kind: str, f, what: str, *, raw_sink: Callable[[bytes], None] | None = None,
             blob: _Sink | None = None) -> _Facts:
    """Read one member once: its digest and its diff_id (sha256 of the content uncompressed); with
    `blob`, also the blob pushed for it (the content gzip-compressed, deterministically); with
    `raw_sink`, a copy of the member's own bytes (a gzip layer pushed as it is).  A corrupt
    compressed member raises LayerStreamError; the file's own stream errors pass through."""
    raw = _Sink(raw_sink)
    tee = _Tee(f, raw)
    src = tee if kind == "tar" else _decoder(kind, tee, what, LayerStreamError)
    diff = hashlib.sha256() if kind != "tar" else raw.hash  # uncompressed: the member is its content
    usize = 0
    gz = ParallelGzip() if blob is not None else None
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        if kind != "tar":
            diff.update(chunk)
        usize += len(chunk)
        if gz is not None:
            out = gz.compress(chunk)
            if out:
                blob(out)
    while tee.read(CHUNK):  # anything after a compressed member's end is part of its bytes
        pass
    if gz is not None:
        blob(gz.flush())
    facts = _Facts(raw.digest, raw.size, "sha256:" + diff.hexdigest(), usize, getattr(src, "padded", False))
    if blob is not None:
        facts.blob = Descriptor(DOCKER_LAYER_GZIP, blob.digest, blob.size)
    return facts


class _Prefixed:
    """A member's bytes: what was read already, then the rest (kept in `parts` when asked)."""

    def __init__(self, head: bytes, f, parts: list[bytes] | None):
        self._head, self._f, self._parts = head, f, parts

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = self._head, b""
            return out
        data = self._f.read(CHUNK if n is None or n < 0 else n)
        if self._parts is not None and data:
            self._parts.append(data)
        return data


# --------------------------------------------------------------------------- the archive model


@dataclass
class _Member:
    name: str
    size: int
    offset: int = -1  # plain tars: where its bytes start
    kind: str = ""  # gzip | zstd | tar (anything uncompressed); "" until looked at
    digest: str | None = None
    diff_id: str | None = None
    usize: int | None = None
    padded: bool = False
    error: str | None = None
    data: bytes | None = None  # small JSON members


@dataclass
class _Layer:
    member: _Member
    blob: Descriptor | None = None  # as pushed, once known
    spool: Path | None = None  # compressed archives: the spooled blob

    @property
    def in_place(self) -> bool:
        """Pushed as it is in the tar (a gzip member with nothing after its end)."""
        return self.member.kind == "gzip" and not self.member.padded


@dataclass
class DockerImage:
    """One manifest.json entry."""

    index: int
    refs: list[ImageRef]
    config_name: str
    layer_names: list[str]
    how: str = "RepoTags"
    config: bytes | None = None
    config_desc: Descriptor | None = None
    platform: Platform | None = None
    diff_ids: list[str] = field(default_factory=list)
    layers: list[_Layer] = field(default_factory=list)
    error: str | None = None
    skip: str | None = None  # not loaded: --platform
    manifest: bytes | None = None
    media_type: str = DOCKER_MANIFEST

    @property
    def image_id(self) -> str | None:
        return self.config_desc.digest if self.config_desc else None

    @property
    def size(self) -> int:
        return (self.config_desc.size if self.config_desc else 0) + sum(l.member.size for l in self.layers)


class DockerArchive(archive.ReadOnlyEndpoint):
    """A docker archive as a read-only `Endpoint` and `Locator` (like `ArchiveReader`).

    `open_archive` makes one; pass 1 runs in the constructor.  `prepare(...)` computes (and, for a
    compressed file, spools) the blobs as they will be pushed; only then can manifests be served.
    """

    delta = None  # what `load` in the CLI asks of any archive

    def __init__(self, path: str | os.PathLike, *, compression: str | None, name: str | None = None,
                 tmp_dir: str | os.PathLike | None = None, log: Log = lambda s: None):
        self.path = Path(path)
        self.paths = [self.path]
        self.label = str(self.path)
        self.compression = compression  # None: a plain tar
        self.log = log
        self.tmp_dir = Path(tmp_dir) if tmp_dir else None
        self._spool: Path | None = None
        self._fd: int | None = None
        self.members: dict[str, _Member] = {}
        self.links: dict[str, str] = {}
        self.ignored: list[str] = []
        self.has_index = False
        self.checked = False
        self.images: list[DockerImage] = []
        self._by_key: dict[str, DockerImage] = {}
        self._by_digest: dict[str, DockerImage] = {}
        self._layers: dict[str, _Layer] = {}  # member name -> layer
        self._blobs: dict[str, object] = {}  # digest -> _Layer | bytes (config)
        self._kept = 0
        try:
            self.size = os.path.getsize(self.path)
            if compression is None:
                self._fd = os.open(self.path, os.O_RDONLY)
                self._scan_plain()
            else:
                self._pass1()
                self.checked = True
            self._read_manifest(name)
            self._check_layers()
        except OSError as exc:
            self.close()
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    # -- life ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __enter__(self) -> "DockerArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def format(self) -> str:
        return FORMAT + (f", {self.compression}-compressed" if self.compression else "") + \
            "; DIGEST is the image ID: load pushes rebuilt manifests (new digests)"

    # -- reading: plain tar ----------------------------------------------------------------
    def _scan_plain(self) -> None:
        with open(self.path, "rb") as f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
            except (tarfile.TarError, ValueError) as exc:
                raise ArchiveError(f"{self.label} is not a tar archive ({exc})") from None
            for ti in archive.tar_entries(tf, self.label):
                if self._add(ti):
                    if ti.offset_data + ti.size > self.size:
                        raise ArchiveError(f"{self.label}: truncated: member {ti.name} ends past the end of the file")
                    m = self.members[safe_member_name(ti.name)]
                    m.offset = ti.offset_data
                    if m.size <= MAX_JSON_MEMBER:
                        head = os.pread(self._fd, 1, m.offset).lstrip()
                        if head in (b"{", b"["):
                            self._keep(m, os.pread(self._fd, m.size, m.offset))
            end = tf.offset
        tail = os.pread(self._fd, 512, end)
        if len(tail) < 512:
            raise ArchiveError(f"{self.label}: truncated: the tar ends without its end-of-archive marker")

    def _add(self, ti: tarfile.TarInfo) -> bool:
        """Record a member (or a link); True for a regular file whose data follows."""
        name = safe_member_name(ti.name)
        if ti.issym() or ti.islnk():
            target = ti.linkname
            if ti.issym():
                target = os.path.normpath(os.path.join(os.path.dirname(name), target)) if not target.startswith("/") else target
            try:
                self.links[name] = safe_member_name(target)
            except ArchiveError:
                self.ignored.append(name)  # a link out of the archive: never followed
            return False
        if not ti.isreg() or ti.issparse():
            if not ti.isdir():
                self.ignored.append(name)
            return False
        if name in ("index.json", "oci-layout"):
            self.has_index = True
        self.members[name] = _Member(name, ti.size)
        return True

    def _keep(self, m: _Member, data: bytes) -> None:
        self._kept += len(data)
        if self._kept > MAX_JSON_TOTAL:
            raise ArchiveError(f"{self.label}: more than {human(MAX_JSON_TOTAL)} of JSON members: not a docker archive")
        m.data = data

    # -- reading: compressed stream --------------------------------------------------------
    def _ticker(self, what: str) -> Callable[[bytes], None]:
        """Logs `what: 25% …` as a long pass goes (big files only)."""
        state = {"n": 0, "next": 1}

        def tick(data: bytes) -> None:
            state["n"] += len(data)
            if state["n"] * 4 >= state["next"] * self.size and state["next"] < 4:
                self.log(f"{what}: {state['next'] * 25}% ({human(state['n'])} of {human(self.size)}) read")
                state["next"] += 1
        return tick

    @contextmanager
    def _stream(self, what: str) -> Iterator[tarfile.TarFile]:
        with open(self.path, "rb") as f:
            raw = _Tee(f, self._ticker(what)) if self.size >= 256 * 1024 * 1024 else f
            dec = _decoder(self.compression, raw, self.label)
            try:
                tf = tarfile.open(fileobj=dec, mode="r|", bufsize=CHUNK)
            except tarfile.TarError as exc:
                raise ArchiveError(f"{self.label} is {self.compression}-compressed, but not a tar inside ({exc})") from None
            yield tf
            while dec.read(CHUNK):  # the rest of the stream must check out too (truncation, CRC)
                pass

    def _members(self, tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, object]]:
        while True:
            try:
                ti = tf.next()
            except (tarfile.TarError, EOFError) as exc:
                raise ArchiveError(f"{self.label}: truncated or corrupt tar inside the "
                                   f"{self.compression} stream ({exc})") from None
            if ti is None:
                return
            yield ti, tf.extractfile(ti) if ti.isreg() else None

    def _pass1(self) -> None:
        t0 = time.monotonic()
        self.log(f"reading {self.label} ({self.compression}, {human(self.size)}): checking every member (pass 1)")
        with self._stream("pass 1") as tf:
            for ti, f in self._members(tf):
                tf.members = []  # stream mode: forget headers as we go
                if not self._add(ti):
                    continue
                m = self.members[safe_member_name(ti.name)]
                try:
                    self._read_stream_member(m, f)
                except (tarfile.TarError, EOFError) as exc:
                    raise ArchiveError(f"{self.label}: truncated tar inside the {self.compression} stream "
                                       f"(in {m.name}: {exc})") from None
        self.log(f"pass 1 done in {time.monotonic() - t0:.1f}s: {len(self.members)} members")

    def _read_stream_member(self, m: _Member, f) -> None:
        head = f.read(min(CHUNK, m.size)) if m.size else b""
        m.kind = _kind(head)
        parts = [head] if m.size <= MAX_JSON_MEMBER and head.lstrip()[:1] in (b"{", b"[") else None
        try:
            facts = _process(m.kind, _Prefixed(head, f, parts), f"{m.name}")
        except LayerStreamError as exc:
            m.error = str(exc)
            while f.read(CHUNK):
                pass
            return
        if facts.size != m.size:
            raise ArchiveError(f"{self.label}: truncated tar inside the {self.compression} stream (in {m.name})")
        m.digest, m.diff_id, m.usize, m.padded = facts.digest, facts.diff_id, facts.usize, facts.padded
        if parts is not None:
            self._keep(m, b"".join(parts))

    # -- manifest.json -----------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        seen = 0
        while name in self.links and name not in self.members:
            name = self.links[name]
            seen += 1
            if seen > 16:
                break
        return name

    def _json(self, name: str, what: str):
        m = self.members.get(self._resolve(name))
        if m is None:
            return None
        if m.data is None:
            if m.error:
                raise ImageProblem(f"{what} {name}: {m.error}")
            raise ImageProblem(f"{what} {name} is not a JSON document (or larger than {human(MAX_JSON_MEMBER)})")
        try:
            return json.loads(m.data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageProblem(f"{what} {name} is not valid JSON ({exc})") from None

    def _read_manifest(self, name: str | None) -> None:
        mm = self.members.get(self._resolve("manifest.json"))
        if mm is None:
            if self.has_index:
                tool = {"gzip": "gunzip", "zstd": "zstd -d"}.get(self.compression or "", "")
                raise ArchiveError(f"{self.label} is {self.compression}-compressed and holds an OCI image layout "
                                   f"(index.json), not a docker archive: decompress it first ({tool}), then give the .tar")
            raise ArchiveError(f"{self.label}: no manifest.json nor index.json: not a docker archive or an OCI layout "
                               "(docker save from before Docker 1.10 is not supported)")
        try:
            doc = json.loads(mm.data or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"{self.label}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(doc, list):
            raise ArchiveError(f"{self.label}: manifest.json is not a list of images")
        base = parse_name_option(name)
        unnamed = 0
        for i, e in enumerate(doc):
            where = f"{self.label}: manifest.json entry {i}"
            if not isinstance(e, dict) or not isinstance(e.get("Config"), str) or not isinstance(e.get("Layers"), list) \
                    or not all(isinstance(x, str) for x in e["Layers"]):
                raise ArchiveError(f"{where}: expected {{\"Config\": ..., \"RepoTags\": [...], \"Layers\": [...]}}")
            tags = e.get("RepoTags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ArchiveError(f"{where}: RepoTags is not a list of names")
            refs: list[ImageRef] = []
            how = "RepoTags"
            for t in tags:
                try:
                    refs.append(ImageRef.parse(t))
                except InputError:
                    raise InputError(f"{where}: RepoTags {t!r} is not an image reference") from None
            if not refs:
                if base is None:
                    raise InputError(f"{where} (config {e['Config']}) has no RepoTags: give --name REPOSITORY[:TAG] "
                                     f"to name it, e.g. --name docker.io/rancher/x")
                unnamed += 1
                if unnamed > 1:
                    raise InputError(f"{self.label}: more than one image has no RepoTags; --name names only one")
                refs, how = [base], "--name"
            img = DockerImage(i, refs, safe_member_name(e["Config"]), [safe_member_name(x) for x in e["Layers"]], how)
            self.images.append(img)
            for r in refs:
                key = ref_key(r.name, r.tag or "latest")
                if key in self._by_key and self._by_key[key] is not img:
                    raise ArchiveError(f"{self.label}: manifest.json names {key} twice")
                self._by_key[key] = img
            self._read_image(img)

    def _read_image(self, img: DockerImage) -> None:
        try:
            cm = self.members.get(self._resolve(img.config_name))
            if cm is None:
                raise ImageProblem(f"config {img.config_name} named in manifest.json is missing from the archive")
            cfg = self._json(img.config_name, "config")
            if not isinstance(cfg, dict):
                raise ImageProblem(f"config {img.config_name} is not a JSON object")
            img.config = cm.data
            img.config_desc = Descriptor(DOCKER_CONFIG, "sha256:" + hashlib.sha256(cm.data).hexdigest(), len(cm.data))
            hx = _HEX64.search(img.config_name)
            if hx and hx.group(1) != img.config_desc.digest[7:]:
                raise ImageProblem(f"config {img.config_name} does not hash to its name (it hashes to "
                                   f"{img.config_desc.digest}): corrupt archive")
            img.platform = Platform.from_json(cfg)
            rootfs = cfg.get("rootfs") if isinstance(cfg.get("rootfs"), dict) else {}
            diff_ids = rootfs.get("diff_ids")
            if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
                raise ImageProblem(f"config {img.config_name} has no rootfs.diff_ids list")
            if len(diff_ids) != len(img.layer_names):
                raise ImageProblem(f"config {img.config_name} lists {len(diff_ids)} diff_ids, manifest.json "
                                   f"{len(img.layer_names)} layers")
            img.diff_ids = diff_ids
            for ln in img.layer_names:
                real = self._resolve(ln)
                m = self.members.get(real)
                if m is None:
                    raise ImageProblem(f"layer {ln} named in manifest.json is missing from the archive")
                img.layers.append(self._layers.setdefault(real, _Layer(m)))
        except ImageProblem as exc:
            img.error = str(exc)

    # -- checks ----------------------------------------------------------------------------
    def _check_layers(self) -> None:
        """diff_ids against what was read (compressed: pass 1 hashed everything)."""
        for img in self.images:
            if img.error:
                continue
            for i, (layer, want) in enumerate(zip(img.layers, img.diff_ids)):
                m = layer.member
                if m.error:
                    img.error = f"layer {i}: {m.error}"
                    break
                if m.diff_id is not None and m.diff_id != want:
                    img.error = (f"layer {i} ({m.name}) does not match the config's diff_ids: its content hashes to "
                                 f"{m.diff_id}, the config says {want}")
                    break

    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 4)), thread_name_prefix="layer")

    def check(self, on_layer: Callable[[str, str | None], None] | None = None) -> None:
        """Plain tars: hash every layer (diff_ids), without computing blobs (inspect --check)."""
        if self.checked:
            return
        todo = sorted({l.member.name: l for img in self.images if not img.error for l in img.layers}.values(),
                      key=lambda l: l.member.offset)

        def one(layer: _Layer) -> None:
            self._hash_plain(layer, blob=False)
            if on_layer:
                on_layer(layer.member.name, layer.member.error)

        with self._pool() as pool:
            list(pool.map(one, todo))
        self.checked = True
        self._check_layers()

    def _hash_plain(self, layer: _Layer, *, blob: bool) -> None:
        """Plain tars: read a layer in place for its digest and diff_id, and with `blob` the digest of
        the gzip blob pushed for it (computed, not kept: it is compressed again while uploading)."""
        m = layer.member
        assert self._fd is not None
        if m.error:
            return
        if not m.kind:
            m.kind = _kind(os.pread(self._fd, 4, m.offset))
        try:
            if m.digest is None:
                sink = _Sink() if blob and m.kind != "gzip" else None
                facts = self._read_plain(m, sink)
                m.digest, m.diff_id, m.usize, m.padded = facts.digest, facts.diff_id, facts.usize, facts.padded
                layer.blob = facts.blob
            if blob and layer.blob is None:
                if layer.in_place:
                    layer.blob = Descriptor(DOCKER_LAYER_GZIP, m.digest, m.size)
                else:
                    facts = self._read_plain(m, _Sink())
                    if facts.digest != m.digest:
                        raise LayerStreamError("read differently the second time: the file changed while being read")
                    layer.blob = facts.blob
        except LayerStreamError as exc:
            m.error = str(exc)

    def _read_plain(self, m: _Member, blob: _Sink | None) -> _Facts:
        facts = _process(m.kind, _RangeFile(self._fd, m.offset, m.size), m.name, blob=blob)
        if facts.size != m.size:
            raise LayerStreamError(f"{facts.size} of {m.size} bytes read: the file changed while being read")
        return facts

    # -- preparing the blobs ---------------------------------------------------------------
    def selected(self, platforms: Sequence[Platform]) -> list[DockerImage]:
        """Mark images outside `platforms` as skipped; the ones left."""
        names = ", ".join(map(str, platforms))
        out = []
        for img in self.images:
            img.skip = None
            if platforms and img.platform is not None and not any(img.platform.matches(p) for p in platforms):
                img.skip = f"single-platform image is {img.platform}, not {names}"
            elif not img.error:
                out.append(img)
        return out

    def prepare(self, images: Sequence[DockerImage]) -> None:
        """Know (and, compressed, spool) every blob these images push; build their manifests."""
        todo = {l.member.name: l for img in images if not img.error for l in img.layers}
        todo = {k: l for k, l in todo.items() if l.blob is None}
        t0 = time.monotonic()
        if todo:
            if self.compression is None:
                for l in todo.values():
                    if not l.member.kind:
                        l.member.kind = _kind(os.pread(self._fd, 4, l.member.offset))
                need = sum(l.member.size for l in todo.values() if l.member.kind != "gzip")
                self.log(f"computing the gzip digests of {len(todo)} layers ({human(need)} to compress; "
                         f"compressed again while uploading)")
                with self._pool() as pool:
                    list(pool.map(lambda l: self._hash_plain(l, blob=True), todo.values()))
                self.checked = self.checked or all(l.member.digest for l in self._layers.values())
                self._check_layers()
            else:
                self._pass2(todo)
            self.log(f"{len(todo)} layers ready in {time.monotonic() - t0:.1f}s")
        for img in images:
            if img.error:
                continue
            if any(l.blob is None for l in img.layers):
                bad = next(l for l in img.layers if l.blob is None)
                img.error = img.error or f"layer {bad.member.name}: {bad.member.error or 'could not be read'}"
                continue
            self._build_manifest(img)
        self._index()

    def _spool_dir(self) -> Path:
        if self._spool is None:
            base = self.tmp_dir or Path(os.environ.get("TMPDIR") or DEFAULT_TMP)
            if not base.is_dir():
                raise InputError(f"--tmp-dir {base}: no such directory")
            try:
                self._spool = Path(tempfile.mkdtemp(prefix="rke2-mirror-load-", dir=base))
            except OSError as exc:
                raise InputError(f"cannot create a temporary directory in {base}: {exc.strerror or exc} "
                                 "(--tmp-dir DIR)") from None
        return self._spool

    def _pass2(self, todo: dict[str, _Layer]) -> None:
        spool = self._spool_dir()
        bound = sum(l.member.size for l in todo.values())
        try:
            free = shutil.disk_usage(spool).free
        except OSError:
            free = None
        self.log(f"pass 2: spooling {len(todo)} layers ({human(bound)} before compression) to {spool}"
                 + (f" ({human(free)} free)" if free is not None else ""))
        if free is not None and free < bound // 2:
            self.log(f"warning: {spool.parent} has {human(free)} free; the compressed layers may need up to {human(bound)}")
        left = dict(todo)
        try:
            with self._stream("pass 2") as tf:
                for ti, f in self._members(tf):
                    tf.members = []
                    if f is None:
                        continue
                    layer = left.pop(safe_member_name(ti.name), None)
                    if layer is None:
                        continue
                    self._spool_layer(layer, f, spool)
        except _SpoolWriteError as err:
            exc = err.exc
            raise InputError(f"cannot write to {spool.parent}: {exc.strerror or exc}; spooling the layers needs up to "
                             f"{human(bound)} (give --tmp-dir DIR with more room); nothing was pushed") from None
        for layer in left.values():
            layer.member.error = "not found again in pass 2: the file changed while being read"

    def _spool_layer(self, layer: _Layer, f, spool: Path) -> None:
        """Pass 2: write the blob pushed for this member (a gzip member as it is, else its content
        gzip-compressed) to the spool directory, named by its digest."""
        m = layer.member
        tmp = spool / f".part-{os.getpid()}"
        try:
            out = open(tmp, "wb", buffering=0)  # unbuffered: a full disk shows at the write that hits it
        except OSError as exc:
            raise _SpoolWriteError(exc) from None

        def write(data: bytes) -> None:
            view = memoryview(data)
            try:
                while view:
                    view = view[out.write(view):]
            except OSError as exc:
                raise _SpoolWriteError(exc) from None

        with out:
            sink = _Sink(write)
            as_is = layer.in_place
            try:
                facts = _process(m.kind, f, m.name, raw_sink=sink if as_is else None, blob=None if as_is else sink)
            except LayerStreamError as exc:
                m.error = str(exc)
                facts = None
        if facts is None or facts.digest != m.digest or facts.size != m.size:
            m.error = m.error or "read differently in pass 2: the file changed while being read"
            tmp.unlink(missing_ok=True)
            return
        blob = Descriptor(DOCKER_LAYER_GZIP, sink.digest, sink.size)
        final = spool / blob.digest[7:]
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise _SpoolWriteError(exc) from None
        layer.blob, layer.spool = blob, final

    def _build_manifest(self, img: DockerImage) -> None:
        assert img.config_desc is not None
        doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
               "config": {"mediaType": DOCKER_CONFIG, "size": img.config_desc.size, "digest": img.config_desc.digest},
               "layers": [{"mediaType": DOCKER_LAYER_GZIP, "size": l.blob.size, "digest": l.blob.digest}
                          for l in img.layers]}
        img.manifest = json.dumps(doc, indent=3).encode()
        img.media_type = DOCKER_MANIFEST

    def _index(self) -> None:
        self._by_digest.clear()
        for img in self.images:
            if img.manifest is not None and not img.error:
                self._by_digest["sha256:" + hashlib.sha256(img.manifest).hexdigest()] = img
                assert img.config_desc is not None and img.config is not None
                self._blobs[img.config_desc.digest] = img.config
                for l in img.layers:
                    if l.blob is not None:
                        self._blobs[l.blob.digest] = l

    # -- Locator / Endpoint ----------------------------------------------------------------
    def locate(self, ref: ImageRef) -> tuple["DockerArchive", str]:
        return self, ref.name

    def location(self, repo: str, reference: str) -> str:
        return f"{self.label}:{ref_key(repo, reference)}"

    def _image(self, repo: str, reference: str) -> DockerImage | None:
        if is_digest(reference):
            return self._by_digest.get(reference)
        return self._by_key.get(ref_key(repo, reference))

    def _ready(self, img: DockerImage) -> DockerImage:
        if img.skip:
            raise ImageProblem(img.skip)
        if img.error:
            raise ImageProblem(img.error)
        if img.manifest is None:
            raise ImageProblem("not prepared")
        return img

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        img = self._image(repo, reference)
        if img is None:
            return None
        self._ready(img)
        return Descriptor.of_bytes(img.media_type, img.manifest)

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        img = self._image(repo, reference)
        if img is None:
            raise NotFound(f"{self.location(repo, reference)}: not in the archive")
        self._ready(img)
        return Descriptor.of_bytes(img.media_type, img.manifest), img.manifest

    def blob_exists(self, repo: str, desc: Descriptor) -> bool:
        return desc.digest in self._blobs

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        what = f"blob {desc.digest} of {self.label}"
        b = self._blobs.get(desc.digest)
        if b is None:
            raise ArchiveError(f"{what}: not in the archive")
        if isinstance(b, bytes):
            yield DigestingReader([b], desc, what=what)
            return
        layer: _Layer = b  # type: ignore[assignment]
        if layer.spool is not None:
            with open(layer.spool, "rb") as f:
                yield DigestingReader(_read_chunks(f), desc, what=what + " (spooled)")
            return
        m = layer.member
        if self._fd is None:
            raise ArchiveError(f"{what}: the archive is closed")
        rng = _RangeFile(self._fd, m.offset, m.size)
        if layer.in_place:
            chunks: Iterable[bytes] = _read_chunks(rng)
        else:
            src = rng if m.kind == "tar" else _decoder(m.kind, rng, f"{self.label}: {m.name}")
            chunks = _gzip_chunks(_read_chunks(src))
        yield DigestingReader(chunks, desc, what=what + " (the file changed while being read?)")



# --------------------------------------------------------------------------- choosing a reader


def open_archive(path: str | os.PathLike, *, name: str | None = None, tmp_dir: str | os.PathLike | None = None,
                 log: Log = lambda s: None) -> ArchiveReader | DockerArchive:
    """The reader for FILE: a plain tar with an OCI layout (index.json) or split parts -> ArchiveReader;
    a docker archive (manifest.json), plain, gzip or zstd -> DockerArchive."""
    p = Path(path)
    if not p.is_file():
        return ArchiveReader(p, name=name)  # parts, or its "no such file" error
    comp = sniff(p)
    if comp is not None:
        return DockerArchive(p, compression=comp, name=name, tmp_dir=tmp_dir, log=log)
    if not archive.is_plain_tar(p) or _has_index(p):
        return ArchiveReader(p, name=name)
    return DockerArchive(p, compression=None, name=name, tmp_dir=tmp_dir, log=log)


def _has_index(path: Path) -> bool:
    """Does a plain tar hold index.json (or no manifest.json)?  Errors: let ArchiveReader say them."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            names = set()
            while (ti := tf.next()) is not None:
                names.add(safe_member_name(ti.name))
                tf.members = []
    except (tarfile.TarError, ValueError, OSError, ArchiveError):
        return True
    return "index.json" in names or "manifest.json" not in names


# --------------------------------------------------------------------------- release checksums


def arch_of(path: Path, arches: Sequence[str] = ()) -> str:
    """Which sha256sum-<arch>.txt: --arch, else the arch in the file name, else amd64."""
    if arches:
        return arches[0]
    m = _ARCH_IN_NAME.search(Path(path).name)
    return m.group(1) if m else "amd64"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
    return h.hexdigest()


def verify_release_file(path: str | os.PathLike, release: str, source, arches: Sequence[str] = (),
                        client=None, log: Log = lambda s: None) -> str:
    """Check FILE against `release`'s sha256sum-<arch>.txt (downloaded, or from the lists cache when
    offline) before anything else: a mismatch, or a file the checksum file does not name, is refused
    (InputError).  `source` is a releases.ReleaseSource.  Returns the asset name it matched."""
    from .releases import Product, ReleaseFetcher, resolve_version

    p = Path(path)
    try:
        parts = resolve_parts(p)
    except InputError:
        raise
    if len(parts) != 1:
        raise InputError(f"--release: {p} is split in parts; a release asset is one file")
    arch = arch_of(p, arches)
    version = resolve_version(release, source, client, log)
    origin, sums = ReleaseFetcher(source, version, client, log).checksums(arch)
    checksum_name = Product.checksum_asset(arch)
    what = f"{source.product} {version}"
    try:
        actual = file_sha256(p)
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None
    if p.name in sums:
        if sums[p.name] != actual:
            raise InputError(f"{p} does not match {checksum_name} of {what}: expected sha256 {sums[p.name]}, "
                             f"got sha256 {actual} (from {origin}); refusing it")
        log(f"{p.name} verified against {checksum_name} of {what} (sha256 {actual[:12]})")
        return p.name
    same = sorted(a for a, h in sums.items() if h == actual)
    if same:
        log(f"{p.name} verified against {checksum_name} of {what}: it is {same[0]} (sha256 {actual[:12]})")
        return same[0]
    raise InputError(f"{p.name} is not named in {checksum_name} of {what} ({origin}) and its sha256 {actual} "
                     f"matches none of the release's files; refusing it (--arch?)")


# --------------------------------------------------------------------------- load


class _Noting(Progress):
    """Adds the docker-archive note to each image's result before the CLI prints it, and reports the
    images found at the target before the engine ran."""

    def __init__(self, inner: Progress | None, present: Sequence[ImageResult]):
        self.inner = inner or Progress()
        self.present = present

    def start(self, total_images: int) -> None:
        self.inner.start(total_images + len(self.present))
        for r in self.present:
            self.inner.image_done(r)

    def image_done(self, result: ImageResult) -> None:
        if not result.note and result.status in ("copied", "would-copy"):
            result.note = NOTE
        elif not result.note and result.status == "skipped":
            result.note = NOTE_PRESENT
        self.inner.image_done(result)

    def bytes_copied(self, n: int) -> None:
        self.inner.bytes_copied(n)


def tasks_of(da: DockerArchive, target: RegistryURL) -> list[CopyTask]:
    return [CopyTask(r, target_ref(r, target)) for img in da.images for r in img.refs]


def _present(da: DockerArchive, tasks: Sequence[CopyTask], tgt, jobs_n: int) -> dict[int, ImageResult]:
    """Tasks whose target tag already holds this image (same config, i.e. image ID), as a manifest
    or inside a multi-platform index: skipped, and nothing of them is compressed again; an index
    there (from `mirror`) is not replaced by one platform's manifest.  Index in `tasks` -> result."""
    by_key = {ref_key(r.name, r.tag or "latest"): img for img in da.images for r in img.refs}

    def one(i: int) -> tuple[int, ImageResult | None]:
        t = tasks[i]
        img = by_key[ref_key(t.source.name, t.source.tag or "latest")]
        if img.error or img.skip or img.image_id is None:
            return i, None
        repo, tag = t.target.repository, t.target.tag or "latest"
        try:
            head = tgt.head_manifest(repo, tag)
            if head is None or not head.digest:
                return i, None
            desc, raw = tgt.get_manifest(repo, head.digest)
            m = parse_manifest(desc.media_type or head.media_type, raw)
            note = NOTE_PRESENT
            found = m.config is not None and m.config.digest == img.image_id
            if m.is_index and img.platform is not None:
                for child in m.manifests:
                    if child.platform is None or not child.platform.matches(img.platform):
                        continue
                    cdesc, craw = tgt.get_manifest(repo, child.digest)
                    cm = parse_manifest(child.media_type or cdesc.media_type, craw)
                    if cm.config is not None and cm.config.digest == img.image_id:
                        found, note = True, f"already at the target, in its multi-platform index ({child.platform})"
                        break
        except MirrorError:
            return i, None
        if not found:
            return i, None
        return i, ImageResult(str(t.source), str(t.target), "skipped", digest=head.digest,
                              source_digest=head.digest, note=note)

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        return {i: r for i, r in pool.map(one, range(len(tasks))) if r is not None}


def load(reader: ArchiveReader | DockerArchive, target: RegistryURL, *, target_tls: jobs.TLSOptions,
         options: CopyOptions, public_projects: bool = False, progress: Progress | None = None,
         log: Log = lambda s: None, max_rps: float | None = None) -> Report:
    """Archive -> registry for any archive `open_archive` gives."""
    if isinstance(reader, ArchiveReader):
        return archive.load(reader, target, target_tls=target_tls, options=options, public_projects=public_projects,
                            progress=progress, log=log, max_rps=max_rps)
    da = reader
    tasks = tasks_of(da, target)
    if not tasks:
        raise InputError(f"{da.label}: manifest.json names no images")
    da.selected(options.platforms)
    if options.platforms and not any(img.skip is None for img in da.images):
        have = ", ".join(sorted({str(i.platform) for i in da.images if i.platform})) or "unknown"
        raise InputError(f"{da.label}: no image for platform {', '.join(map(str, options.platforms))}: its images are "
                         f"{have} (RKE2's image tarballs hold one platform each: take the one for that platform, "
                         f"e.g. rke2-images.linux-arm64.tar.zst)")
    t0 = time.monotonic()
    tgt = jobs.target_registry(target, target_tls, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps)
    try:
        jobs.check_endpoint(tgt, "target")
        jobs.ensure_harbor_projects(tgt, [t.target.repository for t in tasks], public=public_projects,
                                    dry_run=options.dry_run, log=log)
        present = _present(da, tasks, tgt, options.jobs)
        if present:
            log(f"{len(present)} of {len(tasks)} image(s) already at the target with the same image ID: "
                "not compressed again")
        rest = [t for i, t in enumerate(tasks) if i not in present]
        keys = {ref_key(t.source.name, t.source.tag or "latest") for t in rest}
        da.prepare([img for img in da.images if not img.skip and not img.error
                    and any(ref_key(r.name, r.tag or "latest") in keys for r in img.refs)])
        report = jobs.run_copy(rest, da, TargetLocator(tgt), options, _Noting(progress, list(present.values())))
        done = iter(report.images)
        merged = [present[i] if i in present else next(done) for i in range(len(tasks))]
        merged.extend(done)  # signatures, never for docker archives, but keep whatever the engine adds
        return Report(merged, time.monotonic() - t0, stopped=report.stopped, rate_limit=report.rate_limit)
    finally:
        tgt.close()


# --------------------------------------------------------------------------- inspect


def inspect(reader: ArchiveReader | DockerArchive, *, check: bool = False,
            on_blob: Callable[[str, str | None], None] | None = None) -> dict:
    """What `inspect` prints (`--json`): for a docker archive, DIGEST is the image ID (config digest);
    the manifest digests `load` pushes are rebuilt.  Compressed archives are always checked (read whole)."""
    if isinstance(reader, ArchiveReader):
        doc = archive.inspect(reader, check=check, on_blob=on_blob)
        doc.setdefault("format", "OCI image layout" + (f" {doc['layout_version']}" if doc.get("layout_version") else ""))
        return doc
    da = reader
    if check:
        da.check(on_layer=on_blob)
    images, problems = [], []
    for img in da.images:
        for r in img.refs:
            row = {"reference": str(r), "digest": img.image_id or "", "image_id": img.image_id, "kind": "image ID",
                   "mediaType": DOCKER_MANIFEST, "named_by": img.how,
                   "platforms": [str(img.platform) if img.platform else "unknown"], "size": img.size,
                   "layers": len(img.layer_names)}
            if img.error:
                row["error"] = img.error
                problems.append({"image": str(r), "error": img.error})
            images.append(row)
    layers = {l.member.name: l.member for img in da.images for l in img.layers}
    configs = {img.config_name: img.config_desc for img in da.images if img.config_desc}
    doc: dict = {
        "archive": da.label, "files": [str(da.path)], "file_bytes": da.size, "format": da.format,
        "compression": da.compression, "layout_version": None, "images": images,
        "blobs": {"count": len(layers) + len(configs),
                  "bytes": sum(m.size for m in layers.values()) + sum(d.size for d in configs.values())},
        "delta": None,
    }
    if da.ignored:
        doc["ignored_members"] = da.ignored
    if da.checked:
        doc["checked"] = len(layers)
    doc["problems"] = problems
    return doc


__all__ = ["DockerArchive", "DockerImage", "ImageProblem", "NOTE", "open_archive", "load", "inspect",
           "verify_release_file", "arch_of", "sniff", "tasks_of"]
