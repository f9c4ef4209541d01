"""The command line: parse options, call the core, render progress and errors.  Nothing else."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import jobs
from .copy import CopyOptions, ImageResult, Progress, Report
from .errors import InputError, MirrorError
from .oci import Platform
from .registry import RetryPolicy
from .units import human as human_bytes
from .reference import ImageRef, RegistryURL
from .cli_options import (CaFileOpt, FailedListOpt, PublicProjectsOpt, InsecureOpt, JobsOpt, JsonOpt, MaxRpsOpt, PlatformOpt,
                          PullFloorOpt, RetriesOpt, ShardOpt, TimeoutOpt, SourceEndpointOpt, SrcCaFileOpt, SrcInsecureOpt, ToOpt,
                          apply_shard, source_options, target_tls)
from .cli_util import error_line, run_command, stderr_log
from .cli_releases import (ArchOpt, ChannelUrlOpt, FlavorOpt, ImagesOpt, ListsDirOpt, OfflineOpt, ProductChoice,
                           ProductOpt, ReleaseOpt, ReleaseOptions, ReleaseUrlOpt, collect_images)

app = typer.Typer(
    name="rke2-mirror",
    help="Prepare offline (air-gapped) container registries for RKE2: copy a release's images into Harbor "
         "or any registry, write the matching registries.yaml, and verify it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def err(msg: str) -> None:
    typer.echo(msg, err=True)


def parse_platforms(values: list[str]) -> tuple[Platform, ...]:
    try:
        return tuple(Platform.parse(v) for v in values)
    except ValueError as exc:
        raise InputError(str(exc)) from None




class CliProgress(Progress):
    """tqdm bars on a terminal; one plain line per image otherwise."""

    def __init__(self, verb: str = "copy", enabled: bool = True):
        self.tty = enabled and sys.stderr.isatty()
        self.verb = verb
        self.images = None  # tqdm bars, on a terminal
        self.bytes = None

    def start(self, total_images: int) -> None:
        if self.tty:
            from tqdm import tqdm  # only a terminal shows bars: a script's run doesn't import it

            self.images = tqdm(total=total_images, unit="img", desc="images", position=0, file=sys.stderr)
            self.bytes = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="bytes", position=1,
                              file=sys.stderr, bar_format="{desc}: {n_fmt} {rate_fmt}")

    def image_done(self, r: ImageResult) -> None:
        line = self.describe(r)
        if self.images is not None:
            if r.status in ("failed", "missing") or r.note:
                self.images.write(line, file=sys.stderr)
            self.images.update(1)
        else:
            err(line)

    @staticmethod
    def describe(r: ImageResult) -> str:
        s = f"{r.status:8} {r.source}"
        if r.target != r.source:
            s += f" -> {r.target}"
        if r.bytes and r.status != "skipped":
            s += f" ({human_bytes(r.bytes)})"
        if r.error:
            s += f": {r.error}"
        if r.note:
            s += f" [{r.note}]"
        return s

    def bytes_copied(self, n: int) -> None:
        if self.bytes is not None:
            self.bytes.update(n)

    def close(self) -> None:
        for bar in (self.bytes, self.images):
            if bar is not None:
                bar.close()


def finish(report: Report, *, as_json: bool, failed_list: Path | None, verb: str = "copied") -> None:
    """Print the summary / JSON, write the failed list, exit 0 or 1."""
    if failed_list is not None:
        failed = [r.source for r in report.failed]
        body = "# images that failed; retry with --images " + str(failed_list) + "\n" + "".join(f"{s}\n" for s in failed)
        write_text_atomic(failed_list, body)
    if as_json:
        typer.echo(report.dumps())
    j = report.to_json()["summary"]
    extra = f", would copy {j['would_copy']}" if "would_copy" in j else ""
    if j.get("deferred"):
        extra += f", {j['deferred']} deferred ({j['stopped']})"
    err(f"{j['total']} images: {j['copied']} {verb}, {j['skipped']} already present, {j['failed']} failed{extra}; "
        f"{human_bytes(j['bytes'])} in {j['seconds']:.1f}s")
    if report.failed:
        raise typer.Exit(1)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def copy_options(platform: list[str], jobs_n: int, signatures: bool = False, dry_run: bool = False,
                 retries: int = 5, timeout: float = 60.0) -> CopyOptions:
    return CopyOptions(platforms=parse_platforms(platform), signatures=signatures, jobs=jobs_n,
                       blob_jobs=max(4, jobs_n * 2), dry_run=dry_run,
                       retry=RetryPolicy(attempts=retries, timeout=timeout))


def gather_images(images: list[Path] | None, releases: list[str] | None,
                  release_opts: ReleaseOptions | None = None) -> list[ImageRef]:
    """--images files merged with --release lists (verified against their checksum files)."""
    refs = collect_images(images or [], releases or [], release_opts or ReleaseOptions(), log=stderr_log)
    if not refs:
        raise InputError("no images: the lists given are empty")
    return refs


# -- commands ------------------------------------------------------------------------------------
@app.callback()
def _root() -> None:
    """rke2-mirror: copy RKE2 release images into a private registry and configure nodes for it."""


@app.command()
@run_command
def mirror(
    to: ToOpt,
    images: ImagesOpt = None,
    release: ReleaseOpt = None,
    product: ProductOpt = ProductChoice.rke2,
    arch: ArchOpt = None,
    flavor: FlavorOpt = None,
    release_url: ReleaseUrlOpt = None,
    channel_url: ChannelUrlOpt = None,
    lists_dir: ListsDirOpt = None,
    offline: OfflineOpt = False,
    ca_file: CaFileOpt = None,
    insecure_skip_verify: InsecureOpt = False,
    src_ca_file: SrcCaFileOpt = None,
    src_insecure_skip_verify: SrcInsecureOpt = False,
    source_endpoint: SourceEndpointOpt = [],
    platform: PlatformOpt = [],
    signatures: Annotated[bool, typer.Option("--signatures", help="Also copy cosign-style signature tags (sha256-<hex>.sig).")] = False,
    public_projects: PublicProjectsOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the source with manifest requests only; report what would be copied and what is missing.")] = False,
    jobs_n: JobsOpt = 4,
    retries: RetriesOpt = 5,
    timeout: TimeoutOpt = 60.0,
    max_rps: MaxRpsOpt = None,
    pull_floor: PullFloorOpt = 0,
    shard: ShardOpt = None,
    as_json: JsonOpt = False,
    failed_list: FailedListOpt = None,
) -> None:
    """Copy every image registry -> registry, digests preserved."""
    target = RegistryURL.parse(to, what="--to")
    refs = gather_images(images, release, ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url,
                                                                  lists_dir, offline))
    refs = apply_shard(refs, shard, stderr_log)
    opts = copy_options(platform, jobs_n, signatures, dry_run, retries, timeout)
    progress = CliProgress()
    try:
        report = jobs.mirror(
            refs, target, target_tls=target_tls(ca_file, insecure_skip_verify),
            source=source_options(src_ca_file, src_insecure_skip_verify, source_endpoint),
            options=opts, public_projects=public_projects, progress=progress, log=stderr_log,
            max_rps=max_rps, pull_floor=pull_floor)
    finally:
        progress.close()
    finish(report, as_json=as_json, failed_list=failed_list, verb="would copy" if dry_run else "copied")


def _register_optional() -> None:
    """Commands that live in their own modules."""
    import importlib

    for name in ("cli_releases", "cli_node", "cli_archive", "cli_sync"):  # noqa: B007
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        mod.register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err("rke2-mirror: interrupted")
        sys.exit(130)
    except MirrorError as exc:
        err(error_line(str(exc)))
        sys.exit(exc.exit_code)
