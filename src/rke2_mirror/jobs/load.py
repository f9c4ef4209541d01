"""`load`: an archive -> a registry, through the copy engine.

Any archive `endpoints.dockerarchive.open_archive` gives: an OCI layout tar (our `save`, skopeo's
`oci-archive:`, crane's), digests preserved; or a docker archive (`docker save`, RKE2's image tarballs),
whose manifests are rebuilt.  Every image's graph is walked first (the engine's walk, read from the
archive): a graph that nests too deep or is too large refuses the archive before anything is pushed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import rke2_mirror.jobs.common as jobs
from rke2_mirror.endpoints.harbor import project_of
from rke2_mirror.endpoints.dockerarchive import NOTE, NOTE_PRESENT, DockerArchive
from rke2_mirror.endpoints.layout import ref_key
from rke2_mirror.endpoints.ociarchive import ArchiveReader
from rke2_mirror.endpoints.routing import TargetLocator
from rke2_mirror.engine.copy import CopyOptions, CopyTask, ImageResult, Progress, Report
from rke2_mirror.engine.walk import Graph, GraphCache, GraphLimit, select_platforms, walk
from rke2_mirror.jobs.artifacts import KindReport
from rke2_mirror.model.artifacts import content_kind
from rke2_mirror.model.errors import ArchiveError, InputError, MirrorError
from rke2_mirror.model.oci import Descriptor, Platform, parse_manifest
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.model.reference import RegistryURL, target_ref

Log = Callable[[str], None]


def load(reader: ArchiveReader | DockerArchive, target: RegistryURL, *, target_tls: jobs.TLSOptions,
         options: CopyOptions, public_projects: bool = False, progress: Progress | None = None,
         log: Log = lambda s: None, max_rps: float | None = None, mount_from: Sequence[str] = ()) -> Report:
    """Archive -> registry: the `load` command's job, for any archive `open_archive` gives.

    A delta's left-out blobs are mounted only from the target's repositories in the same project as the
    repository that needs them, or in a project named in `mount_from`: the archive says where a blob
    lives, but it never decides what the operator's credentials copy from one project into another."""
    if isinstance(reader, DockerArchive):
        return _load_docker(reader, target, target_tls=target_tls, options=options, public_projects=public_projects,
                            progress=progress, log=log, max_rps=max_rps)
    tasks = [CopyTask(img.ref, target_ref(img.ref, target)) for img in reader.images]
    if not tasks:
        raise InputError(f"{reader.label}: index.json names no images")
    graphs = plan_graphs(reader, options.platforms, options.referrers)
    tgt = jobs.connect_target(target, target_tls, options, max_rps=max_rps, log=log,
                              repos=[t.target.repository for t in tasks], public_projects=public_projects)
    try:
        assume: frozenset[str] = frozenset()
        if reader.delta is not None:
            mounts = _check_delta(reader, graphs, tgt, target, options.blob_jobs, frozenset(mount_from))
            for repo, b, other in mounts:
                if not tgt.reuse_blob(repo, b, fresh=False, mount_from=other):
                    raise InputError(f"the target refused to mount {b.digest} from {other} into {repo} "
                                     f"(needed by the delta {reader.label})")
            assume = frozenset(d for d in reader.delta.omitted if reader.blob(d) is None)
        kinds = {str(t.target): content_kind(graphs[img.key].manifest)
                 for t, img in zip(tasks, reader.images) if img.key in graphs}
        del graphs  # every image's graph, ~10 MB at 1,500 images: the copy walks each image again
        report = jobs.run_copy(tasks, reader, TargetLocator(tgt), replace(options, assume_present=assume), progress)
    finally:
        tgt.close()
    if any(k != "image" for k in kinds.values()):  # charts or install files: counted apart, as save counted them
        return KindReport.of(report, kinds)
    return report


def plan_graphs(reader: ArchiveReader, platforms: Sequence[Platform],
                referrers: ReferrerFilter | None = None) -> dict[str, Graph]:
    """Every image's graph by image key (with the referrers that travel), walked once per root; a hostile
    graph refuses the archive (exit 2).  Images whose graph can't be read otherwise are left out here: the
    copy reports them one by one."""
    cache = GraphCache(reader, referrers=referrers)
    out: dict[str, Graph] = {}
    for img in reader.images:
        try:
            out[img.key] = cache.graph(img.ref.name, img.descriptor.digest, platforms)
        except GraphLimit as exc:
            raise ArchiveError(f"{reader.label}: {img.ref}: {exc}") from None
        except MirrorError:
            continue
    return out


