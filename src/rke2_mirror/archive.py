"""Air-gap archives: an OCI image layout in one tar (or numbered parts of one), written by `save`,
read by `load` and `inspect`.

Format (what `save` writes; any OCI layout tar is read):
- members, in this order: `oci-layout`, `index.json`, `rke2-mirror-delta.json` (delta archives
  only), `blobs/`, `blobs/sha256/`, then every blob once (manifests, configs, layers) sorted by
  digest.  PAX/ustar headers, mode 0644, mtime 0, uid/gid 0: the same images give the same bytes.
  No compression (layers are compressed already).
- index.json names each image (see layout.py): `io.containerd.image.name` and
  `org.opencontainers.image.ref.name` = the full reference, e.g. `docker.io/rancher/x:v1`.
- `--split SIZE`: the tar's bytes cut into `FILE.part001`, `FILE.part002`, … (each at most SIZE;
  `cat FILE.part* > FILE` gives the whole tar back).
- Delta (`save --since OLD`): every manifest is stored, but blobs OLD's images have are left out.
  index.json annotations `io.rke2-mirror.delta.since` (what OLD was) and
  `io.rke2-mirror.delta.file` = `rke2-mirror-delta.json`, which lists the left-out blobs:
  `{"schemaVersion": 1, "since": OLD, "omitted": [{"digest", "size", "repositories": [source
  repository paths of OLD images holding it]}]}`.

Reading never extracts: the tar headers are scanned once for member offsets, then blobs are read
with pread() at those offsets (split parts are one concatenated byte range), streamed and hashed.
Member names are validated (absolute paths and `..` are refused); links, devices and directories
are ignored.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import re
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import jobs
from .units import human
from .copy import CopyOptions, CopyTask, Progress, Report
from .errors import ArchiveError, DigestMismatch, InputError, MirrorError, NotFound, UnsupportedManifest
from .layout import (CONTAINERD_NAME, INDEX_FILE, LAYOUT_FILE, LAYOUT_VERSION, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES,
                     REF_NAME, LayoutDir, LayoutLocator, NamedImage, WorkDirError, blob_member, check_digest,
                     dumps_json, image_key, index_document, index_entry, is_digest, manifest_media_type,
                     name_entries, ref_key)
from .oci import Descriptor, DigestingReader, Manifest, Platform, parse_manifest, sha256_digest
from .reference import ImageRef, RegistryURL, target_ref
from .routing import TargetLocator

Log = Callable[[str], None]

DELTA_FILE = "rke2-mirror-delta.json"
DELTA_SINCE = "io.rke2-mirror.delta.since"
DELTA_FILE_ANNOTATION = "io.rke2-mirror.delta.file"
CHUNK = 1024 * 1024
MIN_SPLIT = 4096
_PART_RE = re.compile(r"^(?P<base>.+)\.part(?P<n>\d{3,})$")
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
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


# --------------------------------------------------------------------------- graph walk


@dataclass
class ImageGraph:
    """What one image consists of: its manifests (root first) and blobs (config + layers)."""

    root: Descriptor
    manifests: dict[str, Descriptor] = field(default_factory=dict)
    blobs: dict[str, Descriptor] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)
    media_type: str = ""

    @property
    def size(self) -> int:
        return sum(d.size for d in self.manifests.values()) + sum(d.size for d in self.blobs.values())


def walk_image(ep, repo: str, reference: str, platforms: Sequence[Platform] = (), *,
               config_platform: bool = False) -> ImageGraph:
    """Read an image's manifests from an Endpoint (no blobs): the same selection the engine makes
    for `platforms` (index entries without a platform are dropped when filtering)."""
    desc, raw = ep.get_manifest(repo, reference)
    root = parse_manifest(desc.media_type, raw)
    g = ImageGraph(Descriptor(root.media_type, desc.digest, len(raw)), media_type=root.media_type)
    g.manifests[desc.digest] = g.root

    def visit(m: Manifest, depth: int) -> None:
        if not m.is_index:
            for b in m.blobs:
                g.blobs.setdefault(check_digest(b.digest), b)
            return
        if depth > 4:
            raise UnsupportedManifest("indexes nested more than 4 deep")
        children = list(m.manifests)
        if platforms:
            children = [c for c in children if c.platform and any(c.platform.matches(p) for p in platforms)]
        for c in children:
            check_digest(c.digest)
            cdesc, craw = ep.get_manifest(repo, c.digest)
            cm = parse_manifest(c.media_type or cdesc.media_type, craw)
            g.manifests.setdefault(c.digest, Descriptor(cm.media_type, c.digest, len(craw)))
            if depth == 0:
                g.platforms.append(str(c.platform) if c.platform else "unknown")
            visit(cm, depth + 1)

    visit(root, 0)
    if not root.is_index and config_platform:
        g.platforms.append(_config_platform(ep, repo, root) or "unknown")
    return g


def _config_platform(ep, repo: str, m: Manifest) -> str | None:
    if m.config is None or m.config.size > 4 * 1024 * 1024:
        return None
    try:
        with ep.open_blob(repo, m.config) as chunks:
            doc = json.loads(b"".join(chunks))
    except (MirrorError, ValueError):
        return None
    p = Platform.from_json(doc) if isinstance(doc, dict) else None
    return str(p) if p else None


# --------------------------------------------------------------------------- reading


class _PReadFile:
    """A read-only, seekable file object over the archive's pread(): what tarfile scans."""

    def __init__(self, reader: "ArchiveReader"):
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


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass(frozen=True)
class DeltaInfo:
    since: str
    omitted: dict[str, dict]  # digest -> {"size": int, "repositories": [..]}

    @property
    def omitted_bytes(self) -> int:
        return sum(int(o.get("size") or 0) for o in self.omitted.values())


