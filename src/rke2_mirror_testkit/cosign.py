"""A cosign look-alike for tests: real ECDSA P-256 signatures in both of cosign's registry layouts,
SBOM and in-toto attestation referrers, and an independent verifier.

Independent of rke2_mirror's code (plain :class:`~rke2_mirror_testkit.images.ImagePusher` / httpx), so
tests can check what the product copied without trusting the product.

Layouts (shapes taken from sigstore/cosign, ``pkg/oci/remote/write.go``, ``internal/pkg/oci/remote/
remote.go``, ``cmd/cosign/cli/attach/sbom.go``, ``cmd/cosign/cli/attest/attest.go``, ``pkg/types``):

- **tag form** (cosign's default, "legacy"): an OCI image manifest tagged ``sha256-<hex>.sig`` whose
  layer is the simple-signing payload (:data:`COSIGN_SIMPLESIGNING`) with the annotation
  ``dev.cosignproject.cosign/signature`` = base64 of the ASN.1 DER ECDSA-P256/SHA-256 signature over
  the payload bytes.  :func:`sign_tag_form`.
- **referrer form** (``cosign sign --registry-referrers-mode=oci-1-1``): the same layer in a manifest
  with ``subject`` (the signed manifest's descriptor) and ``artifactType``
  :data:`SIG_ARTIFACT_TYPE`, pushed by digest.  ``config_style="empty"`` (default) uses the OCI empty
  descriptor (``application/vnd.oci.empty.v1+json``, the blob ``{}``) as config, the usual OCI 1.1
  artifact; ``config_style="cosign"`` does what cosign itself does: config ``mediaType`` =
  :data:`SIG_ARTIFACT_TYPE` over the signature image's config file.  :func:`sign_referrer_form`.
- SBOM referrer, :func:`attach_sbom_referrer`: ``style="cosign"`` is ``cosign attach sbom
  --registry-referrers-mode=oci-1-1``: **no** ``artifactType`` field, config ``mediaType``
  :data:`SBOM_ARTIFACT_TYPE` (so the referrers list takes the artifactType from the config), layer
  ``text/spdx+json``; ``style="oras"`` is ``oras attach --artifact-type application/spdx+json``:
  ``artifactType`` :data:`SPDX_JSON`, empty config, layer ``application/spdx+json``.
- attestation referrer, :func:`attest_referrer`: cosign's ``WriteAttestationsReferrer``:
  ``artifactType`` :data:`INTOTO_ARTIFACT_TYPE`, empty config, one DSSE envelope layer
  (:data:`DSSE_ENVELOPE`, annotations ``predicateType`` and an empty cosign signature annotation),
  manifest annotation ``org.opencontainers.image.created``.

Whenever a referrer is pushed and the registry's PUT answer lacks ``OCI-Subject`` (distribution 2.8),
the referrers *tag schema* index (``sha256-<hex>``, distribution-spec "Pushing Manifests with
Subject") is read, merged and written back (``fallback_tag="auto"``; ``True`` always, ``False``
never).  :func:`find_referrers` reads them back the way the spec tells clients to (referrers API,
then the tag schema on 404); :func:`verify` / :func:`verify_attestation` check signatures.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from pathlib import Path
from typing import Literal, Mapping, Sequence
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rke2_mirror_testkit.images import (
    ALL_MANIFEST_TYPES,
    COSIGN_SIMPLESIGNING,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    ImagePusher,
    push_blob,
    read_manifest,
    sha256_digest,
)

__all__ = [
    "SIG_ARTIFACT_TYPE",
    "SBOM_ARTIFACT_TYPE",
    "INTOTO_ARTIFACT_TYPE",
    "DSSE_ENVELOPE",
    "SPDX_JSON",
    "COSIGN_SPDX_JSON",
    "OCI_EMPTY",
    "EMPTY_JSON",
    "EMPTY_DESCRIPTOR",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING_TYPE",
    "VerificationError",
    "new_key",
    "public_pem_of",
    "sign_bytes",
    "simple_signing_payload",
    "referrers_tag",
    "signature_tag",
    "descriptor_of",
    "push_referrer",
    "update_referrers_tag",
    "sign_tag_form",
    "sign_referrer_form",
    "sign_referrer_of",
    "attach_sbom_referrer",
    "attest_referrer",
    "find_referrers",
    "verify",
    "verify_attestation",
]

SIG_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"  # ArtifactType("sig")
SBOM_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sbom.v1+json"  # ArtifactType("sbom")
INTOTO_ARTIFACT_TYPE = "application/vnd.in-toto+json"  # cosign pkg/types IntotoPayloadType
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"  # cosign pkg/types DssePayloadType
SPDX_JSON = "application/spdx+json"  # IANA media type; what `oras attach` users pass for SPDX
COSIGN_SPDX_JSON = "text/spdx+json"  # cosign pkg/types SPDXJSONMediaType (layer of `attach sbom`)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DESCRIPTOR = {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)}
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLESIGNING_TYPE = "cosign container image signature"
DEFAULT_CREATED = "2024-01-01T00:00:00Z"
DEFAULT_PREDICATE_TYPE = "https://cosign.sigstore.dev/attestation/v1"
_ZERO_TIME = "0001-01-01T00:00:00Z"
_ACCEPT_ANY = (OCI_INDEX, OCI_MANIFEST) + tuple(t for t in ALL_MANIFEST_TYPES if t not in (OCI_INDEX, OCI_MANIFEST))

Verify = ssl.SSLContext | str | Path | bool


class VerificationError(Exception):
    """A signature or attestation could not be verified; the message says why."""


# --------------------------------------------------------------------------- keys and payloads


def new_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh ECDSA P-256 key (what ``cosign generate-key-pair`` makes) and its public PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, public_pem_of(key)


def public_pem_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo), the format of ``cosign.pub``."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_bytes(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """base64 (standard alphabet) of the ASN.1 DER ECDSA/SHA-256 signature over ``data``."""
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def simple_signing_payload(image_digest: str, identity: str) -> bytes:
    """cosign's payload: ``{"critical":{"identity":{"docker-reference":...},"image":{"docker-manifest-
    digest":...},"type":"cosign container image signature"},"optional":null}`` (compact, that key order)."""
    return json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": identity},
                "image": {"docker-manifest-digest": image_digest},
                "type": SIMPLESIGNING_TYPE,
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding (what a DSSE signature covers)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _load_public(public_pem: bytes | str) -> ec.EllipticCurvePublicKey:
    if isinstance(public_pem, str):
        public_pem = public_pem.encode()
    try:
        pub = serialization.load_pem_public_key(public_pem)
    except ValueError as e:
        raise VerificationError(f"cannot read the public key: {e}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise VerificationError(f"the public key is {type(pub).__name__}, not an ECDSA key")
    return pub


def _signature_ok(pub: ec.EllipticCurvePublicKey, b64sig: str, data: bytes) -> bool:
    try:
        sig = base64.b64decode(b64sig, validate=True)
    except (ValueError, TypeError):
        return False
    try:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


# --------------------------------------------------------------------------- names and descriptors


def referrers_tag(digest: str) -> str:
    """The referrers tag schema tag of ``digest`` (distribution-spec "Referrers Tag Schema"):
    algorithm truncated to 32, ``-``, encoded part truncated to 64, other characters -> ``-``."""
    algo, _, encoded = digest.partition(":")
    return re.sub(r"[^a-zA-Z0-9._-]", "-", f"{algo[:32]}-{encoded[:64]}")


def signature_tag(image_digest: str) -> str:
    """cosign's legacy signature tag ``sha256-<hex>.sig``."""
    return image_digest.replace(":", "-", 1) + ".sig"


def _host_of(pusher: ImagePusher) -> str:
    return pusher.url.split("://", 1)[-1].rstrip("/")


def descriptor_of(pusher: ImagePusher, repo: str, digest: str) -> dict:
    """``{mediaType, digest, size}`` of the manifest ``repo@digest`` as the registry serves it."""
    mt, data, got = read_manifest(pusher, repo, digest, accept=_ACCEPT_ANY)
    if got != digest:
        raise RuntimeError(f"{repo}@{digest}: the registry served bytes hashing to {got}")
    try:
        mt = json.loads(data).get("mediaType") or mt
    except (ValueError, AttributeError):
        pass
    return {"mediaType": mt, "digest": digest, "size": len(data)}


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _put_manifest(pusher: ImagePusher, repo: str, ref: str, data: bytes, media_type: str):
    r = pusher.request("PUT", f"/v2/{repo}/manifests/{ref}", repo=repo, content=data,
                       headers={"Content-Type": media_type})
    if r.status_code != 201:
        raise RuntimeError(f"PUT manifest {repo}:{ref}: {r.status_code} {r.text}")
    digest = sha256_digest(data)
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise RuntimeError(f"registry computed digest {got}, expected {digest}")
    return digest, r


# --------------------------------------------------------------------------- referrers


def update_referrers_tag(pusher: ImagePusher, repo: str, subject_digest: str, descriptor: Mapping) -> str:
    """Add ``descriptor`` to the referrers tag schema index of ``subject_digest`` (read, merge, write;
    no duplicate digests).  Returns the index digest.  Raises ``RuntimeError`` when the tag holds
    something other than an OCI image index (the spec: report a failure, change nothing)."""
    tag = referrers_tag(subject_digest)
    try:  # accept everything: distribution answers 404 to an Accept that excludes what the tag holds
        mt, data, _ = read_manifest(pusher, repo, tag, accept=_ACCEPT_ANY)
    except LookupError:
        index: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        try:
            index = json.loads(data)
        except ValueError:
            index = None  # type: ignore[assignment]
        if mt != OCI_INDEX or not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise RuntimeError(f"{repo}:{tag} is a {mt or 'non-JSON'} document, not a referrers index")
        index.setdefault("manifests", [])
    if not any(isinstance(d, dict) and d.get("digest") == descriptor["digest"] for d in index["manifests"]):
        index["manifests"].append(dict(descriptor))
    digest, _ = _put_manifest(pusher, repo, tag, _dumps(index), OCI_INDEX)
    return digest


def push_referrer(
    pusher: ImagePusher,
    repo: str,
    subject: Mapping,
    *,
    artifact_type: str | None,
    layers: Sequence[tuple[Blob, Mapping[str, str] | None]],
    config: Blob | None = None,
    config_media_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    fallback_tag: bool | Literal["auto"] = "auto",
) -> str:
    """Push an OCI 1.1 artifact manifest referring to ``subject`` (``{mediaType, digest, size}``), by
    digest: blobs first, then the manifest.  ``config`` defaults to the OCI empty descriptor (blob
    ``{}``); ``artifact_type=None`` leaves the field out (the referrers list then shows the config's
    mediaType).  Maintains the referrers tag schema per ``fallback_tag``.  Returns the digest."""
    for blob, _ in layers:
        push_blob(pusher, repo, blob)
    if config is None:
        push_blob(pusher, repo, Blob.of(EMPTY_JSON, OCI_EMPTY))
        config_desc = dict(EMPTY_DESCRIPTOR)
    else:
        push_blob(pusher, repo, config)
        config_desc = config.descriptor(config_media_type or config.media_type)
    manifest: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    manifest["config"] = config_desc
    manifest["layers"] = [b.descriptor(**({"annotations": dict(a)} if a else {})) for b, a in layers]
    manifest["subject"] = {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]}
    if annotations:
        manifest["annotations"] = dict(annotations)
    data = _dumps(manifest)
    digest, r = _put_manifest(pusher, repo, sha256_digest(data), data, OCI_MANIFEST)
    if fallback_tag is True or (fallback_tag == "auto" and not r.headers.get("OCI-Subject")):
        desc: dict = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
                      "artifactType": artifact_type or config_desc["mediaType"]}
        if annotations:
            desc["annotations"] = dict(annotations)
        update_referrers_tag(pusher, repo, subject["digest"], desc)
    return digest


