"""The benchmark image set: deterministic, multi-arch, one base layer shared by every image.

Layers are seeded pseudo-random bytes wrapped in *stored* (level-0) gzip: real gzip streams (so
no tool is tempted to recompress them) that cost almost nothing to make, unlike compressing
random data.  Registries never look inside layers; configs carry the matching diff_ids anyway.

Shape (for ``n`` images and ``mb`` MB of unique blobs):

- one base layer (~2 % of the bytes) in every image and every platform;
- ``groups`` "runtime" layers (~1 % each), image ``i`` uses group ``i % groups``;
- per (image, platform): 1-3 unique layers, sizes drawn from a skewed distribution so a few
  images are large and most are small, plus a unique config;
- half Docker v2 (manifest list), half OCI (index); every 10th image single-platform
  (linux/amd64), every 10th (offset 5) three platforms (+ linux/arm/v7), the rest amd64 + arm64.

Pushed with `rke2_mirror_testkit.images` (push_blob / push_manifest; shared layers are uploaded
once and mounted elsewhere) from several threads.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rke2_mirror_testkit.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    ImagePusher,
    push_blob,
    push_manifest,
    sha256_digest,
)

MB = 1024 * 1024
NAMESPACE = "rancher"
_CREATED = "2024-01-01T00:00:00Z"


@dataclass(frozen=True)
class LayerSpec:
    seed: str
    size: int  # size of the random payload (the gzip stream is ~0.01 % larger)


@dataclass
class ImageSpec:
    index: int
    repo: str
    tag: str
    kind: str  # docker | oci
    platforms: list[tuple[str, ...]]  # [] = single-platform linux/amd64 manifest
    shared: list[LayerSpec]  # base (+ group) layers, first in every child
    unique: dict[str, list[LayerSpec]]  # platform string -> its own layers

    @property
    def ref(self) -> str:
        return f"docker.io/{self.repo}:{self.tag}"


@dataclass
class DataSet:
    images: list[ImageSpec]
    base: LayerSpec
    groups: list[LayerSpec]
    unique_bytes: int = 0  # filled by push(): every distinct blob (layers + configs) once
    unique_blobs: int = 0
    manifests: int = 0
    digests: dict[str, str] = field(default_factory=dict)  # ref -> top-level digest

    def image_list(self) -> str:
        return "".join(f"{im.ref}\n" for im in self.images)


def plan(n_images: int, mb: float, *, seed: str = "rke2-mirror-bench", groups: int | None = None) -> DataSet:
    """Decide every image's layers so unique blob bytes come to about ``mb`` MB."""
    rnd = random.Random(seed)
    total = int(mb * MB)
    groups = groups if groups is not None else max(2, min(10, n_images // 15))
    base = LayerSpec(f"{seed}/base", max(64 * 1024, int(total * 0.02)))
    group_layers = [LayerSpec(f"{seed}/group/{g}", max(32 * 1024, int(total * 0.01))) for g in range(groups)]
    images: list[ImageSpec] = []
    children: list[tuple[ImageSpec, str]] = []
    for i in range(n_images):
        if i % 10 == 0:
            plats: list[tuple[str, ...]] = []
        elif i % 10 == 5:
            plats = [("linux", "amd64"), ("linux", "arm64"), ("linux", "arm", "v7")]
        else:
            plats = [("linux", "amd64"), ("linux", "arm64")]
        im = ImageSpec(i, f"{NAMESPACE}/bench-{i:03d}", f"v1.{i}", "docker" if i % 2 == 0 else "oci", plats,
                       [base, group_layers[i % groups]], {})
        images.append(im)
        for p in plats or [("linux", "amd64")]:
            children.append((im, "/".join(p)))
    left = total - base.size - sum(g.size for g in group_layers) - 1500 * len(children)  # ~configs
    left = max(left, len(children) * 4096)
    # skewed sizes: lognormal weights, a few children get tens of MB, most well under one
    weights = [rnd.lognormvariate(0.0, 1.2) for _ in children]
    wsum = sum(weights)
    for (im, pstr), w in zip(children, weights):
        budget = max(4096, int(left * w / wsum))
        n_layers = rnd.choice((1, 2, 2, 3))
        cuts = sorted(rnd.random() for _ in range(n_layers - 1))
        parts = [b - a for a, b in zip([0.0, *cuts], [*cuts, 1.0])]
        im.unique[pstr] = [LayerSpec(f"{seed}/{im.repo}/{pstr}/{k}", max(1024, int(budget * f)))
                           for k, f in enumerate(parts)]
    return DataSet(images, base, group_layers)


def _random_bytes(seed: str, size: int, piece: int = 64 * MB) -> bytes:
    """Seeded pseudo-random bytes (randbytes() alone overflows past 256 MB)."""
    r = random.Random(seed)
    if size <= piece:
        return r.randbytes(size)
    return b"".join(r.randbytes(min(piece, size - off)) for off in range(0, size, piece))


def layer_bytes(spec: LayerSpec) -> tuple[bytes, str]:
    """(stored-gzip layer, diff_id)."""
    raw = _random_bytes(spec.seed, spec.size)
    return gzip.compress(raw, compresslevel=0, mtime=0), sha256_digest(raw)


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=3).encode()


class _Pushed:
    """Shared layers: uploaded once (the first repository), mounted into the others."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.where: dict[str, str] = {}  # digest -> a repository holding it
        self.meta: dict[str, tuple[str, int, str]] = {}  # seed -> (digest, size, diff_id)
        self.digests: dict[str, int] = {}  # digest -> size (every distinct blob)


def _mount(pusher: ImagePusher, repo: str, digest: str, from_repo: str) -> bool:
    r = pusher.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo, params={"mount": digest, "from": from_repo})
    return r.status_code == 201


def _ensure_layer(pusher: ImagePusher, repo: str, spec: LayerSpec, state: _Pushed, shared: bool) -> tuple[str, int, str]:
    if shared:
        with state.lock:
            meta = state.meta.get(spec.seed)
        if meta is not None:
            src = state.where[meta[0]]
            if src != repo and not _mount(pusher, repo, meta[0], src):
                data, _ = layer_bytes(spec)
                push_blob(pusher, repo, data)
            return meta
    data, diff_id = layer_bytes(spec)
    digest = push_blob(pusher, repo, data)
    meta = (digest, len(data), diff_id)
    with state.lock:
        state.meta.setdefault(spec.seed, meta)
        state.where.setdefault(digest, repo)
        state.digests[digest] = len(data)
    return meta


def _push_child(pusher: ImagePusher, im: ImageSpec, plat: tuple[str, ...], state: _Pushed) -> tuple[bytes, str]:
    pstr = "/".join(plat)
    layers = [_ensure_layer(pusher, im.repo, s, state, True) for s in im.shared]
    layers += [_ensure_layer(pusher, im.repo, s, state, False) for s in im.unique[pstr]]
    config: dict = {
        "architecture": plat[1], "os": plat[0], "created": _CREATED,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": {"org.opencontainers.image.title": im.repo,
                                                  "bench.platform": pstr}},
        "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
        "history": [{"created": _CREATED, "created_by": f"ADD layer {k}"} for k in range(len(layers))],
    }
    if len(plat) > 2:
        config["variant"] = plat[2]
    cfg = _dumps(config)
    cfg_digest = push_blob(pusher, im.repo, cfg)
    with state.lock:
        state.digests[cfg_digest] = len(cfg)
    docker = im.kind == "docker"
    layer_mt = DOCKER_LAYER if docker else OCI_LAYER
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "size": len(cfg), "digest": cfg_digest},
        "layers": [{"mediaType": layer_mt, "size": size, "digest": d} for d, size, _ in layers],
    }
    return _dumps(manifest), DOCKER_MANIFEST if docker else OCI_MANIFEST


def push_image(pusher: ImagePusher, im: ImageSpec, state: _Pushed) -> tuple[str, int]:
    """Push one image (children first, tag last).  Returns (top-level digest, manifests pushed)."""
    if not im.platforms:
        data, mt = _push_child(pusher, im, ("linux", "amd64"), state)
        return push_manifest(pusher, im.repo, im.tag, data, mt), 1
    entries = []
    for plat in im.platforms:
        data, mt = _push_child(pusher, im, plat, state)
        digest = push_manifest(pusher, im.repo, sha256_digest(data), data, mt)
        p = {"architecture": plat[1], "os": plat[0]}
        if len(plat) > 2:
            p["variant"] = plat[2]
        entries.append({"mediaType": mt, "size": len(data), "digest": digest, "platform": p})
    docker = im.kind == "docker"
    index = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX, "manifests": entries}
    return push_manifest(pusher, im.repo, im.tag, _dumps(index), DOCKER_LIST if docker else OCI_INDEX), len(entries) + 1


def push(ds: DataSet, url: str, *, threads: int = 4, log=print) -> DataSet:
    """Push the whole set to the registry at ``url``; fills digests and totals."""
    state = _Pushed()
    local = threading.local()
    pushers: list[ImagePusher] = []

    def pusher() -> ImagePusher:
        p = getattr(local, "p", None)
        if p is None:
            p = local.p = ImagePusher(url, timeout=120.0)
            with state.lock:
                pushers.append(p)
        return p

    # the first image (it holds base + its group layer) goes alone so the others can mount
    first = ds.images[0]
    d, n = push_image(pusher(), first, state)
    ds.digests[first.ref] = d
    manifests = n
    rest = ds.images[1:]
    done = 0
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="seed") as pool:
            for im, (d, n) in zip(rest, pool.map(lambda im: push_image(pusher(), im, state), rest)):
                ds.digests[im.ref] = d
                manifests += n
                done += 1
                if log and done % 50 == 0:
                    log(f"  seeded {done + 1}/{len(ds.images)} images")
    finally:
        for p in pushers:
            p.close()
    ds.manifests = manifests
    ds.unique_blobs = len(state.digests)
    ds.unique_bytes = sum(state.digests.values())
    return ds


def big_image(url: str, size: int, *, repo: str = f"{NAMESPACE}/bench-big", tag: str = "v1",
              seed: str = "rke2-mirror-bench/big") -> str:
    """A single-platform image with one ``size``-byte layer (for peak-RSS checks).  Returns its ref."""
    spec = LayerSpec(seed, size)
    data, diff_id = layer_bytes(spec)
    with ImagePusher(url, timeout=600.0) as p:
        digest = push_blob(p, repo, data)
        layer_size = len(data)
        del data
        cfg = _dumps({"architecture": "amd64", "os": "linux", "created": _CREATED,
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
        cfg_digest = push_blob(p, repo, cfg)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "size": len(cfg), "digest": cfg_digest},
                    "layers": [{"mediaType": OCI_LAYER, "size": layer_size, "digest": digest}]}
        push_manifest(p, repo, tag, _dumps(manifest), OCI_MANIFEST)
    return f"docker.io/{repo}:{tag}"