class ReadOnlyEndpoint:
    """The write half of the engine's Endpoint for sources that are files: nothing can be written."""

    label: str

    def mount_blob(self, repo: str, desc: Descriptor, from_repo: str) -> bool:
        return False

    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str:
        raise MirrorError(f"{self.label}: an archive is read-only")

    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        raise MirrorError(f"{self.label}: an archive is read-only")


class ArchiveReader(ReadOnlyEndpoint):
    """An OCI layout tar (or its split parts) as a read-only `Endpoint` and `Locator`.

    Member offsets come from one scan of the tar headers; blobs are then read in place with
    pread() (thread-safe, nothing extracted, memory flat) and checked by a DigestingReader.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], *, name: str | None = None):
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else resolve_parts(Path(path))
        self.paths = paths
        self.label = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
        self._fds: list[int] = []
        self._starts: list[int] = []
        self.size = 0
        try:
            for p in paths:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError as exc:
                    raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None
                self._fds.append(fd)
                self._starts.append(self.size)
                self.size += os.fstat(fd).st_size
            self.members: dict[str, Member] = {}
            self.ignored: list[str] = []
            self._scan()
            self.layout_version = self._read_layout_version()
            self.index = self._read_json(INDEX_FILE, MAX_INDEX_BYTES, required=True)
            if not isinstance(self.index, dict):
                raise ArchiveError(f"{self.label}: index.json is not a JSON object")
            self.images: list[NamedImage] = name_entries(self.index, name, f"{self.label}: index.json")
            self._by_key = {img.key: img for img in self.images}
            self.delta = self._read_delta()
        except BaseException:
            self.close()
            raise

    # -- raw access ------------------------------------------------------------------------
    def pread(self, offset: int, n: int) -> bytes:
        out: list[bytes] = []
        while n > 0 and offset < self.size:
            i = bisect.bisect_right(self._starts, offset) - 1
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
            want = min(n, end - offset)
            data = os.pread(self._fds[i], want, offset - self._starts[i])
            if not data:
                break
            out.append(data)
            offset += len(data)
            n -= len(data)
        return b"".join(out)

    def _iter_range(self, offset: int, size: int) -> Iterator[bytes]:
        end = offset + size
        while offset < end:
            data = self.pread(offset, min(CHUNK, end - offset))
            if not data:
                return
            offset += len(data)
            yield data

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scanning --------------------------------------------------------------------------
    def _not_a_tar(self, detail: str) -> ArchiveError:
        head = self.pread(0, 8)
        for magic, kind, tool in _COMPRESSED:
            if head.startswith(magic):
                return ArchiveError(f"{self.label} is {kind}-compressed: decompress it first ({tool}), "
                                    "then give the .tar")
        if self.size == 0:
            return ArchiveError(f"{self.label} is empty, not a tar archive")
        return ArchiveError(f"{self.label} is not a tar archive ({detail})")

    def _scan(self) -> None:
        f = _PReadFile(self)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, ValueError) as exc:
            raise self._not_a_tar(str(exc)) from None
        try:
            for ti in tar_entries(tf, self.label):
                name = safe_member_name(ti.name)
                if not ti.isreg() or ti.issparse():
                    if not ti.isdir():
                        self.ignored.append(name)
                    continue
                if ti.offset_data + ti.size > self.size:
                    raise ArchiveError(f"{self.label}: truncated: member {name} ends past the end of the file"
                                       + (" (is a part missing?)" if len(self.paths) > 1 else ""))
                self.members[name] = Member(ti.offset_data, ti.size)
            end = tf.offset
        finally:
            tf.members = []
        tail = self.pread(end, 512)
        if len(tail) < 512:
            more = " (is the last part missing?)" if len(self.paths) > 1 else ""
            raise ArchiveError(f"{self.label}: truncated: the tar ends without its end-of-archive marker{more}")
        if tail.strip(b"\x00"):
            raise ArchiveError(f"{self.label}: corrupt tar header at byte {end}")

    def member_bytes(self, name: str, limit: int) -> bytes | None:
        m = self.members.get(name)
        if m is None:
            return None
        if m.size > limit:
            raise ArchiveError(f"{self.label}: {name} is larger than {limit} bytes")
        data = self.pread(m.offset, m.size)
        if len(data) != m.size:
            raise ArchiveError(f"{self.label}: truncated in {name}")
        return data

    def _read_json(self, name: str, limit: int, required: bool = False):
        data = self.member_bytes(name, limit)
        if data is None:
            if required:
                hint = ""
                if "manifest.json" in self.members:
                    hint = " (it has manifest.json: a docker save archive; save it in OCI format, e.g. skopeo oci-archive:)"
                raise ArchiveError(f"{self.label}: no index.json: not an OCI image layout archive{hint}")
            return None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"{self.label}: {name} is not valid JSON ({exc})") from None

    def _read_layout_version(self) -> str | None:
        doc = self._read_json(LAYOUT_FILE, 64 * 1024)
        if doc is None:
            return None
        version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ArchiveError(f"{self.label}: unsupported oci-layout version {version!r}")
        return version

    def _read_delta(self) -> DeltaInfo | None:
        ann = self.index.get("annotations") if isinstance(self.index.get("annotations"), dict) else {}
        doc = self._read_json(DELTA_FILE, MAX_INDEX_BYTES)
        if doc is None:
            if DELTA_SINCE in ann:
                raise ArchiveError(f"{self.label}: a delta archive (against {ann[DELTA_SINCE]}) without {DELTA_FILE}")
            return None
        try:
            omitted = {check_digest(o["digest"]): {"size": int(o["size"]),
                                                  "repositories": [str(r) for r in o.get("repositories") or []]}
                       for o in doc["omitted"]}
            since = str(doc.get("since") or ann.get(DELTA_SINCE) or "?")
        except (KeyError, TypeError, ValueError, MirrorError) as exc:
            raise ArchiveError(f"{self.label}: malformed {DELTA_FILE} ({exc})") from None
        return DeltaInfo(since, omitted)

    # -- Locator / Endpoint ----------------------------------------------------------------
    def locate(self, ref: ImageRef) -> tuple["ArchiveReader", str]:
        return self, ref.name

    def location(self, repo: str, reference: str) -> str:
        return f"{self.label}:{ref_key(repo, reference)}"

    def blob(self, digest: str) -> Member | None:
        return self.members.get(blob_member(digest))

    def _manifest_bytes(self, digest: str, what: str) -> bytes:
        m = self.blob(digest)
        if m is None:
            raise ArchiveError(f"{what}: manifest {digest} is missing from {self.label}")
        if m.size > MAX_MANIFEST_BYTES:
            raise UnsupportedManifest(f"{what}: manifest {digest} larger than {MAX_MANIFEST_BYTES} bytes")
        raw = self.pread(m.offset, m.size)
        got = sha256_digest(raw)
        if got != digest:
            raise DigestMismatch(f"manifest {digest} in {self.label}: content hashes to {got} (corrupt archive)")
        return raw

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        if is_digest(reference):
            m = self.blob(reference)
            if m is None:
                return None
            try:
                mt = manifest_media_type(self._manifest_bytes(reference, self.location(repo, reference)))
            except MirrorError:
                mt = ""
            return Descriptor(mt, reference, m.size)
        img = self._by_key.get(ref_key(repo, reference))
        return img.descriptor if img else None

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        what = self.location(repo, reference)
        mt = ""
        if is_digest(reference):
            digest = check_digest(reference)
        else:
            img = self._by_key.get(ref_key(repo, reference))
            if img is None:
                raise NotFound(f"{what}: not in the archive")
            digest, mt = img.descriptor.digest, img.descriptor.media_type
        raw = self._manifest_bytes(digest, what)
        return Descriptor.of_bytes(mt or manifest_media_type(raw), raw), raw

    def blob_exists(self, repo: str, desc: Descriptor) -> bool:
        m = self.blob(desc.digest)
        return m is not None and m.size == desc.size

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        m = self.blob(desc.digest)
        if m is None:
            if self.delta and desc.digest in self.delta.omitted:
                raise ArchiveError(f"blob {desc.digest} is left out of the delta archive {self.label} "
                                   f"(it must be at the target already: load the archive of {self.delta.since} first)")
            raise ArchiveError(f"blob {desc.digest} is missing from {self.label} (corrupt or incomplete archive)")
        if m.size != desc.size:
            raise DigestMismatch(f"blob {desc.digest} in {self.label}: {m.size} bytes, the manifest says "
                                 f"{desc.size} (corrupt archive)")
        yield DigestingReader(self._iter_range(m.offset, m.size), desc,
                              what=f"blob {desc.digest} in {self.label} (corrupt archive)")


    # -- checks ----------------------------------------------------------------------------
    def blob_members(self) -> list[tuple[str, Member]]:
        out = []
        for name, m in self.members.items():
            if name.startswith("blobs/"):
                parts = name.split("/")
                if len(parts) == 3:
                    out.append((f"{parts[1]}:{parts[2]}", m))
        return sorted(out)

    def rehash(self, digest: str, m: Member) -> str | None:
        """None when the member hashes to its name; else what is wrong."""
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            return f"unexpected blob name blobs/{algo}/{hexpart}"
        h = hashlib.sha256()
        n = 0
        for chunk in self._iter_range(m.offset, m.size):
            h.update(chunk)
            n += len(chunk)
        if n != m.size:
            return f"truncated: {n} of {m.size} bytes"
        got = "sha256:" + h.hexdigest()
        return None if got == digest else f"content hashes to {got}"


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
        self._f = open(tmp, "wb", buffering=0)  # unbuffered: copy_from() writes to the fd directly
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


@dataclass
class ArchiveContent:
    """What goes into an archive: the index entries and every blob, each once."""

    images: list[NamedImage]
    blobs: dict[str, Descriptor]  # manifests + configs + layers that are included
    omitted: dict[str, Descriptor]  # delta: left out
    index: dict


class OutputError(InputError):
    """The archive could not be written (disk full, file too large, permissions): exit 2."""


def plan_archive(layout: LayoutDir, images: Sequence[NamedImage], *, omit: Iterable[str] = (),
                 annotations: dict | None = None) -> ArchiveContent:
    omit = set(omit)
    blobs: dict[str, Descriptor] = {}
    omitted: dict[str, Descriptor] = {}
    entries = []
    for img in sorted(images, key=lambda i: i.key):
        g = walk_image(layout, img.ref.name, img.descriptor.digest)
        entries.append(index_entry(img.key, g.root.media_type, g.root.digest, g.root.size))
        blobs.update(g.manifests)
        for d, b in g.blobs.items():
            (omitted if d in omit else blobs).setdefault(d, b)
    return ArchiveContent(list(images), blobs, omitted, index_document(entries, annotations))


def write_archive(layout: LayoutDir, content: ArchiveContent, output: Path, *, split: int | None = None,
                  delta_doc: dict | None = None, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write the tar (or its parts) under temporary names, fsync, then rename into place.

    A blob file this run wrote itself was checked as it arrived; any other (left by an earlier
    run) is hashed again first: what the tar holds was checked.  Blob bytes are copied by the
    kernel (the work dir is beside the output, on the same file system)."""
    writer = _PartWriter(output, split)
    try:
        small = [(LAYOUT_FILE, dumps_json({"imageLayoutVersion": LAYOUT_VERSION})),
                 (INDEX_FILE, dumps_json(content.index))]
        if delta_doc is not None:
            small.append((DELTA_FILE, dumps_json(delta_doc)))
        for name, data in small:
            _tar_header(writer, _tarinfo(name, len(data)))
            writer.write(data)
            _tar_pad(writer, len(data))
        _tar_header(writer, _tarinfo("blobs", directory=True))
        _tar_header(writer, _tarinfo("blobs/sha256", directory=True))
        for digest in sorted(content.blobs):
            desc = content.blobs[digest]
            path = layout.blob_path(digest)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise WorkDirError(f"blob {digest} is missing from the work dir {layout.path} "
                                   f"({exc.strerror or exc}); run again") from None
            try:
                size = os.fstat(fd).st_size
                if size != desc.size:
                    raise WorkDirError(f"blob {digest} in the work dir has {size} bytes, expected {desc.size}; run again")
                if not layout.checked_here(digest) and _file_digest(fd, size) != digest:
                    path.unlink(missing_ok=True)
                    raise WorkDirError(f"blob {digest} in the work dir {layout.path} is corrupt (removed); run again")
                _tar_header(writer, _tarinfo(blob_member(digest), size))
                writer.copy_from(fd, size)
                _tar_pad(writer, size)
            finally:
                os.close(fd)
            if progress:
                progress(size)
        _tar_end(writer)
        return writer.commit()
    except OSError as exc:
        writer.abort()
        where = writer.temps[-1] if writer.temps else output
        raise OutputError(f"cannot write {where}: {exc.strerror or exc}; no archive was written "
                          f"(the work dir {layout.path} is kept: run again when there is room)") from None
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- save


