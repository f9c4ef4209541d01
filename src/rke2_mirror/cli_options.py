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
RetriesOpt = Annotated[int, typer.Option("--retries", min=1, max=20, help="Attempts per operation on transient errors (connection errors, 408, 429, 5xx), with exponential backoff.")]
FailedListOpt = Annotated[Optional[Path], typer.Option("--failed-list", help="Write the references that failed to this file (readable by --images).")]


def _tls(ca_file: Path | None, insecure: bool, flags: tuple[str, str]) -> TLSOptions:
    if ca_file is not None and not ca_file.is_file():
        raise InputError(f"{flags[0]} {ca_file}: no such file")
    return TLSOptions(str(ca_file) if ca_file else None, insecure, flags)


def target_tls(ca_file: Path | None, insecure: bool) -> TLSOptions:
    return _tls(ca_file, insecure, ("--ca-file", "--insecure-skip-verify"))


def source_options(ca_file: Path | None, insecure: bool, endpoints: list[str] | None) -> SourceOptions:
    return SourceOptions(_tls(ca_file, insecure, SOURCE_TLS_FLAGS), parse_source_endpoints(endpoints or []))
