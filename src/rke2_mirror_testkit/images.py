"""Deterministic test images, pushed over the v2 API with plain httpx.

Deliberately independent of rke2_mirror's own registry client: the tests must not depend
on the code they test.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import re
import ssl
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urljoin

import httpx

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_LIST",
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "OCI_MANIFEST",
    "OCI_INDEX",
    "OCI_CONFIG",
    "OCI_LAYER",
    "COSIGN_SIMPLESIGNING",
    "ALL_MANIFEST_TYPES",
    "WINDOWS_OS_VERSION",
    "Blob",
    "PushedImage",
    "ImagePusher",
    "sha256_digest",
    "make_layer",
    "make_layer_blob",
    "push_blob",
    "push_manifest",
    "push_image",
    "push_signature",
    "read_manifest",
    "read_blob",
    "blob_exists",
    "list_tags",
    "platform_string",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ALL_MANIFEST_TYPES = (
    OCI_INDEX,
    DOCKER_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
WINDOWS_OS_VERSION = "10.0.17763.5329"
_CREATED = "2024-01-01T00:00:00Z"



def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def platform_string(p: Sequence[str]) -> str:
    return "/".join(x for x in p if x)


@dataclass(frozen=True)
class Blob:
    data: bytes
    digest: str
    size: int
    media_type: str = OCI_LAYER
    diff_id: str | None = None  # sha256 of the uncompressed tar, for layers

    @classmethod
    def of(cls, data: bytes, media_type: str = "application/octet-stream", diff_id: str | None = None) -> "Blob":
        return cls(data, sha256_digest(data), len(data), media_type, diff_id)

    def descriptor(self, media_type: str | None = None, **extra) -> dict:
        d = {"mediaType": media_type or self.media_type, "size": self.size, "digest": self.digest}
        d.update(extra)
        return d


def _layer_tar(seed: str, size: int) -> bytes:
    payload = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", seed)[:60] or "x"
        info = tarfile.TarInfo(f"data/{safe}.bin")
        info.size = size
        info.mtime = 1704067200
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(data)
    return out.getvalue()


def make_layer(seed: str, size: int) -> bytes:
    """A real gzip-compressed tar with one file of ``size`` seeded pseudo-random bytes (deterministic)."""
    return _gzip(_layer_tar(seed, size))


def make_layer_blob(seed: str, size: int, media_type: str = OCI_LAYER) -> Blob:
    """Like :func:`make_layer` but returns a :class:`Blob` including its ``diff_id``."""
    tar = _layer_tar(seed, size)
    return Blob.of(_gzip(tar), media_type, diff_id=sha256_digest(tar))


def _diff_id(blob: Blob) -> str:
    if blob.diff_id:
        return blob.diff_id
    return sha256_digest(gzip.decompress(blob.data))


# --------------------------------------------------------------------------- client


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class ImagePusher:
    """Minimal v2 client for test setup/assertions; answers Basic and Bearer challenges itself."""

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        verify: ssl.SSLContext | str | Path | bool = True,
        timeout: float = 30.0,
    ):
        self.url = url.rstrip("/")
        self.auth = auth
        if isinstance(verify, (str, Path)):
            verify = ssl.create_default_context(cafile=str(verify))
        self.verify = verify
        self.client = httpx.Client(verify=verify, timeout=timeout, trust_env=False)
        self._basic = False
        self._tokens: dict[str, str] = {}  # scope -> token
        self._repo_scope: dict[str, str] = {}  # repo -> last scope that worked

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "ImagePusher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _abs(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return urljoin(self.url + "/", path_or_url.lstrip("/"))

    def _auth_headers(self, repo: str | None) -> dict[str, str]:
        if self._basic and self.auth:
            return {"Authorization": "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()}
        scope = self._repo_scope.get(repo or "")
        if scope and scope in self._tokens:
            return {"Authorization": "Bearer " + self._tokens[scope]}
        return {}

    def fetch_token(self, realm: str, service: str | None, scope: str | None) -> str:
        params = {}
        if service:
            params["service"] = service
        if scope:
            params["scope"] = scope
        r = self.client.get(realm, params=params, auth=self.auth)
        r.raise_for_status()
        body = r.json()
        return body.get("token") or body["access_token"]

    def request(self, method: str, path: str, *, repo: str | None = None, headers: dict | None = None,
                **kw) -> httpx.Response:
        """Send a request, answering one auth challenge if needed.  ``repo`` keys the token cache."""
        url = self._abs(path)
        hdrs = dict(headers or {})
        r = self.client.request(method, url, headers={**hdrs, **self._auth_headers(repo)}, **kw)
        if r.status_code != 401:
            return r
        challenge = r.headers.get("WWW-Authenticate", "")
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if not self.auth or self._basic:
                return r
            self._basic = True
        elif scheme == "bearer":
            scope = params.get("scope")
            if repo and scope is None:
                scope = f"repository:{repo}:pull,push"
            # widen pull-only challenges so one token serves both directions
            if scope and repo and scope == f"repository:{repo}:pull" and method not in ("GET", "HEAD"):
                scope = f"repository:{repo}:pull,push"
            token = self.fetch_token(params["realm"], params.get("service"), scope)
            self._tokens[scope or ""] = token
            self._repo_scope[repo or ""] = scope or ""
        else:
            return r
        return self.client.request(method, url, headers={**hdrs, **self._auth_headers(repo)}, **kw)


# --------------------------------------------------------------------------- push


def blob_exists(pusher: ImagePusher, repo: str, digest: str) -> bool:
    r = pusher.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo)
    if r.status_code == 200:
        return True
    if r.status_code == 404:
        return False
    raise RuntimeError(f"HEAD blob {repo}@{digest}: {r.status_code} {r.text}")


def push_blob(pusher: ImagePusher, repo: str, blob: Blob | bytes) -> str:
    """Upload a blob (POST + monolithic PUT) unless present.  Returns its digest."""
    if isinstance(blob, bytes):
        blob = Blob.of(blob)
    if blob_exists(pusher, repo, blob.digest):
        return blob.digest
    r = pusher.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo)
    if r.status_code != 202:
        raise RuntimeError(f"start upload {repo}: {r.status_code} {r.text}")
    location = urljoin(str(r.url), r.headers["Location"])
    sep = "&" if "?" in location else "?"
    r = pusher.request(
        "PUT",
        f"{location}{sep}digest={blob.digest}",
        repo=repo,
        content=blob.data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if r.status_code != 201:
        raise RuntimeError(f"finish upload {repo}@{blob.digest}: {r.status_code} {r.text}")
    return blob.digest


def push_manifest(pusher: ImagePusher, repo: str, ref: str, data: bytes, media_type: str) -> str:
    """PUT a manifest under ``ref`` (tag or digest).  Returns its digest."""
    digest = sha256_digest(data)
    r = pusher.request("PUT", f"/v2/{repo}/manifests/{ref}", repo=repo, content=data,
                       headers={"Content-Type": media_type})
    if r.status_code != 201:
        raise RuntimeError(f"PUT manifest {repo}:{ref}: {r.status_code} {r.text}")
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise RuntimeError(f"registry computed digest {got}, expected {digest}")
    return digest


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=3).encode()


@dataclass
class PushedImage:
    repo: str
    tag: str | None
    digest: str  # top-level manifest / index
    media_type: str
    manifest: bytes
    children: list[tuple[str, str]] = field(default_factory=list)  # (platform string, digest)
    blobs: set[str] = field(default_factory=set)  # every config + layer digest
    child_manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.digest}"

    def child(self, platform: str) -> str:
        return dict(self.children)[platform]


def _build_single(
    pusher: ImagePusher,
    repo: str,
    *,
    kind: str,
    platform: Sequence[str],
    base: Blob | None,
    layer_sizes: Sequence[int],
    seed: str,
    os_version: str | None,
    annotations: dict | None,
) -> tuple[bytes, str, set[str]]:
    layer_mt = DOCKER_LAYER if kind == "docker" else OCI_LAYER
    os_, arch = platform[0], platform[1]
    variant = platform[2] if len(platform) > 2 else None
    pstr = platform_string(platform)
    layers: list[Blob] = []
    if base is not None:
        layers.append(base)
    for i, size in enumerate(layer_sizes):
        layers.append(make_layer_blob(f"{seed}/{pstr}/{i}", size, layer_mt))
    diff_ids = [_diff_id(b) for b in layers]
    config: dict = {
        "architecture": arch,
        "os": os_,
        "created": _CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"TEST_SEED={seed}"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.opencontainers.image.title": repo},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": _CREATED, "created_by": f"ADD layer {i} # {seed}"} for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    if os_version:
        config["os.version"] = os_version
    config_blob = Blob.of(_dumps(config), DOCKER_CONFIG if kind == "docker" else OCI_CONFIG)
    blobs = {config_blob.digest}
    for b in layers:
        push_blob(pusher, repo, b)
        blobs.add(b.digest)
    push_blob(pusher, repo, config_blob)
    manifest: dict = {"schemaVersion": 2}
    if kind == "docker":
        manifest["mediaType"] = DOCKER_MANIFEST
        manifest["config"] = config_blob.descriptor(DOCKER_CONFIG)
        manifest["layers"] = [b.descriptor(DOCKER_LAYER) for b in layers]
        mt = DOCKER_MANIFEST
    else:
        manifest["mediaType"] = OCI_MANIFEST
        manifest["config"] = config_blob.descriptor(OCI_CONFIG)
        manifest["layers"] = [b.descriptor(OCI_LAYER) for b in layers]
        if annotations:
            manifest["annotations"] = dict(annotations)
        mt = OCI_MANIFEST
    return _dumps(manifest), mt, blobs


def push_image(
    pusher: ImagePusher,
    repo: str,
    tag: str | None,
    *,
    kind: str = "docker",
    platforms: Iterable[Sequence[str]] | None = (("linux", "amd64"), ("linux", "arm64")),
    base: Blob | None = None,
    layer_sizes: Sequence[int] = (1024, 2048),
    seed: str = "seed",
    windows: bool = False,
    annotations: dict | None = None,
) -> PushedImage:
    """Build and push a deterministic image (same arguments -> same digests).

    ``platforms=None`` pushes a single-platform ``linux/amd64`` manifest; otherwise an index /
    manifest list with one child per platform (``("linux","arm64","v8")`` for a variant), plus
    ``windows/amd64`` (``os.version`` :data:`WINDOWS_OS_VERSION`) when ``windows``.  ``base`` is a
    layer put first in every image.  ``annotations`` go on the top-level OCI manifest/index.
    ``tag=None`` pushes by digest only.  Children are pushed before the parent.
    """
    if kind not in ("docker", "oci"):
        raise ValueError(f"kind must be 'docker' or 'oci', not {kind!r}")
    if platforms is None:
        data, mt, blobs = _build_single(pusher, repo, kind=kind, platform=("linux", "amd64"), base=base,
                                        layer_sizes=layer_sizes, seed=seed, os_version=None,
                                        annotations=annotations)
        digest = push_manifest(pusher, repo, tag or sha256_digest(data), data, mt)
        return PushedImage(repo, tag, digest, mt, data, [], blobs, {})
    plats = [tuple(p) for p in platforms]
    if windows:
        plats.append(("windows", "amd64"))
    entries = []
    children: list[tuple[str, str]] = []
    child_manifests: dict[str, bytes] = {}
    all_blobs: set[str] = set()
    for p in plats:
        os_version = WINDOWS_OS_VERSION if p[0] == "windows" else None
        data, mt, blobs = _build_single(pusher, repo, kind=kind, platform=p, base=base, layer_sizes=layer_sizes,
                                        seed=seed, os_version=os_version, annotations=None)
        digest = push_manifest(pusher, repo, sha256_digest(data), data, mt)
        all_blobs |= blobs
        children.append((platform_string(p), digest))
        child_manifests[digest] = data
        plat: dict = {"architecture": p[1], "os": p[0]}
        if os_version:
            plat["os.version"] = os_version
        if len(p) > 2 and p[2]:
            plat["variant"] = p[2]
        entries.append({"mediaType": mt, "size": len(data), "digest": digest, "platform": plat})
    index: dict = {"schemaVersion": 2}
    if kind == "docker":
        index["mediaType"] = DOCKER_LIST
        top_mt = DOCKER_LIST
    else:
        index["mediaType"] = OCI_INDEX
        top_mt = OCI_INDEX
    index["manifests"] = entries
    if annotations and kind == "oci":
        index["annotations"] = dict(annotations)
    data = _dumps(index)
    digest = push_manifest(pusher, repo, tag or sha256_digest(data), data, top_mt)
    return PushedImage(repo, tag, digest, top_mt, data, children, all_blobs, child_manifests)


def push_signature(pusher: ImagePusher, repo: str, image_digest: str, *, identity: str | None = None) -> str:
    """Push a cosign-style signature for ``image_digest``, tagged ``sha256-<hex>.sig``.  Returns its digest."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": identity or repo},
                "image": {"docker-manifest-digest": image_digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()
    payload_blob = Blob.of(payload, COSIGN_SIMPLESIGNING)
    config = {
        "architecture": "",
        "os": "",
        "created": "0001-01-01T00:00:00Z",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [payload_blob.digest]},
    }
    config_blob = Blob.of(json.dumps(config, separators=(",", ":")).encode(), OCI_CONFIG)
    push_blob(pusher, repo, payload_blob)
    push_blob(pusher, repo, config_blob)
    fake_sig = base64.b64encode(hashlib.sha512(payload).digest()).decode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(OCI_CONFIG),
        "layers": [
            payload_blob.descriptor(
                COSIGN_SIMPLESIGNING, annotations={"dev.cosignproject.cosign/signature": fake_sig}
            )
        ],
    }
    tag = image_digest.replace(":", "-", 1) + ".sig"
    return push_manifest(pusher, repo, tag, _dumps(manifest), OCI_MANIFEST)


