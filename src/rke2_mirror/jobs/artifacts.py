"""Charts and install files as copies like any image: fetched and verified first (releases.download), served
as small OCI graphs by an `ArtifactSource` (OCI charts: by their registry, through the source router), and
copied by the same engine to whatever destination the command has.  `extract` writes an archive's files
into a directory laid out for INSTALL_RKE2_ARTIFACT_PATH, each hashed again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from rke2_mirror import yamlsafe
from rke2_mirror.endpoints.artifacts import ArtifactLocator, ArtifactSource
from rke2_mirror.endpoints.ociarchive import ArchiveReader
from rke2_mirror.engine.copy import NOT_IN_PLACE, CopyTask, ImageResult, Report
from rke2_mirror.files import read_capped, write_stream
from rke2_mirror.model.artifacts import (CHARTS_PREFIX, FILES_REPOSITORY, LOCAL_REGISTRY, ChartSpec, content_kind,
                                         file_entries, oci_tag)
from rke2_mirror.model.errors import ArchiveError, DigestMismatch, InputError, MirrorError
from rke2_mirror.model.oci import parse_manifest
from rke2_mirror.model.reference import ImageRef, RegistryURL, merge_refs, target_ref
from rke2_mirror.releases.download import fetch_chart, fetch_install_files
from rke2_mirror.releases.source import ReleaseSource

Log = Callable[[str], None]


@dataclass(frozen=True)
class InstallFiles:
    """`--install-files`: RKE2 `version`'s install files for `arch`."""

    source: ReleaseSource
    version: str
    arch: str
    install_script: str


@dataclass
class Prepared:
    """What joins a copy besides the images: (source reference, name in an archive) pairs, and the source
    serving those fetched over HTTP."""

    source: ArtifactSource = field(default_factory=ArtifactSource)
    pairs: list[tuple[ImageRef, ImageRef]] = field(default_factory=list)
    registry_refs: list[ImageRef] = field(default_factory=list)  # OCI charts: read from their registry
    kinds: dict[ImageRef, str] = field(default_factory=dict)  # name -> "chart" | "files"
    images: list[ImageRef] = field(default_factory=list)  # the charts' declared images (artifacthub.io/images)
    # the targets of the tasks made so far -> their kind (the engine's results name their target)
    target_kinds: dict[str, str] = field(default_factory=dict)

    def locator(self, fallback) -> ArtifactLocator:
        return ArtifactLocator(self.source, fallback)

    def save_tasks(self) -> list[CopyTask]:
        return [self._task(src, name, name) for src, name in self.pairs]

    def mirror_tasks(self, target: RegistryURL) -> list[CopyTask]:
        return [self._task(src, name, target_ref(name, target)) for src, name in self.pairs]

    def _task(self, src: ImageRef, name: ImageRef, dst: ImageRef) -> CopyTask:
        self.target_kinds[str(dst)] = self.kinds.get(name, "chart")
        return CopyTask(src, dst)

    def with_kinds(self, report: Report) -> Report:
        """`report` as a KindReport: its summary counts images, charts and files apart."""
        return KindReport.of(report, self.target_kinds)


KINDS = ("image", "chart", "files")


