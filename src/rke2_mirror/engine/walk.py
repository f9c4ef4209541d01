"""The one walk of a content graph: index -> manifests -> config + layers.

Every caller uses it: the copy (what to push, children first), the dry run and size estimates, `save`'s
archive plan and delta, `load`'s checks, `inspect`, the docker-archive loader's look at the target.
Each distinct descriptor is visited once however often a manifest lists it; nesting deeper than
MAX_DEPTH, or more than MAX_DESCRIPTORS distinct descriptors in one image, is refused with one line
(`GraphLimit`).  Work and requests grow with the distinct content, never with repetition.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rke2_mirror.engine.blobs import read_blob
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.model.errors import MirrorError, NotFound, UnsupportedManifest
from rke2_mirror.model.oci import Descriptor, Manifest, Platform, check_digest, filter_index, parse_manifest
from rke2_mirror.model.referrers import MAX_REFERRER_DEPTH, ReferrerFilter, kind_of

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
    pruned: list[str] = field(default_factory=list)  # child manifests not descended into (complete at the target)
    referrers: list["ReferrerEdge"] = field(default_factory=list)  # each after its subject (walk_referrers)

    @property
    def manifest_digests(self) -> list[str]:
        """Every manifest of the image itself, pruned ones included: the subjects referrers can point at."""
        return list(dict.fromkeys([self.root.digest, *(d.digest for d, _ in self.children), *self.pruned]))

    @property
    def manifests(self) -> dict[str, Descriptor]:
        """Every manifest of the image by digest, the root first."""
        out = {self.root.digest: self.root}
        for d, _ in self.children:
            out.setdefault(d.digest, d)
        return out

    @property
    def size(self) -> int:
        """Bytes of the image's manifests and of every blob (its referrers' included), and of the referrer
        manifests not at the destination."""
        own = sum(d.size for d in self.manifests.values()) + sum(d.size for d in self.blobs.values())
        return own + sum(d.size for e in self.referrers if e.graph for d in e.graph.manifests.values())


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
                g.pruned.append(c.digest)
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


@dataclass
class ReferrerEdge:
    """A signature, attestation or SBOM of `subject` (a manifest of the image, or another referrer).

    `graph` is None when the destination has it already (`present`): only its own referrers were looked
    for.  `tag`: cosign's legacy tag form (`sha256-<hex>.sig`), written under that tag."""

    subject: str
    descriptor: Descriptor
    kind: str
    tag: str | None = None
    graph: Graph | None = None

    @property
    def present(self) -> bool:
        return self.graph is None

    def to_json(self) -> dict:
        d = self.descriptor
        out = {"subject": self.subject, "digest": d.digest, "artifactType": d.artifact_type or "", "kind": self.kind,
               "size": self.graph.size if self.graph else d.size}
        if self.tag:
            out["tag"] = self.tag
        return out


PresentReferrer = Callable[[str, Descriptor, "str | None"], bool]


def referrer_subjects(g: Graph, *, rebuilt: bool) -> list[str]:
    """Whose referrers to carry: every manifest of the image, but not an index rebuilt for `--platform`
    (what signed the original index does not name the rebuilt one)."""
    subjects = g.manifest_digests
    return subjects[1:] if rebuilt else subjects


