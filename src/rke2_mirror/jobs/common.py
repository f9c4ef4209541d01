"""Wiring shared by the commands: build endpoints from options, check them, run the engine.

No typer, no tqdm: the CLI passes a Progress and a log callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rke2_mirror.endpoints.auth import Credentials, lookup_credentials
from rke2_mirror.engine.copy import CopyEngine, CopyOptions, CopyTask, Locator, Progress, Report
from rke2_mirror.model.errors import AuthError, InputError, MirrorError, RegistryError, TLSError, UnreachableError
from rke2_mirror.endpoints.harbor import Harbor, project_of
from rke2_mirror.model.reference import DOCKER_HUB_API, ImageRef, RegistryURL
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror.engine.cancel import Cancel
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.endpoints.ratelimit import PullBudget, RequestRateLimiter
from rke2_mirror.endpoints.routing import SourceRouter

Log = Callable[[str], None]


@dataclass(frozen=True)
class TLSOptions:
    """How a registry is reached: its TLS (`flags` name the options that fix a TLS failure) and, with
    `strict_auth_realm`, credentials sent to no token service on another host or over a downgrade to http."""

    ca_file: str | None = None
    insecure: bool = False
    flags: tuple[str, str] = ("--ca-file", "--insecure-skip-verify")
    strict_auth_realm: bool = False

    @property
    def verify(self) -> bool | str:
        if self.insecure:
            return False
        return self.ca_file or True


SOURCE_TLS_FLAGS = ("--src-ca-file", "--src-insecure-skip-verify")


@dataclass(frozen=True)
class SourceOptions:
    tls: TLSOptions = field(default_factory=lambda: TLSOptions(flags=SOURCE_TLS_FLAGS))
    endpoints: dict[str, RegistryURL] = field(default_factory=dict)
    auth_file: str | None = None  # a docker config.json / auth.json read before the usual places


def _limiter(max_rps: float | None) -> RequestRateLimiter | None:
    return RequestRateLimiter(max_rps) if max_rps else None


def target_registry(target: RegistryURL, tls: TLSOptions, *, jobs: int = 8, retry: RetryPolicy | None = None,
                    max_rps: float | None = None, credentials: Credentials | None = None,
                    cancel: Cancel | None = None, log: Log | None = None) -> Registry:
    """The target; `credentials` given explicitly win over the usual lookup; `cancel` stops its requests;
    `log` gets its warnings (credentials going to a token service on another host)."""
    creds = credentials or lookup_credentials(target.host, target=True)
    return Registry(target.base_url, verify=tls.verify, credentials=creds,
                    actions="pull,push", jobs=jobs, retry=retry, tls_flags=tls.flags, limiter=_limiter(max_rps),
                    cancel=cancel, strict_auth_realm=tls.strict_auth_realm, log=log)


def source_router(src: SourceOptions, *, jobs: int = 8, retry: RetryPolicy | None = None,
                  max_rps: float | None = None, budget: PullBudget | None = None,
                  cancel: Cancel | None = None, log: Log | None = None) -> SourceRouter:
    """One Registry per source endpoint, each with its own request-rate cap; all feed the pull budget;
    `cancel` stops their requests; `log` gets their warnings."""
    def factory(base_url: str) -> Registry:
        host = base_url.split("://", 1)[1]
        files = (Path(src.auth_file),) if src.auth_file else ()
        return Registry(base_url, verify=src.tls.verify, credentials=lookup_credentials(host, auth_files=files),
                        actions="pull",
                        jobs=jobs, retry=retry, tls_flags=src.tls.flags, limiter=_limiter(max_rps),
                        on_response=budget.observe if budget else None, cancel=cancel,
                        strict_auth_realm=src.tls.strict_auth_realm, log=log)
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


def check_source_endpoints(router: SourceRouter, refs: Sequence[ImageRef]) -> None:
    """Ping each source endpoint the references use, once, before any copy starts."""
    seen: set[str] = set()
    for r in refs:
        reg, _ = router.locate(r)
        if reg.base_url not in seen:
            seen.add(reg.base_url)
            check_endpoint(reg, "source")


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
        check_source_endpoints(router, refs)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            return list(pool.map(one, refs))
    finally:
        router.close()


def counts_pulls(router: SourceRouter, refs: Sequence[ImageRef]) -> bool:
    """Does any image come from Docker Hub itself (where every manifest GET counts as a pull)?"""
    return any(router.endpoint_url(r).host == DOCKER_HUB_API for r in refs)


def run_copy(tasks: Sequence[CopyTask], source: Locator, target: Locator, options: CopyOptions,
             progress: Progress | None = None) -> Report:
    return CopyEngine(source, target, options, progress).run(tasks)
