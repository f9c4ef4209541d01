"""`verify --images-dir DIR`: what a node finds in its `/var/lib/rancher/rke2/agent/images` before it asks
any registry (see endpoints/nodetarball.py for the sources of each rule).

Every file a node reads there (wharfie's SupportedExtensions, dot-files skipped, no sub-directories) is
opened once with `open_archive`; per file, two sets of names:

- `containerd`: the names containerd's importer gives its images (index.json `io.containerd.image.name`
  for an OCI layout, else the docker `manifest.json` RepoTags); every image but the runtime one counts
  as present under them;
- `runtime_lookup`: what go-containerregistry's docker-tarball reader finds there (the manifest.json
  RepoTags, ggcr-normalized; `endpoints/nodefiles.node_readiness`, as `inspect` reports it): RKE2's lookup of
  `rancher/rke2-runtime` before containerd runs.  Empty for a file the node cannot decode (a name that
  says another compression, a zstd window over 32 MiB).

A file that cannot be read is one warning naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rke2_mirror.endpoints.dockerarchive import DockerArchive, open_archive
from rke2_mirror.endpoints.nodetarball import ZSTD_MAX_WINDOW, ggcr_tag_name, node_suffix, repo_tag
from rke2_mirror.endpoints.nodefiles import node_readiness
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.node.versions import RUNTIME_REPOSITORY


@dataclass
class ImagesFile:
    name: str  # the file's name in agent/images
    containerd: set[tuple[str, str]] = field(default_factory=set)  # (name, tag or digest) after import
    runtime_lookup: set[str] = field(default_factory=set)  # ggcr names the docker-tarball reader finds
    runtime_oci_only: list[str] = field(default_factory=list)  # runtime images held without a manifest.json


@dataclass
class ImagesDir:
    path: Path
    files: list[ImagesFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def containerd_file(self, name: ImageRef) -> str | None:
        """The first file (in the node's order) whose import gives containerd `name`."""
        want = (name.name, name.digest or name.tag or "latest")
        return next((f.name for f in self.files if want in f.containerd), None)

    def runtime_file(self, names: list[ImageRef]) -> str | None:
        """The first file where RKE2's runtime lookup finds one of `names` (its lookup order)."""
        keys = []
        for ref in names:
            try:
                if repo_tag(ref):
                    keys.append(ggcr_tag_name(repo_tag(ref)))
            except ValueError:
                pass
        for key in keys:
            for f in self.files:
                if key in f.runtime_lookup:
                    return f.name
        return None

    def runtime_oci_only(self, names: list[ImageRef]) -> str | None:
        """A file holding one of `names` that RKE2's runtime lookup cannot read (no manifest.json)."""
        want = {str(n) for n in names}
        return next((f.name for f in self.files if want & set(f.runtime_oci_only)), None)


def read_images_dir(path: str | os.PathLike) -> ImagesDir:
    d = ImagesDir(Path(path))
    for entry in sorted(os.scandir(d.path), key=lambda e: e.name):  # wharfie and k3s read the dir sorted
        if node_suffix(entry.name) is None or not entry.is_file():
            continue
        try:
            d.files.append(_read_file(Path(entry.path)))
        except Exception as exc:  # noqa: BLE001 -- any unreadable file is a warning, the run goes on
            d.warnings.append(f"--images-dir: {entry.name} cannot be read, its images are not counted: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return d


def _read_file(path: Path) -> ImagesFile:
    out = ImagesFile(path.name)
    reader = open_archive(path)
    try:
        readiness = node_readiness(reader)
        suffix = node_suffix(path.name)
        content = reader.compression if isinstance(reader, DockerArchive) else None
        if suffix is not None and suffix[1] != content:
            raise ValueError(f"named {suffix[0]} but {content + '-compressed' if content else 'a plain tar'}: "
                             f"a node decodes it by its name and fails")
        if isinstance(reader, DockerArchive):
            for img in reader.images:
                if img.how == "RepoTags":
                    out.containerd.update((r.name, r.tag or "latest") for r in img.refs)
        else:
            for img in reader.images:
                out.containerd.add((img.ref.name, img.ref.tag or "latest"))
                out.containerd.add((img.ref.name, img.descriptor.digest))
                if ("/" + img.ref.repository).endswith("/" + RUNTIME_REPOSITORY) and not readiness["docker_manifest"]:
                    out.runtime_oci_only.append(str(img.ref))
        window = readiness.get("zstd_window")
        if not (window and window > ZSTD_MAX_WINDOW):
            out.runtime_lookup.update(readiness["runtime_lookup"])
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
    return out


__all__ = ["ImagesDir", "ImagesFile", "read_images_dir"]
