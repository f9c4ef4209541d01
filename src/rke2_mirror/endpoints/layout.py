"""OCI image layout directories as copy-engine endpoints, and how index.json entries name images.

A layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md) is
`oci-layout`, `index.json` and `blobs/sha256/<hex>`; manifests are blobs too.  At a layout
endpoint the "repository" is the full image name (`docker.io/rancher/x`): a tag put there is
recorded in index.json with `org.opencontainers.image.ref.name` and `io.containerd.image.name`
both set to the full reference (`docker.io/rancher/x:v1`), which containerd (RKE2's image import)
and skopeo (`oci-archive:FILE:docker.io/rancher/x:v1`) read.

Naming rules for index.json entries written by any tool (`name_entries`), in this order:
1. `io.containerd.image.name` (containerd, docker save, rke2-mirror): a full reference.
2. `org.opencontainers.image.ref.name` holding a reference (it has a `/`, `:` or `@`:
   `docker.io/rancher/x:v1`, `alpine:3.19`, crane's `index.docker.io/library/alpine:3.19`).
3. A bare ref.name (`v1`, skopeo's `oci-archive:FILE:v1`) is a tag: the repository comes from
   `--name REPOSITORY` (like containerd's `--base-name`).
4. No name at all (skopeo's `oci-archive:FILE`): `--name REPOSITORY[:TAG]` names it (one such
   entry at most; tag `latest` by default).
An entry that cannot be named is an error (exit 2), never silently skipped.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rke2_mirror.model.errors import WorkDirError, DigestMismatch, InputError, MirrorError, NotFound, UnsupportedManifest
from rke2_mirror.engine.walk import walk
from rke2_mirror.endpoints.referrers import store_referrers, store_tagged
from rke2_mirror.model import jsondoc
from rke2_mirror.model.oci import OCI_INDEX, Descriptor, check_digest, parse_manifest, sha256_digest
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.model.referrers import fallback_tag, merged_index, parse_referrer_tag, referrer_descriptor

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
CHUNK = 1024 * 1024



def blob_member(digest: str) -> str:
    """The path of a blob inside a layout: `blobs/sha256/<hex>`."""
    return "blobs/sha256/" + check_digest(digest).split(":", 1)[1]


def is_digest(reference: str) -> bool:
    return reference.startswith("sha256:")


def ref_key(repo: str, reference: str) -> str:
    """The full reference string a layout records for (repository, tag-or-digest)."""
    return f"{repo}@{reference}" if is_digest(reference) else f"{repo}:{reference}"


def image_key(ref: ImageRef) -> str:
    """What the engine writes for `ref` at a layout: by tag when it has one, else by digest."""
    return ref_key(ref.name, ref.tag or ref.digest or "latest")


def manifest_media_type(raw: bytes, fallback: str = "") -> str:
    """A manifest's media type from its body (OCI allows it to be absent: inferred from the shape)."""
    try:
        return parse_manifest(fallback or None, raw).media_type
    except MirrorError:
        return fallback


# --------------------------------------------------------------------------- naming entries


@dataclass(frozen=True)
class NamedImage:
    """One image an index.json names: its reference and root descriptor."""

    ref: ImageRef
    descriptor: Descriptor
    how: str = ""  # which rule named it (for inspect)

    @property
    def key(self) -> str:
        return image_key(self.ref)


def _looks_like_reference(text: str) -> bool:
    return any(c in text for c in "/:@")


def parse_name_option(name: str | None) -> ImageRef | None:
    """`--name REPOSITORY[:TAG]`: the name for archive entries that carry none (or only a tag)."""
    if not name:
        return None
    try:
        return ImageRef.parse(name)
    except InputError:
        raise InputError(f"--name {name!r}: expected REPOSITORY[:TAG], e.g. docker.io/rancher/x") from None


