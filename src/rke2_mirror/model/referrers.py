"""Referrers: signatures, attestations and SBOMs that point at an image (OCI 1.1).  Pure: no I/O.

Three ways a registry holds them, all carried by the engine's walk as edges of the image graph:
- the referrers API (`GET /v2/<name>/referrers/<digest>`): manifests whose `subject` is the image;
- the referrers tag schema, for registries without the API: an index tagged `sha256-<hex>` of the
  subject listing the referrer descriptors (distribution spec 1.1, "Referrers Tag Schema");
- cosign's legacy tags `sha256-<hex>.sig`, `.att`, `.sbom`: ordinary manifests, no `subject`.

The kinds a user filters on (`--referrer-type`): `signature`, `attestation`, `sbom`, or an exact
artifact type (a media type).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import InputError, UnsupportedManifest
from rke2_mirror.model.oci import OCI_INDEX, Descriptor, check_digest

LEGACY_SUFFIXES = {".sig": "signature", ".att": "attestation", ".sbom": "sbom"}
MAX_REFERRERS = 1000  # per subject: real images carry a handful
MAX_REFERRER_DEPTH = 4  # image <- attestation <- its signature <- ...: cosign uses 2
KINDS = ("signature", "attestation", "sbom")

COSIGN_SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
BUNDLE_PREDICATE = "dev.sigstore.bundle.predicateType"
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"

_TYPES = {
    "signature": (COSIGN_SIGNATURE, "application/vnd.cncf.notary.signature",
                  "application/vnd.dev.cosign.simplesigning.v1+json"),
    "attestation": ("application/vnd.dsse.envelope.v1+json", "application/vnd.in-toto+json",
                    "application/vnd.dev.cosign.artifact.att.v1+json"),
    "sbom": ("application/spdx+json", "text/spdx", "application/vnd.cyclonedx+json", "application/vnd.cyclonedx",
             "application/vnd.syft+json", "application/vnd.dev.cosign.artifact.sbom.v1+json", "text/spdx+json"),
}
_SBOM_PREDICATES = ("spdx", "cyclonedx", "syft")
_TAG_RE = re.compile(r"^sha256-([0-9a-f]{64})(\.sig|\.att|\.sbom)?$")


def fallback_tag(subject: str) -> str:
    """The referrers tag schema's tag for `subject`: `sha256-<hex>`."""
    return check_digest(subject).replace(":", "-", 1)


def legacy_tags(subject: str) -> dict[str, str]:
    """cosign's tags for `subject`: tag -> kind."""
    base = fallback_tag(subject)
    return {base + suffix: kind for suffix, kind in LEGACY_SUFFIXES.items()}


def parse_referrer_tag(tag: str) -> tuple[str, str | None] | None:
    """(subject digest, legacy kind or None for the tag schema index) for a referrer tag, else None."""
    m = _TAG_RE.match(tag or "")
    if not m:
        return None
    return "sha256:" + m.group(1), LEGACY_SUFFIXES.get(m.group(2)) if m.group(2) else None


def kind_of(artifact_type: str | None, annotations: dict | None = None) -> str:
    """signature | attestation | sbom | other, from an artifact type (and a sigstore bundle's predicate)."""
    at = (artifact_type or "").split(";")[0].strip().lower()
    if at == SIGSTORE_BUNDLE or at.startswith("application/vnd.dev.sigstore.bundle"):
        pred = str((annotations or {}).get(BUNDLE_PREDICATE) or "")
        if not pred or pred == COSIGN_SIGN_PREDICATE:
            return "signature"
        return "sbom" if any(p in pred.lower() for p in _SBOM_PREDICATES) else "attestation"
    for kind, types in _TYPES.items():
        if at in types:
            return kind
    return "other"


@dataclass(frozen=True)
class ReferrerFilter:
    """Which referrers to carry: every one (empty), or those of the named kinds / exact artifact types."""

    kinds: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, values: Iterable[str]) -> "ReferrerFilter":
        kinds: set[str] = set()
        types: set[str] = set()
        for raw in values:
            v = raw.strip().lower()
            plural = v[:-1] if v.endswith("s") and v[:-1] in KINDS else v
            if plural in KINDS:
                kinds.add(plural)
            elif re.match(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$", v) and len(v) <= 255:
                types.add(v)
            else:
                raise InputError(f"--referrer-type {raw!r}: expected signature, attestation, sbom or a media type "
                                 "(e.g. application/spdx+json)")
        return cls(frozenset(kinds), frozenset(types))

    @property
    def everything(self) -> bool:
        return not self.kinds and not self.types

    def wants(self, artifact_type: str | None, kind: str) -> bool:
        if self.everything:
            return True
        return kind in self.kinds or (artifact_type or "").lower() in self.types

    @property
    def single_type(self) -> str | None:
        """The one exact type asked for (a registry can filter by it: `?artifactType=`)."""
        return next(iter(self.types)) if not self.kinds and len(self.types) == 1 else None


def referrer_descriptor(media_type: str, raw: bytes, digest: str) -> Descriptor:
    """The descriptor a referrers list gives for a manifest: artifactType (else its config's media type)
    and its annotations."""
    doc = jsondoc.loads(raw, "referrer manifest", error=UnsupportedManifest, expect=dict)
    at = doc.get("artifactType")
    if not isinstance(at, str) or not at:
        cfg = doc.get("config")
        at = cfg.get("mediaType") if isinstance(cfg, dict) and isinstance(cfg.get("mediaType"), str) else None
    ann = doc.get("annotations")
    return Descriptor(media_type, digest, len(raw), annotations=ann if isinstance(ann, dict) else None,
                      artifact_type=at)


def descriptor_json(d: Descriptor) -> dict:
    out: dict = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.artifact_type:
        out["artifactType"] = d.artifact_type
    if d.annotations:
        out["annotations"] = d.annotations
    return out


def parse_referrers_index(raw: bytes, what: str) -> list[Descriptor]:
    """The descriptors of a referrers answer or tag-schema index (bounded; each digest checked)."""
    doc = jsondoc.loads(raw, what, error=UnsupportedManifest, expect=dict)
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise UnsupportedManifest(f"{what}: not an image index (no manifests list)")
    if len(entries) > MAX_REFERRERS:
        raise UnsupportedManifest(f"{what}: more than {MAX_REFERRERS} referrers: refused")
    out = []
    for e in entries:
        if not isinstance(e, dict):
            raise UnsupportedManifest(f"{what}: an entry is not an object")
        d = Descriptor.from_json(e)
        check_digest(d.digest)
        out.append(d)
    return out


def referrers_index(descs: Iterable[Descriptor]) -> bytes:
    """A tag schema index listing `descs`."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor_json(d) for d in descs]}
    return json.dumps(doc, separators=(",", ":")).encode()


def merged_index(old: bytes | None, add: Descriptor, what: str) -> bytes | None:
    """The tag schema index with `add` in it (read-merge-write); None when it lists `add` already."""
    if old is None:
        doc: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        doc = jsondoc.loads(old, what, error=UnsupportedManifest, expect=dict)
        if not isinstance(doc.get("manifests"), list):
            raise UnsupportedManifest(f"{what}: not an image index (no manifests list)")
        if len(doc["manifests"]) >= MAX_REFERRERS:
            raise UnsupportedManifest(f"{what}: more than {MAX_REFERRERS} referrers: refused")
    if any(isinstance(e, dict) and e.get("digest") == add.digest for e in doc["manifests"]):
        return None
    doc["manifests"].append(descriptor_json(add))
    return json.dumps(doc, separators=(",", ":")).encode()