def _signature_config(layer_digest: str) -> Blob:
    """The config file cosign's signature image carries (go-containerregistry's empty image plus one layer)."""
    config = {
        "architecture": "",
        "created": _ZERO_TIME,
        "history": [{"created": _ZERO_TIME}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "config": {},
    }
    return Blob.of(_dumps(config), OCI_CONFIG)


def _payload_layer(key, image_digest: str, identity: str, payload: bytes | None) -> tuple[Blob, dict]:
    data = payload if payload is not None else simple_signing_payload(image_digest, identity)
    return Blob.of(data, COSIGN_SIMPLESIGNING), {SIGNATURE_ANNOTATION: sign_bytes(key, data)}


def sign_tag_form(
    pusher: ImagePusher,
    repo: str,
    image_digest: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    identity: str | None = None,
    payload: bytes | None = None,
) -> str:
    """cosign's legacy layout: tag ``sha256-<hex>.sig`` -> manifest with the signed payload layer.
    ``identity`` defaults to ``<registry host>/<repo>``; ``payload`` replaces the simple-signing
    payload (signed as given: for hostile tests).  Returns the signature manifest's digest."""
    layer, ann = _payload_layer(key, image_digest, identity or f"{_host_of(pusher)}/{repo}", payload)
    config = _signature_config(layer.digest)
    push_blob(pusher, repo, layer)
    push_blob(pusher, repo, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(OCI_CONFIG),
        "layers": [layer.descriptor(annotations=ann)],
    }
    digest, _ = _put_manifest(pusher, repo, signature_tag(image_digest), _dumps(manifest), OCI_MANIFEST)
    return digest


def sign_referrer_form(
    pusher: ImagePusher,
    repo: str,
    subject: Mapping,
    key: ec.EllipticCurvePrivateKey,
    *,
    identity: str | None = None,
    fallback_tag: bool | Literal["auto"] = "auto",
    config_style: Literal["empty", "cosign"] = "empty",
    annotations: Mapping[str, str] | None = None,
    payload: bytes | None = None,
) -> str:
    """``cosign sign --registry-referrers-mode=oci-1-1``: the signature as a referrer of ``subject``
    (``{mediaType, digest, size}``; any manifest, a referrer too), artifactType
    :data:`SIG_ARTIFACT_TYPE`.  Returns the signature manifest's digest."""
    if config_style not in ("empty", "cosign"):
        raise ValueError(f"config_style must be 'empty' or 'cosign', not {config_style!r}")
    layer, ann = _payload_layer(key, subject["digest"], identity or f"{_host_of(pusher)}/{repo}", payload)
    config = _signature_config(layer.digest) if config_style == "cosign" else None
    return push_referrer(pusher, repo, subject, artifact_type=SIG_ARTIFACT_TYPE, layers=[(layer, ann)],
                         config=config, config_media_type=SIG_ARTIFACT_TYPE, annotations=annotations,
                         fallback_tag=fallback_tag)


def sign_referrer_of(
    pusher: ImagePusher,
    repo: str,
    digest: str,
    key: ec.EllipticCurvePrivateKey,
    **kw,
) -> str:
    """:func:`sign_referrer_form` of the manifest ``repo@digest`` as the registry has it (its
    descriptor read back first): e.g. a signature of an attestation or of an SBOM referrer."""
    return sign_referrer_form(pusher, repo, descriptor_of(pusher, repo, digest), key, **kw)


def _default_sbom(subject_digest: str, name: str) -> bytes:
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"https://rke2-mirror.test/spdx/{subject_digest.replace(':', '-')}",
        "creationInfo": {"created": DEFAULT_CREATED, "creators": ["Tool: rke2-mirror-testkit"]},
        "packages": [
            {
                "SPDXID": "SPDXRef-image",
                "name": name,
                "downloadLocation": "NOASSERTION",
                "checksums": [{"algorithm": "SHA256", "checksumValue": subject_digest.partition(":")[2]}],
            }
        ],
        "relationships": [
            {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-image"}
        ],
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def attach_sbom_referrer(
    pusher: ImagePusher,
    repo: str,
    subject: Mapping,
    *,
    sbom: bytes | None = None,
    style: Literal["cosign", "oras"] = "cosign",
    fallback_tag: bool | Literal["auto"] = "auto",
    created: str = DEFAULT_CREATED,
) -> str:
    """An SPDX JSON SBOM (a small deterministic one by default) as a referrer of ``subject``.

    ``style="cosign"``: as ``cosign attach sbom --type spdx --registry-referrers-mode=oci-1-1`` --
    no ``artifactType``, config mediaType :data:`SBOM_ARTIFACT_TYPE`, layer :data:`COSIGN_SPDX_JSON`;
    the referrers list shows artifactType :data:`SBOM_ARTIFACT_TYPE`.  ``style="oras"``: as ``oras
    attach --artifact-type application/spdx+json`` -- artifactType :data:`SPDX_JSON`, empty config,
    layer :data:`SPDX_JSON` titled ``sbom.spdx.json``, annotation ``org.opencontainers.image.created``.
    Returns the SBOM manifest's digest."""
    data = sbom if sbom is not None else _default_sbom(subject["digest"], f"{_host_of(pusher)}/{repo}")
    if style == "cosign":
        layer = Blob.of(data, COSIGN_SPDX_JSON)
        return push_referrer(pusher, repo, subject, artifact_type=None, layers=[(layer, None)],
                             config=_signature_config(layer.digest), config_media_type=SBOM_ARTIFACT_TYPE,
                             fallback_tag=fallback_tag)
    if style == "oras":
        layer = Blob.of(data, SPDX_JSON)
        return push_referrer(pusher, repo, subject, artifact_type=SPDX_JSON,
                             layers=[(layer, {"org.opencontainers.image.title": "sbom.spdx.json"})],
                             annotations={"org.opencontainers.image.created": created}, fallback_tag=fallback_tag)
    raise ValueError(f"style must be 'cosign' or 'oras', not {style!r}")


def attest_referrer(
    pusher: ImagePusher,
    repo: str,
    subject: Mapping,
    key: ec.EllipticCurvePrivateKey,
    *,
    predicate_type: str = DEFAULT_PREDICATE_TYPE,
    predicate: Mapping | None = None,
    identity: str | None = None,
    fallback_tag: bool | Literal["auto"] = "auto",
    created: str = DEFAULT_CREATED,
) -> str:
    """An in-toto statement about ``subject`` in a DSSE envelope signed with ``key``, pushed as
    cosign's ``WriteAttestationsReferrer`` does (artifactType :data:`INTOTO_ARTIFACT_TYPE`, empty
    config, layer :data:`DSSE_ENVELOPE`).  Returns the attestation manifest's digest."""
    algo, _, hexpart = subject["digest"].partition(":")
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": predicate_type,
        "subject": [{"name": identity or f"{_host_of(pusher)}/{repo}", "digest": {algo: hexpart}}],
        "predicate": dict(predicate) if predicate is not None else {"Data": "rke2-mirror test attestation",
                                                                     "Timestamp": created},
    }
    body = _dumps(statement)
    envelope = {
        "payloadType": INTOTO_ARTIFACT_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": "", "sig": sign_bytes(key, _pae(INTOTO_ARTIFACT_TYPE, body))}],
    }
    layer = Blob.of(_dumps(envelope), DSSE_ENVELOPE)
    return push_referrer(pusher, repo, subject, artifact_type=INTOTO_ARTIFACT_TYPE,
                         layers=[(layer, {"predicateType": predicate_type, SIGNATURE_ANNOTATION: ""})],
                         annotations={"org.opencontainers.image.created": created}, fallback_tag=fallback_tag)


# --------------------------------------------------------------------------- discovery


def find_referrers(
    pusher: ImagePusher,
    repo: str,
    digest: str,
    *,
    artifact_type: str | None = None,
) -> tuple[list[dict], str]:
    """``(descriptors, via)``: the referrers of ``repo@digest`` as a spec client finds them -- the
    referrers API (all ``Link`` pages; ``via="referrers-api"``), else on 404 the tag schema index
    (``via="tag-schema"``; none when that tag is missing or not an index).  Filtered by
    ``artifact_type`` client-side too.  Other answers raise ``RuntimeError``."""
    q = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
    url: str | None = f"/v2/{repo}/referrers/{digest}{q}"
    found: list[dict] = []
    via = "referrers-api"
    while url:
        r = pusher.request("GET", url, repo=repo, headers={"Accept": OCI_INDEX})
        if r.status_code == 404 and not found:
            via = "tag-schema"
            try:
                mt, data, _ = read_manifest(pusher, repo, referrers_tag(digest), accept=_ACCEPT_ANY)
                index = json.loads(data)
                found = list(index.get("manifests") or []) if mt == OCI_INDEX and isinstance(index, dict) else []
            except (LookupError, ValueError, AttributeError):
                found = []
            break
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
        found.extend(r.json().get("manifests") or [])
        m = re.match(r"\s*<([^>]+)>\s*;\s*rel=\"?next\"?", r.headers.get("Link") or "")
        url = m.group(1) if m else None
    out = [d for d in found if isinstance(d, dict) and isinstance(d.get("digest"), str)]
    if artifact_type:
        out = [d for d in out if d.get("artifactType") == artifact_type]
    return out, via


def _fetch_checked_blob(pusher: ImagePusher, repo: str, desc: Mapping, what: str) -> bytes:
    digest = desc.get("digest")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise VerificationError(f"{what}: unsupported or missing digest {digest!r}")
    r = pusher.request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, follow_redirects=True)
    if r.status_code == 404:
        raise VerificationError(f"{what}: blob {repo}@{digest} is missing")
    if r.status_code != 200:
        raise VerificationError(f"{what}: GET blob {repo}@{digest} answered {r.status_code}")
    data = r.content
    got = sha256_digest(data)
    if got != digest:
        raise VerificationError(f"{what}: blob {repo}@{digest} has the wrong content (sha256 {got})")
    if desc.get("size") is not None and desc.get("size") != len(data):
        raise VerificationError(f"{what}: blob {repo}@{digest} is {len(data)} bytes, the manifest says {desc.get('size')}")
    return data


