"""A sync run: take the lock (``fcntl.flock``: the kernel drops it when the holder dies), resolve each
followed release (channel -> version), merge the image sets, keep this shard's part, run the copy
engine once, split its report per release, then write the outputs atomically (JSON report,
node-exporter textfile, registries.yaml / config.yaml).  Nothing is ever deleted from the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

import rke2_mirror.files as files
import rke2_mirror.yamlsafe as yamlsafe
import rke2_mirror.jobs.common as jobs
import rke2_mirror.jobs.mirror as mirror_job
from rke2_mirror.endpoints.auth import Credentials, credential_helper, credentials_from_file, helper_for
from rke2_mirror.endpoints.routing import parse_source_endpoints
from rke2_mirror.engine.cancel import Cancel, Interrupted
from rke2_mirror.engine.copy import CopyOptions, ImageResult, Progress, Report
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.jobs.sync.config import LoadedConfig, SyncConfig, load_config, referrer_filter, shard_path
from rke2_mirror.jobs.sync.lock import SyncLock
from rke2_mirror.jobs.sync.report import (EXIT_OK, ImageSet, SyncResult, build_report, report_messages, write_atomic,
                                          write_textfile)
from rke2_mirror.model.errors import InputError, MirrorError
from rke2_mirror.model.oci import Platform
from rke2_mirror.model.reference import ImageRef, merge_refs, target_ref
from rke2_mirror.model.reference import shard as shard_refs
from rke2_mirror.node.registries import Registries, load_yaml_mapping
from rke2_mirror.node.versions import RKE2Version
from rke2_mirror.node.writer import (NodeConfig, build_registries, check_node_config, dump_registries,
                                     registries_have_auth, set_system_default_registry)
from rke2_mirror.releases import ReleaseSource, release_images

Log = Callable[[str], None]


# =============================================================================================
# Credentials: resolved at run time, scoped to the run, never logged


def target_credentials(cfg: LoadedConfig, env: Mapping[str, str] | None = None) -> Credentials | None:
    spec = cfg.config.target.credentials
    if spec is None:
        return None
    env = os.environ if env is None else env
    if spec.env is not None:
        missing = [v for v in (spec.env.username, spec.env.password) if not env.get(v)]
        if missing:
            raise InputError(f"target.credentials.env: environment variable(s) {', '.join(missing)} not set "
                             f"(config {cfg.path})")
        return Credentials(env[spec.env.username], env[spec.env.password])
    path = Path(spec.file or "")
    if not path.is_file():
        raise InputError(f"target.credentials.file {path}: no such file (config {cfg.path})")
    creds = credentials_from_file(path, cfg.target.host)
    if creds is None:  # the credential helper the file names (credHelpers / credsStore), as docker does
        helper = helper_for(path, cfg.target.host)
        creds = credential_helper(helper, cfg.target.host, env=dict(env), origin=path) if helper else None
    if creds is None:
        raise InputError(f"target.credentials.file {path}: no 'auths' entry (nor a credential helper's answer) "
                         f"for {cfg.target.host}")
    if not creds.username or not creds.password:
        raise InputError(f"target.credentials.file {path}: the entry for {cfg.target.host} needs a username and "
                         "password (or 'auth'); identity tokens are not supported for the target")
    return creds


def source_auth_file(cfg: LoadedConfig) -> str | None:
    """The sources' credentials file named by the config (checked to exist)."""
    src = cfg.config.sources.credentials
    if src is None:
        return None
    if not Path(src.file).is_file():
        raise InputError(f"sources.credentials.file {src.file}: no such file (config {cfg.path})")
    return src.file


# =============================================================================================
# Resolving what to mirror


def _release_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=15.0), follow_redirects=True,
                        headers={"User-Agent": "rke2-mirror"})


def read_extra_lists(cfg: LoadedConfig) -> list[ImageSet]:
    """The config's `images:` list files (each at most 4 MiB), read before anything is downloaded."""
    return [ImageSet(f"images {f}", tuple(jobs.read_image_list(f, what="images:")), file=f) for f in cfg.config.images]


