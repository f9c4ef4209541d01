"""`load` and `inspect` for the tarballs people already have: docker archives (`docker save`,
`rancher-save-images.sh`, RKE2's `rke2-images*.linux-<arch>.tar.zst` / `.tar.gz` release assets,
skopeo `docker-archive:`), plain, gzip-, zstd-, bzip2- or lz4-compressed (detected from the content:
RKE2 also takes `.tar.bz2`/`.tbz` and `.tar.lz4` in agent/images).

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
- `.tar.gz` / `.tar.zst` / `.tar.bz2` / `.tar.lz4` (a stream cannot be seeked): pass 1 decompresses
  and reads the tar once, keeping only the small JSON members (manifest.json, configs) and hashing
  every member (diff_ids checked here, before anything is written or pushed); pass 2 decompresses
  again and spools the layers the selected images need, as they will be pushed (gzip), into a private
  directory under `--tmp-dir` (default `$TMPDIR`, else /var/tmp), removed at the end.  Temporary
  space: about the size of the layers gzip-compressed (roughly a `.tar.gz` of the same images;
  1-1.5x a `.tar.zst` or `.tar.bz2`, less than a `.tar.lz4`).
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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rke2_mirror.endpoints.compression import (CHUNK, HEAD, LayerStreamError, ParallelGzip, RangeFile,
                                              Sink, Tee, decoder, gzip_chunks, kind_of, read_chunks, sniff)
from rke2_mirror.endpoints.ociarchive import ArchiveReader
from rke2_mirror.endpoints.tarfiles import COMPRESSED, is_plain_tar, safe_member_name, tar_entries
from rke2_mirror.model.units import human
from rke2_mirror.endpoints.layout import parse_name_option
from rke2_mirror.model.errors import ArchiveError, InputError, MirrorError, NotFound
from rke2_mirror.endpoints.layout import is_digest, ref_key
from rke2_mirror.model import jsondoc
from rke2_mirror.model.oci import DOCKER_MANIFEST, Descriptor, Platform
from rke2_mirror.model.reference import ImageRef

Log = Callable[[str], None]

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
NOTE = "new digest (rebuilt from a docker archive)"
NOTE_PRESENT = "already at the target with this image ID (rebuilt from a docker archive)"
FORMAT = "docker archive (docker save)"

MAX_JSON_MEMBER = 16 * 1024 * 1024  # manifest.json, configs: kept in memory
MAX_JSON_TOTAL = 256 * 1024 * 1024
DEFAULT_TMP = "/var/tmp"

_HEX64 = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")


class ImageProblem(MirrorError):
    """One image of a docker archive cannot be loaded (missing member, diff_id mismatch, bad config)."""


class _SpoolWriteError(Exception):
    def __init__(self, exc: OSError):
        super().__init__(str(exc))
        self.exc = exc


# --------------------------------------------------------------------------- reading members


@dataclass
class _Facts:
    digest: str  # sha256 of the member's bytes
    size: int
    diff_id: str  # sha256 of the uncompressed content
    usize: int
    padded: bool = False
    blob: Descriptor | None = None  # the blob as pushed, when computed


def _process(kind: str, f, what: str, *, raw_sink: Callable[[bytes], None] | None = None,
             blob: Sink | None = None) -> _Facts:
    """Read one member once: its digest and its diff_id (sha256 of the content uncompressed); with
    `blob`, also the blob pushed for it (the content gzip-compressed, deterministically); with
    `raw_sink`, a copy of the member's own bytes (a gzip layer pushed as it is).  A corrupt
    compressed member raises LayerStreamError; the file's own stream errors pass through."""
    raw = Sink(raw_sink)
    tee = Tee(f, raw)
    src = tee if kind == "tar" else decoder(kind, tee, what, LayerStreamError)
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
    kind: str = ""  # gzip | zstd | bzip2 | lz4 | tar (anything uncompressed); "" until looked at
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


