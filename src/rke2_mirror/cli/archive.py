"""typer commands of the air-gap archive path: `save`, `load`, `inspect`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from rke2_mirror.cli.base import (CliProgress, app, copy_options, finish, gather_images, load_releases, read_image_file,
                                  release_http_client, run_command)
from rke2_mirror.cli.options import (COPY_TUNING, IMAGE_LISTS, REFERRERS, RELEASE_CHECKSUMS, RELEASE_LISTS, REPORT_OUTPUT, SOURCE,
                                     TARGET_TLS, CopyTuning,
                                     ImageLists, JsonOpt, PlatformOpt, PublicProjectsOpt, ReleaseOptions, ReportOutput, ToOpt,
                                     options, parse_platforms)
from rke2_mirror.cli.artifacts import ChartImagesOpt, ChartOpt, InstallFilesOpt, InstallScriptOpt, prepared
from rke2_mirror.cli.signals import interrupts
from rke2_mirror.cli.util import LazyModule, stderr_log
from rke2_mirror.jobs.common import SourceOptions, TLSOptions
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.oci import Platform
from rke2_mirror.model.reference import RegistryURL
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.model.units import human
from rke2_mirror.releases import KNOWN_ARCHES

tarfiles = LazyModule("rke2_mirror.endpoints.tarfiles")
save_job = LazyModule("rke2_mirror.jobs.save")
load_job = LazyModule("rke2_mirror.jobs.load")
inspect_job = LazyModule("rke2_mirror.jobs.inspect")
dockerarchive = LazyModule("rke2_mirror.endpoints.dockerarchive")
checksums = LazyModule("rke2_mirror.releases.checksums")
artifacts_job = LazyModule("rke2_mirror.jobs.artifacts")
ociarchive = LazyModule("rke2_mirror.endpoints.ociarchive")

LOAD_NAME_HELP = ("REPOSITORY[:TAG] for index.json entries that name no image or only a tag (skopeo's "
                  "oci-archive:FILE or oci-archive:FILE:TAG), e.g. docker.io/rancher/x.")


def resolve_since(value: str, release_options) -> "save_job.Since":  # a string: evaluating it would import archive now
    """`--since`: an earlier archive (or its parts), an image list file, or a release."""
    path = Path(value)
    if tarfiles.looks_like_archive(path):
        return save_job.Since(label=path.name, archive=path)
    if path.is_file():
        return save_job.Since(label=str(path), refs=read_image_file(path))
    (r,) = load_releases([value], release_options, log=stderr_log)
    return save_job.Since(label=r.version, refs=list(r.images))


def _print_inspect(doc: dict) -> None:
    echo = typer.echo
    files = doc["files"]
    where = doc["archive"] if len(files) == 1 else f"{files[0]} … {Path(files[-1]).name} ({len(files)} parts)"
    echo(f"archive:  {where}, {human(doc['file_bytes'])}, " + doc.get(
        "format", "OCI image layout" + (f" {doc['layout_version']}" if doc.get("layout_version") else "")))
    d = doc.get("delta")
    if d:
        echo(f"delta:    against {d['since']}: {d['omitted']} blobs ({human(d['omitted_bytes'])}) left out; "
             "`load` needs them at the target already")
    b = doc["blobs"]
    c = doc.get("counts") or {}
    extra = "".join(f", {c[k]} {k if k == 'files' else 'chart(s)'}" for k in ("chart", "files") if c.get(k))
    extra = extra.replace(" files", " file set(s)")
    echo(f"contents: {len(doc['images']) - c.get('chart', 0) - c.get('files', 0)} images{extra}, {b['count']} blobs, "
         f"{human(b['bytes'])}")
    rows = []
    for im in doc["images"]:
        if "error" in im:
            rows.append((im["reference"], im["digest"][:19], "error", im["error"], ""))
            continue
        kind = im.get("kind") or ("index" if im["mediaType"].endswith(("index.v1+json", "list.v2+json")) else "manifest")
        if im.get("content") in ("chart", "files"):
            kind = im["content"]
        size = human(im["size"])
        if "size_in_archive" in im:
            size += f" ({human(im['size_in_archive'])} here)"
        plats = "-" if im.get("content") in ("chart", "files") else ", ".join(im["platforms"])
        rows.append((im["reference"], im["digest"][:19], kind, plats, size))
        for f in im.get("files", ()):
            rows.append(("  ↳ " + str(f["title"]), f["digest"][:19], "file", "-", human(f["size"])))
        for r in im.get("referrers", ()):
            what = r["kind"] if r["kind"] != "other" else (r["artifactType"] or "artifact")
            rows.append(("  ↳ " + (f"{what} (tag {r['tag']})" if r.get("tag") else what), r["digest"][:19], "referrer",
                         r["artifactType"] or "-", human(r["size"])))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("IMAGE", "DIGEST", "KIND", "PLATFORMS", "SIZE")]) for i in range(4)]
        echo("")
        for r in [("IMAGE", "DIGEST", "KIND", "PLATFORMS", "SIZE")] + rows:
            echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
    if doc.get("ignored_members"):
        echo(f"\nignored (links, devices): {', '.join(doc['ignored_members'][:10])}")
    _print_node(doc.get("node"))
    if "checked" in doc:
        bad = [p for p in doc["problems"] if "blob" in p]
        echo(f"\ncheck:    {doc['checked']} blobs hashed again: "
             + ("all match" if not bad else f"{len(bad)} problem(s)"))


def node_platform(platform: list[str], lists: ReleaseOptions) -> tuple[list[str], ReleaseOptions]:
    """`save --for-node`: the one platform of the file (a node tarball is per architecture), from --platform,
    else --arch, else linux/amd64; the release lists follow it (the arch's lists) unless --arch says."""
    plats = parse_platforms(platform)
    if len(plats) > 1:
        raise InputError("--for-node writes one file per architecture: give one --platform (run once per arch)")
    if lists.arch_given and len(lists.arches) > 1:
        raise InputError("--for-node writes one file per architecture: give one --arch (run once per arch)")
    p = plats[0] if plats else Platform("linux", lists.arches[0] if lists.arch_given else "amd64")
    if lists.arch_given and p.architecture != lists.arches[0]:
        raise InputError(f"--platform {p} and --arch {lists.arches[0]} disagree")
    if not lists.arch_given and p.architecture in KNOWN_ARCHES:
        lists = replace(lists, arches=(p.architecture,))
    return [str(p)], lists


def _print_node(node: dict | None) -> None:
    """inspect: what an RKE2 node makes of the file in agent/images."""
    if not node:
        return
    echo = typer.echo
    echo("")
    if node["runtime"]:
        echo(f"node:     serves RKE2's runtime image (read before containerd starts) as: {', '.join(node['runtime'])}")
    elif node["docker_manifest"]:
        echo("node:     no rancher/rke2-runtime image here (a node needs it from another tarball or a registry)")
    else:
        echo("node:     OCI-only: containerd imports it from agent/images, RKE2's runtime-image lookup never "
             "finds anything in it (no docker manifest.json)")
    if node["runtime_lookup"]:
        echo(f"          names RKE2's docker-tarball reader finds ({len(node['runtime_lookup'])}):")
        for n in node["runtime_lookup"]:
            echo(f"            {n}")
    if node.get("zstd_window"):
        echo(f"          zstd window {human(node['zstd_window'])}")
    for w in node["warnings"]:
        echo(f"node:     warning: {w}")


NameOpt = Annotated[Optional[str], typer.Option("--name", metavar="REPOSITORY[:TAG]", help=LOAD_NAME_HELP)]


@app.command("save")
@run_command
@options(images=IMAGE_LISTS, source=SOURCE, lists=RELEASE_LISTS, tuning=COPY_TUNING, referrers=REFERRERS,
         out=REPORT_OUTPUT)
def save_command(
    *,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE.tar",
                                         help="The archive to write (it appears only when complete).")],
    images: ImageLists,
    since: Annotated[Optional[str], typer.Option(
        "--since", metavar="OLD",
        help="Write a delta: leave out the blobs OLD's images have (OLD: a release, an image list file or an "
             "earlier archive). `load` checks that the target holds them.")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", metavar="SIZE",
        help="Write FILE.tar.part001, part002, … of at most SIZE each (4G = 4 GiB; 4GB = 4×10⁹, fits FAT32). "
             "`load` reads the parts.")] = None,
    platform: PlatformOpt = [],  # noqa: B006 - typer's default
    work_dir: Annotated[Optional[Path], typer.Option(
        "--work-dir", metavar="DIR",
        help="Where blobs are collected (default FILE.tar.work beside the output). A rerun resumes there.")] = None,
    keep_work_dir: Annotated[bool, typer.Option("--keep-work-dir", help="Keep the work dir after success.")] = False,
    source: SourceOptions,
    referrers: ReferrerFilter | None,
    for_node: Annotated[bool, typer.Option(
        "--for-node",
        help="Write a tarball for RKE2's agent/images (rke2-images.linux-amd64.tar.zst): one platform (--platform, "
             "else from --arch, else linux/amd64), read by RKE2's runtime-image lookup and by containerd. "
             "Compression from the name: .tar, .tar.gz, .tar.zst.")] = False,
    system_default_registry: Annotated[Optional[str], typer.Option(
        "--system-default-registry", metavar="HOST[/PATH]",
        help="With --for-node: also name each docker.io image as the nodes' system-default-registry asks for it "
             "(HOST/rancher/x:tag).", show_default=False)] = None,
    lists: ReleaseOptions,
    tuning: CopyTuning,
    out: ReportOutput,
    chart: ChartOpt = [],  # noqa: B006 - typer's default
    chart_images: ChartImagesOpt = True,
    install_files: InstallFilesOpt = False,
    install_script: InstallScriptOpt = None,
) -> None:
    """Copy images into one archive file, digests preserved.

    The archive is an OCI image layout in a tar (each blob once); `load` pushes it to a registry.
    With --for-node it is a node tarball for /var/lib/rancher/rke2/agent/images/."""
    with interrupts() as cancel:
        node = None
        if for_node:
            platform, lists = node_platform(platform, lists)
            if referrers is not None and not referrers.everything:
                raise InputError("--referrer-type/--signatures do not go with --for-node (a node tarball holds "
                                 "images only)")
            referrers = None
            node = save_job.ForNode(Platform.parse(platform[0]),
                                    save_job.parse_system_default_registry(system_default_registry)
                                    if system_default_registry else None)
        elif system_default_registry:
            raise InputError("--system-default-registry goes with --for-node")
        opts = copy_options(tuning, cancel, platform=platform, referrers=referrers)
        split_bytes = tarfiles.parse_size(split) if split else None
        published: dict = {}  # digests the releases publish (rancher): each copy is checked against them
        only_artifacts = bool(chart) and not images.files and not images.releases
        versions: dict[str, str] = {}  # each --release as resolved: the install files are of the same version
        refs = [] if only_artifacts else gather_images(images, lists, digests=published, versions=versions)
        since_spec = resolve_since(since, lists) if since else None
        with prepared(chart, install_files, install_script, images, lists, output.parent,
                      chart_images=chart_images, versions=versions) as artifacts:
            refs = artifacts_job.join_images(refs, artifacts, stderr_log)  # the charts' declared images
            progress = CliProgress()
            try:
                res = save_job.save(refs, output, source=source, options=opts, split=split_bytes, since=since_spec,
                                    work_dir=work_dir, keep_work_dir=keep_work_dir, progress=progress, log=stderr_log,
                                    for_node=node, expect_digests=published, artifacts=artifacts)
            finally:
                progress.close()
        if res.files:
            names = str(res.files[0]) if len(res.files) == 1 else \
                f"{len(res.files)} parts {res.files[0]} … {res.files[-1].name}"
            what = "images" if artifacts is None else "entries (images, charts, install files)"
            stderr_log(f"wrote {names}: {res.images} {what}, {res.blobs} blobs, {human(res.bytes)}")
            if since_spec is not None:
                stderr_log(f"delta against {since_spec.label}: {res.omitted} blobs "
                           f"({human(res.omitted_bytes)}) left out")
        else:
            stderr_log("no archive written: " + ("the run was interrupted" if res.report.interrupted
                                                 else "no image was saved"))
        if res.work_dir_kept and res.work_dir is not None and res.work_dir.exists():
            stderr_log(f"work dir kept: {res.work_dir}" + (" (run again to complete)" if res.report.failed else ""))
        finish(res.report, out, cancel, verb="saved")