def _fetch_checked_manifest(pusher: ImagePusher, repo: str, ref: str, what: str,
                            expect_digest: str | None = None, expect_size: int | None = None) -> tuple[bytes, dict]:
    try:
        _, data, got = read_manifest(pusher, repo, ref, accept=_ACCEPT_ANY)
    except LookupError:
        raise VerificationError(f"{what}: {repo}:{ref} not found") from None
    except (RuntimeError, httpx.HTTPError) as e:  # 401/403/5xx, connection trouble
        raise VerificationError(f"{what}: {e}") from None
    if expect_digest and got != expect_digest:
        raise VerificationError(f"{what}: {repo}@{expect_digest} served bytes hashing to {got}")
    if expect_size is not None and expect_size != len(data):
        raise VerificationError(f"{what}: {repo}@{got} is {len(data)} bytes, its descriptor says {expect_size}")
    try:
        doc = json.loads(data)
    except ValueError:
        raise VerificationError(f"{what}: {repo}:{ref} is not JSON") from None
    if not isinstance(doc, dict):
        raise VerificationError(f"{what}: {repo}:{ref} is not a JSON object")
    return data, doc


def _check_image(pusher: ImagePusher, repo: str, image_digest: str) -> str:
    """The signed manifest must be at the registry under its digest and hash to it; returns its media type."""
    _, doc = _fetch_checked_manifest(pusher, repo, image_digest, "signed image", expect_digest=image_digest)
    return doc.get("mediaType") or ""


