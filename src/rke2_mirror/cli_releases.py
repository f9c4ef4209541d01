"""typer pieces for release image lists: the shared release-source options, `collect_images` for
mirror/save/verify/sync, and the `list` and `diff` commands (`register(app)` adds them).

Wiring in another command:

    @app.command()
    @run_command
    def mirror(images: ImagesOpt = None, release: ReleaseOpt = None, product: ProductOpt = ProductChoice.rke2,
               arch: ArchOpt = None, flavor: FlavorOpt = None, release_url: ReleaseUrlOpt = None,
               channel_url: ChannelUrlOpt = None, lists_dir: ListsDirOpt = None, offline: OfflineOpt = False, ...):
        opts = ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url, lists_dir, offline)
        refs = collect_images(images or [], release or [], opts, log=stderr_log)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer

from .cli_options import JobsOpt, SourceEndpointOpt, SrcCaFileOpt, SrcInsecureOpt
from .cli_util import run_command, stderr_log
from .errors import InputError
from .reference import ImageRef, merge_refs, parse_image_lines
from .releases import (
    DEFAULT_ARCHES,
    DEFAULT_FLAVORS,
    ENV_CHANNEL_URL,
    ENV_RELEASE_URL,
    ImageDiff,
    Log,
    ReleaseImages,
    ReleaseSource,
    check_arches,
    check_flavors,
    diff_refs,
    release_images,
)

__all__ = [
    "ArchOpt",
    "ChannelUrlOpt",
    "FlavorOpt",
    "ImagesOpt",
    "ListsDirOpt",
    "OfflineOpt",
    "ProductChoice",
    "ProductOpt",
    "ReleaseOpt",
    "ReleaseOptions",
    "ReleaseUrlOpt",
    "collect_images",
    "load_releases",
    "read_image_file",
    "register",
    "release_http_client",
]

PANEL = "Release image lists"


class ProductChoice(StrEnum):
    rke2 = "rke2"
    k3s = "k3s"


# --------------------------------------------------------------------------- reusable options

ReleaseOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--release",
        "-r",
        metavar="RELEASE",
        help="Use this release's image lists: a version (v1.28.9+rke2r1) or a channel (stable, latest, v1.28). "
        "Repeatable; merged with --images.",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
ImagesOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--images",
        "-i",
        metavar="FILE",
        help="An image list file: one reference per line, '#' comments. Repeatable; '-' reads stdin.",
        show_default=False,
    ),
]
ProductOpt = Annotated[
    ProductChoice,
    typer.Option("--product", help="Whose releases: rke2 or k3s.", rich_help_panel=PANEL),
]
ArchOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--arch",
        metavar="ARCH",
        help="amd64 (default), arm64, s390x. Repeatable; the lists are merged.",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
FlavorOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--flavor",
        metavar="FLAVOR",
        help="all (default); default (= core + canal); core, canal, calico, cilium, flannel, multus, harvester, "
        "traefik, vsphere, ingress-nginx; windows. Repeatable; the lists are merged.",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
ReleaseUrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--release-url",
        metavar="URL",
        help=f"Where release assets are downloaded from (<URL>/<version>/<asset>). Env {ENV_RELEASE_URL}; "
        "default https://github.com/rancher/rke2/releases/download (k3s: k3s-io/k3s).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
ChannelUrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--channel-url",
        metavar="URL",
        help=f"Channel server used to resolve stable, latest, v1.28 and so on. Env {ENV_CHANNEL_URL}; "
        "default https://update.rke2.io/v1-release/channels (k3s: update.k3s.io).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
ListsDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--lists-dir",
        metavar="DIR",
        help="Cache of verified lists, <DIR>/<product>/<version>/. "
        "Default $XDG_CACHE_HOME/rke2-mirror/lists (~/.cache/rke2-mirror/lists).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Read only the lists cache, verifying each list against its cached checksum file again. "
        "No network. A channel needs a version instead.",
        rich_help_panel=PANEL,
    ),
]


@dataclass(frozen=True)
class ReleaseOptions:
    """The release-source options of one command, parsed."""

    product: str = "rke2"
    arches: tuple[str, ...] = DEFAULT_ARCHES
    flavors: tuple[str, ...] = DEFAULT_FLAVORS
    release_url: str | None = None
    channel_url: str | None = None
    lists_dir: Path | None = None
    offline: bool = False

    @classmethod
    def from_cli(
        cls,
        product: str | ProductChoice = "rke2",
        arch: Sequence[str] | None = None,
        flavor: Sequence[str] | None = None,
        release_url: str | None = None,
        channel_url: str | None = None,
        lists_dir: Path | None = None,
        offline: bool = False,
    ) -> "ReleaseOptions":
        return cls(
            product=str(product),
            arches=check_arches(arch or ()),
            flavors=check_flavors(flavor or ()),
            release_url=release_url,
            channel_url=channel_url,
            lists_dir=lists_dir,
            offline=offline,
        )

    def source(self) -> ReleaseSource:
        return ReleaseSource.default(
            self.product, self.release_url, self.channel_url, self.lists_dir, self.offline
        )


# --------------------------------------------------------------------------- helpers for any command


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"rke2-mirror/{version('rke2-mirror')}"
    except Exception:  # pragma: no cover - not installed
        return "rke2-mirror"


def release_http_client() -> httpx.Client:
    """The client for release assets and channels (not for registries). It follows redirects, and
    honours proxy and CA-bundle environment variables."""
    return httpx.Client(
        timeout=httpx.Timeout(30.0, connect=15.0),
        follow_redirects=True,
        headers={"User-Agent": _user_agent()},
    )


@contextmanager
def _client_for(source: ReleaseSource, client: httpx.Client | None) -> Iterator[httpx.Client | None]:
    if client is not None or source.offline:
        yield client
        return
    with release_http_client() as own:
        yield own


def read_image_file(path: Path) -> list[ImageRef]:
    """An `--images` file. An error names file:line. '-' is stdin."""
    if str(path) == "-":
        return parse_image_lines(sys.stdin.read(), origin="<stdin>")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"image list {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"image list {path}: is a directory") from None
    except UnicodeDecodeError:
        raise InputError(f"image list {path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"image list {path}: {exc.strerror or exc}") from None
    return parse_image_lines(text, origin=str(path))


def load_releases(
    releases: Sequence[str],
    options: ReleaseOptions,
    client: httpx.Client | None = None,
    log: Log = stderr_log,
) -> list[ReleaseImages]:
    """Each release's verified images and resolved version. Use this when the versions matter too,
    e.g. for `registries-yaml --release`."""
    source = options.source()
    with _client_for(source, client) as c:
        return [release_images(r, source, c, options.arches, options.flavors, log) for r in releases]


def collect_images(
    images_files: Sequence[Path],
    releases: Sequence[str],
    options: ReleaseOptions,
    client: httpx.Client | None = None,
    log: Log = stderr_log,
) -> list[ImageRef]:
    """Every image of the `--images` files, then of the `--release`s, with duplicates removed in stable order.
    An InputError (exit 2) if neither is given, or on a bad file, release or list."""
    if not images_files and not releases:
        raise InputError("no images given: use --images FILE and/or --release RELEASE")
    lists = [read_image_file(Path(p)) for p in images_files]
    lists += [list(r.images) for r in load_releases(releases, options, client, log)]
    return merge_refs(*lists)


# --------------------------------------------------------------------------- diff rendering


@dataclass(frozen=True)
class _Side:
    label: str
    info: dict[str, Any] = field(hash=False)
    images: tuple[ImageRef, ...] = ()


def _load_side(arg: str, options: ReleaseOptions, client: httpx.Client | None, log: Log) -> _Side:
    path = Path(arg)
    if path.is_file():
        return _Side(str(path), {"file": str(path)}, tuple(read_image_file(path)))
    source = options.source()
    r = release_images(arg, source, client, options.arches, options.flavors, log)
    info = {"release": arg, "version": r.version, "lists": [f.name for f in r.files]}
    return _Side(r.version, info, r.images)


def _ref_version(ref: ImageRef) -> str:
    out = ref.tag or ""
    if ref.digest:
        out += f"@{ref.digest}"
    return out


def render_diff(diff: ImageDiff, old: str, new: str, product: str) -> str:
    head = (
        f"{product} {old} -> {new}: {len(diff.added)} added, {len(diff.removed)} removed, "
        f"{len(diff.changed)} changed, {len(diff.unchanged)} unchanged"
    )
    lines = [head]
    if diff.added:
        lines += ["added:"] + [f"  + {r}" for r in diff.added]
    if diff.removed:
        lines += ["removed:"] + [f"  - {r}" for r in diff.removed]
    if diff.changed:
        lines += ["changed:"] + [f"  ~ {c.name}: {_ref_version(c.old)} -> {_ref_version(c.new)}" for c in diff.changed]
    return "\n".join(lines)


def diff_document(diff: ImageDiff, old: _Side, new: _Side, options: ReleaseOptions) -> dict[str, Any]:
    return {
        "product": options.product,
        "arches": list(options.arches),
        "flavors": list(options.flavors),
        "old": old.info,
        "new": new.info,
        "summary": {
            "added": len(diff.added),
            "removed": len(diff.removed),
            "changed": len(diff.changed),
            "unchanged": len(diff.unchanged),
        },
        **diff.as_dict(),
    }


# --------------------------------------------------------------------------- commands


@run_command
def list_command(
    release: Annotated[
        str,
        typer.Argument(metavar="RELEASE", help="A version (v1.28.9+rke2r1) or a channel (stable, latest, v1.28)."),
    ],
    product: ProductOpt = ProductChoice.rke2,
    arch: ArchOpt = None,
    flavor: FlavorOpt = None,
    release_url: ReleaseUrlOpt = None,
    channel_url: ChannelUrlOpt = None,
    lists_dir: ListsDirOpt = None,
    offline: OfflineOpt = False,
    check: Annotated[bool, typer.Option("--check", help="Ask the source registries for every image (manifest HEADs "
                                        "only: no pulls counted against rate limits); exit 1 if any is missing.")] = False,
    source_endpoint: SourceEndpointOpt = [],
    src_ca_file: SrcCaFileOpt = None,
    src_insecure_skip_verify: SrcInsecureOpt = False,
    jobs_n: JobsOpt = 8,
) -> None:
    """Print a release's images, one reference per line, verified against its sha256sum-<arch>.txt."""
    options = ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url, lists_dir, offline)
    (result,) = load_releases([release], options, log=stderr_log)
    if not check:
        for ref in result.images:
            typer.echo(str(ref))
        return
    from .cli_options import source_options
    from .jobs import check_sources

    checks = check_sources(result.images, source_options(src_ca_file, src_insecure_skip_verify, source_endpoint),
                           jobs=jobs_n)
    missing = [c for c in checks if c.digest is None]
    for c in checks:
        typer.echo(f"{'ok' if c.digest else 'MISSING':8} {c.ref}" + (f"  ({c.error})" if c.error else ""))
    typer.echo(f"{result.version}: {len(checks) - len(missing)} of {len(checks)} images present at the source"
               + (f", {len(missing)} missing" if missing else ""), err=True)
    if missing:
        raise typer.Exit(1)


