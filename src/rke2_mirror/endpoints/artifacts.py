"""A `Source` of synthesized OCI graphs whose blobs are local files (charts and install files, downloaded
and verified first): per (repository, tag) one manifest, a config held in memory and layer files on disk.
The copy engine reads them like any image (and hashes every blob while it streams, as always).

`ArtifactLocator` puts it in front of another locator (the source registries): a reference it holds is
served here, every other one there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rke2_mirror.model.artifacts import (EMPTY_CONFIG, EMPTY_CONFIG_BYTES, FILE_LAYER, FILES_ARTIFACT_TYPE,
                                         HELM_CHART_LAYER, HELM_CONFIG, TITLE, VERIFIED_ANNOTATION,
                                         VERIFIED_FROM_ANNOTATION, chart_annotations, helm_config, manifest_bytes)
from rke2_mirror.model.errors import NotFound
from rke2_mirror.model.oci import OCI_MANIFEST, Descriptor
from rke2_mirror.model.reference import ImageRef

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """A file on disk, verified: its sha256 (hex) and size, and where that sha256 came from."""

    path: Path
    name: str
    sha256: str
    size: int
    verified_from: str = ""


@dataclass
class ArtifactSource:
    """See the module docstring.  `add_*` return the reference the graph is served under."""

    _manifests: dict[tuple[str, str], tuple[Descriptor, bytes]] = field(default_factory=dict)
    _memory: dict[str, bytes] = field(default_factory=dict)
    _files: dict[str, Path] = field(default_factory=dict)

    def _add(self, repo: str, tag: str, raw: bytes) -> None:
        self._manifests[(repo, tag)] = (Descriptor.of_bytes(OCI_MANIFEST, raw), raw)

    def add_chart(self, ref: ImageRef, tgz: LocalFile, chart_yaml: dict) -> ImageRef:
        config = helm_config(chart_yaml)
        cdesc = Descriptor.of_bytes(HELM_CONFIG, config)
        self._memory[cdesc.digest] = config
        layer = Descriptor(HELM_CHART_LAYER, f"sha256:{tgz.sha256}", tgz.size)
        self._files[layer.digest] = tgz.path
        self._add(ref.name, ref.tag or "latest", manifest_bytes(cdesc, [layer], annotations=chart_annotations(chart_yaml)))
        return ref

    def add_files(self, ref: ImageRef, files: list[LocalFile], annotations: dict | None = None) -> ImageRef:
        cdesc = Descriptor.of_bytes(EMPTY_CONFIG, EMPTY_CONFIG_BYTES)
        self._memory[cdesc.digest] = EMPTY_CONFIG_BYTES
        layers = []
        for f in files:
            ann = {TITLE: f.name, VERIFIED_ANNOTATION: f.sha256}
            if f.verified_from:
                ann[VERIFIED_FROM_ANNOTATION] = f.verified_from
            d = Descriptor(FILE_LAYER, f"sha256:{f.sha256}", f.size, annotations=ann)
            self._files[d.digest] = f.path
            layers.append(d)
        self._add(ref.name, ref.tag or "latest",
                  manifest_bytes(cdesc, layers, annotations=annotations, artifact_type=FILES_ARTIFACT_TYPE))
        return ref

    def holds(self, ref: ImageRef) -> bool:
        return (ref.name, ref.tag or "latest") in self._manifests

    # -- Source ----------------------------------------------------------------------------
    def location(self, repo: str, reference: str) -> str:
        return f"{repo}:{reference}"

    def _find(self, repo: str, reference: str) -> tuple[Descriptor, bytes] | None:
        got = self._manifests.get((repo, reference))
        if got is None:
            got = next((v for (r, _), v in self._manifests.items() if r == repo and v[0].digest == reference), None)
        return got

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        got = self._find(repo, reference)
        return got[0] if got else None

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        got = self._find(repo, reference)
        if got is None:
            raise NotFound(f"{repo}:{reference}: not prepared")
        return got

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        if desc.digest in self._memory:
            yield iter([self._memory[desc.digest]])
            return
        path = self._files.get(desc.digest)
        if path is None:
            raise NotFound(f"blob {desc.digest} of {repo}: not prepared")
        with open(path, "rb") as f:
            yield iter(lambda: f.read(CHUNK), b"")


class ArtifactLocator:
    """References the ArtifactSource holds are served by it; every other one by `fallback`."""

    def __init__(self, artifacts: ArtifactSource, fallback):
        self.artifacts = artifacts
        self.fallback = fallback

    def locate(self, ref: ImageRef):
        if self.artifacts.holds(ref):
            return self.artifacts, ref.name
        return self.fallback.locate(ref)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed."""
    import hashlib
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
            n += len(data)
    return h.hexdigest(), n


__all__ = ["ArtifactLocator", "ArtifactSource", "LocalFile", "file_digest"]