def _candidates(pusher: ImagePusher, repo: str, digest: str, form: str,
                artifact_type: str) -> tuple[list[tuple[str, bytes, dict]], str]:
    """``[(manifest digest, bytes, doc)]`` of the signature/attestation manifests found, and how."""
    if form == "tag":
        tag = signature_tag(digest)
        data, doc = _fetch_checked_manifest(pusher, repo, tag, "signature tag")
        return [(sha256_digest(data), data, doc)], "tag"
    if form != "referrer":
        raise ValueError(f"form must be 'tag' or 'referrer', not {form!r}")
    try:
        descs, via = find_referrers(pusher, repo, digest, artifact_type=artifact_type)
    except RuntimeError as e:
        raise VerificationError(f"listing referrers of {repo}@{digest}: {e}") from None
    if not descs:
        raise VerificationError(f"no referrer of {repo}@{digest} with artifactType {artifact_type} "
                                f"(looked via {via})")
    out = []
    for d in descs:
        data, doc = _fetch_checked_manifest(pusher, repo, d["digest"], f"referrer {d['digest']}",
                                            expect_digest=d["digest"], expect_size=d.get("size"))
        subject = doc.get("subject")
        if not isinstance(subject, dict) or subject.get("digest") != digest:
            raise VerificationError(f"referrer {d['digest']} is listed for {digest} but its subject is "
                                    f"{subject.get('digest') if isinstance(subject, dict) else None}")
        at = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
        if at != artifact_type:
            raise VerificationError(f"referrer {d['digest']} is listed as {artifact_type} but is a {at}")
        out.append((d["digest"], data, doc))
    return out, via


