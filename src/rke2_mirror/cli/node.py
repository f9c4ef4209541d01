"""typer commands for the node side: `registries-yaml` and `verify`."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rke2_mirror.endpoints.auth import ENV_PASSWORD, ENV_USERNAME, Credentials
from rke2_mirror.cli.base import app, load_releases, read_image_file, run_command
from rke2_mirror.cli.options import IMAGE_LISTS, RELEASE_LISTS, ImageLists, ReleaseOptions, StrictAuthRealmOpt, options
from rke2_mirror.cli.util import PROG, LazyModule, stderr_log
from rke2_mirror.model.errors import InputError
from rke2_mirror.files import existing_mode, write_atomic
from rke2_mirror.model.oci import Platform
from rke2_mirror.model.reference import ImageRef, RegistryURL, merge_refs
from rke2_mirror.releases import parse_release

node_versions = LazyModule("rke2_mirror.node.versions")  # imported when a command of this module runs
node_registries = LazyModule("rke2_mirror.node.registries")
node_writer = LazyModule("rke2_mirror.node.writer")
nodecheck = LazyModule("rke2_mirror.node.verify")
node_imagesdir = LazyModule("rke2_mirror.node.imagesdir")
node_resolver = LazyModule("rke2_mirror.node.resolver")

ENV_IDENTITY_TOKEN = "RKE2_MIRROR_IDENTITY_TOKEN"

RKE2VersionOpt = Annotated[Optional[str], typer.Option(
    "--rke2-version", metavar="VERSION",
    help="The RKE2 version the nodes run (v1.28.9+rke2r1); default: from --release, or the rke2-runtime tag "
         "of --images. Unknown: what works on every supported release, with warnings.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout.")]


# -- shared helpers --------------------------------------------------------------------------------
def warn(message: str) -> None:
    typer.echo(f"{PROG}: warning: {message}", err=True)


def read_text(path: Path, what: str, missing_ok: bool = False) -> str:
    """A node file's text (registries.yaml, config.yaml), reading no more than `yamlsafe.MAX_BYTES`: too
    large, not UTF-8 or unreadable is one InputError naming it (and the line, where known)."""
    from rke2_mirror import yamlsafe  # here: yaml costs start-up time every other command would pay

    try:
        return yamlsafe.read_text(path)
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory") from None
    except yamlsafe.YAMLRefused as exc:
        raise InputError(exc.describe(str(path))) from None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None


def local_images(images: ImageLists, required: bool) -> tuple[list[ImageRef], list[node_versions.RKE2Version | None]]:
    """What can be known without the network: the images of the --images files, and per --release the RKE2
    version its name says (None for a channel).  A bad file or release name is an InputError here, before
    any download."""
    if required and not images.files and not images.releases:
        raise InputError("no images given: use --images FILE and/or --release RELEASE")
    refs = merge_refs(*[read_image_file(p) for p in images.files])
    named: list[node_versions.RKE2Version | None] = []
    for r in images.releases:
        value, is_channel = parse_release(r, "rke2")
        named.append(None if is_channel else node_versions.RKE2Version.try_parse(value))
    return refs, named


def with_release_images(images: ImageLists, options: ReleaseOptions, refs: list[ImageRef]
                   ) -> tuple[list[ImageRef], list[node_versions.RKE2Version]]:
    """`refs` merged with the --release lists (downloaded, or from the cache), and the RKE2 versions they
    resolved to."""
    lists = [refs]
    versions: list[node_versions.RKE2Version] = []
    if images.releases:
        for r in load_releases(images.releases, options, log=stderr_log):
            lists.append(list(r.images))
            v = node_versions.RKE2Version.try_parse(r.version)
            if v:
                versions.append(v)
    return merge_refs(*lists), versions


def known_version(explicit: str | None, named: list[node_versions.RKE2Version | None],
                  refs: list[ImageRef]) -> node_versions.RKE2Version | None:
    """The version `pick_version` will model, when it is known before any download: --rke2-version, else the
    oldest of the --release versions when every --release is a version (a channel is known only once
    resolved), else the rke2-runtime tag of the --images."""
    if explicit:
        return node_versions.RKE2Version.parse(explicit)
    if named:
        return min(named) if all(v is not None for v in named) else None  # type: ignore[type-var]
    return node_versions.version_from_images(refs)


def pick_version(explicit: str | None, from_releases: list[node_versions.RKE2Version],
                 images: list[ImageRef]) -> node_versions.RKE2Version | None:
    if explicit:
        return node_versions.RKE2Version.parse(explicit)
    if from_releases:
        if len(set(from_releases)) > 1:
            warn(f"several RKE2 versions ({', '.join(map(str, sorted(set(from_releases))))}): "
                 f"modelling the oldest, {min(from_releases)}")
        return min(from_releases)
    return node_versions.version_from_images(images)


def credentials_from_env() -> Credentials:
    user, pw = os.environ.get(ENV_USERNAME, ""), os.environ.get(ENV_PASSWORD, "")
    token = os.environ.get(ENV_IDENTITY_TOKEN, "")
    if user and pw:
        return Credentials(user, pw)
    if token:
        return Credentials(user, "", token)
    raise InputError(f"--with-auth needs {ENV_USERNAME} and {ENV_PASSWORD} (or {ENV_IDENTITY_TOKEN}) in the "
                     "environment; passwords are never taken on the command line")


# -- registries-yaml -------------------------------------------------------------------------------
@app.command("registries-yaml")
@run_command
@options(images=IMAGE_LISTS, lists=RELEASE_LISTS.without("product"))
def registries_yaml_command(
    *,
    to: Annotated[str, typer.Option("--to", metavar="TARGET", help="The registry the images were copied to: [https://|http://]HOST[:PORT][/PREFIX].", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="Write registries.yaml here (atomically; mode 0600 when it holds credentials). Default: stdout.", show_default=False)] = None,
    config_yaml: Annotated[Optional[Path], typer.Option("--config-yaml", metavar="PATH", help="Also set system-default-registry in this RKE2 config.yaml (created if missing), keeping its other keys, their order and its comments.", show_default=False)] = None,
    node_ca_file: Annotated[Optional[str], typer.Option("--node-ca-file", metavar="PATH", help="Path of the registry's CA certificate ON THE NODES (tls.ca_file).", show_default=False)] = None,
    insecure_skip_verify: Annotated[bool, typer.Option("--insecure-skip-verify", help="Write tls.insecure_skip_verify: true (prefer --node-ca-file).")] = False,
    with_auth: Annotated[bool, typer.Option("--with-auth", help=f"Write auth from ${ENV_USERNAME}/${ENV_PASSWORD} (or ${ENV_IDENTITY_TOKEN}).")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Update the existing --output file: other mirrors and configs, its comments and order are kept.")] = False,
    system_default_registry: Annotated[bool, typer.Option("--system-default-registry/--no-system-default-registry", help="Pull RKE2's system images from TARGET (config.yaml system-default-registry). --no-system-default-registry: TARGET serves workload images only (and --config-yaml removes the key).")] = True,
    disable_default_endpoint: Annotated[bool, typer.Option("--disable-default-endpoint", help="Also write disable-default-registry-endpoint: true into --config-yaml: containerd then never falls back to a registry's upstream endpoint for the registries listed (RKE2 v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1 and later; RKE2's own runtime-image pull still does).")] = False,
    embedded_registry: Annotated[bool, typer.Option("--embedded-registry", help="Also write embedded-registry: true into --config-yaml (servers): nodes share the images of every mirrored registry with each other (Spegel; RKE2 v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1 and later).")] = False,
    rke2_version: RKE2VersionOpt = None,
    images: ImageLists,
    lists: ReleaseOptions,
) -> None:
    """Write the registries.yaml that points RKE2 nodes at TARGET.

    Mirror entries are written for docker.io, for every registry the images come from (with
    --release/--images) and for TARGET's host itself, each with TARGET as a full URL; a /PREFIX becomes
    rewrite rules. configs (TLS, auth) are keyed by the endpoint's host:port. With --config-yaml, its
    system-default-registry is set too (comments and key order kept).

    Local input is checked before anything is downloaded, and nothing is written unless both files can be.
    """
    # Local input first (files exist and parse, flags combine, the version gates of a version known by its
    # name), then the network (release lists), then the writes -- both files only once both are built.
    target = RegistryURL.parse(to, what="--to")
    if merge and output is None:
        raise InputError("--merge needs --output PATH (the registries.yaml to update)")
    existing = None
    existing_text = ""
    if merge and output:
        existing_text = read_text(output, "registries.yaml", missing_ok=True)
        existing = node_registries.load_yaml_mapping(existing_text, str(output))
        node_registries.Registries.from_dict(existing, str(output))
    auth = credentials_from_env() if with_auth else None
    local_refs, named = local_images(images, required=False)
    node_options = dict(node_ca_file=node_ca_file, insecure_skip_verify=insecure_skip_verify, auth=auth,
                        system_default_registry=system_default_registry,
                        disable_default_endpoint=disable_default_endpoint, embedded_registry=embedded_registry)
    # refuses what cannot work on a version known now (the http system-default-registry trap, the config.yaml
    # options of later releases), and reads config.yaml, before any download
    early = node_writer.NodeConfig.for_images(target, local_refs, **node_options,
                                              rke2_version=known_version(rke2_version, named, local_refs))
    node_writer.check_node_config(early)
    if config_yaml is not None:
        prepare_config_yaml(config_yaml, early.config_updates())
    refs, versions = with_release_images(images, lists, local_refs)
    version = pick_version(rke2_version, versions, refs)
    cfg = node_writer.NodeConfig.for_images(target, refs, **node_options, rke2_version=version)
    doc, warnings = node_writer.build_registries(cfg, existing, str(output))
    config_update = prepare_config_yaml(config_yaml, cfg.config_updates()) if config_yaml is not None else None
    if config_yaml is None and (disable_default_endpoint or embedded_registry):
        keys = [k for k, on in (("disable-default-registry-endpoint", disable_default_endpoint),
                                ("embedded-registry", embedded_registry)) if on]
        warnings.append(f"no --config-yaml: add {', '.join(f'`{k}: true`' for k in keys)} to the nodes' config.yaml yourself")
    text = (node_writer.merged_registries_text(existing_text, existing, doc, str(output)) if existing else None) \
        or node_writer.dump_registries(doc, cfg)
    if version is None and system_default_registry:
        warnings.append("RKE2 version unknown (give --release or --rke2-version): written for every supported release")
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        secret = node_writer.registries_have_auth(doc)
        mode = 0o600 if secret else existing_mode(output, 0o644)
        write_atomic(output, text, mode)
        typer.echo(f"{PROG}: wrote {output}" + (" (mode 0600: it holds credentials)" if secret else ""), err=True)
    if config_update is not None:
        config_update()
    for w in warnings:
        warn(w)


def prepare_config_yaml(path: Path, updates: dict):
    """Read and rewrite config.yaml in memory (an InputError now if it cannot be); returns what writes it.
    `updates`: the keys to set (None: remove), system-default-registry first."""
    old = read_text(path, "config.yaml", missing_ok=True)
    new = node_writer.update_config_yaml(old, updates, str(path))

    def write() -> None:
        if new != old:
            write_atomic(path, new, existing_mode(path, 0o600))
        what = [f"{k}: {str(val).lower() if isinstance(val, bool) else val}" if val is not None else f"no {k}"
                for k, val in updates.items()]
        typer.echo(f"{PROG}: {path}: {', '.join(what)}", err=True)

    return write


# -- verify ----------------------------------------------------------------------------------------
@app.command("verify")
@run_command
@options(images=IMAGE_LISTS, lists=RELEASE_LISTS.without("product"))
def verify_command(
    *,
    registries_yaml: Annotated[Path, typer.Option("--registries-yaml", metavar="PATH", help="The registries.yaml the nodes use.", show_default=False)],
    config_yaml: Annotated[Optional[Path], typer.Option("--config-yaml", metavar="PATH", help="The nodes' config.yaml: its system-default-registry renames the system images.", show_default=False)] = None,
    images: ImageLists,
    rke2_version: RKE2VersionOpt = None,
    node_root: Annotated[Optional[Path], typer.Option("--node-root", metavar="DIR", help="Read the files registries.yaml names (ca_file) under DIR, e.g. a copy of a node's /etc.", show_default=False)] = None,
    images_dir: Annotated[Optional[Path], typer.Option("--images-dir", metavar="DIR", help="A copy of a node's /var/lib/rancher/rke2/agent/images: images in its tarballs count as present before any registry is asked (the runtime image only where RKE2's docker-tarball lookup finds it).", show_default=False)] = None,
    check_upstream: Annotated[bool, typer.Option("--check-upstream", help="Also contact upstream registries (docker.io, quay.io, ...) where a node would fall back to them; default: reported as failing, as on an air-gapped node.")] = False,
    jobs_n: Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, metavar="N", help="Images checked at once.")] = 4,
    as_json: JsonOpt = False,
    strict_auth_realm: StrictAuthRealmOpt = False,
    lists: ReleaseOptions,
) -> None:
    """Check that RKE2 nodes would find every image.

    Per image, as a node resolves it through registries.yaml: the name the node asks for (system-default-registry applied), then the endpoints in
    RKE2's order (mirror endpoints, rewrite, "*", the default endpoint last) with the TLS and auth of
    configs."host:port"; the manifest and the child for --arch must be there. Exit 1 if any image
    would fail.
    """
    # local input first: the node files, --node-root, --rke2-version, the --images files and --release names
    regs = node_registries.Registries.parse(read_text(registries_yaml, "registries.yaml"), str(registries_yaml))
    conf_text = read_text(config_yaml, "config.yaml") if config_yaml else ""
    sdr = node_writer.system_default_registry_of(conf_text, str(config_yaml))
    no_default = node_writer.default_endpoint_disabled(conf_text, str(config_yaml))
    embedded = node_writer.embedded_registry_enabled(conf_text, str(config_yaml))
    if node_root is not None and not node_root.is_dir():
        raise InputError(f"--node-root {node_root}: no such directory")
    if images_dir is not None and not images_dir.is_dir():
        raise InputError(f"--images-dir {images_dir}: no such directory")
    if rke2_version:
        node_versions.RKE2Version.parse(rke2_version)
    local_refs, _ = local_images(images, required=True)
    ignored = regs.ignored_warning(str(registries_yaml))
    if ignored:
        warn(ignored)
    refs, versions = with_release_images(images, lists, local_refs)
    version = pick_version(rke2_version, versions, refs)
    platform = Platform("linux", (lists.arches or ("amd64",))[0])
    if len(lists.arches) > 1:
        warn(f"checking the {platform} manifests only (one node architecture at a time)")
    node_path = (lambda p: str(node_root / p.lstrip("/"))) if node_root else str
    try:
        local = node_imagesdir.read_images_dir(images_dir) if images_dir is not None else None
    except OSError as exc:
        raise InputError(f"--images-dir {images_dir}: {exc.strerror or exc}") from None
    progress = _Progress(len(refs))
    try:
        factory = functools.partial(nodecheck.default_registry_factory, strict_auth_realm=strict_auth_realm,
                                    log=stderr_log)
        report = nodecheck.check_images(refs, regs, system_default_registry=sdr, rke2_version=version, platform=platform,
                              jobs=jobs_n, progress=progress.update, node_path=node_path,
                              check_upstream=check_upstream, disable_default_endpoint=no_default,
                              embedded_registry=embedded, registry_factory=factory, images_dir=local)
    finally:
        progress.close()
    extra: list[str] = []
    if version is None:
        extra.append("RKE2 version unknown (give --release or --rke2-version): modelled as the current releases")
    path_note = node_resolver.sdr_path_note(sdr, version)
    if path_note and version is not None:
        extra.append(path_note)
    for key, on, gate in (("disable-default-registry-endpoint", no_default, node_versions.DISABLE_DEFAULT_ENDPOINT),
                          ("embedded-registry", embedded, node_versions.EMBEDDED_REGISTRY)):
        if on and version is not None and not gate.holds(version):
            extra.append(f"config.yaml {key}: RKE2 {version} does not have it (from {gate.describe()}): modelled without it")
    latest = [str(c.name) for c in report.images if c.peer == nodecheck.PEER_LATEST]
    if latest:
        extra.append(f"embedded registry: {len(latest)} image(s) tagged latest are never shared by peers: "
                     + ", ".join(latest[:5]) + (f" and {len(latest) - 5} more" if len(latest) > 5 else ""))
    if extra:
        report = nodecheck.VerifyReport(report.images, report.system_default_registry, version, report.platform,
                                        report.warnings + tuple(extra))
    if as_json:
        import json
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(render_table(report))
    j = report.to_json()["summary"]
    typer.echo(f"{PROG}: {j['total']} images: {j['found']} found, {j['failed']} would fail"
               + (f" (RKE2 {version})" if version else ""), err=True)
    peers = report.peer_summary()
    if peers:
        typer.echo(f"{PROG}: {peers}", err=True)
    for w in report.warnings:
        warn(w)
    if not report.ok:
        raise typer.Exit(1)


class _Progress:
    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty() and total > 1:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="img", desc="verify", file=sys.stderr, leave=False)

    def update(self, _: nodecheck.ImageCheck) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def render_table(report: nodecheck.VerifyReport) -> str:
    """STATUS  IMAGE (as the node names it)  WHERE / WHY, then fixes and notes."""
    rows = []
    for c in report.images:
        found, fail = c.found, c.failure
        if c.images_file is not None:
            rows.append(("found", str(c.name), f"in agent/images {c.images_file}"))
        elif found:
            where = found.attempt.endpoint.url + (" (default endpoint)" if found.attempt.default else "")
            if fail:
                where += f"  [after: {fail.status}]"
            rows.append(("found", str(c.name), where))
        else:
            rows.append(("FAILED", str(c.name), f"{fail.status}: {fail.message}" if fail else "no endpoint"))
    width = max((len(r[1]) for r in rows), default=5)
    lines = [f"{'STATUS':<7} {'IMAGE':<{width}}  ENDPOINT / REASON"]
    lines += [f"{s:<7} {n:<{width}}  {w}" for s, n, w in rows]
    fixes = list(dict.fromkeys(c.failure.fix for c in report.images if not c.ok and c.failure and c.failure.fix))
    if fixes:
        lines.append("")
        lines += [f"fix: {f}" for f in fixes]
    notes = list(dict.fromkeys(n for c in report.images for n in c.notes))
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)

