"""Options the commands share: typer `Annotated` aliases, the option groups several commands take
whole, and `@options`, which gives a command a group.

An option group is a function: its parameters (typer `Annotated` aliases, with defaults) are the
options, its return value is the one object a command receives for them.  A command names the
groups it takes and, for each, the parameter the built object arrives in:

    @app.command()
    @run_command
    @options(images=IMAGE_LISTS, lists=RELEASE_LISTS, source=SOURCE, tuning=COPY_TUNING)
    def save(output: OutputOpt, images: ImageLists, lists: ReleaseOptions, source: SourceOptions,
             tuning: CopyTuning) -> None: ...

typer sees the group's options where the group's parameter stands (that is their place in --help);
the command sees `images`, `lists`, ... built.  `GROUP.without("name", ...)` leaves options out (the
builder's default is used for them).  A group's errors (InputError: a --ca-file that does not exist,
an unknown --arch) are raised when the command is called, inside `run_command`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Generic, Optional, TypeVar

import typer

from rke2_mirror.endpoints.routing import parse_source_endpoints
from rke2_mirror.jobs.common import SOURCE_TLS_FLAGS, SourceOptions, TLSOptions
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.oci import Platform
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.releases import (DEFAULT_ARCHES, DEFAULT_FLAVORS, ENV_CHANNEL_URL, ENV_RELEASE_URL, ReleaseSource,
                                  check_arches, check_flavors)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- the mechanism


@dataclass(frozen=True)
class OptionGroup(Generic[T]):
    """Options declared once: `build`'s parameters are the options, its result what a command gets."""

    build: Callable[..., T]
    skip: frozenset[str] = frozenset()
    helps: tuple[tuple[str, str], ...] = ()  # (parameter name, help text) replacing the option's own

    def without(self, *names: str) -> OptionGroup[T]:
        """The group minus these options (by parameter name); `build` gets its defaults for them."""
        self._check(names)
        return replace(self, skip=self.skip | frozenset(names))

    def with_help(self, **helps: str) -> OptionGroup[T]:
        """The group with another help text for these options (by parameter name): what an option does can
        differ in one command (`load --arch` picks a checksum file, where other commands merge lists)."""
        self._check(helps)
        return replace(self, helps=self.helps + tuple(helps.items()))

    def _check(self, names: Any) -> None:
        unknown = set(names) - set(inspect.signature(self.build).parameters)
        if unknown:
            raise TypeError(f"{self.build.__name__} has no option {', '.join(sorted(unknown))}")

    def parameters(self) -> list[inspect.Parameter]:
        """The options as typer reads them: keyword-only, their annotations evaluated."""
        sig = inspect.signature(self.build, eval_str=True)
        helps = dict(self.helps)
        return [_with_help(p.replace(kind=inspect.Parameter.KEYWORD_ONLY), helps.get(p.name))
                for p in sig.parameters.values() if p.name not in self.skip]


def _with_help(param: inspect.Parameter, text: str | None) -> inspect.Parameter:
    """`param` with its typer option's help replaced by `text` (a copy: the shared alias is untouched)."""
    if text is None:
        return param
    import copy
    import typing

    base, *meta = typing.get_args(param.annotation)
    meta = [copy.copy(m) for m in meta]
    for m in meta:
        if hasattr(m, "help"):
            m.help = text
    return param.replace(annotation=Annotated[(base, *meta)])