def _check_blobs(pusher: ImagePusher, repo: str, doc: dict, what: str) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    config = doc.get("config")
    if not isinstance(config, dict):
        raise VerificationError(f"{what}: no config descriptor")
    blobs[config.get("digest")] = _fetch_checked_blob(pusher, repo, config, f"{what} config")
    for i, layer in enumerate(doc.get("layers") or []):
        if not isinstance(layer, dict):
            raise VerificationError(f"{what}: layer {i} is not a descriptor")
        blobs[layer.get("digest")] = _fetch_checked_blob(pusher, repo, layer, f"{what} layer {i}")
    return blobs


def verify(
    reader_url: str,
    repo: str,
    image_digest: str,
    public_pem: bytes | str,
    *,
    form: Literal["tag", "referrer"],
    verify: Verify = True,
    auth: tuple[str, str] | None = None,
    identity: str | None = None,
) -> dict:
    """Verify a cosign signature of ``repo@image_digest`` at ``reader_url`` with ``public_pem``.

    Finds the signature (``form="tag"``: ``sha256-<hex>.sig``; ``"referrer"``: referrers of
    artifactType :data:`SIG_ARTIFACT_TYPE` via the referrers API, else the tag schema index), checks
    every manifest and blob against its digest, the ECDSA signature over the payload bytes, that the
    payload is a cosign simple-signing payload for ``image_digest`` (and ``identity`` when given), and
    that ``repo@image_digest`` exists and hashes to it.  Passes when at least one signature does
    (several signers may sign one image); raises :class:`VerificationError` saying why otherwise.

    Returns ``{"form", "via", "image_digest", "image_media_type", "signature_manifest",
    "payload_digest", "identity", "payload", "signatures": [...one such dict per valid signature]}``.
    """
    pub = _load_public(public_pem)
    with ImagePusher(reader_url, auth=auth, verify=verify) as p:
        image_media_type = _check_image(p, repo, image_digest)
        manifests, via = _candidates(p, repo, image_digest, form, SIG_ARTIFACT_TYPE)
        good: list[dict] = []
        problems: list[str] = []
        for mdigest, _, doc in manifests:
            blobs = _check_blobs(p, repo, doc, f"signature {mdigest}")
            for i, layer in enumerate(doc.get("layers") or []):
                if layer.get("mediaType") != COSIGN_SIMPLESIGNING:
                    continue
                sig = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
                where = f"signature {mdigest} layer {i}"
                if not sig:
                    problems.append(f"{where}: no {SIGNATURE_ANNOTATION} annotation")
                    continue
                data = blobs[layer["digest"]]
                if not _signature_ok(pub, sig, data):
                    problems.append(f"{where}: the signature does not match the payload with this key")
                    continue
                try:
                    payload = json.loads(data)
                    critical = payload["critical"]
                    signed_digest = critical["image"]["docker-manifest-digest"]
                    ptype = critical["type"]
                    signed_identity = critical["identity"]["docker-reference"]
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{where}: the payload is not a cosign simple-signing payload")
                    continue
                if ptype != SIMPLESIGNING_TYPE:
                    problems.append(f"{where}: payload type {ptype!r}")
                    continue
                if signed_digest != image_digest:
                    problems.append(f"{where}: the payload signs {signed_digest}, not {image_digest}")
                    continue
                if identity is not None and signed_identity != identity:
                    problems.append(f"{where}: signed identity {signed_identity!r}, expected {identity!r}")
                    continue
                good.append({"signature_manifest": mdigest, "payload_digest": layer["digest"],
                             "identity": signed_identity, "payload": payload})
            if not any(l.get("mediaType") == COSIGN_SIMPLESIGNING for l in doc.get("layers") or []):
                problems.append(f"signature {mdigest}: no {COSIGN_SIMPLESIGNING} layer")
        if not good:
            raise VerificationError(f"no valid signature for {repo}@{image_digest} ({form} form, via {via}): "
                                    + "; ".join(problems or ["nothing to check"]))
        return {"form": form, "via": via, "image_digest": image_digest, "image_media_type": image_media_type,
                **good[0], "signatures": good}