def walk_referrers(source, repo: str, g: Graph, filt: ReferrerFilter, *, subjects: Sequence[str] | None = None,
                   present: PresentReferrer | None = None, max_descriptors: int = MAX_DESCRIPTORS) -> None:
    """Add the referrers of the image's manifests (and theirs, to MAX_REFERRER_DEPTH) to `g`: each as an
    edge after its subject, its blobs into `g.blobs`.  `present(subject, descriptor, tag)` True: the
    destination has that referrer (it is not fetched; its own referrers are still looked for).  A source
    that can't hold referrers (no `referrers` method: a docker archive) adds nothing."""
    find = getattr(source, "referrers", None)
    tagged = getattr(source, "tagged_artifacts", None)
    if find is None:
        return
    seen = set(g.manifests) | set(g.pruned) | set(g.blobs) | {e.descriptor.digest for e in g.referrers}

    def count() -> None:
        if len(seen) + len(g.blobs) > max_descriptors:
            raise GraphLimit(f"image graph with its referrers has more than {max_descriptors} distinct "
                             "manifests and blobs: refused")

    queue = deque((s, 0) for s in (subjects if subjects is not None else g.manifest_digests))
    while queue:
        subject, depth = queue.popleft()
        # cosign's tags first: a registry reads the repository's tag list once for them, which then
        # also says whether the tag schema index exists
        legacy = tagged(repo, subject) if tagged is not None else []
        found: list[tuple[Descriptor | None, str | None, str]] = [
            (d, None, kind_of(d.artifact_type, d.annotations)) for d in find(repo, subject, filt)]
        found += [(None, tag, kind) for tag, kind in legacy]
        for desc, tag, kind in found:
            if not filt.wants(desc.artifact_type if desc else None, kind):
                continue
            raw = None
            if desc is None:  # a legacy tag: its digest is what the source's tag names
                desc_t, raw = source.get_manifest(repo, tag)
                desc = Descriptor(desc_t.media_type, desc_t.digest, len(raw))
            if desc.digest in seen:
                continue
            seen.add(check_digest(desc.digest))
            count()
            edge = ReferrerEdge(subject, desc, kind, tag)
            if present is None or not present(subject, desc, tag):
                if raw is None:
                    try:
                        _, raw = source.get_manifest(repo, desc.digest)
                    except NotFound:  # listed but gone (a tag schema index outlives what it lists)
                        seen.discard(desc.digest)
                        continue
                m = parse_manifest(desc.media_type or None, raw)
                if tag is None and (m.subject is None or m.subject.digest != subject):
                    raise UnsupportedManifest(f"referrer {desc.digest} of {subject} does not name it as its subject")
                edge.graph = walk(source, repo, m, root_digest=desc.digest, max_descriptors=max_descriptors)
                for d, b in edge.graph.blobs.items():
                    g.blobs.setdefault(d, b)
                count()
            g.referrers.append(edge)
            if depth + 1 < MAX_REFERRER_DEPTH:
                queue.append((desc.digest, depth + 1))


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
                with_platforms: bool = False, retry: RetryPolicy | None = None,
                referrers: ReferrerFilter | None = None) -> Graph:
    """Fetch an image's root from `source` and walk it (after selecting `platforms`), with its referrers
    when a filter is given."""
    desc, raw = source.get_manifest(repo, reference)
    m = parse_manifest(desc.media_type or None, raw)
    selected = select_platforms(source, repo, m, platforms, retry)
    g = walk(source, repo, selected, root_digest=desc.digest if selected is m else None)
    if referrers is not None:
        walk_referrers(source, repo, g, referrers, subjects=referrer_subjects(g, rebuilt=selected is not m))
    if with_platforms:
        g.platforms = root_platforms(source, repo, selected, retry)
    return g


class GraphCache:
    """Graphs by root digest, for callers that walk many names of one content store (an archive's
    index.json may name one root a thousand times: it is walked once)."""

    def __init__(self, source, *, with_platforms: bool = False, referrers: ReferrerFilter | None = None):
        self.source = source
        self.with_platforms = with_platforms
        self.referrers = referrers
        self._graphs: dict[tuple[str, tuple[Platform, ...]], Graph | MirrorError] = {}

    def graph(self, repo: str, digest: str, platforms: Sequence[Platform] = ()) -> Graph:
        key = (digest, tuple(platforms))
        hit = self._graphs.get(key)
        if hit is None:
            try:
                hit = image_graph(self.source, repo, digest, platforms, with_platforms=self.with_platforms,
                                  referrers=self.referrers)
            except MirrorError as exc:
                hit = exc
            self._graphs[key] = hit
        if isinstance(hit, MirrorError):
            raise hit
        return hit
