"""The one walk of a content graph: index -> manifests -> config + layers.

Every caller uses it: the copy (what to push, children first), the dry run and size estimates, `save`'s
archive plan and delta, `load`'s checks, `inspect`, the docker-archive loader's look at the target.
Each distinct descriptor is visited once however often a manifest lists it; nesting deeper than
MAX_DEPTH, or more than MAX_DESCRIPTORS distinct descriptors in one image, is refused with one line
(`GraphLimit`).  Work and requests grow with the distinct content, never with repetition.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rke2_mirror.engine.blobs import read_blob
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.model.errors import MirrorError, UnsupportedManifest
from rke2_mirror.model.oci import Descriptor, Manifest, Platform, check_digest, filter_index, parse_manifest

MAX_DEPTH = 8  # index -> index -> ... -> manifest: real images use 1 (2 for an index of indexes)
MAX_DESCRIPTORS = 10_000  # distinct manifests + blobs in one image (a big multi-arch image has a few hundred)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class GraphLimit(UnsupportedManifest):
    """An image graph nested deeper, or holding more distinct descriptors, than the walk accepts."""


class PlatformMismatch(MirrorError):
    """The image has none of the platforms asked for."""


@dataclass
class Graph:
    """One image: its root manifest, the child manifests (each once, children before their parents) and
    the blobs (configs + layers, each once)."""

    root: Descriptor
    manifest: Manifest
    children: list[tuple[Descriptor, Manifest]] = field(default_factory=list)
    blobs: dict[str, Descriptor] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)

    @property
    def manifests(self) -> dict[str, Descriptor]:
        """Every manifest of the image by digest, the root first."""
        out = {self.root.digest: self.root}
        for d, _ in self.children:
            out.setdefault(d.digest, d)
        return out

    @property
    def size(self) -> int:
        return sum(d.size for d in self.manifests.values()) + sum(d.size for d in self.blobs.values())


Prune = Callable[[Descriptor], bool]


def walk(source, repo: str, root: Manifest, *, root_digest: str | None = None, prune: Prune | None = None,
         max_depth: int = MAX_DEPTH, max_descriptors: int = MAX_DESCRIPTORS) -> Graph:
    """The graph under `root` (already fetched), child manifests read from `source` in `repo`.

    `prune(child)` True: the child manifest is complete wherever the caller looks (a target that has it):
    it is neither fetched nor descended into.  Iterative (no recursion limit to hit); each distinct digest
    is fetched once."""
    rd = root.descriptor
    g = Graph(Descriptor(root.media_type, root_digest or rd.digest, rd.size), root)
    seen: set[str] = {g.root.digest}

    def count() -> None:
        if len(seen) + len(g.blobs) > max_descriptors:
            raise GraphLimit(f"image graph has more than {max_descriptors} distinct manifests and blobs: refused")

    def add_blobs(m: Manifest) -> None:
        for b in m.blobs:
            if b.digest not in g.blobs:
                g.blobs[check_digest(b.digest)] = b
                count()

    if not root.is_index:
        add_blobs(root)
        return g
    # (descriptor, manifest, depth, next child index): an explicit stack, children emitted after their own children
    stack: list[tuple[Descriptor | None, Manifest, int, int]] = [(None, root, 0, 0)]
    while stack:
        desc, m, depth, i = stack.pop()
        entries = m.manifests
        while i < len(entries):
            c = entries[i]
            i += 1
            if c.digest in seen:
                continue
            seen.add(check_digest(c.digest))
            count()
            if prune is not None and prune(c):
                continue
            cdesc, craw = source.get_manifest(repo, c.digest)
            cm = parse_manifest(c.media_type or cdesc.media_type, craw)
            child = Descriptor(cm.media_type, c.digest, len(craw), c.platform, c.annotations)
            if cm.is_index:
                if depth + 1 >= max_depth:
                    raise GraphLimit(f"indexes nested more than {max_depth} deep: refused")
                stack.append((desc, m, depth, i))
                stack.append((child, cm, depth + 1, 0))
                break
            add_blobs(cm)
            g.children.append((child, cm))
        else:
            if desc is not None:
                g.children.append((desc, m))
    return g


def root_platforms(source, repo: str, m: Manifest, retry: RetryPolicy | None = None) -> list[str]:
    """What `inspect` shows: the platforms an index lists (distinct, in order), or a manifest's config's."""
    if m.is_index:
        out: list[str] = []
        for c in m.manifests:
            p = str(c.platform) if c.platform else "unknown"
            if p not in out:
                out.append(p)
        return out
    p = config_platform(source, repo, m, retry)
    return [str(p) if p else "unknown"]


def config_platform(source, repo: str, m: Manifest, retry: RetryPolicy | None = None) -> Platform | None:
    """The platform a single manifest's config names (None when it names none, or can't be read)."""
    if m.config is None or m.config.size > MAX_CONFIG_BYTES:
        return None
    try:
        doc = json.loads(read_blob(source, repo, m.config, MAX_CONFIG_BYTES, retry))
    except (MirrorError, ValueError, RecursionError):
        return None
    return Platform.from_json(doc) if isinstance(doc, dict) else None


def select_platforms(source, repo: str, m: Manifest, wanted: Sequence[Platform],
                     retry: RetryPolicy | None = None) -> Manifest:
    """The image restricted to `wanted`: an index rebuilt with only those entries (the original when
    nothing is dropped); a single-platform manifest as it is, or PlatformMismatch."""
    if not wanted:
        return m
    names = ", ".join(map(str, wanted))
    if m.is_index:
        filtered = filter_index(m, wanted)
        if not filtered.manifests:
            have = ", ".join(sorted({str(d.platform) for d in m.manifests if d.platform})) or "none"
            raise PlatformMismatch(f"no manifest for platform {names} (the image has: {have})")
        return m if len(filtered.manifests) == len(m.manifests) else filtered
    plat = config_platform(source, repo, m, retry)
    if plat is not None and not any(plat.matches(p) for p in wanted):
        raise PlatformMismatch(f"single-platform image is {plat}, not {names}")
    return m


def image_graph(source, repo: str, reference: str, platforms: Sequence[Platform] = (), *,
                with_platforms: bool = False, retry: RetryPolicy | None = None) -> Graph:
    """Fetch an image's root from `source` and walk it (after selecting `platforms`)."""
    desc, raw = source.get_manifest(repo, reference)
    m = parse_manifest(desc.media_type or None, raw)
    selected = select_platforms(source, repo, m, platforms, retry)
    g = walk(source, repo, selected, root_digest=desc.digest if selected is m else None)
    if with_platforms:
        g.platforms = root_platforms(source, repo, selected, retry)
    return g


class GraphCache:
    """Graphs by root digest, for callers that walk many names of one content store (an archive's
    index.json may name one root a thousand times: it is walked once)."""

    def __init__(self, source, *, with_platforms: bool = False):
        self.source = source
        self.with_platforms = with_platforms
        self._graphs: dict[tuple[str, tuple[Platform, ...]], Graph | MirrorError] = {}

    def graph(self, repo: str, digest: str, platforms: Sequence[Platform] = ()) -> Graph:
        key = (digest, tuple(platforms))
        hit = self._graphs.get(key)
        if hit is None:
            try:
                hit = image_graph(self.source, repo, digest, platforms, with_platforms=self.with_platforms)
            except MirrorError as exc:
                hit = exc
            self._graphs[key] = hit
        if isinstance(hit, MirrorError):
            raise hit
        return hit
