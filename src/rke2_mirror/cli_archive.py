"""typer commands of the air-gap archive path: `save`, `load`, `inspect` (`register(app)` adds them).

The commands are defined inside `register` and take what they need from `rke2_mirror.cli` there:
cli.py imports this module at the end of its own import, and this module must also be importable
on its own (tests import it first).  No `from __future__ import annotations` here: typer evaluates
the option annotations, and the aliases are local names of `register`.
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_releases import load_releases, read_image_file
from .cli_util import LazyModule, run_command, stderr_log
from .reference import RegistryURL

archive = LazyModule("rke2_mirror.archive")
dockerarchive = LazyModule("rke2_mirror.dockerarchive")

LOAD_NAME_HELP = ("REPOSITORY[:TAG] for index.json entries that name no image or only a tag (skopeo's "
                  "oci-archive:FILE or oci-archive:FILE:TAG), e.g. docker.io/rancher/x.")


def resolve_since(value: str, release_options) -> "archive.Since":  # a string: evaluating it would import archive now
    """`--since`: an earlier archive (or its parts), an image list file, or a release."""
    path = Path(value)
    if archive.looks_like_archive(path):
        return archive.Since(label=path.name, archive=path)
    if path.is_file():
        return archive.Since(label=str(path), refs=read_image_file(path))
    (r,) = load_releases([value], release_options, log=stderr_log)
    return archive.Since(label=r.version, refs=list(r.images))


def _print_inspect(doc: dict) -> None:
    echo = typer.echo
    files = doc["files"]
    where = doc["archive"] if len(files) == 1 else f"{files[0]} … {Path(files[-1]).name} ({len(files)} parts)"
    echo(f"archive:  {where}, {archive.human(doc['file_bytes'])}, " + doc.get(
        "format", "OCI image layout" + (f" {doc['layout_version']}" if doc.get("layout_version") else "")))
    d = doc.get("delta")
    if d:
        echo(f"delta:    against {d['since']}: {d['omitted']} blobs ({archive.human(d['omitted_bytes'])}) left out; "
             "`load` needs them at the target already")
    b = doc["blobs"]
    echo(f"contents: {len(doc['images'])} images, {b['count']} blobs, {archive.human(b['bytes'])}")
    rows = []
    for im in doc["images"]:
        if "error" in im:
            rows.append((im["reference"], im["digest"][:19], "error", im["error"], ""))
            continue
        kind = im.get("kind") or ("index" if im["mediaType"].endswith(("index.v1+json", "list.v2+json")) else "manifest")
        size = archive.human(im["size"])
        if "size_in_archive" in im:
            size += f" ({archive.human(im['size_in_archive'])} here)"
        rows.append((im["reference"], im["digest"][:19], kind, ", ".join(im["platforms"]), size))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("IMAGE", "DIGEST", "KIND", "PLATFORMS", "SIZE")]) for i in range(4)]
        echo("")
        for r in [("IMAGE", "DIGEST", "KIND", "PLATFORMS", "SIZE")] + rows:
            echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
    if doc.get("ignored_members"):
        echo(f"\nignored (links, devices): {', '.join(doc['ignored_members'][:10])}")
    if "checked" in doc:
        bad = [p for p in doc["problems"] if "blob" in p]
        echo(f"\ncheck:    {doc['checked']} blobs hashed again: "
             + ("all match" if not bad else f"{len(bad)} problem(s)"))


def register(app: typer.Typer) -> None:
    """Add `save`, `load` and `inspect` to `app`."""
    from . import cli  # noqa: PLC0415 - see the module docstring
    from .cli import CliProgress
    from .cli_options import (CaFileOpt, FailedListOpt, PublicProjectsOpt, InsecureOpt, JobsOpt, JsonOpt, PlatformOpt, RetriesOpt, TimeoutOpt,
                              SourceEndpointOpt, SrcCaFileOpt, SrcInsecureOpt, ToOpt, source_options, target_tls)
    from .cli_releases import (ArchOpt, ChannelUrlOpt, FlavorOpt, ImagesOpt, ListsDirOpt, OfflineOpt, ProductChoice,
                               ProductOpt, ReleaseOpt, ReleaseOptions, ReleaseUrlOpt, release_http_client)

    @app.command("save")
    @run_command
    def save_command(
        output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE.tar",
                                             help="The archive to write (it appears only when complete).")],
        images: ImagesOpt = None,
        release: ReleaseOpt = None,
        since: Annotated[Optional[str], typer.Option(
            "--since", metavar="OLD",
            help="Write a delta: leave out the blobs OLD's images have (OLD: a release, an image list file or an "
                 "earlier archive). `load` checks that the target holds them.")] = None,
        split: Annotated[Optional[str], typer.Option(
            "--split", metavar="SIZE",
            help="Write FILE.tar.part001, part002, … of at most SIZE each (4G = 4 GiB; 4GB = 4×10⁹, fits FAT32). "
                 "`load` reads the parts.")] = None,
        platform: PlatformOpt = [],
        work_dir: Annotated[Optional[Path], typer.Option(
            "--work-dir", metavar="DIR",
            help="Where blobs are collected (default FILE.tar.work beside the output). A rerun resumes there.")] = None,
        keep_work_dir: Annotated[bool, typer.Option("--keep-work-dir", help="Keep the work dir after success.")] = False,
        src_ca_file: SrcCaFileOpt = None,
        src_insecure_skip_verify: SrcInsecureOpt = False,
        source_endpoint: SourceEndpointOpt = [],
        signatures: Annotated[bool, typer.Option("--signatures", help="Also save cosign-style signature tags (sha256-<hex>.sig).")] = False,
        product: ProductOpt = ProductChoice.rke2,
        arch: ArchOpt = None,
        flavor: FlavorOpt = None,
        release_url: ReleaseUrlOpt = None,
        channel_url: ChannelUrlOpt = None,
        lists_dir: ListsDirOpt = None,
        offline: OfflineOpt = False,
        jobs_n: JobsOpt = 4,
        retries: RetriesOpt = 5,
        timeout: TimeoutOpt = 60.0,
        as_json: JsonOpt = False,
        failed_list: FailedListOpt = None,
    ) -> None:
        """Copy images registry -> one archive file (an OCI image layout in a tar), digests preserved."""
        ropts = ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url, lists_dir, offline)
        refs = cli.gather_images(images, release, ropts)
        split_bytes = archive.parse_size(split) if split else None
        since_spec = resolve_since(since, ropts) if since else None
        opts = cli.copy_options(platform, jobs_n, signatures, retries=retries, timeout=timeout)
        progress = CliProgress("save")
        try:
            res = archive.save(
                refs, output, source=source_options(src_ca_file, src_insecure_skip_verify, source_endpoint),
                options=opts, split=split_bytes, since=since_spec, work_dir=work_dir, keep_work_dir=keep_work_dir,
                progress=progress, log=stderr_log)
        finally:
            progress.close()
        if res.files:
            names = str(res.files[0]) if len(res.files) == 1 else \
                f"{len(res.files)} parts {res.files[0]} … {res.files[-1].name}"
            stderr_log(f"wrote {names}: {res.images} images, {res.blobs} blobs, {archive.human(res.bytes)}")
            if since_spec is not None:
                stderr_log(f"delta against {since_spec.label}: {res.omitted} blobs "
                           f"({archive.human(res.omitted_bytes)}) left out")
        else:
            stderr_log("no archive written: no image was saved")
        if res.work_dir_kept and res.work_dir is not None and res.work_dir.exists():
            stderr_log(f"work dir kept: {res.work_dir}" + (" (run again to complete)" if res.report.failed else ""))
        cli.finish(res.report, as_json=as_json, failed_list=failed_list, verb="saved")

    @app.command("load")
    @run_command
    def load_command(
        file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="An archive (or its first part, FILE.tar.part001), "
                                             "or a docker archive (docker save; .tar, .tar.gz, .tar.zst).")],
        to: ToOpt,
        tmp_dir: Annotated[Optional[Path], typer.Option(
            "--tmp-dir", metavar="DIR",
            help="Where the layers of a compressed docker archive are spooled, gzip-compressed (default $TMPDIR, "
                 "else /var/tmp).")] = None,
        release: Annotated[Optional[str], typer.Option(
            "--release", "-r", metavar="VERSION",
            help="First verify FILE against this release's sha256sum-<arch>.txt (downloaded, or from --lists-dir "
                 "with --offline); a mismatch refuses it.")] = None,
        product: ProductOpt = ProductChoice.rke2,
        arch: ArchOpt = None,
        release_url: ReleaseUrlOpt = None,
        channel_url: ChannelUrlOpt = None,
        lists_dir: ListsDirOpt = None,
        offline: OfflineOpt = False,
        ca_file: CaFileOpt = None,
        insecure_skip_verify: InsecureOpt = False,
        platform: PlatformOpt = [],
        name: Annotated[Optional[str], typer.Option("--name", metavar="REPOSITORY[:TAG]", help=LOAD_NAME_HELP)] = None,
        public_projects: PublicProjectsOpt = False,
        jobs_n: JobsOpt = 4,
        retries: RetriesOpt = 5,
        timeout: TimeoutOpt = 60.0,
        as_json: JsonOpt = False,
        failed_list: FailedListOpt = None,
    ) -> None:
        """Push every image of an archive to TARGET under its mapped name, digests preserved (docker archives:
        manifests rebuilt, new digests)."""
        target = RegistryURL.parse(to, what="--to")
        opts = cli.copy_options(platform, jobs_n, retries=retries, timeout=timeout)
        tls = target_tls(ca_file, insecure_skip_verify)
        if release:
            ropts = ReleaseOptions.from_cli(product, arch, None, release_url, channel_url, lists_dir, offline)
            with release_http_client() as client:
                dockerarchive.verify_release_file(file, release, ropts.source(), ropts.arches if arch else (),
                                                  None if offline else client, log=stderr_log)
        with dockerarchive.open_archive(file, name=name, tmp_dir=tmp_dir, log=stderr_log) as reader:
            if reader.delta:
                stderr_log(f"{reader.label} is a delta against {reader.delta.since}: checking that the target "
                           f"holds the {len(reader.delta.omitted)} blobs it leaves out")
            progress = CliProgress("load")
            try:
                report = dockerarchive.load(reader, target, target_tls=tls, options=opts,
                                            public_projects=public_projects, progress=progress, log=stderr_log)
            finally:
                progress.close()
        cli.finish(report, as_json=as_json, failed_list=failed_list, verb="loaded")

    @app.command("inspect")
    @run_command
    def inspect_command(
        file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="An archive (or its first part).")],
        check: Annotated[bool, typer.Option("--check", help="Hash every blob again (reads the whole archive).")] = False,
        name: Annotated[Optional[str], typer.Option("--name", metavar="REPOSITORY[:TAG]", help=LOAD_NAME_HELP)] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """List an archive's images, platforms and sizes; say whether it is a delta (and against what)."""
        with dockerarchive.open_archive(file, name=name, log=stderr_log) as reader:
            def on_blob(digest: str, error: str | None) -> None:
                if error:
                    typer.echo(f"rke2-mirror: {digest}: {error}", err=True)
            doc = dockerarchive.inspect(reader, check=check, on_blob=on_blob)
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


__all__ = ["register", "resolve_since"]
