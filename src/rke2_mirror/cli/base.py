"""The command line's base: the typer app every command module adds its commands to, and what the
commands share: error handling (`run_command`), progress rendering (`CliProgress`), the end of a copy
(`finish`), `copy_options`, and reading the image set (`gather_images`, `load_releases`, ...).

Command modules import this one; it imports no command module (`cli.app` imports them all).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import httpx
import typer

from rke2_mirror.cli.options import CopyTuning, ImageLists, ReleaseOptions, ReportOutput, parse_platforms
from rke2_mirror.cli.signals import Reported, interrupts
from rke2_mirror.cli.usage import Group
from rke2_mirror.cli.util import error_line, stderr_log
from rke2_mirror.engine.cancel import Cancel
from rke2_mirror.engine.copy import CopyOptions, ImageResult, Progress, Report
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.files import write_atomic
from rke2_mirror.jobs.common import IMAGE_LIST_MAX_BYTES, image_list_text, read_image_list
from rke2_mirror.model.errors import InputError, MirrorError
from rke2_mirror.model.reference import ImageRef, merge_refs, parse_image_lines
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.model.units import human as human_bytes
from rke2_mirror.releases import Log, ReleaseImages, ReleaseSource, release_images

F = TypeVar("F", bound=Callable[..., object])

app = typer.Typer(
    cls=Group,  # one-line usage errors, whole command summaries (cli/usage.py)
    name="rke2-mirror",
    help="Prepare offline (air-gapped) container registries for RKE2: copy a release's images into Harbor "
         "or any registry, write the matching registries.yaml, and verify it.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from rke2_mirror import __version__

        typer.echo(f"rke2-mirror {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    """rke2-mirror: copy RKE2 release images into a private registry and configure nodes for it."""


def err(msg: str) -> None:
    typer.echo(msg, err=True)


# --------------------------------------------------------------------------- errors and signals


def run_command(fn: F) -> F:
    """Decorate a typer command: SIGINT/SIGTERM are handled while it runs (`signals.interrupts`), and a
    `MirrorError` becomes ``rke2-mirror: error: <msg>`` on stderr and exit status ``exc.exit_code``, with
    no traceback.  The signature is kept (functools.wraps), so typer still sees the options."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            with interrupts():
                return fn(*args, **kwargs)
        except MirrorError as exc:
            typer.echo(error_line(str(exc)), err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- progress and the end of a copy


class CliProgress(Progress):
    """tqdm bars on a terminal; one plain line per image otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
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


def copy_options(tuning: CopyTuning, cancel: Cancel | None, *, platform: Sequence[str] = (),
                 referrers: ReferrerFilter | None = None, dry_run: bool = False) -> CopyOptions:
    """The engine's options from a command's copy tuning, --platform, ...; `cancel` is the run's token
    (`signals.interrupts`): a signal stops the engine through it."""
    return CopyOptions(platforms=parse_platforms(platform), referrers=referrers, jobs=tuning.jobs,
                       blob_jobs=max(4, tuning.jobs * 2), dry_run=dry_run,
                       retry=RetryPolicy(attempts=tuning.retries, timeout=tuning.timeout), cancel=cancel)


def summary_line(report: Report, verb: str = "copied") -> str:
    j = report.to_json()["summary"]
    done = j.get("would_copy", 0) if "would_copy" in j or verb == "would copy" else j["copied"]
    extra = ""
    if j.get("deferred"):
        extra += f", {j['deferred']} deferred ({j['stopped']})"
    if report.interrupted:
        extra += f", {j.get('interrupted', 0)} interrupted ({report.interrupted})"
    if j.get("referrers", {}).get("copied"):
        extra += f"; {j['referrers']['copied']} signatures/attestations/SBOMs {verb}"
    return (f"{_what(j)}: {done} {verb}, {j['skipped']} already present, {j['failed']} failed{extra}; "
            f"{human_bytes(j['bytes'])} in {j['seconds']:.1f}s")


def _what(summary: dict) -> str:
    """'150 images', or with charts and install files among them '152 items (150 images, 1 chart, 1 set of
    install files)'."""
    kinds = summary.get("kinds") or {}
    charts, files = (kinds.get(k, {}).get("total", 0) for k in ("chart", "files"))
    if not charts and not files:
        return f"{summary['total']} images"
    parts = [f"{kinds.get('image', {}).get('total', 0)} images"]
    if charts:
        parts.append(f"{charts} chart{'s' if charts != 1 else ''}")
    if files:
        parts.append(f"{files} set{'s' if files != 1 else ''} of install files")
    return f"{summary['total']} items ({', '.join(parts)})"