def resolve_image_sets(cfg: LoadedConfig, log: Log = lambda s: None,
                       client: httpx.Client | None = None, verbose: bool = False) -> list[ImageSet]:
    """Each followed release (channel -> version, lists verified against their checksums) and each extra list.
    One line per release to `log`; with `verbose`, also one per list read."""
    c = cfg.config
    extra = read_extra_lists(cfg)
    sets: list[ImageSet] = []
    own = None
    if client is None and any(not r.offline for r in c.releases):
        client = own = _release_client()
    try:
        for spec in c.releases:
            source = ReleaseSource.default(spec.product, spec.release_url, spec.channel_url, c.lists_dir, spec.offline)
            for rel in spec.followed:
                r = release_images(rel, source, None if spec.offline else client, spec.arches, spec.flavors, log,
                                   detail=log if verbose else (lambda s: None), summary=False)
                name = f"{spec.product} {rel}"
                checked = f", {len(r.digests)} with a published digest" if r.digest_files else ""
                log(f"{name}: {r.version} ({len(r.images)} images{checked})" if rel != r.version
                    else f"{name}: {len(r.images)} images{checked}")
                sets.append(ImageSet(name, r.images, spec.product, rel, r.version, tuple(f.name for f in r.files),
                                     digests=r.digests))
    finally:
        if own is not None:
            own.close()
    return sets + extra


def _install_script(cfg: LoadedConfig, script: str | None) -> str:
    from rke2_mirror.releases.download import DEFAULT_INSTALL_SCRIPT
    if not script:
        return DEFAULT_INSTALL_SCRIPT
    if script.startswith(("http://", "https://")):
        return script
    return str(cfg.path.parent / os.path.expanduser(script))


def prepare_artifacts(cfg: LoadedConfig, sets: Sequence[ImageSet], work: Path, client: httpx.Client | None,
                      log: Log = lambda s: None, *, install: bool = True):
    """The config's `charts` and the install files of the releases with `install_files: true` (each resolved
    version, each of the release's arches), fetched and verified into `work` (jobs.artifacts.Prepared);
    None when the config asks for neither.  `install`: False leaves the install files out (another shard's)."""
    import rke2_mirror.jobs.artifacts as artifacts_job
    from rke2_mirror.model.artifacts import parse_chart_spec
    c = cfg.config
    specs = [parse_chart_spec(text) for text in c.charts]
    wanted: dict[tuple[str, str], artifacts_job.InstallFiles] = {}
    for spec in c.releases if install else ():
        if not spec.install_files:
            continue
        source = ReleaseSource.default(spec.product, spec.release_url, spec.channel_url, c.lists_dir, spec.offline)
        for s in sets:
            if s.product == spec.product and s.release in spec.followed and s.version:
                for arch in spec.arches:
                    wanted.setdefault((s.version, arch), artifacts_job.InstallFiles(
                        source, s.version, arch, _install_script(cfg, spec.install_script)))
    if not specs and not wanted:
        return None
    offline = all(r.offline for r in c.releases if r.install_files) and not specs
    own = None
    if client is None and not offline:
        client = own = _release_client()
    try:
        return artifacts_job.prepare(specs, list(wanted.values()), client, work, log, chart_images=c.chart_images)
    finally:
        if own is not None:
            own.close()


def _read(path: Path, *, replaceable: bool = False) -> str | None:
    """An output node file's current text ("" when missing), reading no more than `yamlsafe.MAX_BYTES`.
    Too large or not UTF-8: an InputError naming it, or None when the file is only `replaceable` (compared
    with what is written, not merged)."""
    try:
        return yamlsafe.read_text(path)
    except FileNotFoundError:
        return ""
    except yamlsafe.YAMLRefused as exc:
        if replaceable:
            return None
        raise InputError(exc.describe(str(path))) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None


