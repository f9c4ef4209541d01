"""Will a file serve images on an RKE2 node from its agent/images directory?  What `inspect` reports and
what `verify --images-dir` counts: the names go-containerregistry's docker-tarball reader finds (RKE2's
lookup of its runtime image, before containerd runs) and why a node would not read the file."""

from __future__ import annotations

from pathlib import Path

from rke2_mirror.endpoints.dockerarchive import DockerArchive
from rke2_mirror.endpoints.nodetarball import (NODE_SUFFIXES, RUNTIME_REPOSITORY, ZSTD_MAX_WINDOW, docker_tarball_names,
                                               is_runtime, node_suffix, zstd_max_window)
from rke2_mirror.endpoints.ociarchive import DOCKER_MANIFEST_FILE, ArchiveReader
from rke2_mirror.endpoints.tarfiles import safe_member_name
from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import ArchiveError
from rke2_mirror.model.units import human

MAX_DOCKER_MANIFEST = 16 * 1024 * 1024


def node_readiness(reader: ArchiveReader | DockerArchive) -> dict:
    """Will this file serve images on an RKE2 node from agent/images (see endpoints/nodetarball.py)?

    `runtime_lookup`: the names go-containerregistry's docker-tarball reader finds (RKE2's lookup of its
    runtime image, before containerd runs): a docker manifest.json is needed.  `runtime`: those naming
    rancher/rke2-runtime.  `warnings`: why a node would not read the file, or not find the runtime image."""
    warnings: list[str] = []
    paths = [Path(p) for p in reader.paths]
    out: dict = {"docker_manifest": False, "runtime_lookup": [], "runtime": [], "zstd_window": None,
                 "warnings": warnings}
    if len(paths) > 1:
        warnings.append("split parts: a node reads none of them (cat the parts into one file first)")
    suffix = node_suffix(paths[0].name)
    content = reader.compression if isinstance(reader, DockerArchive) else None
    if suffix is None:
        warnings.append(f"a node ignores this file in agent/images: the name must end in {', '.join(NODE_SUFFIXES)}")
    elif suffix[1] != content and len(paths) == 1:
        warnings.append(f"named {suffix[0]} but {content + '-compressed' if content else 'a plain tar'}: "
                        f"a node decodes it by its name ({suffix[1] or 'none'}) and fails")
    if content == "zstd":
        try:
            window = zstd_max_window(paths[0])
        except OSError:
            window = None
        out["zstd_window"] = window
        if window and window > ZSTD_MAX_WINDOW:
            warnings.append(f"zstd window {human(window)} is larger than the {human(ZSTD_MAX_WINDOW)} RKE2's "
                            "decoder accepts (rancher/wharfie MaxDecoderMemory): the runtime lookup fails on it "
                            "(recompress with zstd --long=25 or less, or save --for-node)")
    try:
        raw = _docker_manifest_bytes(reader)
    except ArchiveError as exc:
        warnings.append(f"manifest.json cannot be read: {exc}")
        return out
    if raw is None:
        runtime = [str(img.ref) for img in getattr(reader, "images", [])
                   if isinstance(reader, ArchiveReader) and ("/" + img.ref.repository).endswith("/" + RUNTIME_REPOSITORY)]
        if runtime:
            warnings.append(f"holds {', '.join(runtime)}, but RKE2's runtime lookup cannot find it here: no docker "
                            "manifest.json (an OCI-only archive); a node without a registry fails to start. "
                            "Write node tarballs with `save --for-node`")
        return out
    out["docker_manifest"] = True
    try:
        doc = jsondoc.loads(raw, DOCKER_MANIFEST_FILE, error=ArchiveError)
    except ArchiveError as exc:
        warnings.append(f"manifest.json cannot be read: {exc}")
        return out
    found = docker_tarball_names(doc)
    if found.error:
        warnings.append(f"{found.error}: go-containerregistry refuses it, and every lookup that reaches it fails")
    broken = _entries_with_missing_members(reader, doc)
    for i, why in sorted(broken.items()):
        warnings.append(f"manifest.json entry {i}: {why}: its names are not found")
    names = [n for n, _, i in found.names if i not in broken]
    out["runtime_lookup"] = list(dict.fromkeys(names))
    out["runtime"] = [n for n in out["runtime_lookup"] if is_runtime(n)]
    return out


def _docker_manifest_bytes(reader: ArchiveReader | DockerArchive) -> bytes | None:
    if isinstance(reader, ArchiveReader):
        return reader.member_bytes(DOCKER_MANIFEST_FILE, MAX_DOCKER_MANIFEST)
    m = reader.members.get(DOCKER_MANIFEST_FILE)
    return m.data if m is not None else None


def _member(name: str) -> str | None:
    try:
        return safe_member_name(name)
    except ArchiveError:
        return None


def _entries_with_missing_members(reader: ArchiveReader | DockerArchive, doc) -> dict[int, str]:
    """manifest.json entries whose Config or a layer is not in the file (the reader fails on them)."""
    out: dict[int, str] = {}
    have = set(reader.members) | set(getattr(reader, "links", {}) or {})
    for i, e in enumerate(doc if isinstance(doc, list) else []):
        if not isinstance(e, dict):
            continue
        layers = e.get("Layers")
        wanted = [e.get("Config")] + (layers if isinstance(layers, list) else [None])
        missing = [w for w in wanted if not isinstance(w, str) or _member(w) not in have]
        if missing:
            out[i] = f"{missing[0]} is not in the file" if isinstance(missing[0], str) else "malformed Config or Layers"
    return out