@app.command("load")
@run_command
@options(lists=RELEASE_CHECKSUMS, tls=TARGET_TLS, tuning=COPY_TUNING, referrers=REFERRERS, out=REPORT_OUTPUT)
def load_command(
    *,
    file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="An archive (or its first part, FILE.tar.part001), "
                                         "or a docker archive (docker save; .tar, .tar.gz, .tar.zst, .tar.bz2/.tbz, "
                                         ".tar.lz4: told from the content).")],
    to: ToOpt,
    tmp_dir: Annotated[Optional[Path], typer.Option(
        "--tmp-dir", metavar="DIR",
        help="Where the layers of a compressed docker archive are spooled, gzip-compressed (default $TMPDIR, "
             "else /var/tmp).")] = None,
    release: Annotated[Optional[str], typer.Option(
        "--release", "-r", metavar="VERSION",
        help="First verify FILE against this release's sha256sum-<arch>.txt (downloaded, or from --lists-dir "
             "with --offline); a mismatch refuses it.")] = None,
    lists: ReleaseOptions,
    tls: TLSOptions,
    platform: PlatformOpt = [],  # noqa: B006 - typer's default
    name: NameOpt = None,
    public_projects: PublicProjectsOpt = False,
    referrers: ReferrerFilter | None,
    mount_from: Annotated[list[str], typer.Option(
        "--mount-from", metavar="PROJECT",
        help="Delta archives: also mount left-out blobs from the target's repositories in PROJECT (a Harbor "
             "project, or first path component) into another project's repositories. Default: only within "
             "one project, so an archive cannot make private blobs public (repeatable).")] = [],  # noqa: B006
    tuning: CopyTuning,
    out: ReportOutput,
) -> None:
    """Push every image of an archive to TARGET.

    Each image goes under its mapped name, digests preserved (docker archives: manifests rebuilt, new
    digests)."""
    target = RegistryURL.parse(to, what="--to")
    with interrupts() as cancel:
        opts = copy_options(tuning, cancel, platform=platform, referrers=referrers)
        if release:
            with release_http_client() as client:
                checksums.verify_release_file(file, release, lists.source(), lists.arches if lists.arch_given else (),
                                              None if lists.offline else client, log=stderr_log)
        with dockerarchive.open_archive(file, name=name, tmp_dir=tmp_dir, log=stderr_log) as reader:
            if reader.delta:
                stderr_log(f"{reader.label} is a delta against {reader.delta.since}: checking that the target "
                           f"holds the {len(reader.delta.omitted)} blobs it leaves out")
            progress = CliProgress()
            try:
                report = load_job.load(reader, target, target_tls=tls, options=opts,
                                       public_projects=public_projects, mount_from=mount_from,
                                       progress=progress, log=stderr_log)
            finally:
                progress.close()
        finish(report, out, cancel, verb="loaded")