def write_node_files(cfg: LoadedConfig, refs: Sequence[ImageRef], sets: Sequence[ImageSet],
                     creds: Credentials | None, log: Log,
                     paths: tuple[Path | None, Path | None] | None = None) -> list[str]:
    """(Re)write registries.yaml / config.yaml from the config: at the config's outputs, or at
    `paths` = (registries.yaml, config.yaml), either None to skip it.  A file is left untouched when its
    content would not change.  Returns the files written."""
    c, out = cfg.config, cfg.config.outputs
    target = cfg.target
    changed: list[str] = []
    if paths is None:
        paths = (Path(out.registries_yaml) if out.registries_yaml else None,
                 Path(out.config_yaml) if out.config_yaml else None)
    registries_yaml, config_yaml = paths
    if registries_yaml:
        path = registries_yaml
        version = node_version(cfg, sets)
        found = {v for s in sets if s.product == "rke2" and (v := RKE2Version.try_parse(s.version))}
        if not c.node.rke2_version and len(found) > 1:
            log(f"registries.yaml: several RKE2 versions followed; written for the oldest, {version}")
        if c.node.with_auth and creds is None:
            raise InputError("node.with_auth: true needs target.credentials in the config")
        old = _read(path, replaceable=not c.node.merge)
        existing = load_yaml_mapping(old, str(path)) if c.node.merge and old else None
        node_cfg = NodeConfig.for_images(target, refs, node_ca_file=c.node.ca_file,
                                         insecure_skip_verify=c.node.insecure_skip_verify,
                                         auth=creds if c.node.with_auth else None,
                                         system_default_registry=c.node.system_default_registry, rke2_version=version)
        doc, warnings = build_registries(node_cfg, existing, str(path))
        text = dump_registries(doc, node_cfg)
        secret = registries_have_auth(doc)
        mode = 0o600 if secret else files.existing_mode(path, 0o644)
        for w in warnings:
            log(f"registries.yaml: warning: {w}")
        if text != old or files.existing_mode(path, mode) != mode:
            write_atomic(path, text, mode)
            changed.append(str(path))
            log(f"wrote {path}" + (" (mode 0600: it holds credentials)" if secret else ""))
    if config_yaml:
        path = config_yaml
        old = _read(path) or ""
        # HOST/PREFIX where the version accepts a path (rancher/rke2#9404), as the registries.yaml assumes
        sdr = NodeConfig(target, system_default_registry=c.node.system_default_registry,
                         rke2_version=node_version(cfg, sets)).system_default_registry_value
        new = set_system_default_registry(old, sdr, str(path))
        if new != old:
            write_atomic(path, new, files.existing_mode(path, 0o600))
            changed.append(str(path))
            log(f"wrote {path} (system-default-registry: {sdr or 'removed'})")
    return changed


def node_version(cfg: LoadedConfig, sets: Sequence[ImageSet] | None = None) -> RKE2Version | None:
    """The RKE2 version the node files are written for: `node.rke2_version`, else the oldest RKE2 version
    followed -- from the resolved `sets`, or, before anything is resolved (`sets` None), from the config's
    pinned versions when every rke2 release is pinned (a channel is known only once resolved: None)."""
    c = cfg.config
    if c.node.rke2_version:
        return RKE2Version.parse(c.node.rke2_version)
    if sets is not None:
        found = [v for s in sets if s.product == "rke2" and (v := RKE2Version.try_parse(s.version))]
    else:
        pinned = [r.pinned for r in c.releases if r.product == "rke2"]
        if any(p is None for p in pinned):
            return None
        found = [v for p in pinned for name in p or () if (v := RKE2Version.try_parse(name))]
    return min(found) if found else None


def check_node_gates(cfg: LoadedConfig, sets: Sequence[ImageSet] | None = None) -> list[str]:
    """The node files' own checks, before anything is copied: `node.with_auth` without credentials, and the
    combinations `registries-yaml` refuses on the version the files are written for (an http target as
    system-default-registry on an RKE2 release before rancher/rke2#4308's fix).  Returns the warnings."""
    c, out = cfg.config, cfg.config.outputs
    if not (out.registries_yaml or out.config_yaml):
        return []
    if out.registries_yaml and c.node.with_auth and c.target.credentials is None:
        raise InputError("node.with_auth: true needs target.credentials in the config")
    node_cfg = NodeConfig(cfg.target, node_ca_file=c.node.ca_file, insecure_skip_verify=c.node.insecure_skip_verify,
                          system_default_registry=c.node.system_default_registry,
                          rke2_version=node_version(cfg, sets))
    return check_node_config(node_cfg)


