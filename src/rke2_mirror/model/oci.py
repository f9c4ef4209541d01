"""Media types, descriptors, manifest parsing and digest-checking streams.  Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import DigestMismatch, UnsupportedManifest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
SCHEMA1_TYPES = (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """`os/arch[/variant]`, e.g. linux/amd64, linux/arm64/v8, windows/amd64."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, obj: dict | None) -> "Platform | None":
        if not isinstance(obj, dict) or not isinstance(obj.get("os"), str) or not isinstance(obj.get("architecture"), str):
            return None  # no platform, or not one we can compare: never a crash further on

        def opt(key: str) -> str | None:
            v = obj.get(key)
            return v if isinstance(v, str) else None
        return cls(obj["os"], obj["architecture"], opt("variant"), opt("os.version"))

    def matches(self, wanted: "Platform") -> bool:
        """Does this (an image's) platform satisfy `wanted` (a user's filter)?"""
        if (self.os, self.architecture) != (wanted.os, wanted.architecture):
            return False
        if wanted.variant is None:
            return True
        mine = self.variant or ("v8" if self.architecture == "arm64" else None)
        return mine == wanted.variant

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        if self.variant:
            s += f"/{self.variant}"
        return s


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict | None = field(default=None, compare=False, hash=False)
    artifact_type: str | None = field(default=None, compare=False, hash=False)  # a referrer's (OCI 1.1)

    @classmethod
    def from_json(cls, obj: dict) -> "Descriptor":
        try:
            size = int(obj["size"])
            if size < 0 or not isinstance(obj["digest"], str) or not isinstance(obj.get("mediaType", ""), str):
                raise ValueError("size must be >= 0, digest and mediaType strings")
            annotations = obj.get("annotations")
            at = obj.get("artifactType")
            return cls(
                obj.get("mediaType", ""),
                obj["digest"],
                size,
                Platform.from_json(obj.get("platform")),
                annotations if isinstance(annotations, dict) else None,
                at if isinstance(at, str) and at else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise UnsupportedManifest(f"malformed descriptor {_short_repr(obj)}: {exc}") from None

    @classmethod
    def of_bytes(cls, media_type: str, raw: bytes) -> "Descriptor":
        return cls(media_type, sha256_digest(raw), len(raw))


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest or index; `raw` keeps the exact bytes (digests are of those)."""

    media_type: str
    raw: bytes
    manifests: tuple[Descriptor, ...] = ()  # index entries
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def children(self) -> list[Descriptor]:
        if self.is_index:
            return list(self.manifests)
        return ([self.config] if self.config else []) + list(self.layers)

    @property
    def blobs(self) -> list[Descriptor]:
        return [] if self.is_index else self.children

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor.of_bytes(self.media_type, self.raw)


_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """A digest safe to use as a file name (`sha256:` + 64 lower-case hex); anything else is refused."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        algo = digest.partition(":")[0] if isinstance(digest, str) else ""
        if algo and algo != "sha256" and re.match(r"^[a-z0-9+._-]+:[0-9a-fA-F]{32,}$", digest):
            raise UnsupportedManifest(f"unsupported digest algorithm {algo!r} in {digest}")
        raise UnsupportedManifest(f"invalid digest {digest!r}")
    return digest



def _short_repr(obj: object, limit: int = 200) -> str:
    """A hostile descriptor can be megabytes: messages show its start only."""
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "…"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_manifest(media_type: str | None, raw: bytes) -> Manifest:
    """Parse manifest bytes.  The media type comes from Content-Type, falling back to the body."""
    doc = jsondoc.loads(raw, "manifest", error=UnsupportedManifest, expect=dict)
    mt = (media_type or "").split(";")[0].strip()
    body_mt = doc.get("mediaType")
    if mt in ("", "application/json", "text/plain", "application/octet-stream"):
        mt = body_mt or ""
    if not mt:
        # OCI allows mediaType to be absent: infer from the shape.
        mt = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "config" in doc else ""
    if mt in SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise UnsupportedManifest(
            "Docker schema1 manifest: not supported (deprecated since 2017); re-push the image with a current client"
        )
    if mt in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise UnsupportedManifest("index has no manifests list")
        return Manifest(mt, raw, manifests=tuple(Descriptor.from_json(m) for m in entries),
                        subject=_subject(doc))
    if mt in MANIFEST_TYPES or ("config" in doc and "layers" in doc):
        if "config" not in doc:
            raise UnsupportedManifest("manifest has no config")
        layers = doc.get("layers") or []
        return Manifest(mt, raw, config=Descriptor.from_json(doc["config"]),
                        layers=tuple(Descriptor.from_json(l) for l in layers), subject=_subject(doc))
    raise UnsupportedManifest(f"unsupported manifest media type {mt or 'unknown'!r}")


def _subject(doc: dict) -> Descriptor | None:
    s = doc.get("subject")
    return Descriptor.from_json(s) if isinstance(s, dict) else None


def filter_index(manifest: Manifest, platforms: Iterable[Platform]) -> Manifest:
    """A new index holding only the entries matching one of `platforms` (other fields unchanged).

    Entries without a platform (attestations, signatures) are dropped: they would name
    manifests that are not copied.
    """
    wanted = list(platforms)
    doc = json.loads(manifest.raw)
    kept = [
        entry for entry, desc in zip(doc["manifests"], manifest.manifests)
        if desc.platform is not None and any(desc.platform.matches(p) for p in wanted)
    ]
    doc["manifests"] = kept
    raw = json.dumps(doc, indent=2).encode()
    return parse_manifest(manifest.media_type, raw)


class DigestingReader:
    """Wraps a chunk iterator: hashes while streaming, checks size and digest at the end.

    Raises DigestMismatch before the final chunk boundary is passed on as "done", so a consumer
    that finalizes only after exhaustion never commits wrong content.
    """

    def __init__(self, chunks: Iterable[bytes], expected: Descriptor, what: str | None = None):
        self._chunks = iter(chunks)
        self.expected = expected
        self.what = what or f"blob {expected.digest}"  # the subject of error messages
        algo, _, _ = expected.digest.partition(":")
        if algo != "sha256":
            raise UnsupportedManifest(f"unsupported digest algorithm {algo!r} for {expected.digest}")
        self._hash = hashlib.sha256()
        self.read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if not chunk:
                continue
            self.read += len(chunk)
            if self.read > self.expected.size:
                raise DigestMismatch(
                    f"{self.what}: more than the {self.expected.size} bytes its descriptor names"
                )
            self._hash.update(chunk)
            yield chunk
        self.check()

    def check(self) -> None:
        if self.read != self.expected.size:
            raise DigestMismatch(
                f"{self.what}: got {self.read} bytes, expected {self.expected.size}"
            )
        got = "sha256:" + self._hash.hexdigest()
        if got != self.expected.digest:
            raise DigestMismatch(f"{self.what}: content hashes to {got}")