def verify_attestation(
    reader_url: str,
    repo: str,
    image_digest: str,
    public_pem: bytes | str,
    *,
    predicate_type: str | None = None,
    verify: Verify = True,
    auth: tuple[str, str] | None = None,
) -> dict:
    """Verify an in-toto attestation referrer (as :func:`attest_referrer` pushes): blobs against their
    digests, the DSSE signature over the PAE with ``public_pem``, the statement's subject digest ==
    ``image_digest`` (and ``predicate_type`` when given), the image present under its digest.
    Returns ``{"via", "attestation_manifest", "predicateType", "statement", "image_digest"}``."""
    pub = _load_public(public_pem)
    algo, _, hexpart = image_digest.partition(":")
    with ImagePusher(reader_url, auth=auth, verify=verify) as p:
        _check_image(p, repo, image_digest)
        manifests, via = _candidates(p, repo, image_digest, "referrer", INTOTO_ARTIFACT_TYPE)
        problems: list[str] = []
        for mdigest, _, doc in manifests:
            blobs = _check_blobs(p, repo, doc, f"attestation {mdigest}")
            for i, layer in enumerate(doc.get("layers") or []):
                where = f"attestation {mdigest} layer {i}"
                if layer.get("mediaType") != DSSE_ENVELOPE:
                    continue
                try:
                    env = json.loads(blobs[layer["digest"]])
                    body = base64.b64decode(env["payload"], validate=True)
                    sigs = [s["sig"] for s in env["signatures"]]
                    statement = json.loads(body)
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{where}: not a DSSE envelope with an in-toto statement")
                    continue
                if env.get("payloadType") != INTOTO_ARTIFACT_TYPE:
                    problems.append(f"{where}: payloadType {env.get('payloadType')!r}")
                    continue
                if not any(_signature_ok(pub, s, _pae(INTOTO_ARTIFACT_TYPE, body)) for s in sigs):
                    problems.append(f"{where}: no DSSE signature matches with this key")
                    continue
                subjects = statement.get("subject") if isinstance(statement, dict) else None
                if not any(isinstance(s, dict) and (s.get("digest") or {}).get(algo) == hexpart
                           for s in subjects or []):
                    problems.append(f"{where}: the statement is not about {image_digest}")
                    continue
                if predicate_type is not None and statement.get("predicateType") != predicate_type:
                    problems.append(f"{where}: predicateType {statement.get('predicateType')!r}")
                    continue
                return {"via": via, "attestation_manifest": mdigest, "predicateType": statement.get("predicateType"),
                        "statement": statement, "image_digest": image_digest}
        raise VerificationError(f"no valid attestation for {repo}@{image_digest} (via {via}): "
                                + "; ".join(problems or ["no DSSE layer"]))