# --------------------------------------------------------------------------- read


def _pusher_for(target: "ImagePusher | str", auth, verify) -> tuple[ImagePusher, bool]:
    if isinstance(target, ImagePusher):
        return target, False
    return ImagePusher(target, auth=auth, verify=verify), True


def read_manifest(
    target: "ImagePusher | str",
    repo: str,
    ref: str,
    *,
    auth: tuple[str, str] | None = None,
    verify: ssl.SSLContext | str | Path | bool = True,
    accept: Sequence[str] = ALL_MANIFEST_TYPES,
) -> tuple[str, bytes, str]:
    """``(media_type, bytes, digest)`` of a manifest; raises ``LookupError`` on 404."""
    p, owned = _pusher_for(target, auth, verify)
    try:
        r = p.request("GET", f"/v2/{repo}/manifests/{ref}", repo=repo, headers={"Accept": ", ".join(accept)})
        if r.status_code == 404:
            raise LookupError(f"{repo}:{ref} not found")
        if r.status_code != 200:
            raise RuntimeError(f"GET manifest {repo}:{ref}: {r.status_code} {r.text}")
        mt = r.headers.get("Content-Type", "").split(";")[0].strip()
        return mt, r.content, sha256_digest(r.content)
    finally:
        if owned:
            p.close()


