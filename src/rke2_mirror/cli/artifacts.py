"""Charts and install files: the `--chart` / `--install-files` options of `save` and `mirror` (`extract` is in
archive.py, beside `inspect`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from rke2_mirror.cli.base import release_http_client
from rke2_mirror.cli.options import ImageLists, ReleaseOptions
from rke2_mirror.cli.util import LazyModule, stderr_log
from rke2_mirror.model.errors import InputError

artifacts_job = LazyModule("rke2_mirror.jobs.artifacts")
model_artifacts = LazyModule("rke2_mirror.model.artifacts")
lists_mod = LazyModule("rke2_mirror.releases.lists")
download_mod = LazyModule("rke2_mirror.releases.download")

ChartOpt = Annotated[list[str], typer.Option(
    "--chart", metavar="URL",
    help="A Helm chart to copy too, stored as Helm stores charts in OCI registries (charts/NAME:VERSION under "
         "the target): https://REPO/NAME@VERSION (a chart repository: index.yaml, digest checked) or "
         "oci://HOST/PATH/NAME:VERSION (repeatable).")]
ChartImagesOpt = Annotated[bool, typer.Option(
    "--chart-images/--no-chart-images",
    help="Also copy the images a --chart declares (Chart.yaml's artifacthub.io/images annotation), "
         "de-duplicated with the other images.")]
InstallFilesOpt = Annotated[bool, typer.Option(
    "--install-files",
    help="Also store the --release's install files (rke2.linux-<arch>.tar.gz, sha256sum-<arch>.txt, install.sh) "
         "for each --arch, checked against the release's checksums; `extract` writes them out.")]
InstallScriptOpt = Annotated[Optional[str], typer.Option(
    "--install-script", metavar="FILE|URL",
    help="Where install.sh comes from when the release does not publish it (default https://get.rke2.io).")]


@contextmanager
def prepared(charts: Sequence[str], install_files: bool, install_script: str | None, images: ImageLists,
             lists: ReleaseOptions, where: Path | None = None, *, chart_images: bool = True,
             versions: Mapping[str, str] | None = None) -> Iterator[object]:
    """The charts and install files asked for, fetched and verified into a temporary directory (beside
    `where` when given) that lives as long as the block; None when neither was asked for.  With
    `chart_images`, its `images` are the images the charts declare.  `versions`: the --releases as the image
    lists resolved them (a channel is not looked up twice)."""
    specs = [model_artifacts.parse_chart_spec(c) for c in charts]
    if install_script and not install_files:
        raise InputError("--install-script goes with --install-files")
    if not specs and not install_files:
        yield None
        return
    if install_files and (not images.releases or lists.product != "rke2"):
        raise InputError("--install-files needs --release VERSION (an RKE2 release: its install files)")
    source = lists.source()
    with tempfile.TemporaryDirectory(prefix=".rke2-mirror-files-", dir=where) as tmp, \
            (release_http_client() if not lists.offline or specs else _none()) as client:
        install = []
        if install_files:
            for release in images.releases:
                version = (versions or {}).get(release) or lists_mod.resolve_version(
                    release, source, None if lists.offline else client, stderr_log)
                for arch in lists.arches:
                    install.append(artifacts_job.InstallFiles(source, version, arch,
                                                              install_script or download_mod.DEFAULT_INSTALL_SCRIPT))
        yield artifacts_job.prepare(specs, install, client, Path(tmp), stderr_log, chart_images=chart_images)


@contextmanager
def _none() -> Iterator[None]:
    yield None


__all__ = ["ChartImagesOpt", "ChartOpt", "InstallFilesOpt", "InstallScriptOpt", "prepared"]
