"""Option declarations shared by the commands (typer Annotated aliases) and their parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import InputError
from .jobs import SOURCE_TLS_FLAGS, SourceOptions, TLSOptions
from .routing import parse_source_endpoints

ToOpt = Annotated[str, typer.Option("--to", help="Target registry: [https://|http://]HOST[:PORT][/PREFIX] (https by default).")]
CaFileOpt = Annotated[Optional[Path], typer.Option("--ca-file", help="CA certificate (PEM) the target's TLS certificate is checked against.")]
InsecureOpt = Annotated[bool, typer.Option("--insecure-skip-verify", help="Do not verify the target's TLS certificate (not recommended).")]
SrcCaFileOpt = Annotated[Optional[Path], typer.Option("--src-ca-file", help="CA certificate (PEM) for the source registries.")]
SrcInsecureOpt = Annotated[bool, typer.Option("--src-insecure-skip-verify", help="Do not verify the source registries' TLS certificates.")]
SourceEndpointOpt = Annotated[list[str], typer.Option("--source-endpoint", help="REGISTRY=URL: pull REGISTRY's images from URL (a URL path is a repository prefix there), e.g. docker.io=http://127.0.0.1:5000 (repeatable).")]
PlatformOpt = Annotated[list[str], typer.Option("--platform", help="OS/ARCH[/VARIANT] to copy, e.g. linux/amd64 (repeatable; default: all platforms, digests preserved).")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, help="Images copied at once.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout at the end.")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=1, max=3600, metavar="SECONDS",
    help="Seconds to wait for a registry's next bytes before the attempt counts as failed (and is retried); "
         "raise it for a registry that takes long to commit big layers.")]
RetriesOpt = Annotated[int, typer.Option("--retries", min=1, max=20, help="Attempts per operation on transient errors (connection errors, 408, 429, 5xx), with exponential backoff.")]
MaxRpsOpt = Annotated[Optional[float], typer.Option("--max-rps", min=0.1, help="At most this many requests per second to each registry, all workers together (Harbor and others throttle).")]
PullFloorOpt = Annotated[int, typer.Option("--pull-floor", min=0, help="Stop starting new images when a source's rate-limit headers (Docker Hub: ratelimit-remaining) say this many pulls are left; the rest is reported as deferred.")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Copy only part I (0-based) of N disjoint parts of the image set, chosen by a hash of each reference. Default from $JOB_COMPLETION_INDEX and $RKE2_MIRROR_SHARDS (a Kubernetes Indexed Job).")]
PublicProjectsOpt = Annotated[bool, typer.Option("--public-projects", help="Create missing Harbor projects as public (default: private).")]
FailedListOpt = Annotated[Optional[Path], typer.Option("--failed-list", help="Write the references that failed to this file (readable by --images).")]


def _tls(ca_file: Path | None, insecure: bool, flags: tuple[str, str]) -> TLSOptions:
    if ca_file is not None and not ca_file.is_file():
        raise InputError(f"{flags[0]} {ca_file}: no such file")
    return TLSOptions(str(ca_file) if ca_file else None, insecure, flags)


def target_tls(ca_file: Path | None, insecure: bool) -> TLSOptions:
    return _tls(ca_file, insecure, ("--ca-file", "--insecure-skip-verify"))


def source_options(ca_file: Path | None, insecure: bool, endpoints: list[str] | None) -> SourceOptions:
    return SourceOptions(_tls(ca_file, insecure, SOURCE_TLS_FLAGS), parse_source_endpoints(endpoints or []))


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """`I/N`, or from a Kubernetes Indexed Job's JOB_COMPLETION_INDEX with RKE2_MIRROR_SHARDS=N."""
    import os

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


def apply_shard(refs: list, shard_text: str | None, log=None) -> list:
    from .reference import shard

    parsed = parse_shard(shard_text)
    if parsed is None:
        return refs
    part = shard(refs, *parsed)
    if log:
        log(f"shard {parsed[0]}/{parsed[1]}: {len(part)} of {len(refs)} images")
    return part