def kind_summary(results: Sequence[ImageResult], target_kinds: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Per kind (image, chart, files): total, copied, skipped, failed (anything not in place)."""
    out = {k: {"total": 0, "copied": 0, "skipped": 0, "failed": 0} for k in KINDS}
    for r in results:
        c = out[target_kinds.get(r.target, "image")]
        c["total"] += 1
        if r.status in ("copied", "skipped"):
            c[r.status] += 1
        elif r.status in NOT_IN_PLACE or r.status == "missing":
            c["failed"] += 1
    return out


@dataclass
class KindReport(Report):
    """A copy's report that knows which results are charts and files (by their target); its JSON summary
    gains `kinds`: {image|chart|files: {total, copied, skipped, failed}}."""

    target_kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, report: Report, target_kinds: Mapping[str, str]) -> "KindReport":
        base = {f.name: getattr(report, f.name) for f in fields(Report)}
        return cls(**base, target_kinds=dict(target_kinds))

    def kind_summary(self) -> dict[str, dict[str, int]]:
        return kind_summary(self.images, self.target_kinds)

    def to_json(self) -> dict:
        doc = super().to_json()
        doc["summary"]["kinds"] = self.kind_summary()
        return doc


def chart_name(spec: ChartSpec) -> ImageRef:
    """Where a chart goes: charts/NAME:VERSION (under the target's prefix, `rke2-mirror.local/` in an archive)."""
    return ImageRef(LOCAL_REGISTRY, f"{CHARTS_PREFIX}/{spec.name}", spec.tag)


def files_name(version: str, arch: str) -> ImageRef:
    return ImageRef(LOCAL_REGISTRY, FILES_REPOSITORY, oci_tag(f"{version}-{arch}"))


IMAGES_ANNOTATION = "artifacthub.io/images"
IMAGES_ANNOTATION_MAX_BYTES = 256 * 1024


def declared_images(chart_yaml: dict, origin: str) -> list[ImageRef]:
    """The images a chart declares in Chart.yaml's `artifacthub.io/images` annotation (a YAML list of
    {name, image, platforms?} in a string, read bounded); [] when it declares none.  One InputError for an
    annotation that is not such a list or names an image that is not a reference."""
    ann = chart_yaml.get("annotations")
    text = ann.get(IMAGES_ANNOTATION) if isinstance(ann, dict) else None
    if text is None:
        return []
    hint = " (--no-chart-images leaves a chart's images out)"
    if not isinstance(text, str):
        raise InputError(f"{origin}: annotation {IMAGES_ANNOTATION} is not a string{hint}")
    try:
        doc = yamlsafe.load(text, limit=IMAGES_ANNOTATION_MAX_BYTES, max_nodes=20_000)
    except yamlsafe.YAMLRefused as exc:
        raise InputError(exc.describe(f"{origin}: annotation {IMAGES_ANNOTATION}") + hint) from None
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise InputError(f"{origin}: annotation {IMAGES_ANNOTATION} is not a list of {{name, image}}{hint}")
    out: list[ImageRef] = []
    for i, item in enumerate(doc):
        image = item.get("image") if isinstance(item, dict) else None
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{origin}: annotation {IMAGES_ANNOTATION}, entry {i + 1}: no 'image'{hint}")
        try:
            out.append(ImageRef.parse(image.strip()))
        except InputError as exc:
            raise InputError(f"{origin}: annotation {IMAGES_ANNOTATION}, entry {i + 1}: {exc}{hint}") from None
    return merge_refs(out)


def join_images(refs: Sequence[ImageRef], prepared: "Prepared | None", log: Log = lambda s: None) -> list[ImageRef]:
    """`refs` and the charts' declared images, de-duplicated (first occurrence kept); says how many are new."""
    if prepared is None or not prepared.images:
        return list(refs)
    out = merge_refs(list(refs), prepared.images)
    log(f"charts' images: {len(prepared.images)} declared, {len(out) - len(refs)} not already in the image set")
    return out


def prepare(charts: Sequence[ChartSpec], install: Sequence[InstallFiles], client, work: Path,
            log: Log = lambda s: None, *, chart_images: bool = True) -> Prepared:
    """Fetch and verify every HTTP chart and the install files into `work` (a directory that lives as
    long as the copy); OCI charts are only named (the copy reads them from their registry).  With
    `chart_images`, the images an HTTP chart declares (artifacthub.io/images) are in `images`."""
    out = Prepared()
    for spec in charts:
        name = chart_name(spec)
        out.kinds[name] = "chart"
        if spec.oci_ref is not None:
            ref = ImageRef.parse(spec.oci_ref)
            out.pairs.append((ref, name))
            out.registry_refs.append(ref)
            continue
        if client is None:
            raise InputError(f"--chart {spec.text}: a chart repository cannot be read --offline")
        got = fetch_chart(client, spec, work, log)
        out.pairs.append((out.source.add_chart(name, got.tgz, got.chart_yaml), name))
        if chart_images:
            imgs = declared_images(got.chart_yaml, f"chart {spec.name} {spec.version}")
            if imgs:
                log(f"chart {spec.name} {spec.version}: {len(imgs)} image(s) declared ({IMAGES_ANNOTATION})")
            out.images = merge_refs(out.images, imgs)
    for one in install:
        d = work / f"files-{one.arch}"
        d.mkdir(exist_ok=True)
        files = fetch_install_files(one.source, one.version, one.arch, client, d, one.install_script, log)
        name = files_name(one.version, one.arch)
        out.source.add_files(name, files, annotations={"io.rke2-mirror.release": one.version,
                                                       "io.rke2-mirror.arch": one.arch})
        out.pairs.append((name, name))
        out.kinds[name] = "files"
    return out


# --------------------------------------------------------------------------- extract


@dataclass
class Extracted:
    files: list[dict] = field(default_factory=list)  # name, path, sha256, size, entry


def extract(reader: ArchiveReader, to: Path, *, log: Log = lambda s: None) -> Extracted:
    """Every file of the archive's files artifacts into `to` (flat), each streamed to an O_EXCL temp file,
    hashed, then renamed into place; a title that is not one plain file name refuses the archive before
    anything is written.  The files a sha256sum-*.txt among them names are checked against it too."""
    plan: dict[str, tuple[str, dict]] = {}
    for img in reader.images:
        try:
            desc, raw = reader.get_manifest(img.ref.name, img.descriptor.digest)
            m = parse_manifest(desc.media_type or None, raw)
        except MirrorError:
            continue
        if content_kind(m) != "files":
            continue
        for f, layer in zip(file_entries(m), m.layers, strict=True):
            if f["name"] is None:
                raise ArchiveError(f"{reader.label}: {img.ref}: file title {str(f['title'])[:80]!r} is not a plain "
                                   "file name; refused (nothing written)")
            if f["verified_sha256"] and f"sha256:{f['verified_sha256']}" != layer.digest:
                raise ArchiveError(f"{reader.label}: {img.ref}: {f['name']} is {layer.digest}, but was verified as "
                                   f"sha256:{f['verified_sha256']}; refused")
            prev = plan.get(f["name"])
            if prev is not None and prev[1]["digest"] != f["digest"]:
                raise InputError(f"{reader.label}: two different files named {f['name']} ({prev[0]} and {img.ref}); "
                                 "extract writes one directory per release and arch")
            plan[f["name"]] = (str(img.ref), {**f, "layer": layer, "repo": img.ref.name})
    if not plan:
        raise InputError(f"{reader.label} holds no install files (save --install-files puts them there)")
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {to}: {exc.strerror or exc}") from None
    out = Extracted()
    for name, (entry, f) in sorted(plan.items()):
        sha = _write_blob(reader, f["repo"], f["layer"], to / name)
        out.files.append({"name": name, "path": str(to / name), "sha256": sha, "size": f["size"], "entry": entry})
        log(f"{to / name}: sha256 {sha[:12]} checked")
    _check_against_sums(to, out, log)
    return out


def _write_blob(reader: ArchiveReader, repo: str, desc, path: Path) -> str:
    """One file of the archive at `path`, whole and checked or not at all (files.write_stream)."""
    def check(hexdigest: str, n: int) -> None:
        if n != desc.size or f"sha256:{hexdigest}" != desc.digest:
            raise DigestMismatch(f"{path.name} in {reader.label}: {n} bytes hashing to sha256:{hexdigest}, "
                                 f"expected {desc.size} bytes, {desc.digest} (corrupt archive); not written")

    with reader.open_blob(repo, desc) as chunks:
        return write_stream(path, chunks, 0o644, check)[0]


def _check_against_sums(to: Path, out: Extracted, log: Log) -> None:
    from rke2_mirror.releases.lists import parse_checksums
    have = {f["name"]: f["sha256"] for f in out.files}
    for f in out.files:
        if not (f["name"].startswith("sha256sum-") and f["name"].endswith(".txt")):
            continue
        raw = read_capped(to / f["name"], 1024 * 1024, "a checksum file")
        sums = parse_checksums(raw.decode("utf-8", errors="replace"), f["path"])
        for name, sha in have.items():
            if name in sums and sums[name] != sha:
                raise DigestMismatch(f"{to / name}: sha256 {sha}, but {f['name']} says {sums[name]}")
            if name in sums:
                log(f"{name} matches {f['name']}")