def check_config(cfg: LoadedConfig, env: Mapping[str, str] | None = None, log: Log = lambda s: None) -> list[str]:
    """`sync --check-config`: everything a run would refuse that can be checked without the network -- the
    files the config names (CA files, credentials files, `images:` lists), the outputs (writable) and the node
    files to keep (parse), the node files' version gates for pinned versions, the lists cache of `offline`
    releases.  InputError for the first problem; returns warnings (an environment variable of
    `target.credentials.env` not set here: the run's environment may differ)."""
    c = cfg.config
    env = os.environ if env is None else env
    warnings: list[str] = []
    _tls(c.target.ca_file, c.target.insecure_skip_verify, "target")
    _tls(c.sources.ca_file, c.sources.insecure_skip_verify, "sources")
    spec = c.target.credentials
    if spec is not None and spec.env is not None:
        missing = [v for v in (spec.env.username, spec.env.password) if not env.get(v)]
        if missing:
            warnings.append(f"target.credentials.env: {', '.join(missing)} not set in this environment "
                            "(a run needs them)")
    else:
        target_credentials(cfg, env)
    source_auth_file(cfg)
    read_extra_lists(cfg)
    check_outputs_writable(cfg)
    check_node_files_readable(cfg)
    warnings += check_node_gates(cfg)
    for r in c.releases:
        script = r.install_script
        if script and not script.startswith(("http://", "https://")) and not Path(_install_script(cfg, script)).is_file():
            raise InputError(f"install_script {_install_script(cfg, script)}: no such file")
        if r.offline:  # the cache is local: read and verify it now
            source = ReleaseSource.default(r.product, r.release_url, r.channel_url, c.lists_dir, True)
            for name in r.followed:
                release_images(name, source, None, r.arches, r.flavors, summary=False)
    return warnings


# =============================================================================================
# The job


def _tls(ca: str | None, insecure: bool, section: str) -> jobs.TLSOptions:
    if ca is not None and not Path(ca).is_file():
        raise InputError(f"{section}.ca_file {ca}: no such file")
    return jobs.TLSOptions(ca, insecure, (f"{section}.ca_file:", f"{section}.insecure_skip_verify: true"))


def copy_options(cfg: SyncConfig, dry_run: bool = False, jobs_override: int | None = None,
                 cancel: Cancel | None = None) -> CopyOptions:
    n = jobs_override or cfg.copy.jobs
    return CopyOptions(platforms=tuple(Platform.parse(p) for p in cfg.copy.platforms),
                       referrers=referrer_filter(cfg.copy), jobs=n, blob_jobs=max(4, n * 2), dry_run=dry_run,
                       retry=RetryPolicy(attempts=cfg.copy.retries, timeout=cfg.copy.timeout), cancel=cancel)


def check_outputs_writable(cfg: LoadedConfig, shard: tuple[int, int] | None = None) -> None:
    """Fail before copying anything, not after, when an output cannot be written."""
    out = cfg.config.outputs
    for key, value in (("report", out.report), ("textfile", out.textfile), ("registries_yaml", out.registries_yaml),
                       ("config_yaml", out.config_yaml)):
        if not value:
            continue
        path = shard_path(Path(value), shard) if key in ("report", "textfile") else Path(value)
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"outputs.{key}: cannot write {path} ({parent} is not a writable directory)")


def check_node_files_readable(cfg: LoadedConfig) -> None:
    """Fail before copying anything when an existing node file the run must parse at the end -- config.yaml
    (its other keys are kept), registries.yaml with `node.merge` -- cannot be (too large, not UTF-8, not
    YAML, nested too deep, an alias bomb, the wrong shape): the run then ends as any bad-input run does, exit
    2 with the textfile saying so, instead of after the copy with no report."""
    c, out = cfg.config, cfg.config.outputs
    if out.config_yaml:
        path = Path(out.config_yaml)
        set_system_default_registry(_read(path) or "", None, str(path))
    if out.registries_yaml and c.node.merge:
        path = Path(out.registries_yaml)
        old = _read(path)
        if old:
            Registries.from_dict(load_yaml_mapping(old, str(path)), str(path))