def name_entries(index: dict, name: str | None = None, origin: str = "index.json") -> list[NamedImage]:
    """The images an index.json names, by the rules in this module's docstring."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InputError(f"{origin}: not an OCI index (no manifests list)")
    base = parse_name_option(name)
    out: list[NamedImage] = []
    unnamed: list[Descriptor] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{origin}: entry {i} is not an object")
        try:
            desc = Descriptor.from_json(entry)
            check_digest(desc.digest)
        except MirrorError as exc:
            raise InputError(f"{origin}: entry {i}: {exc}") from None
        ann = entry.get("annotations") if isinstance(entry.get("annotations"), dict) else {}
        ctr, refname = ann.get(CONTAINERD_NAME), ann.get(REF_NAME)
        for key, value in ((CONTAINERD_NAME, ctr), (REF_NAME, refname)):
            if value is not None and not isinstance(value, str):
                raise InputError(f"{origin}: entry {i} ({desc.digest}): {key} is not a string")
        ref: ImageRef | None = None
        how = ""
        for value, rule in ((ctr, CONTAINERD_NAME), (refname if refname and _looks_like_reference(refname) else None, REF_NAME)):
            if isinstance(value, str) and value:
                try:
                    ref = ImageRef.parse(value)
                    how = rule
                    break
                except InputError:
                    raise InputError(f"{origin}: entry {i} ({desc.digest}): {rule} {value!r} is not an image reference") from None
        if ref is None and isinstance(refname, str) and refname:
            if base is None:
                raise InputError(f"{origin}: entry {i} ({desc.digest}) is named only {refname!r} (a tag): "
                                 f"give --name REPOSITORY to name it, e.g. --name docker.io/rancher/x")
            try:
                ref = ImageRef(base.registry, base.repository, refname if not is_digest(refname) else None,
                               refname if is_digest(refname) else None)
                ImageRef.parse(str(ref))
            except InputError:
                raise InputError(f"{origin}: entry {i}: ref.name {refname!r} is not a valid tag") from None
            how = f"--name + {REF_NAME}"
        if ref is None:
            unnamed.append(desc)
            continue
        out.append(NamedImage(ref, desc, how))
    if unnamed:
        if base is None:
            raise InputError(f"{origin}: {len(unnamed)} entr{'y names' if len(unnamed) == 1 else 'ies name'} no image "
                             f"({unnamed[0].digest}): give --name REPOSITORY[:TAG] to name it")
        if len(unnamed) > 1:
            raise InputError(f"{origin}: {len(unnamed)} entries name no image; --name can name only one")
        out.append(NamedImage(base if base.tag or base.digest else base.with_tag("latest"), unnamed[0], "--name"))
    seen: dict[str, NamedImage] = {}
    for img in out:
        other = seen.get(img.key)
        if other is not None and other.descriptor.digest != img.descriptor.digest:
            raise InputError(f"{origin}: {img.key} is named twice, with different digests "
                             f"({other.descriptor.digest}, {img.descriptor.digest})")
        seen[img.key] = img
    return list(seen.values())


def is_referrer_entry(img: NamedImage) -> bool:
    """An index.json entry that holds referrers (a `sha256-<hex>` tag schema index, or cosign's
    `sha256-<hex>.sig`/`.att`/`.sbom`): carried with the image it refers to, never as an image of its own."""
    return bool(img.ref.tag) and parse_referrer_tag(img.ref.tag) is not None


def index_entry(key: str, media_type: str, digest: str, size: int) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size,
            "annotations": {CONTAINERD_NAME: key, REF_NAME: key}}


def index_document(entries: Iterable[dict], annotations: dict | None = None) -> dict:
    doc: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def dumps_json(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


# --------------------------------------------------------------------------- the endpoint


def _read_chunks(f, size: int | None = None) -> Iterator[bytes]:
    left = size
    while left is None or left > 0:
        n = CHUNK if left is None else min(CHUNK, left)
        b = f.read(n)
        if not b:
            return
        if left is not None:
            left -= len(b)
        yield b


class LayoutDir:
    """An OCI image layout directory: an `Endpoint` for the copy engine (target of `save`).

    Thread-safe.  Blobs are written to a temporary file in `blobs/sha256/`, hashed while written
    and renamed into place only when size and digest match; what exists with the right size is
    skipped.  index.json holds only tagged roots and is rewritten atomically after each tag.

    A manifest counts as present (`head_manifest`) only when everything it references is:
    an interrupted run leaves nothing that looks complete.  `assume_present` names blobs that
    count as present though absent (a delta: they are at the target already).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True,
                 assume_present: Iterable[str] = ()):
        self.path = Path(path)
        self.blob_dir = self.path / "blobs" / "sha256"
        self.assume_present = frozenset(assume_present)
        self._lock = threading.RLock()
        self._entries: dict[str, dict] = {}
        self._foreign: list[dict] = []  # entries we did not name: kept as they are
        self._annotations: dict = {}
        self._complete: set[str] = set()
        self._checked: set[str] = set()  # blob files this object wrote after checking their content
        self.write_error: OSError | None = None
        if create:
            try:
                self.blob_dir.mkdir(parents=True, exist_ok=True)
                if not (self.path / LAYOUT_FILE).exists():
                    self._write_file(self.path / LAYOUT_FILE, dumps_json({"imageLayoutVersion": LAYOUT_VERSION}))
            except OSError as exc:
                raise self._io_error(exc, f"cannot create the layout {self.path}") from None
            self._clean_temp()
        elif not (self.path / INDEX_FILE).is_file():
            raise InputError(f"{self.path}: not an OCI image layout (no index.json)")
        self._load_index()

    # -- index.json ------------------------------------------------------------------------
    def _load_index(self) -> None:
        p = self.path / INDEX_FILE
        if not p.is_file():
            return
        try:
            if p.stat().st_size > MAX_INDEX_BYTES:
                raise InputError(f"{p}: larger than {MAX_INDEX_BYTES} bytes")
            data = p.read_bytes()
        except OSError as exc:
            raise InputError(f"{p}: unreadable index.json ({exc.strerror or exc})") from None
        doc = jsondoc.loads(data, str(p), error=InputError)
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise InputError(f"{p}: not an OCI index")
        self._annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
        for entry in doc["manifests"]:
            ann = entry.get("annotations") if isinstance(entry, dict) else None
            key = ann.get(CONTAINERD_NAME) if isinstance(ann, dict) else None
            if isinstance(key, str) and key and ann.get(REF_NAME) == key:
                self._entries[key] = entry
            else:
                self._foreign.append(entry)

    def index(self) -> dict:
        with self._lock:
            return index_document([self._entries[k] for k in sorted(self._entries)] + self._foreign,
                                  self._annotations)

    def images(self, name: str | None = None) -> list[NamedImage]:
        return name_entries(self.index(), name, str(self.path / INDEX_FILE))

    def entry(self, key: str) -> dict | None:
        with self._lock:
            return self._entries.get(key)

    def _write_index(self) -> None:
        self._write_file(self.path / INDEX_FILE, dumps_json(self.index()))

    def tag(self, key: str, media_type: str, digest: str, size: int) -> None:
        """Record `key` (a full reference) as naming the manifest `digest` in index.json."""
        with self._lock:
            self._entries[key] = index_entry(key, media_type, digest, size)
            try:
                self._write_index()
            except OSError as exc:
                raise self._io_error(exc, f"cannot write {self.path / INDEX_FILE}") from None

    # -- files -----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.path / blob_member(digest)

    def _temp_name(self, hint: str) -> Path:
        return self.blob_dir / f".tmp-{hint[:12]}-{uuid.uuid4().hex[:12]}"

    def _clean_temp(self) -> None:
        for p in self.blob_dir.glob(".*"):  # only our temporary files are hidden
            try:
                p.unlink()
            except OSError:
                pass

    def _write_file(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")  # unpredictable, created exclusively
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _io_error(self, exc: OSError, what: str) -> WorkDirError:
        with self._lock:
            if self.write_error is None:
                self.write_error = exc
        return WorkDirError(f"{what}: {exc.strerror or exc}")

    def _read_manifest_file(self, digest: str) -> bytes | None:
        p = self.blob_path(digest)
        try:
            if p.stat().st_size > MAX_MANIFEST_BYTES:
                return None
            raw = p.read_bytes()
        except OSError:
            return None
        return raw if sha256_digest(raw) == digest else None

    def _is_complete(self, digest: str, media_type: str = "") -> bool:
        """Is every manifest and blob under this manifest here (the engine's walk, read from this layout)?"""
        if digest in self._complete:
            return True
        raw = self._read_manifest_file(digest)
        if raw is None:
            return False
        try:
            g = walk(self, "", parse_manifest(media_type or None, raw), root_digest=digest)
        except MirrorError:
            return False
        ok = all(d in self.assume_present or self._has_blob(b) for d, b in g.blobs.items())
        if ok:
            with self._lock:
                self._complete.add(digest)
        return ok

    def checked_here(self, digest: str) -> bool:
        """Did this object write that blob file itself, after checking its size and digest?
        (Files found from an earlier run were checked then, but are not vouched for now.)"""
        with self._lock:
            return digest in self._checked

    def _has_blob(self, desc: Descriptor) -> bool:
        try:
            return self.blob_path(desc.digest).stat().st_size == desc.size
        except OSError:
            return False

    # -- Endpoint --------------------------------------------------------------------------
    def location(self, repo: str, reference: str) -> str:
        return f"{self.path}:{ref_key(repo, reference)}"

    def _resolve(self, repo: str, reference: str) -> tuple[str, str]:
        """(digest, media type from index.json or '') of a tag or digest."""
        if is_digest(reference):
            return check_digest(reference), ""
        entry = self.entry(ref_key(repo, reference))
        if entry is None:
            raise NotFound(f"{self.location(repo, reference)}: no such tag in the layout")
        return check_digest(entry.get("digest", "")), entry.get("mediaType", "")

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        try:
            digest, mt = self._resolve(repo, reference)
        except NotFound:
            return None
        if not self._is_complete(digest, mt):
            return None
        raw = self._read_manifest_file(digest) or b""
        return Descriptor(mt or manifest_media_type(raw), digest, len(raw))

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        digest, mt = self._resolve(repo, reference)
        p = self.blob_path(digest)
        try:
            size = p.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise UnsupportedManifest(f"{self.location(repo, reference)}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            raw = p.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.location(repo, reference)}: manifest {digest} not in the layout") from None
        except OSError as exc:
            raise WorkDirError(f"cannot read {p}: {exc.strerror or exc}") from None
        if sha256_digest(raw) != digest:
            raise DigestMismatch(f"manifest {digest} in {self.path}: content hashes to {sha256_digest(raw)}")
        return Descriptor.of_bytes(mt or manifest_media_type(raw), raw), raw

    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str:
        digest = sha256_digest(raw)
        if is_digest(reference) and reference != digest:
            raise DigestMismatch(f"manifest for {self.location(repo, reference)} hashes to {digest}")
        p = self.blob_path(digest)
        if not (p.is_file() and p.stat().st_size == len(raw)):
            try:
                self._write_file(p, raw)
            except OSError as exc:
                raise self._io_error(exc, f"cannot write {p}") from None
            with self._lock:
                self._checked.add(digest)
        if not is_digest(reference):
            self.tag(ref_key(repo, reference), media_type, digest, len(raw))
        if b'"subject"' in raw:
            subject = parse_manifest(media_type or None, raw).subject
            if subject is not None:
                self._add_referrer(repo, subject.digest, referrer_descriptor(media_type, raw, digest))
        return digest

    # -- referrers: the tag schema, as index.json entries (endpoints/referrers.py) ------------
    def _add_referrer(self, repo: str, subject: str, desc: Descriptor) -> None:
        tag = fallback_tag(subject)
        with self._lock:
            try:
                old = self.get_manifest(repo, tag)[1]
            except NotFound:
                old = None
            new = merged_index(old, desc, self.location(repo, tag))
            if new is not None:
                self.put_manifest(repo, tag, OCI_INDEX, new)

    def referrers(self, repo: str, subject: str, filt=None) -> list[Descriptor]:
        return store_referrers(self.get_manifest, repo, subject)

    def tagged_artifacts(self, repo: str, subject: str) -> list[tuple[str, str]]:
        return store_tagged(lambda r, t: self.entry(ref_key(r, t)) is not None, repo, subject)

    def repository_is_new(self, repo: str) -> bool:
        return False  # existence checks are local and cheap here: always make them

    def has_blob(self, repo: str, desc: Descriptor) -> bool:
        return self._has_blob(desc)

    def reuse_blob(self, repo: str, desc: Descriptor, *, fresh: bool, mount_from: str | None) -> bool:
        return self._has_blob(desc)  # one blob store for every repository of a layout: a file check is cheap

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        p = self.blob_path(desc.digest)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {desc.digest} not in {self.path}") from None
        except OSError as exc:
            raise WorkDirError(f"cannot read {p}: {exc.strerror or exc}") from None
        with f:
            yield _read_chunks(f)

    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        """Write to a temporary file, renamed into place once `chunks` (checked by the engine: it raises
        before its end on a wrong size or digest) is exhausted."""
        final = self.blob_path(desc.digest)
        if self._has_blob(desc):
            return
        tmp = self._temp_name(desc.digest.split(":", 1)[1])
        try:
            try:
                f = open(tmp, "xb")
            except OSError as exc:
                raise self._io_error(exc, f"cannot write {tmp}") from None
            with f:
                try:
                    for chunk in chunks:
                        f.write(chunk)
                    f.flush()
                except OSError as exc:
                    raise self._io_error(exc, f"cannot write {final}") from None
            os.replace(tmp, final)
            with self._lock:
                self._checked.add(desc.digest)
        finally:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        pass


@dataclass
class LayoutLocator:
    """Every image goes into one layout, under its full name (`docker.io/rancher/x`)."""

    layout: LayoutDir

    def locate(self, ref: ImageRef) -> tuple[LayoutDir, str]:
        return self.layout, ref.name


__all__ = ["LayoutDir", "LayoutLocator", "NamedImage", "WorkDirError", "name_entries", "index_entry",
           "index_document", "blob_member", "check_digest", "image_key", "ref_key", "REF_NAME", "CONTAINERD_NAME"]
