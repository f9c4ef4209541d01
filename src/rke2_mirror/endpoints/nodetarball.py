"""Node tarballs (`save --for-node`): one file per architecture that an RKE2 node reads from
`/var/lib/rancher/rke2/agent/images/` with both of its readers, and the facts `inspect` checks about
a file there.

The file is an OCI archive as `save` writes it (ociarchive.py: `oci-layout`, `index.json`, each blob
once under `blobs/sha256/`) plus a docker `manifest.json` pointing into the same blobs, as Docker 25+
`docker save` writes it: `[{"Config": "blobs/sha256/<hex>", "RepoTags": [...], "Layers": [...]}]`.
One platform per image (a docker manifest.json entry is one image config), chosen from an index.

What a node does with it (read in the sources; RKE2 vendors go-containerregistry v0.20.3, whose files
cited here are the same at HEAD):

- **The runtime image, before containerd runs.**  rancher/rke2 `pkg/bootstrap/bootstrap.go`
  `preloadBootstrapFromRuntime` looks for `rancher/rke2-runtime:TAG` in the files of agent/images,
  first under the default registry's name (`index.docker.io/rancher/rke2-runtime:TAG`), then, when
  `system-default-registry` is set, under `HOST[/PATH]/rancher/rke2-runtime:TAG` (`pkg/images/images.go`
  `setRegistry`).  Each name goes to rancher/wharfie `pkg/tarfile/tarfile.go` `FindImage`: every
  non-dot file whose name ends (case-insensitively) in `.tar`, `.tar.lz4`, `.tar.bz2`/`.tbz`,
  `.tar.gz`/`.tgz` or `.tar.zst`/`.tzst`, decoded by the extension (`GetOpener`; zstd with
  `WithDecoderMaxMemory(1 << 25)`: a window over 32 MiB fails), then go-containerregistry
  `pkg/v1/tarball/image.go` `tarball.Image(opener, &tag)`:
  * `loadTarDescriptorAndConfig` (l.178) reads `manifest.json`: an OCI-only tar has none, so the
    runtime image is never found there and a node without a registry cannot start.
  * `Manifest.findDescriptor` (l.136-157) parses each `RepoTags` entry with `name.NewTag` and compares
    `Name()`: `rancher/x:t`, `docker.io/rancher/x:t` and `index.docker.io/rancher/x:t` are one name
    (`pkg/name/registry.go` NewRegistry rewrites `docker.io` to `index.docker.io`, l.129; `repository.go`
    `hasImplicitNamespace` adds `library/`, l.35; no tag means `latest`).  A RepoTags entry NewTag
    refuses ends the lookup with an error (l.145-148): every name written here must parse
    (`ggcr_tag_name` is that parser).
  * `Config` and `Layers` are member paths, each found by scanning the tar from its start
    (`extractFileFromTar`, l.221): `blobs/sha256/<hex>` works, `manifest.json` early in the file keeps a
    miss cheap.
  * Compressed layers are read as they are: `Image` (l.90-117) peeks at the first layer
    (`areLayersCompressed`, l.159-176) with `internal/compression/compression.go` `PeekCompression`
    (gzip and zstd magic, l.52-68); compressed -> `compressedImage`, whose layers are decompressed one
    by one by `pkg/v1/partial/compressed.go` `compressedLayerExtender.Uncompressed` (peeks again: gzip,
    zstd or none, l.51-76).  So the OCI blobs are listed as stored, no second copy.  The one case
    that breaks: a first layer stored uncompressed and a later one compressed (served compressed as if
    uncompressed): `plan_node_archive` warns.
  * The image ID (config digest) is the config blob's: the source's.
- **Everything, once containerd runs.**  k3s `pkg/agent/containerd` imports each file with
  `client.Import(..., containerd.WithAllPlatforms(true))` into the `k8s.io` namespace; containerd's
  `core/images/archive/importer.go` `ImportIndex` (l.129-144) takes the OCI layout when `oci-layout` is
  there (index.json; names from `io.containerd.image.name`), manifest.json only otherwise.  With all
  platforms every blob an index.json entry reaches must be in the file: each entry names the chosen
  platform's manifest itself (the source's digest), never a multi-platform index.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from rke2_mirror.endpoints.layout import CONTAINERD_NAME, LayoutDir, NamedImage, blob_member, index_document, index_entry
from rke2_mirror.endpoints.ociarchive import ArchiveContent
from rke2_mirror.model.errors import MirrorError
from rke2_mirror.model.oci import Descriptor, Manifest, Platform, filter_index, parse_manifest
from rke2_mirror.model.reference import ImageRef

RUNTIME_REPOSITORY = "rancher/rke2-runtime"
# rancher/wharfie pkg/tarfile/tarfile.go SupportedExtensions, and the decoder GetOpener picks for each
NODE_SUFFIXES = {".tar": None, ".tar.lz4": "lz4", ".tar.bz2": "bzip2", ".tbz": "bzip2", ".tar.gz": "gzip",
                 ".tgz": "gzip", ".tar.zst": "zstd", ".tzst": "zstd"}
ZSTD_MAX_WINDOW = 1 << 25  # wharfie MaxDecoderMemory
MAX_NESTING = 8

# go-containerregistry pkg/name: tag.go tagChars, repository.go repositoryChars, options.go defaults
_TAG_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")
_REPO_CHARS = frozenset(string.ascii_lowercase + string.digits + "_-./")
_AUTHORITY = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(?::[0-9]*)?$")
GGCR_DEFAULT_REGISTRY = "index.docker.io"


def ggcr_tag_name(text: str) -> str:
    """What go-containerregistry's `name.NewTag(text).Name()` gives (weak validation, the defaults):
    the string the docker-tarball reader compares.  ValueError where NewTag returns an error."""
    base, tag = text, ""
    parts = text.split(":")
    if len(parts) > 1 and "/" not in parts[-1]:
        base, tag = ":".join(parts[:-1]), parts[-1]
        if not tag:
            raise ValueError(f"{text!r} must specify a tag name after the colon")
    if tag and (len(tag) > 128 or set(tag) - _TAG_CHARS):
        raise ValueError(f"tag {tag!r} of {text!r} is not valid")
    tag = tag or "latest"
    if not base:
        raise ValueError("a repository name must be specified")
    registry, repo = "", base
    first, sep, rest = base.partition("/")
    if sep and (first == "localhost" or "." in first or ":" in first):
        registry, repo = first, rest
    if not 1 <= len(repo) <= 255 or set(repo) - _REPO_CHARS:
        raise ValueError(f"repository {repo!r} of {text!r} is not valid (lower-case letters, digits, _-./)")
    if not _AUTHORITY.match(registry):
        raise ValueError(f"registry {registry!r} of {text!r} is not a valid authority")
    if registry in ("", "docker.io"):
        registry = GGCR_DEFAULT_REGISTRY
    if "/" not in repo and registry == GGCR_DEFAULT_REGISTRY:
        repo = "library/" + repo
    return f"{registry}/{repo}:{tag}"


def is_runtime(name: str) -> bool:
    """Does a ggcr-normalized name (`ggcr_tag_name`) name the RKE2 runtime image (under any registry or
    system-default-registry path)?"""
    repo = name.rsplit(":", 1)[0]
    return repo.endswith("/" + RUNTIME_REPOSITORY)


def repo_tag(ref: ImageRef) -> str | None:
    """The RepoTags string for `ref` (docker.io/… in full), None when it has no tag."""
    return f"{ref.name}:{ref.tag}" if ref.tag else None


# --------------------------------------------------------------------------- the plan


@dataclass
class NodeEntry:
    """One saved image and every name it goes under in the file: its own first, then aliases
    (`system-default-registry` names)."""

    image: NamedImage
    names: list[ImageRef]


@dataclass
class NodePlan:
    content: ArchiveContent
    problems: dict[str, str] = field(default_factory=dict)  # image key -> why it is not in the file
    warnings: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # name -> manifest digest, every name written


def _platform_manifest(layout: LayoutDir, repo: str, desc: Descriptor,
                       platform: Platform) -> tuple[Descriptor, Manifest]:
    """The single-platform manifest for `platform` under a root (an index: its first matching entry)."""
    d, raw = layout.get_manifest(repo, desc.digest)
    m = parse_manifest(desc.media_type or d.media_type or None, raw)
    here = Descriptor(m.media_type, desc.digest, len(raw))
    for _ in range(MAX_NESTING):
        if not m.is_index:
            return here, m
        matching = filter_index(m, [platform]).manifests
        if not matching:
            have = ", ".join(sorted({str(c.platform) for c in m.manifests if c.platform})) or "none"
            raise MirrorError(f"no manifest for platform {platform} (the image has: {have})")
        child = matching[0]
        d, raw = layout.get_manifest(repo, child.digest)
        m = parse_manifest(child.media_type or d.media_type or None, raw)
        here = Descriptor(m.media_type, child.digest, len(raw))
    raise MirrorError(f"indexes nested more than {MAX_NESTING} deep")


def _compressed(media_type: str) -> bool | None:
    mt = media_type.lower()
    if "gzip" in mt or "zstd" in mt:
        return True
    if mt.endswith((".tar", "diff.tar", "layer.v1.tar")):
        return False
    return None  # unknown


def plan_node_archive(layout: LayoutDir, entries: Sequence[NodeEntry], platform: Platform) -> NodePlan:
    """index.json, manifest.json and the blobs of a node tarball: per image, `platform`'s manifest with
    its config and layers, under every name of its entry.  A name already taken by another image (an
    alias colliding with an image of that name) is left out with a warning; an image that cannot be
    written (no config, a layer not in the work dir) is a problem: left out, named."""
    plan = NodePlan(ArchiveContent([], {}, {}, {}))
    chosen: list[tuple[NodeEntry, Descriptor, Manifest]] = []
    for e in sorted(entries, key=lambda x: x.image.key):
        img = e.image
        try:
            desc, m = _platform_manifest(layout, img.ref.name, img.descriptor, platform)
            if m.config is None:
                raise MirrorError(f"{m.media_type or 'the manifest'} has no config: not an image a node can run")
            for b in [m.config, *m.layers]:
                if not layout.blob_path(b.digest).is_file():
                    what = "config" if b is m.config else f"layer {b.digest}"
                    foreign = " (a foreign layer: not distributable)" if "foreign" in (b.media_type or "") else ""
                    raise MirrorError(f"{what} is not in the work dir{foreign}")
            names = []
            for i, ref in enumerate(e.names):  # a name go-containerregistry refuses would fail every lookup
                try:
                    if ref.tag:
                        ggcr_tag_name(repo_tag(ref))
                    names.append(ref)
                except ValueError as exc:
                    if i == 0:
                        raise MirrorError(f"RKE2's docker-tarball reader cannot take its name: {exc}") from None
                    plan.warnings.append(f"{ref} left out: RKE2's docker-tarball reader cannot take it ({exc})")
            e = NodeEntry(img, names)
        except MirrorError as exc:
            plan.problems[img.key] = str(exc)
            continue
        # The layers are listed as they are stored (gzip, zstd): go-containerregistry reads compressed layers
        # (pkg/v1/tarball/image.go Image l.99-111, areLayersCompressed l.159-176; see the module's doc).
        kinds = [_compressed(b.media_type) for b in m.layers]
        if kinds and kinds[0] is False and any(k for k in kinds[1:]):
            plan.warnings.append(f"{img.ref}: its first layer is stored uncompressed and a later one compressed: "
                                 "RKE2's docker-tarball reader would misread it (containerd imports it fine)")
        chosen.append((e, desc, m))
    # names: every image's own names first, then the aliases, each name once
    for aliases in (False, True):
        for e, desc, _ in chosen:
            for ref in (e.names[1:] if aliases else e.names[:1]):
                key = str(ref)
                other = plan.names.get(key)
                if other is None:
                    plan.names[key] = desc.digest
                elif other != desc.digest:
                    plan.warnings.append(f"{key} is the name of another image in this file: "
                                         f"not also given to {e.image.ref}")
    written: dict[str, list[str]] = {}  # manifest digest -> its names, in order
    for key, digest in plan.names.items():
        written.setdefault(digest, []).append(key)
    index_entries, docker = [], []
    for e, desc, m in chosen:
        names = written.pop(desc.digest, None)
        if names is None:  # another entry with the same manifest came first
            continue
        plan.content.images.append(e.image)
        plan.content.blobs.setdefault(desc.digest, desc)
        for b in [m.config, *m.layers]:
            plan.content.blobs.setdefault(b.digest, b)
        for key in names:
            index_entries.append(index_entry(key, desc.media_type, desc.digest, desc.size))
        tags = [t for t in (repo_tag(ImageRef.parse(k)) for k in names) if t]  # by digest only: no RepoTags
        docker.append({"Config": blob_member(m.config.digest), "RepoTags": tags,
                       "Layers": [blob_member(b.digest) for b in m.layers]})
    plan.content.index = index_document(sorted(index_entries, key=lambda x: x["annotations"][CONTAINERD_NAME]))
    plan.content.docker_manifest = docker
    return plan


# --------------------------------------------------------------------------- reading a file as a node would


def node_suffix(name: str) -> tuple[str, str | None] | None:
    """(suffix, the codec wharfie/k3s decode it with) for a file name, None when a node ignores the file."""
    low = name.lower()
    if low.startswith("."):
        return None
    for suffix in sorted(NODE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return suffix, NODE_SUFFIXES[suffix]
    return None


@dataclass
class TarballNames:
    """What go-containerregistry's docker-tarball reader finds by name in a manifest.json."""

    names: list[tuple[str, str, int]] = field(default_factory=list)  # (ggcr name, RepoTags string, entry)
    error: str | None = None  # a RepoTags entry NewTag refuses: lookups that reach it fail