def options(**groups: OptionGroup[Any]) -> Callable[[F], F]:
    """Give the decorated command these option groups: `name=GROUP` puts GROUP's options in the place of
    the command's parameter `name` (for typer: an explicit `__signature__` with real annotation objects)
    and, when the command is called, passes `GROUP.build(**their values)` as `name`."""

    def decorate(fn: F) -> F:
        own = inspect.signature(fn)
        missing = set(groups) - set(own.parameters)
        if missing:
            raise TypeError(f"{fn.__name__} has no parameter {', '.join(sorted(missing))} for its option group")
        group_params = {name: group.parameters() for name, group in groups.items()}
        params: list[inspect.Parameter] = []
        for p in own.parameters.values():
            if p.name in groups:
                params += group_params[p.name]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                        annotation=_evaluated(p.annotation, fn)))
        names = [p.name for p in params]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise TypeError(f"{fn.__name__}: option group parameters clash: {', '.join(clashes)}")

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            for name, group in groups.items():
                given = {p.name: values.pop(p.name) for p in group_params[name] if p.name in values}
                values[name] = group.build(**given)
            return fn(**values)

        command.__signature__ = own.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return command  # type: ignore[return-value]

    return decorate


def _evaluated(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (`from __future__ import annotations`) as the object it names in fn's module."""
    if isinstance(annotation, str):
        return eval(annotation, fn.__globals__)  # noqa: S307 - the module's own annotation text
    return annotation


# --------------------------------------------------------------------------- single options

ToOpt = Annotated[str, typer.Option("--to", metavar="TARGET", show_default=False, help="Target registry: [https://|http://]HOST[:PORT][/PREFIX] (https by default).")]
CaFileOpt = Annotated[Optional[Path], typer.Option("--ca-file", metavar="PEM", show_default=False, help="CA certificate (PEM) the target's TLS certificate is checked against.")]
InsecureOpt = Annotated[bool, typer.Option("--insecure-skip-verify", help="Do not verify the target's TLS certificate (not recommended).")]
SrcCaFileOpt = Annotated[Optional[Path], typer.Option("--src-ca-file", metavar="PEM", show_default=False, help="CA certificate (PEM) for the source registries.")]
SrcInsecureOpt = Annotated[bool, typer.Option("--src-insecure-skip-verify", help="Do not verify the source registries' TLS certificates.")]
StrictAuthRealmOpt = Annotated[bool, typer.Option("--strict-auth-realm", help="Send a registry's credentials to its token service only on the registry's own host, and never over http for an https registry (default: allowed, with a warning naming both hosts).")]
SourceEndpointOpt = Annotated[list[str], typer.Option("--source-endpoint", metavar="REGISTRY=URL", show_default=False, help="REGISTRY=URL: pull REGISTRY's images from URL (a URL path is a repository prefix there), e.g. docker.io=http://127.0.0.1:5000 (repeatable).")]
PlatformOpt = Annotated[list[str], typer.Option("--platform", metavar="OS/ARCH", show_default=False, help="OS/ARCH[/VARIANT] to copy, e.g. linux/amd64 (repeatable; default: all platforms, digests preserved).")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, metavar="N", help="Images copied at once.")]
CheckJobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, metavar="N", help="Images checked at once (with --check).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout at the end.")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=1, max=3600, metavar="SECONDS",
    help="Seconds to wait for a registry's next bytes before the attempt counts as failed (and is retried); "
         "a transfer slower than 1 KiB/s over that time is abandoned too. "
         "Raise it for a registry that takes long to commit big layers.")]