@app.command("inspect")
@run_command
def inspect_command(
    file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="An archive (or its first part), or a docker archive "
                                         "(docker save; .tar, .tar.gz, .tar.zst, .tar.bz2/.tbz, .tar.lz4).")],
    check: Annotated[bool, typer.Option("--check", help="Hash every blob again (reads the whole archive).")] = False,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List an archive's images, platforms and sizes.

    Also says whether it is a delta archive, and against what."""
    with dockerarchive.open_archive(file, name=name, log=stderr_log) as reader:
        def on_blob(digest: str, error: str | None) -> None:
            if error:
                typer.echo(f"rke2-mirror: {digest}: {error}", err=True)
        doc = inspect_job.inspect(reader, check=check, on_blob=on_blob)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        _print_inspect(doc)
    for p in doc["problems"]:
        if "image" in p:
            typer.echo(f"rke2-mirror: {p['image']}: {p['error']}", err=True)
        elif not check or "missing" in p["error"]:
            typer.echo(f"rke2-mirror: {p['blob']}: {p['error']}", err=True)
    if doc["problems"]:
        raise typer.Exit(1)


@app.command("extract")
@run_command
def extract_command(
    file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="An archive written by `save --install-files` "
                                         "(or its first part).")],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="The directory to write the files into "
                                     "(INSTALL_RKE2_ARTIFACT_PATH).")],
    as_json: JsonOpt = False,
) -> None:
    """Write an archive's RKE2 install files into a directory.

    For INSTALL_RKE2_ARTIFACT_PATH, flat: rke2.linux-<arch>.tar.gz, sha256sum-<arch>.txt, install.sh, each hashed again (and checked
    against the sha256sum file) and written whole or not at all."""
    with ociarchive.ArchiveReader(file) as reader:
        res = artifacts_job.extract(reader, to, log=stderr_log)
    if as_json:
        typer.echo(json.dumps({"files": res.files}, indent=2))
    else:
        for f in res.files:
            typer.echo(f"{f['path']}  sha256:{f['sha256']}")
        stderr_log(f"extracted {len(res.files)} file(s) into {to}: install with "
                   f"INSTALL_RKE2_ARTIFACT_PATH={to} sh {to}/install.sh")


__all__ = ["extract_command", "inspect_command", "load_command", "resolve_since", "save_command"]