def _check_delta(reader: ArchiveReader, graphs: dict[str, Graph], tgt, target: RegistryURL,
                 jobs_n: int, mount_from: frozenset[str] = frozenset()) -> list[tuple[str, Descriptor, str]]:
    """For a delta archive: are the blobs it leaves out at the target?  Returns the mounts to make
    (repo, blob, from repo); raises InputError naming what is absent."""
    delta = reader.delta
    assert delta is not None
    needs: dict[tuple[str, str], tuple[Descriptor, str]] = {}
    for img in reader.images:
        g = graphs.get(img.key)
        if g is None:
            continue  # the copy reports this image's problem
        repo = target_ref(img.ref, target).repository
        for d, b in g.blobs.items():
            if d in delta.omitted and reader.blob(d) is None:
                needs.setdefault((repo, d), (b, str(img.ref)))

    def check(item):
        (repo, d), (b, image) = item
        if tgt.has_blob(repo, b):
            return None
        refused = None
        for src_repo in delta.omitted[d]["repositories"]:
            other = target.repository(src_repo)
            if other == repo:
                continue
            if project_of(other) != project_of(repo) and project_of(other) not in mount_from:
                refused = refused or other
                continue
            if tgt.has_blob(other, b):
                return ("mount", repo, b, other)
        if refused is not None and tgt.has_blob(refused, b):
            return ("refused", d, repo, refused)
        return ("absent", d, image)

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        results = [r for r in pool.map(check, needs.items()) if r is not None]
    refused = sorted({(r[1], r[2], r[3]) for r in results if r[0] == "refused"})
    if refused:
        d, repo, other = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise InputError(f"{reader.label} is a delta that needs blob {d} in {repo}, and the target has it only in "
                         f"{other}, another project: not mounted across projects{more}; give --mount-from "
                         f"{project_of(other)} to allow it, or load the archive of {delta.since} first")
    absent = sorted({(r[1], r[2]) for r in results if r[0] == "absent"})
    if absent:
        blobs = sorted({d for d, _ in absent})
        shown = ", ".join(f"{d} ({next(i for dd, i in absent if dd == d)})" for d in blobs[:5])
        more = f" and {len(blobs) - 5} more" if len(blobs) > 5 else ""
        raise InputError(f"{reader.label} is a delta against {delta.since}, and the target {target} lacks "
                         f"{len(blobs)} blob(s) it leaves out: {shown}{more}; load the archive of "
                         f"{delta.since} (or mirror it) to this target first")
    return [(r[1], r[2], r[3]) for r in results if r[0] == "mount"]


# --------------------------------------------------------------------------- docker archives


def docker_tasks(da: DockerArchive, target: RegistryURL) -> list[CopyTask]:
    return [CopyTask(r, target_ref(r, target), note=NOTE, note_skipped=NOTE_PRESENT)
            for img in da.images for r in img.refs]


def _present(da: DockerArchive, tasks: Sequence[CopyTask], tgt, jobs_n: int) -> list[CopyTask]:
    """The tasks, those whose target tag already holds this image (same config, i.e. image ID) marked
    done: as a manifest, or inside a multi-platform index (read with the engine's walk).  Nothing of
    them is compressed again, and an index there (from `mirror`) is not replaced by one platform's
    manifest."""
    by_key = {ref_key(r.name, r.tag or "latest"): img for img in da.images for r in img.refs}

    def one(t: CopyTask) -> CopyTask:
        img = by_key[ref_key(t.source.name, t.source.tag or "latest")]
        if img.error or img.skip or img.image_id is None:
            return t
        repo, tag = t.target.repository, t.target.tag or "latest"
        try:
            head = tgt.head_manifest(repo, tag)
            if head is None or not head.digest:
                return t
            desc, raw = tgt.get_manifest(repo, head.digest)
            m = parse_manifest(desc.media_type or head.media_type, raw)
            if m.is_index and img.platform is not None:
                m = select_platforms(tgt, repo, m, (img.platform,))
            g = walk(tgt, repo, m, root_digest=head.digest)
        except MirrorError:
            return t
        where = [(None, g.manifest)] + [(d.platform, cm) for d, cm in g.children]
        hit = next(((p, cm) for p, cm in where if cm.config is not None and cm.config.digest == img.image_id), None)
        if hit is None:
            return t
        note = NOTE_PRESENT if hit[0] is None else f"already at the target, in its multi-platform index ({hit[0]})"
        return replace(t, done=ImageResult(str(t.source), str(t.target), "skipped", digest=head.digest,
                                           source_digest=head.digest, note=note))

    with ThreadPoolExecutor(max(1, jobs_n)) as pool:
        return list(pool.map(one, tasks))


def _load_docker(da: DockerArchive, target: RegistryURL, *, target_tls: jobs.TLSOptions, options: CopyOptions,
                 public_projects: bool, progress: Progress | None, log: Log, max_rps: float | None) -> Report:
    tasks = docker_tasks(da, target)
    if not tasks:
        raise InputError(f"{da.label}: manifest.json names no images")
    da.selected(options.platforms)
    if options.platforms and not any(img.skip is None for img in da.images):
        have = ", ".join(sorted({str(i.platform) for i in da.images if i.platform})) or "unknown"
        raise InputError(f"{da.label}: no image for platform {', '.join(map(str, options.platforms))}: its images are "
                         f"{have} (RKE2's image tarballs hold one platform each: take the one for that platform, "
                         f"e.g. rke2-images.linux-arm64.tar.zst)")
    t0 = time.monotonic()
    tgt = jobs.connect_target(target, target_tls, options, max_rps=max_rps, log=log,
                              repos=[t.target.repository for t in tasks], public_projects=public_projects)
    try:
        tasks = _present(da, tasks, tgt, options.jobs)
        present = sum(1 for t in tasks if t.done is not None)
        if present:
            log(f"{present} of {len(tasks)} image(s) already at the target with the same image ID: "
                "not compressed again")
        keys = {ref_key(t.source.name, t.source.tag or "latest") for t in tasks if t.done is None}
        da.prepare([img for img in da.images if not img.skip and not img.error
                    and any(ref_key(r.name, r.tag or "latest") in keys for r in img.refs)])
        report = jobs.run_copy(tasks, da, TargetLocator(tgt), options, progress)
        report.seconds = time.monotonic() - t0
        return report
    finally:
        tgt.close()
