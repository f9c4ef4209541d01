"""Wiring shared by the commands: build endpoints from options, check them, run the engine.

No typer, no tqdm: the CLI passes a Progress and a log callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rke2_mirror.endpoints.auth import Credentials, lookup_credentials
from rke2_mirror.engine.copy import CopyEngine, CopyOptions, CopyTask, Locator, Progress, Report
from rke2_mirror.engine.protocols import counts_pulls as source_counts_pulls
from rke2_mirror.files import read_capped
from rke2_mirror.model.errors import AuthError, InputError, MirrorError, RegistryError, TLSError, UnreachableError
from rke2_mirror.endpoints.harbor import Harbor, project_of
from rke2_mirror.model.reference import ImageRef, RegistryURL, parse_image_lines
from rke2_mirror.model.referrers import kind_of
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


IMAGE_LIST_MAX_BYTES = 4 * 1024 * 1024  # a release's list is ~10 KiB; a list of every image of 50 releases ~1 MiB


def image_list_text(data: bytes, origin: str, what: str = "image list") -> str:
    """An image list's bytes as text: more than IMAGE_LIST_MAX_BYTES or not UTF-8 is one InputError."""
    if len(data) > IMAGE_LIST_MAX_BYTES:
        raise InputError(f"{what} {origin}: more than {IMAGE_LIST_MAX_BYTES // (1024 * 1024)} MiB, the most "
                         "accepted for an image list; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{what} {origin}:{line}: not UTF-8 text") from None


def read_image_list(path: Path | str, what: str = "image list") -> list[ImageRef]:
    """An image list file (`--images`, a sync config's `images:`), reading no more than
    IMAGE_LIST_MAX_BYTES + 1 bytes of it; every problem is one InputError naming the file (and the line)."""
    data = read_capped(path, IMAGE_LIST_MAX_BYTES, what)
    return parse_image_lines(image_list_text(data, str(path), what), origin=str(path))


def _limiter(max_rps: float | None) -> RequestRateLimiter | None:
    return RequestRateLimiter(max_rps) if max_rps else None


def target_registry(target: RegistryURL, tls: TLSOptions, *, jobs: int = 8, retry: RetryPolicy | None = None,
                    max_rps: float | None = None, credentials: Credentials | None = None,
                    cancel: Cancel | None = None, log: Log | None = None) -> Registry:
    """The target; `credentials` given explicitly win over the usual lookup; `cancel` stops its requests;
    `log` gets its warnings (credentials going to a token service on another host)."""
    creds = credentials or lookup_credentials(target.host, target=True, log=log)
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
        return Registry(base_url, verify=src.tls.verify, credentials=lookup_credentials(host, auth_files=files, log=log),
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


def connect_target(target: RegistryURL, tls: TLSOptions, options, *, max_rps: float | None, log: Log,
                   repos: Sequence[str], public_projects: bool, credentials: Credentials | None = None) -> Registry:
    """The target registry for a copy (the copy's jobs, retries and cancel token), pinged, with the Harbor
    projects of `repos` created.  The caller closes it."""
    tgt = target_registry(target, tls, jobs=options.blob_jobs, retry=options.retry, max_rps=max_rps,
                          credentials=credentials, cancel=options.cancel, log=log)
    try:
        check_endpoint(tgt, "target")
        ensure_harbor_projects(tgt, repos, public=public_projects, dry_run=options.dry_run, log=log)
        tgt.plan_repositories(repos)  # tokens for batches of repositories, not one each
    except BaseException:
        tgt.close()
        raise
    return tgt


def ensure_harbor_projects(reg: Registry, repos: Sequence[str], *, public: bool, dry_run: bool,
                           log: Log) -> list[str]:
    """Create the Harbor projects `repos` live in (nothing when the target is not a Harbor).  A dry run
    creates nothing and returns the projects the real run would create."""
    creds = reg.auth.credentials
    harbor = Harbor(reg, creds)
    if not harbor.detect():
        return []
    projects = sorted({project_of(r) for r in repos})
    if dry_run:
        missing = [p for p in projects if not harbor.project_exists(p)]
        if missing:
            log(f"dry run: would create Harbor project(s): {', '.join(missing)}")
        return missing
    harbor.ensure_projects(projects, public=public, log=log)
    return []


class ProjectsToCreate:
    """A dry run's view of a target whose Harbor projects the real run would create first: their
    repositories are empty (Harbor answers 401 for a project that does not exist).  Everything else is
    the registry's own answer."""

    def __init__(self, registry: Registry, projects: Sequence[str]):
        self._registry = registry
        self._projects = frozenset(projects)

    def _new(self, repo: str) -> bool:
        return project_of(repo) in self._projects

    def head_manifest(self, repo: str, reference: str):
        return None if self._new(repo) else self._registry.head_manifest(repo, reference)

    def repository_is_new(self, repo: str) -> bool:
        return self._new(repo) or self._registry.repository_is_new(repo)

    def has_blob(self, repo: str, desc) -> bool:
        return not self._new(repo) and self._registry.has_blob(repo, desc)

    def __getattr__(self, name: str):  # location, and the write side a dry run never calls
        return getattr(self._registry, name)


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
    referrers: dict[str, int] | None = None  # kind -> how many the image's top-level manifest has


def _referrer_kinds(reg, repo: str, digest: str) -> dict[str, int]:
    """What signs the top-level manifest, by kind: no image manifest is fetched (the tag list says which of
    cosign's tags exist); the only manifest GET is a tag schema index, where the tag list shows one."""
    out: dict[str, int] = {}
    legacy = [k for _, k in reg.tagged_artifacts(repo, digest)]  # first: it reads the tag list once
    for kind in legacy + [kind_of(d.artifact_type, d.annotations) for d in reg.referrers(repo, digest)]:
        out[kind] = out.get(kind, 0) + 1
    return out


def check_sources(refs: Sequence[ImageRef], source: SourceOptions, *, jobs: int = 8,
                  retry: RetryPolicy | None = None, referrers: bool = True) -> list[SourceCheck]:
    """Ask the source for every reference with a manifest HEAD (no pull counted against rate limits), and
    for the referrers of what the tag names (its signatures, attestations, SBOMs)."""
    from concurrent.futures import ThreadPoolExecutor

    router = source_router(source, jobs=jobs, retry=retry)

    def one(ref: ImageRef) -> SourceCheck:
        reg, repo = router.locate(ref)
        try:
            desc = reg.head_manifest(repo, ref.reference)
        except MirrorError as exc:
            return SourceCheck(ref, None, str(exc))
        if desc is None:
            return SourceCheck(ref, None, "not found at the source")
        kinds = None
        if referrers and desc.digest:
            try:
                kinds = _referrer_kinds(reg, repo, desc.digest)
            except MirrorError as exc:
                return SourceCheck(ref, desc.digest, f"referrers: {exc}")
        return SourceCheck(ref, desc.digest or "?", None, kinds)

    try:
        check_source_endpoints(router, refs)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            return list(pool.map(one, refs))
    finally:
        router.close()


def counts_pulls(router: SourceRouter, refs: Sequence[ImageRef]) -> bool:
    """Does any image come from a source where every manifest GET counts as a pull (Docker Hub itself)?
    The source says so (engine.protocols.counts_pulls), the same answer the engine's dry run acts on."""
    return any(source_counts_pulls(router.locate(r)[0]) for r in refs)


def run_copy(tasks: Sequence[CopyTask], source: Locator, target: Locator, options: CopyOptions,
             progress: Progress | None = None) -> Report:
    return CopyEngine(source, target, options, progress).run(tasks)
