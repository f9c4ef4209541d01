"""typer commands for release image lists: `list` and `diff`.

The release-source options (--product, --arch, ...) are the option group `options.RELEASE_LISTS`;
reading the lists is `base.load_releases`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from rke2_mirror.cli.base import app, client_for, load_releases, read_image_file, run_command
from rke2_mirror.cli.options import RELEASE_LISTS, SOURCE, CheckJobsOpt, ReleaseOptions, options
from rke2_mirror.cli.util import stderr_log
from rke2_mirror.jobs.common import SourceOptions, check_sources
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.releases import ImageDiff, Log, ReleaseImages, diff_refs, get_product, release_images

__all__ = ["diff_command", "diff_document", "flavors_lines", "list_command", "list_document", "render_diff"]

ReleaseArg = Annotated[str, typer.Argument(
    metavar="RELEASE", help="A version (v1.28.9+rke2r1) or a channel (stable, latest, v1.28).")]
SideArg = "A release (version or channel), or an image list file."


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


@app.command("list")
@run_command
@options(lists=RELEASE_LISTS, source=SOURCE)
def list_command(
    *,
    release: ReleaseArg,
    lists: ReleaseOptions,
    check: Annotated[bool, typer.Option("--check", help="Ask the source registries for every image (manifest HEADs "
                                        "only: no pulls counted against rate limits); exit 1 if any is missing.")] = False,
    source: SourceOptions,
    jobs: CheckJobsOpt = 8,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document: the resolved version, "
                                              "product, arches, flavors, the lists read (with their sha256) and "
                                              "the images (with --check, what the source said of each).")] = False,
) -> None:
    """Print a release's images, one reference per line.

    Every list is verified against the release's sha256sum-<arch>.txt first."""
    (result,) = load_releases([release], lists, log=stderr_log)
    for line in flavors_lines(result):
        typer.echo(line, err=True)
    doc = list_document(result, lists) if json_output else None
    if not check:
        if doc is not None:
            typer.echo(json.dumps(doc, indent=2))
            return
        for ref in result.images:
            typer.echo(str(ref))
        return
    checks = check_sources(result.images, source, jobs=jobs)
    missing = [c for c in checks if c.digest is None]
    # a digest the release publishes (rancher) that the source's tag does not name: as bad as missing
    differs = {c.ref: result.digests[c.ref] for c in checks
               if c.digest not in (None, "?") and result.digests.get(c.ref) not in (None, c.digest)}
    if doc is not None:
        doc["check"] = {"present": len(checks) - len(missing), "missing": len(missing),
                        "images": [{"image": str(c.ref), "digest": c.digest, "error": c.error,
                                    **({"published_digest": differs[c.ref]} if c.ref in differs else {}),
                                    **({"referrers": c.referrers} if c.referrers else {})} for c in checks]}
        if result.digests:
            doc["check"]["digest_mismatch"] = len(differs)
        typer.echo(json.dumps(doc, indent=2))
    else:
        for c in checks:
            signed = ", ".join(f"{n} {k}" for k, n in sorted((c.referrers or {}).items()))
            state = "MISSING" if not c.digest else "DIGEST" if c.ref in differs else "ok"
            typer.echo(f"{state:8} {c.ref}" + (f"  ({c.error})" if c.error else "")
                       + (f"  (the source has {c.digest}, the release publishes {differs[c.ref]})"
                          if c.ref in differs else "") + (f"  [{signed}]" if signed else ""))
    typer.echo(f"{result.version}: {len(checks) - len(missing)} of {len(checks)} images present at the source"
               + (f", {len(missing)} missing" if missing else "")
               + (f", {len(differs)} with another digest than the release publishes" if differs else ""), err=True)
    if missing or differs:
        raise typer.Exit(1)


def flavors_lines(result: ReleaseImages) -> list[str]:
    """`FLAVORS published by VERSION (ARCH): core, canal, ...`, read from the checksum file; one line per
    set of flavors (arches publishing the same ones share it)."""
    by_set: dict[tuple[str, ...], list[str]] = {}
    for arch, flavors in result.published:
        by_set.setdefault(flavors, []).append(arch)
    return [f"FLAVORS published by {result.version} ({', '.join(arches)}): {', '.join(flavors) or '(none)'}"
            for flavors, arches in by_set.items()]


def list_document(result: ReleaseImages, options: ReleaseOptions) -> dict[str, Any]:
    """`list --json`: what was asked, what it resolved to, which verified lists were read, the images."""
    return {
        "product": result.product,
        "release": result.release,
        "version": result.version,
        "arches": list(options.arches),
        "flavors": list(options.flavors),
        "flavors_published": {arch: list(flavors) for arch, flavors in result.published},
        "lists": [{"name": f.name, "arch": f.arch, "flavor": f.flavor, "sha256": f.sha256, "images": f.count,
                   "verified_against": get_product(result.product).checksum_asset(f.arch), "origin": f.origin}
                  for f in result.files],
        "images": [str(r) for r in result.images],
        # rancher: the top-level digest the release publishes per image (checked when copied)
        **({"digest_files": list(result.digest_files),
            "digests": {str(r): d for r, d in result.digests.items()}} if result.digest_files else {}),
    }


@app.command("diff")
@run_command
@options(lists=RELEASE_LISTS)
def diff_command(
    *,
    old: Annotated[str, typer.Argument(metavar="OLD", help=SideArg)],
    new: Annotated[str, typer.Argument(metavar="NEW", help=SideArg)],
    lists: ReleaseOptions,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")] = False,
) -> None:
    """Show the images added, removed and changed from OLD to NEW.

    Changed: the same repository with a new tag. An argument naming an existing file is read as an
    image list; otherwise it is a release."""
    with client_for(lists.source(), None) as client:
        old_side = _load_side(old, lists, client, stderr_log)
        new_side = _load_side(new, lists, client, stderr_log)
    diff = diff_refs(old_side.images, new_side.images)
    if json_output:
        typer.echo(json.dumps(diff_document(diff, old_side, new_side, lists), indent=2))
    else:
        typer.echo(render_diff(diff, old_side.label, new_side.label, lists.product))