@run_command
def diff_command(
    old: Annotated[str, typer.Argument(metavar="OLD", help="A release (version or channel), or an image list file.")],
    new: Annotated[str, typer.Argument(metavar="NEW", help="A release (version or channel), or an image list file.")],
    product: ProductOpt = ProductChoice.rke2,
    arch: ArchOpt = None,
    flavor: FlavorOpt = None,
    release_url: ReleaseUrlOpt = None,
    channel_url: ChannelUrlOpt = None,
    lists_dir: ListsDirOpt = None,
    offline: OfflineOpt = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")] = False,
) -> None:
    """Images added, removed and changed (same repository, new tag) from OLD to NEW.

    An argument naming an existing file is read as an image list; otherwise it is a release."""
    options = ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url, lists_dir, offline)
    with _client_for(options.source(), None) as client:
        old_side = _load_side(old, options, client, stderr_log)
        new_side = _load_side(new, options, client, stderr_log)
    diff = diff_refs(old_side.images, new_side.images)
    if json_output:
        typer.echo(json.dumps(diff_document(diff, old_side, new_side, options), indent=2))
    else:
        typer.echo(render_diff(diff, old_side.label, new_side.label, options.product))


def register(app: typer.Typer) -> None:
    """Add the `list` and `diff` commands to `app`."""
    app.command("list")(list_command)
    app.command("diff")(diff_command)