def write_failed_list(path: Path, failed: Sequence[ImageResult]) -> None:
    """The references not in place, in a form `--images` reads back; mode 0644 whatever the umask."""
    body = "# images that failed; retry with --images " + str(path) + "\n" + "".join(f"{r.source}\n" for r in failed)
    write_atomic(path, body, 0o644)


def finish(report: Report, output: ReportOutput, cancel: Cancel | None = None, *, verb: str = "copied") -> None:
    """The end of a copying command: the --failed-list file, the --json report, the summary line; then exit
    0, 1 when some image is not in place, or, when the run was interrupted, the signal's status (130
    SIGINT, 143 SIGTERM) through `signals.Reported` (main() ends the process)."""
    if output.failed_list is not None:
        write_failed_list(output.failed_list, report.failed)
    if output.as_json:
        typer.echo(report.dumps())
    err(summary_line(report, verb))
    if report.interrupted or (cancel is not None and cancel.is_set()):
        raise Reported(_signum(report, cancel))
    if report.failed:
        raise typer.Exit(1)


def _signum(report: Report, cancel: Cancel | None) -> int:
    if cancel is not None and cancel.signum is not None:
        return cancel.signum
    try:
        return signal.Signals[str(report.interrupted)]
    except KeyError:
        return signal.SIGINT


# --------------------------------------------------------------------------- the image set


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"rke2-mirror/{version('rke2-mirror')}"
    except Exception:  # pragma: no cover - not installed
        return "rke2-mirror"


def release_http_client() -> httpx.Client:
    """The client for release assets and channels (not for registries). It follows redirects, and
    honours proxy and CA-bundle environment variables."""
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=15.0), follow_redirects=True,
                        headers={"User-Agent": _user_agent()})


@contextmanager
def client_for(source: ReleaseSource, client: httpx.Client | None) -> Iterator[httpx.Client | None]:
    """`client`, else a fresh release client for the block (none offline)."""
    if client is not None or source.offline:
        yield client
        return
    with release_http_client() as own:
        yield own


def read_image_file(path: Path) -> list[ImageRef]:
    """An `--images` file (at most 4 MiB). An error names file:line. '-' is stdin."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(IMAGE_LIST_MAX_BYTES + 1)
        return parse_image_lines(image_list_text(data, "<stdin>"), origin="<stdin>")
    return read_image_list(path)


def load_releases(releases: Sequence[str], options: ReleaseOptions, client: httpx.Client | None = None,
                  log: Log = stderr_log) -> list[ReleaseImages]:
    """Each release's verified images and resolved version. Use this when the versions matter too,
    e.g. for `registries-yaml --release`."""
    if not releases:
        return []  # no release client (building one loads a CA bundle and httpcore: ~50 ms of start-up)
    source = options.source()
    with client_for(source, client) as c:
        return [release_images(r, source, c, options.arches, options.flavors, log) for r in releases]


def collect_images(images_files: Sequence[Path], releases: Sequence[str], options: ReleaseOptions,
                   client: httpx.Client | None = None, log: Log = stderr_log,
                   digests: dict[ImageRef, str] | None = None,
                   versions: dict[str, str] | None = None) -> list[ImageRef]:
    """Every image of the `--images` files, then of the `--release`s, with duplicates removed in stable order.
    An InputError (exit 2) if neither is given, or on a bad file, release or list.  `digests`, when given,
    gets the digests the releases publish for their images (rancher), for the copy to check; `versions` each
    --release as resolved (a channel looked up once: install files use the same version)."""
    if not images_files and not releases:
        raise InputError("no images given: use --images FILE and/or --release RELEASE")
    lists = [read_image_file(Path(p)) for p in images_files]
    for release, r in zip(releases, load_releases(releases, options, client, log)):
        if versions is not None:
            versions[release] = r.version
        lists.append(list(r.images))
        if digests is not None:
            digests.update(r.digests)
    return merge_refs(*lists)


def gather_images(images: ImageLists, lists: ReleaseOptions | None = None,
                  digests: dict[ImageRef, str] | None = None,
                  versions: dict[str, str] | None = None) -> list[ImageRef]:
    """--images files merged with --release lists (verified against their checksum files); never empty.
    `digests` and `versions`: see `collect_images`."""
    refs = collect_images(images.files, images.releases, lists or ReleaseOptions(), log=stderr_log,
                          digests=digests, versions=versions)
    if not refs:
        raise InputError("no images: the lists given are empty")
    return refs
