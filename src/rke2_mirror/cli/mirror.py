"""typer command `mirror`: every image registry -> registry, digests preserved."""

from __future__ import annotations

from typing import Annotated

import typer

import rke2_mirror.jobs.mirror as mirror_job
from rke2_mirror.cli.artifacts import ChartImagesOpt, ChartOpt, artifacts_job, prepared
from rke2_mirror.cli.base import CliProgress, app, copy_options, finish, gather_images, run_command
from rke2_mirror.cli.options import (COPY_TUNING, IMAGE_LISTS, REFERRERS, RELEASE_LISTS, REPORT_OUTPUT, SOURCE, TARGET_TLS, CopyTuning,
                                     ImageLists, MaxRpsOpt, PlatformOpt, PublicProjectsOpt, PullFloorOpt, ReleaseOptions,
                                     ReportOutput, ShardOpt, ToOpt, apply_shard, options, parse_shard,
                                     with_strict_auth_realm)
from rke2_mirror.cli.signals import interrupts
from rke2_mirror.cli.util import stderr_log
from rke2_mirror.jobs.common import SourceOptions, TLSOptions
from rke2_mirror.model.reference import RegistryURL
from rke2_mirror.model.referrers import ReferrerFilter

DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check the source with manifest requests only; report what would be copied and what is missing.")]


@app.command()
@run_command
@options(images=IMAGE_LISTS, lists=RELEASE_LISTS, tls=TARGET_TLS, source=SOURCE.without("strict_auth_realm"),
         tuning=COPY_TUNING, referrers=REFERRERS, out=REPORT_OUTPUT)
def mirror(*, to: ToOpt, images: ImageLists, lists: ReleaseOptions, tls: TLSOptions, source: SourceOptions,
           platform: PlatformOpt = [], referrers: ReferrerFilter | None,  # noqa: B006 - typer's default
           public_projects: PublicProjectsOpt = False, dry_run: DryRunOpt = False, tuning: CopyTuning,
           max_rps: MaxRpsOpt = None, pull_floor: PullFloorOpt = 0, shard: ShardOpt = None,
           out: ReportOutput, chart: ChartOpt = [],  # noqa: B006 - typer's default
           chart_images: ChartImagesOpt = True) -> None:
    """Copy every image registry -> registry, digests preserved."""
    target = RegistryURL.parse(to, what="--to")
    source = with_strict_auth_realm(source, tls)
    with interrupts() as cancel:
        opts = copy_options(tuning, cancel, platform=platform, referrers=referrers, dry_run=dry_run)
        published: dict = {}  # digests the releases publish (rancher): each copy is checked against them
        only_charts = bool(chart) and not images.files and not images.releases
        refs = [] if only_charts else gather_images(images, lists, digests=published)
        with prepared(chart, False, None, images, lists, chart_images=chart_images) as artifacts:
            # the charts' declared images join the image set before it is cut into shards (each image in one
            # shard); the charts themselves are shard 0's, as in sync
            refs = apply_shard(artifacts_job.join_images(refs, artifacts, stderr_log), shard, stderr_log)
            if (parse_shard(shard) or (0, 1))[0] != 0:
                artifacts = None
            progress = CliProgress()
            try:
                report = mirror_job.mirror(refs, target, target_tls=tls, source=source, options=opts,
                                           public_projects=public_projects, progress=progress, log=stderr_log,
                                           max_rps=max_rps, pull_floor=pull_floor, expect_digests=published,
                                           artifacts=artifacts)
            finally:
                progress.close()
        finish(report, out, cancel, verb="would copy" if dry_run else "copied")
