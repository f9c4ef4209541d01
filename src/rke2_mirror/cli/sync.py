"""typer command `sync CONFIG.yaml`: the scheduled job.

Exit status: 0 every image is in place; 1 some failed or were deferred (rate-limit budget); 2 bad
config or unusable target; 3 another run of the same config holds the lock; 130/143 interrupted by
SIGINT/SIGTERM (the report and the textfile are written first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rke2_mirror.cli.base import CliProgress, app, run_command
from rke2_mirror.cli.options import JsonOpt, ShardOpt, parse_shard
from rke2_mirror.cli.signals import Reported, interrupts
from rke2_mirror.cli.util import PROG, stderr_log
from rke2_mirror.engine.copy import ImageResult
from rke2_mirror.model.units import human as human_bytes

PullFloorOpt = Annotated[Optional[int], typer.Option(
    "--pull-floor", min=0, metavar="N", show_default=False,
    help="Stop starting new images when the source's rate-limit headers (Docker Hub: ratelimit-remaining) say "
         "this many pulls are left; the rest is deferred to the next run. Default: copy.pull_floor of the config.")]


class SyncProgress(CliProgress):
    """A scheduled job's log: what changed, not the hundreds of images already present (unless verbose)."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def image_done(self, r: ImageResult) -> None:
        if r.status == "skipped" and not self.verbose and self.images is None:
            return
        super().image_done(r)


@app.command("sync")
@run_command
def sync_command(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="The sync config (version: 1).",
                                           show_default=False)],
    shard: ShardOpt = None,
    max_rps: Annotated[Optional[float], typer.Option(
        "--max-rps", min=0.1, metavar="N", show_default=False,
        help="At most this many requests per second to each registry, all workers together. "
             "Default: copy.max_rps of the config.")] = None,
    pull_floor: PullFloorOpt = None,
    jobs_n: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, max=64, metavar="N", show_default=False,
                                                  help="Images copied at once. Default: copy.jobs of the config.")] = None,
    lock: Annotated[Optional[Path], typer.Option(
        "--lock", metavar="PATH", show_default=False,
        help="Lock file (default: 'lock' of the config, else CONFIG.yaml.lock). A second run exits with status 3.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Resolve the releases and ask the registries (manifest requests only); copy nothing, "
                          "write no output files.")] = False,
    check_config: Annotated[bool, typer.Option(
        "--check-config", help="Only check the config and what it names without the network: the files it "
                               "names, the outputs, the node files' version gates (exit 0, or 2 with one line).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also log images that were already present, and "
                                                                   "each image list verified.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The scheduled job: mirror everything CONFIG.yaml names.

    Follows channels and pinned versions (a channel that moved is copied at its new version; nothing is
    ever deleted), merges their images with extra list files, copies what is missing in one engine run
    (manifest HEADs only when nothing changed), and writes the outputs the config names: a JSON report,
    a node-exporter textfile, registries.yaml and config.yaml.

    Exit status: 0 all done; 1 some images failed or were deferred (rate-limit budget); 2 bad config;
    3 another run of this config holds the lock.
    """
    import rke2_mirror.jobs.sync as job

    if check_config:
        cfg = job.load_config(config)
        c = cfg.config
        for w in job.check_config(cfg):
            typer.echo(f"{PROG}: warning: {w}", err=True)
        followed = [f"{r.product} {x}" for r in c.releases for x in r.followed] + [f"images {f}" for f in c.images]
        typer.echo(f"{PROG}: {config}: config OK: target {cfg.target}; follows {', '.join(followed)} "
                   "(checked without the network: the releases and the target are not contacted)", err=True)
        return
    parsed_shard = parse_shard(shard)
    with interrupts() as cancel:
        progress = SyncProgress(verbose)
        try:
            result = job.sync(config, shard=parsed_shard, lock_path=lock, log=stderr_log, max_rps=max_rps,
                              pull_floor=pull_floor, jobs_override=jobs_n, dry_run=dry_run, progress=progress,
                              cancel=cancel, verbose=verbose)
        finally:
            progress.close()
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))
    for m in result.messages:
        stderr_log(m)
    s = result.report["summary"]
    extra = f", {s['deferred']} deferred" if s["deferred"] else ""
    extra += f", {s['would_copy']} would be copied" if s.get("would_copy") else ""
    extra += f", {s['interrupted']} interrupted" if s.get("interrupted") else ""
    stderr_log(f"sync {'done' if result.ok else 'incomplete'}: {s['total']} images, {s['copied']} copied, "
               f"{s['skipped']} already present, {s['failed']} failed{extra}; {human_bytes(s['bytes'])} in "
               f"{result.report['seconds']:.1f}s")
    sys.stderr.flush()
    if cancel.is_set():  # the report and the textfile are written: main() ends the process (130, 143)
        raise Reported(cancel.signum)
    if not result.ok:
        raise typer.Exit(result.exit_code)
