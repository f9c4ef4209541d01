"""`save`: registry -> one archive file (an OCI image layout in a tar), through the copy engine.

Blobs are collected in a work dir (an OCI layout beside the output, resumable), then the tar is assembled
by the kernel (endpoints.ociarchive.write_archive).  A delta (`--since OLD`) leaves out the blobs OLD's
images have: found with the engine's walk over OLD (an archive, a list, a release).

`--for-node` (`ForNode`): the same copy into the same work dir, restricted to one platform; then the
file is planned by endpoints.nodetarball (a docker manifest.json beside index.json, one platform
manifest per image, `system-default-registry` names too) and written by the same write_archive,
through the encoder the file name says (.tar, .tar.gz, .tar.zst).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import rke2_mirror.jobs.common as jobs
from rke2_mirror.endpoints.layout import INDEX_FILE, LAYOUT_FILE, LayoutDir, LayoutLocator, NamedImage, image_key
from rke2_mirror.endpoints.nodetarball import NodeEntry, plan_node_archive
from rke2_mirror.endpoints.tarfiles import output_compression
from rke2_mirror.endpoints.ociarchive import (DELTA_FILE, DELTA_FILE_ANNOTATION, DELTA_SINCE, ArchiveReader, plan_archive,
                                              write_archive)
from rke2_mirror.engine.copy import CopyOptions, CopyTask, Progress, Report
from rke2_mirror.engine.walk import Graph, GraphCache, image_graph
from rke2_mirror.model.errors import WorkDirError, InputError, MirrorError
from rke2_mirror.model.oci import Descriptor, Platform
from rke2_mirror.model.reference import ImageRef, RegistryURL
from rke2_mirror.model.units import human
from rke2_mirror.node.resolver import node_image

Log = Callable[[str], None]

@dataclass
class Since:
    """`save --since`: what the target holds already."""

    label: str
    refs: list[ImageRef] = field(default_factory=list)
    archive: Path | None = None


@dataclass(frozen=True)
class ForNode:
    """`save --for-node`: a tarball for RKE2's agent/images, one platform (a node's)."""

    platform: Platform
    system_default_registry: str | None = None  # HOST[:PORT][/PATH]: each docker.io image also under HOST/…


def parse_system_default_registry(text: str) -> str:
    """`--system-default-registry HOST[:PORT][/PATH]`, as config.yaml has it (no scheme)."""
    raw = text.strip().strip("/")
    if "://" in raw:
        raise InputError(f"--system-default-registry {text!r}: HOST[:PORT][/PATH] as in config.yaml, without a scheme")
    url = RegistryURL.parse(raw, what="--system-default-registry")
    return url.host + (f"/{url.prefix}" if url.prefix else "")


def node_names(ref: ImageRef, system_default_registry: str | None) -> list[ImageRef]:
    """The names an image goes under in a node tarball: its own, then the one RKE2 asks for under
    system-default-registry (docker.io images only, as RKE2 renames them)."""
    out = [ref]
    if system_default_registry:
        alias = node_image(ref, system_default_registry)
        if alias != ref:
            out.append(alias)
    return out


@dataclass
class SaveResult:
    report: Report
    files: list[Path]
    images: int = 0
    blobs: int = 0
    bytes: int = 0
    omitted: int = 0
    omitted_bytes: int = 0
    work_dir: Path | None = None
    work_dir_kept: bool = False


def _old_blobs(since: Since, router, platforms: Sequence[Platform], jobs_n: int, log: Log) -> dict[str, set[str]]:
    """digest -> source repositories (of OLD's images) holding it."""
    out: dict[str, set[str]] = {}
    lock = threading.Lock()

    def add(repo: str, g: Graph) -> None:
        with lock:
            for d in g.blobs:
                out.setdefault(d, set()).add(repo)

    if since.archive is not None:
        with ArchiveReader(since.archive) as old:
            graphs = GraphCache(old)
            for img in old.images:
                try:
                    add(img.ref.repository, graphs.graph(img.ref.name, img.descriptor.digest, platforms))
                except MirrorError as exc:
                    log(f"--since {since.label}: cannot read {img.ref} ({exc}); its blobs are not left out")
            if old.delta:  # what that delta left out is at the target too
                for d, o in old.delta.omitted.items():
                    if d in out:
                        out[d].update(o["repositories"])
        return out

    def one(ref: ImageRef) -> None:
        try:
            ep, repo = router.locate(ref)
            add(ref.repository, image_graph(ep, repo, ref.reference, platforms))
        except MirrorError as exc:
            log(f"--since {since.label}: cannot read {ref} ({exc}); its blobs are not left out")

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        list(pool.map(one, since.refs))
    return out


@contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    import fcntl
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(work_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WorkDirError(f"cannot create the work dir {work_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"{work_dir} is in use by another rke2-mirror save") from None
        yield
    finally:
        os.close(fd)


def default_work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".work")


_WORK_ENTRIES = ("blobs", INDEX_FILE, LAYOUT_FILE, ".lock")


def _check_work_dir(work_dir: Path) -> None:
    """A work dir is ours (an OCI layout we made) or new: never someone else's directory."""
    if work_dir.exists() and not work_dir.is_dir():
        raise InputError(f"work dir {work_dir} exists and is not a directory")
    if work_dir.is_dir() and not (work_dir / LAYOUT_FILE).is_file() and any(work_dir.iterdir()):
        raise InputError(f"work dir {work_dir} is not empty and not an rke2-mirror work dir (no oci-layout)")


def _remove_work_dir(work_dir: Path) -> None:
    """Remove what save put there (and the directory when that leaves it empty)."""
    for name in _WORK_ENTRIES:
        p = work_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in work_dir.glob(f".{INDEX_FILE}.tmp-*"):
        p.unlink(missing_ok=True)
    try:
        work_dir.rmdir()
    except OSError:
        pass


def save(refs: Sequence[ImageRef], output: Path, *, source: jobs.SourceOptions, options: CopyOptions,
         split: int | None = None, since: Since | None = None, work_dir: Path | None = None,
         keep_work_dir: bool = False, progress: Progress | None = None, log: Log = lambda s: None,
         max_rps: float | None = None, for_node: ForNode | None = None,
         expect_digests: Mapping[ImageRef, str] | None = None, artifacts=None) -> SaveResult:
    """Registry -> archive: the `save` command's job.  `expect_digests`: the digest a release publishes for an
    image (rancher): the copy fails it otherwise.  `artifacts` (jobs.artifacts.Prepared): charts and install
    files, copied into the same archive by the same engine."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"--output {output} is a directory")
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: directory {output.parent} does not exist")
    compression = None
    if for_node is None and output.name.lower().endswith((".gz", ".tgz", ".zst", ".tzst", ".bz2", ".tbz", ".lz4")):
        raise InputError(f"--output {output.name}: save writes a plain tar (layers are compressed already, and `load` "
                         "reads it in place); name it .tar, or add --for-node for a compressed node tarball")
    if for_node is not None:
        if split is not None:
            raise InputError("--for-node writes one file (a node does not read split parts): drop --split")
        if since is not None:
            raise InputError("--for-node writes every blob (containerd imports whole images): drop --since")
        if artifacts is not None and artifacts.pairs:
            raise InputError("--for-node writes images only (a node imports images): drop --chart/--install-files")
        compression = output_compression(output)
        options = replace(options, platforms=(for_node.platform,), referrers=None)  # a node imports images only
        sdr = for_node.system_default_registry
        if sdr and "/" in sdr:
            log(f"system-default-registry {sdr} has a path: only RKE2 releases with rancher/rke2#9404 accept "
                "one (older ones take HOST[:PORT] only); the images are named under it as those releases ask")
    work_dir = Path(work_dir) if work_dir else default_work_dir(output)
    _check_work_dir(work_dir)
    router = jobs.source_router(source, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps,
                                cancel=options.cancel, log=log)
    try:
        jobs.check_source_endpoints(router, list(refs) + (since.refs if since else [])
                                    + (artifacts.registry_refs if artifacts else []))
        old: dict[str, set[str]] = {}
        if since is not None:
            old = _old_blobs(since, router, options.platforms, options.jobs, log)
            log(f"delta against {since.label}: {len(old)} blobs of its images are left out when shared")
        with _locked(work_dir):
            layout = LayoutDir(work_dir, assume_present=old)
            tasks = [CopyTask(r, r, expect_digest=(expect_digests or {}).get(r)) for r in refs]
            tasks += artifacts.save_tasks() if artifacts else []
            report = jobs.run_copy(tasks, artifacts.locator(router) if artifacts else router, LayoutLocator(layout),
                                   replace(options, assume_present=frozenset(old)), progress)
            if artifacts is not None and artifacts.pairs:
                report = artifacts.with_kinds(report)  # its summary counts images, charts and files apart
            if report.interrupted:  # no archive from half a run: the work dir keeps what arrived
                return SaveResult(report, [], work_dir=work_dir, work_dir_kept=True)
            if layout.write_error is not None:
                e = layout.write_error
                raise WorkDirError(f"cannot write to the work dir {work_dir}: {e.strerror or e}; no archive was written")
            images = _saved_images(layout, report)
            result = SaveResult(report, [], work_dir=work_dir)
            if not images:
                result.work_dir_kept = True
                return result
            annotations = {}
            delta_doc = None
            omit = set(old)
            if since is not None:
                annotations = {DELTA_SINCE: since.label, DELTA_FILE_ANNOTATION: DELTA_FILE}
            if for_node is not None:
                plan = plan_node_archive(layout, [NodeEntry(img, node_names(img.ref, for_node.system_default_registry))
                                                  for img in images], for_node.platform)
                for w in plan.warnings:
                    log(w)
                _mark_failed(report, plan.problems)
                images = [img for img in images if img.key not in plan.problems]
                if not images:
                    result.work_dir_kept = True
                    return result
                content = plan.content
            else:
                content = plan_archive(layout, images, omit=omit, annotations=annotations, referrers=options.referrers)
            if since is not None:
                delta_doc = {"schemaVersion": 1, "since": since.label,
                             "omitted": [{"digest": d, "size": b.size, "repositories": sorted(old[d])}
                                         for d, b in sorted(content.omitted.items())]}
            total = sum(b.size for b in content.blobs.values())
            log(f"writing {output}{' in parts of ' + human(split) if split else ''}: {len(images)} images, "
                f"{len(content.blobs)} blobs, {human(total)}")
            result.files = write_archive(layout, content, output, split=split, delta_doc=delta_doc,
                                         progress=getattr(progress, "bytes_copied", None), compression=compression)
            result.images, result.blobs, result.bytes = len(images), len(content.blobs), total
            result.omitted = len(content.omitted)
            result.omitted_bytes = sum(b.size for b in content.omitted.values())
            if report.failed or keep_work_dir:
                result.work_dir_kept = True
            else:
                _remove_work_dir(work_dir)
        return result
    finally:
        router.close()


def _saved_ref(r) -> ImageRef:
    ref = ImageRef.parse(r.target)
    return ref.with_digest(None) if ref.tag else ref  # by tag when it has one (as the engine wrote it)


def _mark_failed(report: Report, problems: dict[str, str]) -> None:
    """Images the node tarball cannot hold: failed in the report (exit 1), with the reason."""
    for r in report.images:
        if r.status in ("copied", "skipped") and r.digest and image_key(_saved_ref(r)) in problems:
            r.status = "failed"
            r.error = f"not written to the node tarball: {problems[image_key(_saved_ref(r))]}"


def _saved_images(layout: LayoutDir, report: Report) -> list[NamedImage]:
    out: dict[str, NamedImage] = {}
    for r in report.images:
        if r.status not in ("copied", "skipped") or not r.digest:
            continue
        ref = _saved_ref(r)
        key = image_key(ref)
        entry = layout.entry(key)
        if entry is not None:
            desc = Descriptor.from_json(entry)
        else:  # pinned by digest only: the engine wrote no tag
            d, raw = layout.get_manifest(ref.name, r.digest)
            desc = Descriptor(d.media_type, r.digest, len(raw))
        out[key] = NamedImage(ref, desc)
    return list(out.values())