def mirror_refs(cfg: LoadedConfig, refs: Sequence[ImageRef], *, creds: Credentials | None = None,
                max_rps: float | None = None, pull_floor: int | None = None, jobs_override: int | None = None,
                dry_run: bool = False, progress: Progress | None = None, log: Log = lambda s: None,
                cancel: Cancel | None = None, expect_digests: Mapping[ImageRef, str] | None = None,
                artifacts=None) -> Report:
    """One engine run of `refs` into the config's target, with its TLS, sources, credentials and limits
    (the arguments given here override the config's); `cancel` interrupts it; `expect_digests`: the digests
    the releases publish (rancher), each copy checked against them."""
    c = cfg.config
    creds = creds if creds is not None else target_credentials(cfg)
    target_tls = dataclasses.replace(_tls(c.target.ca_file, c.target.insecure_skip_verify, "target"),
                                     strict_auth_realm=c.target.strict_auth_realm)
    source = jobs.SourceOptions(_tls(c.sources.ca_file, c.sources.insecure_skip_verify, "sources"),
                                parse_source_endpoints(f"{k}={u}" for k, u in c.sources.endpoints.items()),
                                source_auth_file(cfg))
    options = copy_options(c, dry_run, jobs_override, cancel)
    return mirror_job.mirror(refs, cfg.target, target_tls=target_tls, source=source, options=options,
                       public_projects=c.target.public_projects, progress=progress, log=log,
                       max_rps=max_rps if max_rps is not None else c.copy.max_rps,
                       pull_floor=pull_floor if pull_floor is not None else c.copy.pull_floor,
                       target_credentials=creds, expect_digests=expect_digests, artifacts=artifacts)