def docker_tarball_names(doc) -> TarballNames:
    """The names `tarball.Image(opener, &tag)` finds in a manifest.json document, in its search order;
    names after a RepoTags entry it cannot parse are unreachable (its error ends every lookup that
    gets there)."""
    out = TarballNames()
    if not isinstance(doc, list):
        out.error = "manifest.json is not a list of images"
        return out
    for i, entry in enumerate(doc):
        tags = entry.get("RepoTags") if isinstance(entry, dict) else None
        if tags is not None and not isinstance(tags, list):
            out.error = f"manifest.json entry {i}: RepoTags is not a list"  # the JSON decoder refuses the file
            return out
        for t in tags or []:
            try:
                if not isinstance(t, str):
                    raise ValueError("not a string")
                out.names.append((ggcr_tag_name(t), t, i))
            except ValueError as exc:
                out.error = f"manifest.json entry {i}: RepoTags {t!r}: {exc}"
                return out
    return out


def zstd_max_window(path, limit: int = 1 << 16) -> int | None:
    """The largest window a zstd file's frames ask for (frame headers read, blocks skipped: no
    decompression), None when it is not a zstd stream; at most `limit` frames are looked at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off, frames, biggest = 0, 0, 0
        while off < size and frames < limit:
            magic = os.pread(fd, 4, off)
            if len(magic) < 4:
                return biggest or None
            if magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50:  # skippable frame
                off += 8 + int.from_bytes(os.pread(fd, 4, off + 4), "little")
                continue
            if magic != b"\x28\xb5\x2f\xfd":
                return biggest or None
            fhd = os.pread(fd, 1, off + 4)[0]
            single = bool(fhd & 0x20)
            pos = off + 5
            window = 0
            if not single:
                wd = os.pread(fd, 1, pos)[0]
                base = 1 << (10 + (wd >> 3))
                window = base + (base // 8) * (wd & 7)
                pos += 1
            pos += (0, 1, 2, 4)[fhd & 3]
            fcs_len = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            if single:
                fcs = int.from_bytes(os.pread(fd, fcs_len, pos), "little") + (256 if fcs_len == 2 else 0)
                window = max(fcs, 1024)
            pos += fcs_len
            while True:  # blocks
                h = os.pread(fd, 3, pos)
                if len(h) < 3:
                    return max(biggest, window)
                v = int.from_bytes(h, "little")
                last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
                pos += 3 + (1 if btype == 1 else bsize)
                if last:
                    break
            pos += 4 if fhd & 0x04 else 0
            biggest = max(biggest, window)
            frames += 1
            off = pos
        return biggest
    finally:
        os.close(fd)


__all__ = ["NODE_SUFFIXES", "NodeEntry", "NodePlan", "RUNTIME_REPOSITORY", "TarballNames", "ZSTD_MAX_WINDOW",
           "docker_tarball_names", "ggcr_tag_name", "is_runtime", "node_suffix", "plan_node_archive", "repo_tag",
           "zstd_max_window"]