def read_blob(
    target: "ImagePusher | str",
    repo: str,
    digest: str,
    *,
    auth: tuple[str, str] | None = None,
    verify: ssl.SSLContext | str | Path | bool = True,
) -> bytes:
    p, owned = _pusher_for(target, auth, verify)
    try:
        r = p.request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, follow_redirects=True)
        if r.status_code == 404:
            raise LookupError(f"{repo}@{digest} not found")
        if r.status_code != 200:
            raise RuntimeError(f"GET blob {repo}@{digest}: {r.status_code}")
        return r.content
    finally:
        if owned:
            p.close()


def list_tags(
    target: "ImagePusher | str",
    repo: str,
    *,
    auth: tuple[str, str] | None = None,
    verify: ssl.SSLContext | str | Path | bool = True,
) -> list[str]:
    """Sorted tags of ``repo`` (follows ``Link`` pagination); ``[]`` when the repository is unknown."""
    p, owned = _pusher_for(target, auth, verify)
    tags: list[str] = []
    try:
        url = f"/v2/{repo}/tags/list"
        while url:
            r = p.request("GET", url, repo=repo)
            if r.status_code == 404:
                return []
            if r.status_code != 200:
                raise RuntimeError(f"GET tags {repo}: {r.status_code} {r.text}")
            tags.extend(r.json().get("tags") or [])
            link = r.headers.get("Link")
            m = re.match(r'\s*<([^>]+)>', link or "")
            url = m.group(1) if m else ""
        return sorted(tags)
    finally:
        if owned:
            p.close()
