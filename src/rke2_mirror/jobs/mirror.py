"""`mirror`: registry -> registry through the copy engine, digests preserved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.endpoints.ratelimit import PullBudget
from rke2_mirror.endpoints.routing import TargetLocator
from rke2_mirror.engine.copy import CopyOptions, CopyTask, Progress, Report
from rke2_mirror.jobs.common import (Log, ProjectsToCreate, SourceOptions, TLSOptions, check_endpoint, check_source_endpoints, counts_pulls,
                                     ensure_harbor_projects, run_copy, source_router, target_registry)
from rke2_mirror.model.reference import ImageRef, RegistryURL, target_ref


def mirror_tasks(refs: Sequence[ImageRef], target: RegistryURL,
                 expect_digests: Mapping[ImageRef, str] | None = None) -> list[CopyTask]:
    """`expect_digests`: the digest a release publishes for an image (rancher): the copy fails it otherwise."""
    expect = expect_digests or {}
    return [CopyTask(r, target_ref(r, target), expect_digest=expect.get(r)) for r in refs]


def mirror(refs: Sequence[ImageRef], target: RegistryURL, *, target_tls: TLSOptions, source: SourceOptions,
           options: CopyOptions, public_projects: bool = False, progress: Progress | None = None,
           log: Log = lambda s: None, max_rps: float | None = None, pull_floor: int | None = None,
           target_credentials: Credentials | None = None,
           expect_digests: Mapping[ImageRef, str] | None = None, artifacts=None) -> Report:
    """Registry -> registry: the `mirror` command's job.

    `max_rps` caps requests per second to each registry (all workers together); `pull_floor` stops
    starting new images once a source's rate-limit headers say that few pulls are left.
    """
    tasks = mirror_tasks(refs, target, expect_digests)
    tasks += artifacts.mirror_tasks(target) if artifacts else []  # charts and files (jobs.artifacts.Prepared)
    budget = PullBudget(pull_floor or 0)
    router = source_router(source, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps, budget=budget,
                           cancel=options.cancel, log=log)
    tgt = target_registry(target, target_tls, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps,
                          credentials=target_credentials, cancel=options.cancel, log=log)
    try:
        check_endpoint(tgt, "target")
        check_source_endpoints(router, list(refs) + (artifacts.registry_refs if artifacts else []))
        to_create = ensure_harbor_projects(tgt, [t.target.repository for t in tasks], public=public_projects,
                                           dry_run=options.dry_run, log=log)
        if options.dry_run and counts_pulls(router, refs):
            log("dry run: Docker Hub counts manifest GETs as pulls, so only HEADs are sent and sizes are not reported")
        tgt.plan_repositories(t.target.repository for t in tasks)  # tokens for batches of repositories
        options = replace(options, stop_check=budget.exhausted)
        dst = ProjectsToCreate(tgt, to_create) if to_create else tgt
        report = run_copy(tasks, artifacts.locator(router) if artifacts else router, TargetLocator(dst), options,
                          progress)
        if artifacts is not None and artifacts.pairs:
            report = artifacts.with_kinds(report)  # its summary counts images, charts and files apart
        if budget.remaining is not None or budget.hit_429:
            report.rate_limit = budget.to_json()
            left = f"{budget.remaining}" + (f" of {budget.limit}" if budget.limit else "")
            log(f"source pull budget left for the next run: {left}")
        return report
    finally:
        router.close()
        tgt.close()