class DockerArchive:
    """A docker archive as an engine `Source` and `Locator` (like `ArchiveReader`).

    `open_archive` makes one; pass 1 runs in the constructor.  `prepare(...)` computes (and, for a
    compressed file, spools) the blobs as they will be pushed; only then can manifests be served.
    """

    damage_hint = " (the file changed while being read?)"  # a blob that does not hash as computed before


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
            for ti in tar_entries(tf, self.label):
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
            raw = Tee(f, self._ticker(what)) if self.size >= 256 * 1024 * 1024 else f
            dec = decoder(self.compression, raw, self.label)
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
        m.kind = kind_of(head)
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
        return jsondoc.loads(m.data, f"{what} {name}", error=ImageProblem)

    def _read_manifest(self, name: str | None) -> None:
        mm = self.members.get(self._resolve("manifest.json"))
        if mm is None:
            if self.has_index:
                tool = {kind: tool for _, kind, tool in COMPRESSED}.get(self.compression or "", "")
                raise ArchiveError(f"{self.label} is {self.compression}-compressed and holds an OCI image layout "
                                   f"(index.json), not a docker archive: decompress it first ({tool}), then give the .tar")
            raise ArchiveError(f"{self.label}: no manifest.json nor index.json: not a docker archive or an OCI layout "
                               "(docker save from before Docker 1.10 is not supported)")
        doc = jsondoc.loads(mm.data or b"", f"{self.label}: manifest.json", error=ArchiveError)
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
            m.kind = kind_of(os.pread(self._fd, HEAD, m.offset))
        try:
            if m.digest is None:
                sink = Sink() if blob and m.kind != "gzip" else None
                facts = self._read_plain(m, sink)
                m.digest, m.diff_id, m.usize, m.padded = facts.digest, facts.diff_id, facts.usize, facts.padded
                layer.blob = facts.blob
            if blob and layer.blob is None:
                if layer.in_place:
                    layer.blob = Descriptor(DOCKER_LAYER_GZIP, m.digest, m.size)
                else:
                    facts = self._read_plain(m, Sink())
                    if facts.digest != m.digest:
                        raise LayerStreamError("read differently the second time: the file changed while being read")
                    layer.blob = facts.blob
        except LayerStreamError as exc:
            m.error = str(exc)

    def _read_plain(self, m: _Member, blob: Sink | None) -> _Facts:
        facts = _process(m.kind, RangeFile(self._fd, m.offset, m.size), m.name, blob=blob)
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
                        l.member.kind = kind_of(os.pread(self._fd, HEAD, l.member.offset))
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
            sink = Sink(write)
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
            yield [b]
            return
        layer: _Layer = b  # type: ignore[assignment]
        if layer.spool is not None:
            with open(layer.spool, "rb") as f:
                yield read_chunks(f)
            return
        m = layer.member
        if self._fd is None:
            raise ArchiveError(f"{what}: the archive is closed")
        rng = RangeFile(self._fd, m.offset, m.size)
        if layer.in_place:
            chunks: Iterable[bytes] = read_chunks(rng)
        else:
            src = rng if m.kind == "tar" else decoder(m.kind, rng, f"{self.label}: {m.name}")
            chunks = gzip_chunks(read_chunks(src))
        yield chunks



# --------------------------------------------------------------------------- choosing a reader


def open_archive(path: str | os.PathLike, *, name: str | None = None, tmp_dir: str | os.PathLike | None = None,
                 log: Log = lambda s: None) -> ArchiveReader | DockerArchive:
    """The reader for FILE: a plain tar with an OCI layout (index.json) or split parts -> ArchiveReader;
    a docker archive (manifest.json), plain or compressed (gzip, zstd, bzip2, lz4) -> DockerArchive."""
    p = Path(path)
    if not p.is_file():
        return ArchiveReader(p, name=name)  # parts, or its "no such file" error
    comp = sniff(p)
    if comp is not None:
        return DockerArchive(p, compression=comp, name=name, tmp_dir=tmp_dir, log=log)
    if not is_plain_tar(p) or _has_index(p):
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


__all__ = ["DockerArchive", "DockerImage", "ImageProblem", "NOTE", "NOTE_PRESENT", "open_archive", "sniff"]