RetriesOpt = Annotated[int, typer.Option("--retries", min=1, max=20, metavar="N", help="Attempts per operation on transient errors (connection errors, 408, 429, 5xx), with exponential backoff.")]
MaxRpsOpt = Annotated[Optional[float], typer.Option("--max-rps", min=0.1, metavar="N", show_default=False, help="At most this many requests per second to each registry, all workers together (Harbor and others throttle).")]
PullFloorOpt = Annotated[int, typer.Option("--pull-floor", min=0, metavar="N", help="Stop starting new images when a source's rate-limit headers (Docker Hub: ratelimit-remaining) say this many pulls are left; the rest is reported as deferred.")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Copy only part I (0-based) of N disjoint parts of the image set, chosen by a hash of each reference. Default from $JOB_COMPLETION_INDEX and $RKE2_MIRROR_SHARDS (a Kubernetes Indexed Job).")]
PublicProjectsOpt = Annotated[bool, typer.Option("--public-projects", help="Create missing Harbor projects as public (default: private).")]
FailedListOpt = Annotated[Optional[Path], typer.Option("--failed-list", metavar="PATH", show_default=False, help="Write the references that failed to this file (readable by --images).")]

# -- release image lists
PANEL = "Release image lists"


class ProductChoice(StrEnum):
    rke2 = "rke2"
    k3s = "k3s"
    rancher = "rancher"


ReleaseOpt = Annotated[Optional[list[str]], typer.Option(
    "--release", "-r", metavar="RELEASE",
    help="Use this release's image lists: a version (v1.28.9+rke2r1) or a channel (stable, latest, v1.28). "
         "Repeatable; merged with --images.",
    rich_help_panel=PANEL, show_default=False)]
ImagesOpt = Annotated[Optional[list[Path]], typer.Option(
    "--images", "-i", metavar="FILE",
    help="An image list file: one reference per line, '#' comments. Repeatable; '-' reads stdin.",
    show_default=False)]
ProductOpt = Annotated[ProductChoice, typer.Option("--product", metavar="rke2|k3s|rancher", help="Whose releases: rke2, k3s or rancher (versions like v2.12.3: rancher-images.txt, each copy checked against the digest the release publishes).", rich_help_panel=PANEL)]
ArchOpt = Annotated[Optional[list[str]], typer.Option(
    "--arch", metavar="ARCH", help="amd64 (default), arm64, s390x. Repeatable; the lists are merged.",
    rich_help_panel=PANEL, show_default=False)]
FlavorOpt = Annotated[Optional[list[str]], typer.Option(
    "--flavor", metavar="FLAVOR",
    help="all (default); default (= core + canal); core, canal, calico, cilium, flannel, multus, harvester, "
         "traefik, vsphere, ingress-nginx; windows. Repeatable; the lists are merged. "
         "rancher: all (rancher-images.txt) or windows (rancher-windows-images.txt).",
    rich_help_panel=PANEL, show_default=False)]
ReleaseUrlOpt = Annotated[Optional[str], typer.Option(
    "--release-url", metavar="URL",
    help=f"Where release assets are downloaded from (<URL>/<version>/<asset>). Env {ENV_RELEASE_URL}; "
         "default https://github.com/rancher/rke2/releases/download (k3s: k3s-io/k3s; rancher: rancher/rancher).",
    rich_help_panel=PANEL, show_default=False)]
ChannelUrlOpt = Annotated[Optional[str], typer.Option(
    "--channel-url", metavar="URL",
    help=f"Channel server used to resolve stable, latest, v1.28 and so on. Env {ENV_CHANNEL_URL}; "
         "default https://update.rke2.io/v1-release/channels (k3s: update.k3s.io; rancher: none, give versions).",
    rich_help_panel=PANEL, show_default=False)]
ListsDirOpt = Annotated[Optional[Path], typer.Option(
    "--lists-dir", metavar="DIR",
    help="Cache of verified lists, <DIR>/<product>/<version>/. "
         "Default $XDG_CACHE_HOME/rke2-mirror/lists (~/.cache/rke2-mirror/lists).",
    rich_help_panel=PANEL, show_default=False)]
OfflineOpt = Annotated[bool, typer.Option(
    "--offline",
    help="Read only the lists cache, verifying each list against its cached checksum file again. "
         "No network. A channel needs a version instead.",
    rich_help_panel=PANEL)]


# --------------------------------------------------------------------------- what the groups build


@dataclass(frozen=True)
class ReleaseOptions:
    """Where release image lists come from, and which: the release-source options, parsed."""

    product: str = "rke2"
    arches: tuple[str, ...] = DEFAULT_ARCHES
    flavors: tuple[str, ...] = DEFAULT_FLAVORS
    release_url: str | None = None
    channel_url: str | None = None
    lists_dir: Path | None = None
    offline: bool = False
    arch_given: bool = False  # --arch was given (else `arches` is the default)

    @classmethod
    def from_cli(cls, product: str | ProductChoice = "rke2", arch: Sequence[str] | None = None,
                 flavor: Sequence[str] | None = None, release_url: str | None = None, channel_url: str | None = None,
                 lists_dir: Path | None = None, offline: bool = False) -> ReleaseOptions:
        return cls(product=str(product), arches=check_arches(arch or ()), flavors=check_flavors(flavor or ()),
                   release_url=release_url, channel_url=channel_url, lists_dir=lists_dir, offline=offline,
                   arch_given=bool(arch))

    def source(self) -> ReleaseSource:
        return ReleaseSource.default(self.product, self.release_url, self.channel_url, self.lists_dir, self.offline)


@dataclass(frozen=True)
class ImageLists:
    """The image set asked for: `--images` files and `--release` names (merged by `gather_images`)."""

    files: tuple[Path, ...] = ()
    releases: tuple[str, ...] = ()


@dataclass(frozen=True)
class CopyTuning:
    """How hard a copy works: images at once, attempts per operation, the read timeout."""

    jobs: int = 4
    retries: int = 5
    timeout: float = 60.0


@dataclass(frozen=True)
class ReportOutput:
    """Where the report of a copy goes besides the summary line: `--json` on stdout, `--failed-list`."""

    as_json: bool = False
    failed_list: Path | None = None


def _tls(ca_file: Path | None, insecure: bool, flags: tuple[str, str]) -> TLSOptions:
    if ca_file is not None and not ca_file.is_file():
        raise InputError(f"{flags[0]} {ca_file}: no such file")
    return TLSOptions(str(ca_file) if ca_file else None, insecure, flags)


# --------------------------------------------------------------------------- the groups' builders


def target_tls(ca_file: CaFileOpt = None, insecure_skip_verify: InsecureOpt = False,
               strict_auth_realm: StrictAuthRealmOpt = False) -> TLSOptions:
    """--ca-file, --insecure-skip-verify, --strict-auth-realm: TLS to the target, where its credentials go."""
    return replace(_tls(ca_file, insecure_skip_verify, ("--ca-file", "--insecure-skip-verify")),
                   strict_auth_realm=strict_auth_realm)


def source_options(src_ca_file: SrcCaFileOpt = None, src_insecure_skip_verify: SrcInsecureOpt = False,
                   source_endpoint: SourceEndpointOpt = [],  # noqa: B006 - typer's default
                   strict_auth_realm: StrictAuthRealmOpt = False) -> SourceOptions:
    """--src-ca-file, --src-insecure-skip-verify, --source-endpoint, --strict-auth-realm: how the source
    registries are reached.  (A command that also takes TARGET_TLS takes this group without --strict-auth-realm
    and applies the target's to its sources: `with_strict_auth_realm`.)"""
    return SourceOptions(replace(_tls(src_ca_file, src_insecure_skip_verify, SOURCE_TLS_FLAGS),
                                 strict_auth_realm=strict_auth_realm),
                         parse_source_endpoints(source_endpoint or []))


def with_strict_auth_realm(source: SourceOptions, tls: TLSOptions) -> SourceOptions:
    """The sources with the target's --strict-auth-realm (one flag for every registry of a command)."""
    return replace(source, tls=replace(source.tls, strict_auth_realm=tls.strict_auth_realm))


def image_lists(images: ImagesOpt = None, release: ReleaseOpt = None) -> ImageLists:
    """--images, --release: which images."""
    return ImageLists(tuple(images or ()), tuple(release or ()))


def release_lists(product: ProductOpt = ProductChoice.rke2, arch: ArchOpt = None, flavor: FlavorOpt = None,
                  release_url: ReleaseUrlOpt = None, channel_url: ChannelUrlOpt = None, lists_dir: ListsDirOpt = None,
                  offline: OfflineOpt = False) -> ReleaseOptions:
    """--product, --arch, --flavor, --release-url, --channel-url, --lists-dir, --offline: a release's lists."""
    return ReleaseOptions.from_cli(product, arch, flavor, release_url, channel_url, lists_dir, offline)


ReferrersOpt = Annotated[bool, typer.Option(
    "--referrers/--no-referrers",
    help="Carry each image's signatures, attestations and SBOMs with it: OCI 1.1 referrers (API or tag schema) "
         "and cosign's sha256-<hex>.sig/.att/.sbom tags.")]
ReferrerTypeOpt = Annotated[Optional[list[str]], typer.Option(
    "--referrer-type", metavar="TYPE",
    help="Carry only these referrers: signature, attestation, sbom or an artifact media type "
         "(e.g. application/spdx+json). Repeatable.", show_default=False)]
SignaturesOpt = Annotated[bool, typer.Option("--signatures", help="Same as --referrer-type signature.")]


def referrer_options(referrers: ReferrersOpt = True, referrer_type: ReferrerTypeOpt = None,
                     signatures: SignaturesOpt = False) -> ReferrerFilter | None:
    """--referrers/--no-referrers, --referrer-type, --signatures: which referrers travel (None: none)."""
    types = list(referrer_type or ()) + (["signature"] if signatures else [])
    if not referrers:
        if types:
            raise InputError("--no-referrers does not go with --referrer-type or --signatures")
        return None
    return ReferrerFilter.parse(types)


def copy_tuning(jobs: JobsOpt = 4, retries: RetriesOpt = 5, timeout: TimeoutOpt = 60.0) -> CopyTuning:
    """--jobs, --retries, --timeout."""
    return CopyTuning(jobs, retries, timeout)


def report_output(as_json: JsonOpt = False, failed_list: FailedListOpt = None) -> ReportOutput:
    """--json, --failed-list."""
    return ReportOutput(as_json, failed_list)


TARGET_TLS = OptionGroup(target_tls)
SOURCE = OptionGroup(source_options)
IMAGE_LISTS = OptionGroup(image_lists)
RELEASE_LISTS = OptionGroup(release_lists)
# `load --release`: the release's checksum file, not its lists
RELEASE_CHECKSUMS = RELEASE_LISTS.without("flavor").with_help(
    arch="With --release: the architecture whose sha256sum-<arch>.txt FILE is checked against, amd64, arm64 "
         "or s390x (default: from the file name, e.g. linux-arm64, else amd64).")
COPY_TUNING = OptionGroup(copy_tuning)
REFERRERS = OptionGroup(referrer_options)
REPORT_OUTPUT = OptionGroup(report_output)


# --------------------------------------------------------------------------- parsing


def parse_platforms(values: Sequence[str]) -> tuple[Platform, ...]:
    try:
        return tuple(Platform.parse(v) for v in values)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """`I/N`, or from a Kubernetes Indexed Job's JOB_COMPLETION_INDEX with RKE2_MIRROR_SHARDS=N."""
    env = os.environ if env is None else env
    if text is None:
        if env.get("JOB_COMPLETION_INDEX") is not None and env.get("RKE2_MIRROR_SHARDS"):
            text = f"{env['JOB_COMPLETION_INDEX']}/{env['RKE2_MIRROR_SHARDS']}"
        else:
            return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise InputError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def apply_shard(refs: list, shard_text: str | None, log: Callable[[str], None] | None = None) -> list:
    from rke2_mirror.model.reference import shard

    parsed = parse_shard(shard_text)
    if parsed is None:
        return refs
    part = shard(refs, *parsed)
    if log:
        log(f"shard {parsed[0]}/{parsed[1]}: {len(part)} of {len(refs)} images")
    return part