def run_sync(cfg: LoadedConfig, *, shard: tuple[int, int] | None = None, max_rps: float | None = None,
             pull_floor: int | None = None, jobs_override: int | None = None, dry_run: bool = False,
             progress: Progress | None = None, log: Log = lambda s: None,
             release_client: httpx.Client | None = None, clock: Callable[[], float] = time.time,
             cancel: Cancel | None = None, verbose: bool = False) -> SyncResult:
    """One sync run (the caller holds the lock).  Bad config or an unusable target raises InputError;
    image failures are in the result (exit code 1).

    Interrupted (`cancel` set, e.g. by a signal handler, or `Interrupted` raised in this thread): the
    report and the textfile are still written, with result "interrupted", exit code 130 (SIGINT) or 143
    (SIGTERM) and the unfinished images `interrupted`; the node files are not.  An interrupted engine run
    is returned as that result; an interruption outside the engine re-raises `Interrupted` once they are
    written."""
    c = cfg.config
    cancel = cancel if cancel is not None else Cancel()  # the engine sets it when Interrupted reaches it
    started, t0 = clock(), time.monotonic()
    target = cfg.target
    labels = {"config": cfg.path.stem, **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {})}
    textfile = shard_path(Path(c.outputs.textfile), shard) if c.outputs.textfile and not dry_run else None
    sets: list[ImageSet] = []
    art_sets: list[ImageSet] = []  # the charts and install files copied (in the report, not in the node files)
    all_refs: list[ImageRef] = []
    refs: list[ImageRef] = []
    creds: Credentials | None = None
    work = contextlib.ExitStack()  # the charts' and install files' download directory

    def finish(report: Report, interrupt_exit_code: int) -> SyncResult:
        finished, seconds = clock(), time.monotonic() - t0
        doc = build_report(report, sets + art_sets, config=cfg.path, target=str(target), shard=shard, dry_run=dry_run,
                           started=started, finished=finished, seconds=seconds,
                           interrupt_exit_code=interrupt_exit_code)
        messages = report_messages(doc)
        if not dry_run:
            if (c.outputs.registries_yaml or c.outputs.config_yaml) and not report.interrupted:
                doc["node_files_written"] = write_node_files(cfg, all_refs, sets, creds, log)
            if c.outputs.report:
                write_atomic(shard_path(Path(c.outputs.report), shard), json.dumps(doc, indent=2) + "\n", 0o644)
            if textfile is not None:
                write_textfile(textfile, labels=labels, finished=finished, success=doc["exit_code"] == EXIT_OK,
                               summary=doc["summary"], seconds=seconds, rate_limit=report.rate_limit, releases=sets,
                               kinds=doc["summary"].get("kinds"))
        return SyncResult(doc, doc["exit_code"], messages)

    try:
        if not dry_run:
            check_outputs_writable(cfg, shard)
            check_node_files_readable(cfg)
        creds = target_credentials(cfg)
        source_auth_file(cfg)  # checked before any download, as are the CA files and the node files' gates
        _tls(c.target.ca_file, c.target.insecure_skip_verify, "target")
        _tls(c.sources.ca_file, c.sources.insecure_skip_verify, "sources")
        check_node_gates(cfg)  # with the pinned versions
        sets = resolve_image_sets(cfg, log, release_client, verbose)
        if not dry_run:
            check_node_gates(cfg, sets)  # with the versions the channels resolved to, before anything is copied
        all_refs = merge_refs(*[list(s.images) for s in sets])
        artifacts = None
        if c.charts or any(r.install_files for r in c.releases):
            tmp = work.enter_context(tempfile.TemporaryDirectory(prefix="rke2-mirror-sync-"))
            artifacts = prepare_artifacts(cfg, sets, Path(tmp), release_client, log,
                                          install=shard is None or shard[0] == 0)
        if artifacts is not None:
            if artifacts.images:  # the charts' declared images join the image set (every shard's share)
                before = len(all_refs)
                sets.append(ImageSet("charts' images", tuple(artifacts.images)))
                all_refs = merge_refs(all_refs, artifacts.images)
                log(f"charts' images: {len(artifacts.images)} declared, {len(all_refs) - before} not already in "
                    "the image set")
            if shard is not None and shard[0] != 0:
                artifacts = None  # the charts and files themselves: shard 0's
            else:
                for kind, label in (("chart", "charts"), ("files", "install files")):
                    mine = tuple(src for src, name in artifacts.pairs if artifacts.kinds.get(name) == kind)
                    if mine:
                        art_sets.append(ImageSet(label, mine))
        refs = shard_refs(all_refs, *shard) if shard else all_refs
        if shard:
            log(f"shard {shard[0]}/{shard[1]}: {len(refs)} of {len(all_refs)} images")
        if cancel.is_set():
            raise Interrupted(cancel.signum or signal.SIGINT)
        expect = {r: d for s in sets for r, d in s.digests.items()}
        report = mirror_refs(cfg, refs, creds=creds, max_rps=max_rps, pull_floor=pull_floor,
                             jobs_override=jobs_override, dry_run=dry_run, progress=progress, log=log, cancel=cancel,
                             expect_digests=expect, artifacts=artifacts)
    except MirrorError as exc:
        if textfile is not None:  # monitoring sees the failed run; the last success is kept
            finished = clock()
            try:
                write_textfile(textfile, labels=labels, finished=finished, success=False, summary=None,
                               seconds=time.monotonic() - t0, rate_limit=None, releases=sets)
            except InputError as werr:
                log(f"warning: {werr}")
        raise exc
    except Interrupted as exc:
        if not dry_run:
            try:
                unfinished = [ImageResult(str(r), str(target_ref(r, target)), "interrupted",
                                          error="not started: the run was interrupted") for r in refs]
                finish(Report(unfinished, interrupted=signal.Signals(exc.signum).name), exc.exit_code)
            except MirrorError as werr:
                log(f"warning: {werr}")
        raise
    finally:
        work.close()
    return finish(report, cancel.exit_code)


def sync(config_path: Path | str, *, shard: tuple[int, int] | None = None, lock_path: Path | None = None,
         log: Log = lambda s: None, cancel: Cancel | None = None, **kw: Any) -> SyncResult:
    """Load the config, take its lock (LockHeld, exit 3, if another run has it), run; the lock is released
    however the run ends (an `Interrupted` unwinding included)."""
    cfg = load_config(config_path)
    lock = SyncLock(cfg.lock_path(shard, lock_path), f"rke2-mirror sync of {cfg.path}")
    lock.acquire(log)
    try:
        return run_sync(cfg, shard=shard, log=log, cancel=cancel, **kw)
    finally:
        lock.release()
