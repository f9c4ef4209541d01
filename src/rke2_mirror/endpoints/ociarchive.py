"""Air-gap archives: an OCI image layout in one tar (or numbered parts of one), written by `save`,
read by `load` and `inspect`.

Format (what `save` writes; any OCI layout tar is read):
- members, in this order: `oci-layout`, `index.json`, `manifest.json` (node tarballs only:
  nodetarball.py), `rke2-mirror-delta.json` (delta archives only), `blobs/`, `blobs/sha256/`, then every
  blob once (manifests, configs, layers) sorted by digest.  PAX/ustar headers, mode 0644, mtime 0,
  uid/gid 0: the same images give the same bytes.  No compression (layers are compressed already),
  except for node tarballs named `.tar.gz` / `.tar.zst` (tarfiles.open_tar_writer).
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
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rke2_mirror.endpoints.layout import (INDEX_FILE, LAYOUT_FILE, LAYOUT_VERSION, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES,
                                          LayoutDir, NamedImage, blob_member, check_digest, dumps_json,
                                          index_document, index_entry, is_digest, is_referrer_entry,
                                          manifest_media_type, name_entries, ref_key)
from rke2_mirror.endpoints.referrers import store_referrers, store_tagged
from rke2_mirror.endpoints.tarfiles import (CHUNK, COMPRESSED, _file_digest, _PReadFile, _tar_end, _tar_header,
                                            _tar_pad, _tarinfo, open_tar_writer, resolve_parts, safe_member_name,
                                            tar_entries)
from rke2_mirror.engine.walk import GraphCache
from rke2_mirror.model.errors import WorkDirError, ArchiveError, DigestMismatch, InputError, MirrorError, NotFound, UnsupportedManifest
from rke2_mirror.model import jsondoc
from rke2_mirror.model.oci import OCI_INDEX, Descriptor, sha256_digest
from rke2_mirror.model.referrers import ReferrerFilter, fallback_tag, referrers_index
from rke2_mirror.model.reference import ImageRef

DELTA_FILE = "rke2-mirror-delta.json"
DOCKER_MANIFEST_FILE = "manifest.json"  # node tarballs (save --for-node): see endpoints/nodetarball.py
DELTA_SINCE = "io.rke2-mirror.delta.since"
DELTA_FILE_ANNOTATION = "io.rke2-mirror.delta.file"


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


class ArchiveReader:
    """An OCI layout tar (or its split parts) as an engine `Source` and `Locator`.

    Member offsets come from one scan of the tar headers; blobs are then read in place with
    pread() (thread-safe, nothing extracted, memory flat); the engine checks them as they stream.
    """

    damage_hint = " (corrupt archive)"  # what a blob that does not match its digest means here

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
            named = name_entries(self.index, name, f"{self.label}: index.json")
            self._by_key = {img.key: img for img in named}
            # referrer entries (tag schema indexes, cosign's tags) travel with their images: not images
            self.images: list[NamedImage] = [img for img in named if not is_referrer_entry(img)]
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
        for magic, kind, tool in COMPRESSED:
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
        return jsondoc.loads(data, f"{self.label}: {name}", error=ArchiveError)

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

    def referrers(self, repo: str, subject: str, filt=None) -> list[Descriptor]:
        return store_referrers(self.get_manifest, repo, subject)

    def tagged_artifacts(self, repo: str, subject: str) -> list[tuple[str, str]]:
        return store_tagged(lambda r, t: ref_key(r, t) in self._by_key, repo, subject)

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
        yield self._iter_range(m.offset, m.size)

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


@dataclass
class ArchiveContent:
    """What goes into an archive: the index entries and every blob, each once."""

    images: list[NamedImage]
    blobs: dict[str, Descriptor]  # manifests + configs + layers that are included
    omitted: dict[str, Descriptor]  # delta: left out
    index: dict
    docker_manifest: list | None = None  # node tarballs: manifest.json, written right after index.json


class OutputError(InputError):
    """The archive could not be written (disk full, file too large, permissions): exit 2."""


def plan_archive(layout: LayoutDir, images: Sequence[NamedImage], *, omit: Iterable[str] = (),
                 annotations: dict | None = None, referrers: ReferrerFilter | None = None) -> ArchiveContent:
    """Every blob the images need, once (the engine's walk), minus `omit` (a delta's left-out blobs).

    With `referrers`, each image's referrers found in the layout come along: cosign's tags as they are,
    the tag schema indexes written anew with just the referrers carried (the work dir may hold more)."""
    omit = set(omit)
    graphs = GraphCache(layout, referrers=referrers)
    blobs: dict[str, Descriptor] = {}
    omitted: dict[str, Descriptor] = {}
    entries: dict[str, dict] = {}
    for img in sorted(images, key=lambda i: i.key):
        g = graphs.graph(img.ref.name, img.descriptor.digest)
        entries[img.key] = index_entry(img.key, g.root.media_type, g.root.digest, g.root.size)
        blobs.update(g.manifests)
        for d, b in g.blobs.items():
            (omitted if d in omit else blobs).setdefault(d, b)
        by_subject: dict[str, list[Descriptor]] = {}
        for e in g.referrers:
            assert e.graph is not None  # nothing is present at a plan's destination
            blobs.update(e.graph.manifests)
            if e.tag:
                key = ref_key(img.ref.name, e.tag)
                entries[key] = index_entry(key, e.graph.root.media_type, e.descriptor.digest, e.graph.root.size)
            else:
                by_subject.setdefault(e.subject, []).append(e.descriptor)
        for subject, descs in by_subject.items():
            raw = referrers_index(descs)
            digest = layout.put_manifest(img.ref.name, sha256_digest(raw), OCI_INDEX, raw)
            key = ref_key(img.ref.name, fallback_tag(subject))
            entries[key] = index_entry(key, OCI_INDEX, digest, len(raw))
            blobs[digest] = Descriptor(OCI_INDEX, digest, len(raw))
    return ArchiveContent(list(images), blobs, omitted, index_document([entries[k] for k in sorted(entries)],
                                                                      annotations))


def write_archive(layout: LayoutDir, content: ArchiveContent, output: Path, *, split: int | None = None,
                  delta_doc: dict | None = None, progress: Callable[[int], None] | None = None,
                  compression: str | None = None) -> list[Path]:
    """Write the tar (or its parts) under temporary names, fsync, then rename into place.

    A blob file this run wrote itself was checked as it arrived; any other (left by an earlier
    run) is hashed again first: what the tar holds was checked.  Blob bytes are copied by the
    kernel (the work dir is beside the output, on the same file system); with `compression` (gzip,
    zstd: node tarballs) they stream through the encoder instead."""
    writer = open_tar_writer(output, split, compression)
    try:
        small = [(LAYOUT_FILE, dumps_json({"imageLayoutVersion": LAYOUT_VERSION})),
                 (INDEX_FILE, dumps_json(content.index))]
        if content.docker_manifest is not None:  # early in the file: a reader that scans for it stops soon
            small.append((DOCKER_MANIFEST_FILE, (json.dumps(content.docker_manifest, indent=2) + "\n").encode()))
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


