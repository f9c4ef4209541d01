"""`inspect`: what an archive holds, read with the engine's walk (each root walked once however many
names index.json gives it; a hostile graph refuses the archive in one line)."""

from __future__ import annotations

from collections.abc import Callable

from rke2_mirror.endpoints.dockerarchive import DOCKER_MANIFEST, DockerArchive
from rke2_mirror.endpoints.nodefiles import node_readiness
from rke2_mirror.endpoints.ociarchive import ArchiveReader
from rke2_mirror.engine.walk import GraphCache, GraphLimit
from rke2_mirror.model.artifacts import TITLE, VERSION, content_kind, file_entries
from rke2_mirror.model.errors import ArchiveError, MirrorError
from rke2_mirror.model.oci import Descriptor
from rke2_mirror.model.referrers import ReferrerFilter



def inspect(reader: ArchiveReader | DockerArchive, *, check: bool = False,
            on_blob: Callable[[str, str | None], None] | None = None) -> dict:
    """What `inspect` prints (`--json`): for a docker archive, DIGEST is the image ID (config digest);
    the manifest digests `load` pushes are rebuilt.  Compressed archives are always checked (read whole)."""
    if isinstance(reader, ArchiveReader):
        doc = _inspect_oci(reader, check=check, on_blob=on_blob)
        doc.setdefault("format", "OCI image layout" + (f" {doc['layout_version']}" if doc.get("layout_version") else ""))
        doc["node"] = node_readiness(reader)
        return doc
    da = reader
    if check:
        da.check(on_layer=on_blob)
    images, problems = [], []
    for img in da.images:
        for r in img.refs:
            row = {"reference": str(r), "digest": img.image_id or "", "image_id": img.image_id, "kind": "image ID",
                   "mediaType": DOCKER_MANIFEST, "named_by": img.how,
                   "platforms": [str(img.platform) if img.platform else "unknown"], "size": img.size,
                   "layers": len(img.layer_names)}
            if img.error:
                row["error"] = img.error
                problems.append({"image": str(r), "error": img.error})
            images.append(row)
    layers = {l.member.name: l.member for img in da.images for l in img.layers}
    configs = {img.config_name: img.config_desc for img in da.images if img.config_desc}
    doc: dict = {
        "archive": da.label, "files": [str(da.path)], "file_bytes": da.size, "format": da.format,
        "compression": da.compression, "layout_version": None, "images": images,
        "blobs": {"count": len(layers) + len(configs),
                  "bytes": sum(m.size for m in layers.values()) + sum(d.size for d in configs.values())},
        "delta": None,
    }
    if da.ignored:
        doc["ignored_members"] = da.ignored
    if da.checked:
        doc["checked"] = len(layers)
    doc["problems"] = problems
    doc["node"] = node_readiness(da)
    return doc


def _inspect_oci(reader: ArchiveReader, *, check: bool = False,
            on_blob: Callable[[str, str | None], None] | None = None) -> dict:
    """A JSON-able description of the archive; with `check`, every blob is hashed again."""
    images = []
    referenced: dict[str, Descriptor] = {}
    problems: list[dict] = []
    graphs = GraphCache(reader, with_platforms=True, referrers=ReferrerFilter())
    for img in reader.images:
        row = {"reference": str(img.ref), "digest": img.descriptor.digest,
               "mediaType": img.descriptor.media_type, "named_by": img.how}
        try:
            g = graphs.graph(img.ref.name, img.descriptor.digest)
            row.update(mediaType=g.root.media_type, platforms=g.platforms, size=g.size,
                       manifests=len(g.manifests), blobs=len(g.blobs))
            row["content"] = content_kind(g.manifest)
            if row["content"] == "chart":
                ann = _annotations(g.manifest.raw)
                row["chart"] = {"name": ann.get(TITLE), "version": ann.get(VERSION)}
            elif row["content"] == "files":
                row["files"] = [{k: f[k] for k in ("title", "digest", "size", "verified_sha256")}
                                for f in file_entries(g.manifest)]
            if g.referrers:
                row["referrers"] = [e.to_json() for e in g.referrers]
                for e in g.referrers:
                    if e.graph is not None:
                        referenced.update(e.graph.manifests)
            if reader.delta:
                row["size_in_archive"] = sum(d.size for k, d in {**g.manifests, **g.blobs}.items()
                                             if reader.blob(k) is not None)
            referenced.update(g.blobs)
            referenced.update(g.manifests)
        except GraphLimit as exc:
            raise ArchiveError(f"{reader.label}: {img.ref}: {exc}") from None
        except MirrorError as exc:
            row["error"] = str(exc)
            problems.append({"image": str(img.ref), "error": str(exc)})
        images.append(row)
    blob_list = reader.blob_members()
    doc: dict = {
        "archive": reader.label, "files": [str(p) for p in reader.paths], "file_bytes": reader.size,
        "layout_version": reader.layout_version,
        "images": images,
        "blobs": {"count": len(blob_list), "bytes": sum(m.size for _, m in blob_list)},
        "delta": None,
    }
    if reader.delta:
        doc["delta"] = {"since": reader.delta.since, "omitted": len(reader.delta.omitted),
                        "omitted_bytes": reader.delta.omitted_bytes}
    omitted = reader.delta.omitted if reader.delta else {}
    for d in sorted(referenced):
        if reader.blob(d) is None and d not in omitted:
            problems.append({"blob": d, "error": f"missing from {reader.label}"})
    if reader.ignored:
        doc["ignored_members"] = reader.ignored
    if check:
        for digest, m in blob_list:
            err = reader.rehash(digest, m)
            if on_blob:
                on_blob(digest, err)
            if err:
                problems.append({"blob": digest, "error": err})
        doc["checked"] = len(blob_list)
    doc["problems"] = problems
    doc["counts"] = {k: sum(1 for r in images if r.get("content") == k) for k in ("image", "chart", "files")}
    return doc


def _annotations(raw: bytes) -> dict:
    import json
    try:
        ann = json.loads(raw).get("annotations")
    except (ValueError, AttributeError):
        return {}
    return ann if isinstance(ann, dict) else {}