@dataclass
class Since:
    """`save --since`: what the target holds already."""

    label: str
    refs: list[ImageRef] = field(default_factory=list)
    archive: Path | None = None


@dataclass
class SaveResult:
    report: Report
    files: list[Path]
    images: int = 0
    blobs: int = 0
    bytes: int = 0
    omitted: int = 0
    omitted_bytes: int = 0
    work_dir: Path | None = None
    work_dir_kept: bool = False


def _old_blobs(since: Since, router, platforms: Sequence[Platform], jobs_n: int, log: Log) -> dict[str, set[str]]:
    """digest -> source repositories (of OLD's images) holding it."""
    out: dict[str, set[str]] = {}
    lock = threading.Lock()

    def add(repo: str, g: ImageGraph) -> None:
        with lock:
            for d in g.blobs:
                out.setdefault(d, set()).add(repo)

    if since.archive is not None:
        with ArchiveReader(since.archive) as old:
            for img in old.images:
                try:
                    add(img.ref.repository, walk_image(old, img.ref.name, img.descriptor.digest, platforms))
                except MirrorError as exc:
                    log(f"--since {since.label}: cannot read {img.ref} ({exc}); its blobs are not left out")
            if old.delta:  # what that delta left out is at the target too
                for d, o in old.delta.omitted.items():
                    if d in out:
                        out[d].update(o["repositories"])
        return out

    def one(ref: ImageRef) -> None:
        try:
            ep, repo = router.locate(ref)
            add(ref.repository, walk_image(ep, repo, ref.reference, platforms))
        except MirrorError as exc:
            log(f"--since {since.label}: cannot read {ref} ({exc}); its blobs are not left out")

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        list(pool.map(one, since.refs))
    return out


@contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    import fcntl
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(work_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WorkDirError(f"cannot create the work dir {work_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"{work_dir} is in use by another rke2-mirror save") from None
        yield
    finally:
        os.close(fd)


def default_work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".work")


_WORK_ENTRIES = ("blobs", INDEX_FILE, LAYOUT_FILE, ".lock")


def _check_work_dir(work_dir: Path) -> None:
    """A work dir is ours (an OCI layout we made) or new: never someone else's directory."""
    if work_dir.exists() and not work_dir.is_dir():
        raise InputError(f"work dir {work_dir} exists and is not a directory")
    if work_dir.is_dir() and not (work_dir / LAYOUT_FILE).is_file() and any(work_dir.iterdir()):
        raise InputError(f"work dir {work_dir} is not empty and not an rke2-mirror work dir (no oci-layout)")


def _remove_work_dir(work_dir: Path) -> None:
    """Remove what save put there (and the directory when that leaves it empty)."""
    for name in _WORK_ENTRIES:
        p = work_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in work_dir.glob(f".{INDEX_FILE}.tmp-*"):
        p.unlink(missing_ok=True)
    try:
        work_dir.rmdir()
    except OSError:
        pass


def save(refs: Sequence[ImageRef], output: Path, *, source: jobs.SourceOptions, options: CopyOptions,
         split: int | None = None, since: Since | None = None, work_dir: Path | None = None,
         keep_work_dir: bool = False, progress: Progress | None = None, log: Log = lambda s: None,
         max_rps: float | None = None) -> SaveResult:
    """Registry -> archive: the `save` command's job."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"--output {output} is a directory")
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: directory {output.parent} does not exist")
    work_dir = Path(work_dir) if work_dir else default_work_dir(output)
    _check_work_dir(work_dir)
    router = jobs.source_router(source, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps)
    try:
        seen: set[str] = set()
        for r in list(refs) + (since.refs if since else []):
            reg, _ = router.locate(r)
            if reg.base_url not in seen:
                seen.add(reg.base_url)
                jobs.check_endpoint(reg, "source")
        old: dict[str, set[str]] = {}
        if since is not None:
            old = _old_blobs(since, router, options.platforms, options.jobs, log)
            log(f"delta against {since.label}: {len(old)} blobs of its images are left out when shared")
        with _locked(work_dir):
            layout = LayoutDir(work_dir, assume_present=old)
            tasks = [CopyTask(r, r) for r in refs]
            report = jobs.run_copy(tasks, router, LayoutLocator(layout), replace(options, skip_blobs=frozenset(old)),
                                   progress)
            if layout.write_error is not None:
                e = layout.write_error
                raise WorkDirError(f"cannot write to the work dir {work_dir}: {e.strerror or e}; no archive was written")
            images = _saved_images(layout, report)
            result = SaveResult(report, [], work_dir=work_dir)
            if not images:
                result.work_dir_kept = True
                return result
            annotations = {}
            delta_doc = None
            omit = set(old)
            if since is not None:
                annotations = {DELTA_SINCE: since.label, DELTA_FILE_ANNOTATION: DELTA_FILE}
            content = plan_archive(layout, images, omit=omit, annotations=annotations)
            if since is not None:
                delta_doc = {"schemaVersion": 1, "since": since.label,
                             "omitted": [{"digest": d, "size": b.size, "repositories": sorted(old[d])}
                                         for d, b in sorted(content.omitted.items())]}
            total = sum(b.size for b in content.blobs.values())
            log(f"writing {output}{' in parts of ' + human(split) if split else ''}: {len(images)} images, "
                f"{len(content.blobs)} blobs, {human(total)}")
            result.files = write_archive(layout, content, output, split=split, delta_doc=delta_doc,
                                         progress=getattr(progress, "bytes_copied", None))
            result.images, result.blobs, result.bytes = len(images), len(content.blobs), total
            result.omitted = len(content.omitted)
            result.omitted_bytes = sum(b.size for b in content.omitted.values())
            if report.failed or keep_work_dir:
                result.work_dir_kept = True
            else:
                _remove_work_dir(work_dir)
        return result
    finally:
        router.close()


def _saved_images(layout: LayoutDir, report: Report) -> list[NamedImage]:
    out: dict[str, NamedImage] = {}
    for r in report.images:
        if r.status not in ("copied", "skipped") or not r.digest:
            continue
        ref = ImageRef.parse(r.target)
        ref = ref.with_digest(None) if ref.tag else ref  # by tag when it has one (as the engine wrote it)
        key = image_key(ref)
        entry = layout.entry(key)
        if entry is not None:
            desc = Descriptor.from_json(entry)
        else:  # pinned by digest only: the engine wrote no tag
            d, raw = layout.get_manifest(ref.name, r.digest)
            desc = Descriptor(d.media_type, r.digest, len(raw))
        out[key] = NamedImage(ref, desc)
    return list(out.values())


# --------------------------------------------------------------------------- load


def _check_delta(reader: ArchiveReader, tasks: Sequence[CopyTask], tgt, target: RegistryURL,
                 platforms: Sequence[Platform], jobs_n: int) -> list[tuple[str, Descriptor, str]]:
    """For a delta archive: are the blobs it leaves out at the target?  Returns the mounts to make
    (repo, blob, from repo); raises InputError naming what is absent."""
    delta = reader.delta
    assert delta is not None
    needs: dict[tuple[str, str], tuple[Descriptor, str]] = {}
    for t in tasks:
        try:
            g = walk_image(reader, t.source.name, t.source.reference, platforms)
        except MirrorError:
            continue  # the copy reports this image's problem
        for d, b in g.blobs.items():
            if d in delta.omitted and reader.blob(d) is None:
                needs.setdefault((t.target.repository, d), (b, str(t.source)))

    def check(item):
        (repo, d), (b, image) = item
        if tgt.blob_exists(repo, b):
            return None
        for src_repo in delta.omitted[d]["repositories"]:
            other = target.repository(src_repo)
            if other != repo and tgt.blob_exists(other, b):
                return ("mount", repo, b, other)
        return ("absent", d, image)

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        results = [r for r in pool.map(check, needs.items()) if r is not None]
    absent = sorted({(r[1], r[2]) for r in results if r[0] == "absent"})
    if absent:
        blobs = sorted({d for d, _ in absent})
        shown = ", ".join(f"{d} ({next(i for dd, i in absent if dd == d)})" for d in blobs[:5])
        more = f" and {len(blobs) - 5} more" if len(blobs) > 5 else ""
        raise InputError(f"{reader.label} is a delta against {delta.since}, and the target {target} lacks "
                         f"{len(blobs)} blob(s) it leaves out: {shown}{more}; load the archive of "
                         f"{delta.since} (or mirror it) to this target first")
    return [(r[1], r[2], r[3]) for r in results if r[0] == "mount"]


def load(reader: ArchiveReader, target: RegistryURL, *, target_tls: jobs.TLSOptions, options: CopyOptions,
         public_projects: bool = False, progress: Progress | None = None, log: Log = lambda s: None,
         max_rps: float | None = None) -> Report:
    """Archive -> registry: the `load` command's job."""
    tasks = [CopyTask(img.ref, target_ref(img.ref, target)) for img in reader.images]
    if not tasks:
        raise InputError(f"{reader.label}: index.json names no images")
    tgt = jobs.target_registry(target, target_tls, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps)
    try:
        jobs.check_endpoint(tgt, "target")
        mounts: list[tuple[str, Descriptor, str]] = []
        skip: frozenset[str] = frozenset()
        if reader.delta is not None:
            mounts = _check_delta(reader, tasks, tgt, target, options.platforms, options.blob_jobs)
        jobs.ensure_harbor_projects(tgt, [t.target.repository for t in tasks], public=public_projects,
                                    dry_run=options.dry_run, log=log)
        if reader.delta is not None:
            for repo, b, other in mounts:
                if not tgt.mount_blob(repo, b, other):
                    raise InputError(f"the target refused to mount {b.digest} from {other} into {repo} "
                                     f"(needed by the delta {reader.label})")
            skip = frozenset(d for d in reader.delta.omitted if reader.blob(d) is None)
        return jobs.run_copy(tasks, reader, TargetLocator(tgt), replace(options, skip_blobs=skip), progress)
    finally:
        tgt.close()


# --------------------------------------------------------------------------- inspect


def inspect(reader: ArchiveReader, *, check: bool = False,
            on_blob: Callable[[str, str | None], None] | None = None) -> dict:
    """A JSON-able description of the archive; with `check`, every blob is hashed again."""
    images = []
    referenced: dict[str, Descriptor] = {}
    problems: list[dict] = []
    for img in reader.images:
        row = {"reference": str(img.ref), "digest": img.descriptor.digest,
               "mediaType": img.descriptor.media_type, "named_by": img.how}
        try:
            g = walk_image(reader, img.ref.name, img.descriptor.digest, config_platform=True)
            row.update(mediaType=g.media_type, platforms=g.platforms, size=g.size,
                       manifests=len(g.manifests), blobs=len(g.blobs))
            if reader.delta:
                row["size_in_archive"] = sum(d.size for k, d in {**g.manifests, **g.blobs}.items()
                                             if reader.blob(k) is not None)
            referenced.update(g.blobs)
            referenced.update(g.manifests)
        except MirrorError as exc:
            row["error"] = str(exc)
            problems.append({"image": str(img.ref), "error": str(exc)})
        images.append(row)
    blob_list = reader.blob_members()
    doc: dict = {
        "archive": reader.label, "files": [str(p) for p in reader.paths], "file_bytes": reader.size,
        "layout_version": reader.layout_version,
        "images": images,
        "blobs": {"count": len(blob_list), "bytes": sum(m.size for _, m in blob_list)},
        "delta": None,
    }
    if reader.delta:
        doc["delta"] = {"since": reader.delta.since, "omitted": len(reader.delta.omitted),
                        "omitted_bytes": reader.delta.omitted_bytes}
    omitted = reader.delta.omitted if reader.delta else {}
    for d in sorted(referenced):
        if reader.blob(d) is None and d not in omitted:
            problems.append({"blob": d, "error": f"missing from {reader.label}"})
    if reader.ignored:
        doc["ignored_members"] = reader.ignored
    if check:
        for digest, m in blob_list:
            err = reader.rehash(digest, m)
            if on_blob:
                on_blob(digest, err)
            if err:
                problems.append({"blob": digest, "error": err})
        doc["checked"] = len(blob_list)
    doc["problems"] = problems
    return doc


__all__ = ["ArchiveReader", "ArchiveContent", "DeltaInfo", "ImageGraph", "OutputError", "SaveResult", "Since",
           "inspect", "is_plain_tar", "load", "looks_like_archive", "parse_size", "plan_archive", "resolve_parts", "save",
           "safe_member_name", "walk_image", "write_archive", "DELTA_FILE", "DELTA_SINCE", "REF_NAME",
           "CONTAINERD_NAME"]
