"""Wiring shared by the commands: build endpoints from options, check them, run the engine.

No typer, no tqdm: the CLI passes a Progress and a log callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .auth import Credentials, lookup_credentials
from .copy import CopyEngine, CopyOptions, CopyTask, Locator, Progress, Report
from .errors import AuthError, InputError, MirrorError, RegistryError, TLSError, UnreachableError
from .harbor import Harbor, project_of
from .reference import DOCKER_HUB_API, ImageRef, RegistryURL, target_ref
from .registry import Registry, RetryPolicy
from .ratelimit import PullBudget, RequestRateLimiter
from .routing import SourceRouter, TargetLocator

Log = Callable[[str], None]


@dataclass(frozen=True)
class TLSOptions:
    ca_file: str | None = None
    insecure: bool = False
    flags: tuple[str, str] = ("--ca-file", "--insecure-skip-verify")

    @property
    def verify(self) -> bool | str:
        if self.insecure:
            return False
        return self.ca_file or True


SOURCE_TLS_FLAGS = ("--src-ca-file", "--src-insecure-skip-verify")
SMALL_BLOB = 64 * 1024  # registry targets: blobs below this are uploaded without a HEAD first (configs mostly)


@dataclass(frozen=True)
class SourceOptions:
    tls: TLSOptions = field(default_factory=lambda: TLSOptions(flags=SOURCE_TLS_FLAGS))
    endpoints: dict[str, RegistryURL] = field(default_factory=dict)
    auth_file: str | None = None  # a docker config.json / auth.json read before the usual places


def _limiter(max_rps: float | None) -> RequestRateLimiter | None:
    return RequestRateLimiter(max_rps) if max_rps else None


def target_registry(target: RegistryURL, tls: TLSOptions, *, jobs: int = 8, retry: RetryPolicy | None = None,
                    max_rps: float | None = None, credentials: Credentials | None = None) -> Registry:
    """The target; `credentials` given explicitly win over the usual lookup."""
    creds = credentials or lookup_credentials(target.host, target=True)
    return Registry(target.base_url, verify=tls.verify, credentials=creds,
                    actions="pull,push", jobs=jobs, retry=retry, tls_flags=tls.flags, limiter=_limiter(max_rps))


def source_router(src: SourceOptions, *, jobs: int = 8, retry: RetryPolicy | None = None,
                  max_rps: float | None = None, budget: PullBudget | None = None) -> SourceRouter:
    """One Registry per source endpoint, each with its own request-rate cap; all feed the pull budget."""
    def factory(base_url: str) -> Registry:
        host = base_url.split("://", 1)[1]
        files = (Path(src.auth_file),) if src.auth_file else ()
        return Registry(base_url, verify=src.tls.verify, credentials=lookup_credentials(host, auth_files=files),
                        actions="pull",
                        jobs=jobs, retry=retry, tls_flags=src.tls.flags, limiter=_limiter(max_rps),
                        on_response=budget.observe if budget else None)
    return SourceRouter(factory, src.endpoints)


def check_endpoint(reg: Registry, role: str) -> None:
    """Ping a registry; configuration problems become one-line errors (exit 2)."""
    try:
        reg.ping()
    except (TLSError, UnreachableError, AuthError, RegistryError) as exc:
        raise InputError(f"{role} {exc}") from None


def ensure_harbor_projects(reg: Registry, repos: Sequence[str], *, public: bool, dry_run: bool, log: Log) -> None:
    creds = reg.auth.credentials
    harbor = Harbor(reg, creds)
    if not harbor.detect():
        return
    projects = sorted({project_of(r) for r in repos})
    if dry_run:
        missing = [p for p in projects if not harbor.project_exists(p)]
        if missing:
            log(f"dry run: would create Harbor project(s): {', '.join(missing)}")
        return
    harbor.ensure_projects(projects, public=public, log=log)


@dataclass(frozen=True)
class SourceCheck:
    ref: ImageRef
    digest: str | None  # None: missing
    error: str | None = None


def check_sources(refs: Sequence[ImageRef], source: SourceOptions, *, jobs: int = 8,
                  retry: RetryPolicy | None = None) -> list[SourceCheck]:
    """Ask the source for every reference with a manifest HEAD (no pull counted against rate limits)."""
    from concurrent.futures import ThreadPoolExecutor

    router = source_router(source, jobs=jobs, retry=retry)

    def one(ref: ImageRef) -> SourceCheck:
        reg, repo = router.locate(ref)
        try:
            desc = reg.head_manifest(repo, ref.reference)
        except MirrorError as exc:
            return SourceCheck(ref, None, str(exc))
        return SourceCheck(ref, desc.digest or "?" if desc else None, None if desc else "not found at the source")

    try:
        seen: set[str] = set()
        for r in refs:
            reg, _ = router.locate(r)
            if reg.base_url not in seen:
                seen.add(reg.base_url)
                check_endpoint(reg, "source")
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            return list(pool.map(one, refs))
    finally:
        router.close()


def counts_pulls(router: SourceRouter, refs: Sequence[ImageRef]) -> bool:
    """Does any image come from Docker Hub itself (where every manifest GET counts as a pull)?"""
    return any(router.endpoint_url(r).host == DOCKER_HUB_API for r in refs)


def mirror_tasks(refs: Sequence[ImageRef], target: RegistryURL) -> list[CopyTask]:
    return [CopyTask(r, target_ref(r, target)) for r in refs]


def run_copy(tasks: Sequence[CopyTask], source: Locator, target: Locator, options: CopyOptions,
             progress: Progress | None = None) -> Report:
    return CopyEngine(source, target, options, progress).run(tasks)


def mirror(refs: Sequence[ImageRef], target: RegistryURL, *, target_tls: TLSOptions, source: SourceOptions,
           options: CopyOptions, public_projects: bool = False, progress: Progress | None = None,
           log: Log = lambda s: None, max_rps: float | None = None, pull_floor: int | None = None,
           target_credentials: Credentials | None = None) -> Report:
    """Registry -> registry: the `mirror` command's job.

    `max_rps` caps requests per second to each registry (all workers together); `pull_floor` stops
    starting new images once a source's rate-limit headers say that few pulls are left.
    """
    tasks = mirror_tasks(refs, target)
    budget = PullBudget(pull_floor or 0)
    router = source_router(source, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps, budget=budget)
    tgt = target_registry(target, target_tls, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps,
                          credentials=target_credentials)
    try:
        check_endpoint(tgt, "target")
        seen: set[str] = set()
        for t in tasks:
            reg, _ = router.locate(t.source)
            if reg.base_url not in seen:
                seen.add(reg.base_url)
                check_endpoint(reg, "source")
        ensure_harbor_projects(tgt, [t.target.repository for t in tasks], public=public_projects,
                               dry_run=options.dry_run, log=log)
        if options.dry_run and counts_pulls(router, refs):
            log("dry run: Docker Hub counts manifest GETs as pulls, so only HEADs are sent and sizes are not reported")
            options = replace(options, dry_run_heads_only=True)
        options = replace(options, stop_check=budget.exhausted, upload_without_head_below=SMALL_BLOB)
        report = run_copy(tasks, router, TargetLocator(tgt), options, progress)
        if budget.remaining is not None or budget.hit_429:
            report.rate_limit = budget.to_json()
            left = f"{budget.remaining}" + (f" of {budget.limit}" if budget.limit else "")
            log(f"source pull budget left for the next run: {left}")
        return report
    finally:
        router.close()
        tgt.close()
