"""What a sync run reports: the image sets it followed, the summary, the JSON report split per release,
and the node-exporter textfile (written atomically; a failed run keeps the last success time).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rke2_mirror.files as files
from rke2_mirror.engine.copy import ImageResult, Report
from rke2_mirror.model.reference import ImageRef

REPORT_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1      # some images failed or were deferred (rate-limit budget)
EXIT_CONFIG = 2      # bad config (InputError)
EXIT_LOCKED = 3      # another run holds the lock
# interrupted: 130 (SIGINT) or 143 (SIGTERM), as `engine.cancel.Interrupted.exit_code` says


@dataclass(frozen=True)
class ImageSet:
    """One followed release (or one extra list file) and its images."""

    name: str                      # "rke2 stable", "rke2 v1.28.9+rke2r1", "images /etc/…/extra.txt"
    images: tuple[ImageRef, ...]
    product: str | None = None
    release: str | None = None     # as followed: a channel or a version
    version: str | None = None     # what it resolved to
    lists: tuple[str, ...] = ()    # the verified list assets
    file: str | None = None
    # the digest the release publishes per image (rancher): each copy is checked against it
    digests: Mapping[ImageRef, str] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name}
        if self.product:
            d.update(product=self.product, release=self.release, version=self.version, lists=list(self.lists))
        if self.file:
            d["file"] = self.file
        return d


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize(results: Sequence[ImageResult]) -> dict[str, Any]:
    count = lambda *s: sum(1 for r in results if r.status in s)  # noqa: E731
    return {"total": len(results), "copied": count("copied"), "skipped": count("skipped"),
            "failed": count("failed", "missing"), "deferred": count("deferred"),
            **({"would_copy": count("would-copy")} if count("would-copy") else {}),
            **({"interrupted": count("interrupted")} if count("interrupted") else {}),
            "bytes": sum(r.bytes for r in results)}


def split_report(report: Report, sets: Sequence[ImageSet]) -> list[dict]:
    """Per image set: its results (an image listed by two releases counts for both; its referrers are in
    its result)."""
    by_source = {r.source: r for r in report.images}
    out = []
    for s in sets:
        mine: list[ImageResult] = []
        for ref in s.images:
            res = by_source.get(str(ref))
            if res is None:
                continue  # another shard's
            mine.append(res)
        entry = s.to_json()
        entry["summary"] = {**summarize(mine), "seconds": round(sum(r.seconds for r in mine), 3),
                            "in_release": len(s.images)}
        for status in ("copied", "skipped", "would-copy", "deferred", "interrupted"):
            lst = [r.source for r in mine if r.status == status]
            if lst or status not in ("would-copy", "interrupted"):
                entry[status.replace("-", "_")] = lst
        entry["failed"] = [{"source": r.source, "error": r.error} for r in mine if r.status in ("failed", "missing")]
        out.append(entry)
    return out


def build_report(report: Report, sets: Sequence[ImageSet], *, config: Path, target: str,
                 shard: tuple[int, int] | None, dry_run: bool, started: float, finished: float, seconds: float,
                 interrupt_exit_code: int = 130) -> dict[str, Any]:
    """The JSON report of one run: its result ("ok"; "failed"; "stopped" when the rate-limit budget
    deferred images; "interrupted" by a signal, with `interrupt_exit_code`), the summary, the split per
    release and every image."""
    from rke2_mirror.jobs.artifacts import kind_summary
    summary = summarize(report.images)
    summary["kinds"] = kind_summary(report.images, getattr(report, "target_kinds", {}))  # image, chart, files
    success = summary["failed"] == 0 and summary["deferred"] == 0
    if report.interrupted:
        result, exit_code = "interrupted", interrupt_exit_code
    else:
        result = "ok" if success else ("stopped" if report.stopped and not summary["failed"] else "failed")
        exit_code = EXIT_OK if success else EXIT_FAILED
    return {
        "report_version": REPORT_VERSION,
        "config": str(config),
        "target": target,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "dry_run": dry_run,
        "started_at": _utc(started),
        "finished_at": _utc(finished),
        "seconds": round(seconds, 3),
        "result": result,
        "exit_code": exit_code,
        "stopped": report.stopped,
        **({"interrupted": report.interrupted} if report.interrupted else {}),
        "rate_limit": report.rate_limit,
        "summary": summary,
        "releases": split_report(report, sets),
        "images": [r.to_json() for r in report.images],
    }


def report_messages(doc: Mapping[str, Any]) -> list[str]:
    """The summary lines of a report for the log: one per release, then why the run ended early."""
    messages = []
    for rel in doc["releases"]:
        s = rel["summary"]
        label = rel["name"] + (f" ({rel['version']})" if rel.get("version") and rel["version"] != rel.get("release") else "")
        messages.append(f"{label}: {s['total']} images, {s['copied']} copied, {s['skipped']} already present, "
                        f"{s['failed']} failed" + (f", {s['deferred']} deferred" if s["deferred"] else "")
                        + (f", {s['interrupted']} interrupted" if s.get("interrupted") else ""))
    summary, rate_limit = doc["summary"], doc["rate_limit"]
    if doc["stopped"]:
        left = ""
        if rate_limit and rate_limit.get("remaining") is not None:
            left = f"; pulls left for the next run: {rate_limit['remaining']}" + (
                f" of {rate_limit['limit']}" if rate_limit.get("limit") else "")
        messages.append(f"stopped early, {summary['deferred']} images deferred to the next run: {doc['stopped']}{left}")
    if doc.get("interrupted"):
        messages.append(f"interrupted by {doc['interrupted']}: {summary.get('interrupted', 0)} images not finished, "
                        f"left to the next run")
    return messages


@dataclass
class SyncResult:
    report: dict
    exit_code: int
    messages: list[str] = field(default_factory=list)   # summary lines for the log

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """A sync output: directories made as needed (files.write_atomic: on disk before the rename; its temp
    name never matches *.prom, so node-exporter never reads half a textfile)."""
    files.write_atomic(path, text, mode, parents=True)


_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


MAX_TEXTFILE_BYTES = 1024 * 1024  # ours are ~3 KiB; a larger one is not ours, and is read as garbled


def read_textfile(path: Path) -> dict[str, float]:
    """The first sample of each metric in a previous textfile (missing, garbled or larger than
    MAX_TEXTFILE_BYTES: empty)."""
    out: dict[str, float] = {}
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXTFILE_BYTES + 1)
        if len(data) > MAX_TEXTFILE_BYTES:
            return out
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        m = _PROM_LINE.match(line)
        if m and m.group(1) not in out:
            try:
                out[m.group(1)] = float(m.group(3))
            except ValueError:
                continue
    return out


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2 ** 53 else repr(float(v))


METRICS = {  # name: (type, help)
    "rke2_mirror_last_run_timestamp_seconds": ("gauge", "Unix time the last sync run finished."),
    "rke2_mirror_last_success_timestamp_seconds": ("gauge", "Unix time of the last sync run that mirrored every image (kept from earlier runs when this one failed)."),
    "rke2_mirror_last_run_success": ("gauge", "1 if the last sync run mirrored every image, else 0."),
    "rke2_mirror_images_total": ("gauge", "Images in the last run (this shard's part)."),
    "rke2_mirror_images_copied": ("gauge", "Images copied by the last run."),
    "rke2_mirror_images_skipped": ("gauge", "Images already present at the target in the last run."),
    "rke2_mirror_images_failed": ("gauge", "Images that failed in the last run."),
    "rke2_mirror_images_deferred": ("gauge", "Images not started in the last run because the source's rate-limit budget reached its floor."),
    "rke2_mirror_bytes_copied_last_run": ("gauge", "Bytes copied by the last run."),
    "rke2_mirror_bytes_copied_total": ("counter", "Bytes copied by all runs that wrote this file."),
    "rke2_mirror_duration_seconds": ("gauge", "Wall time of the last run."),
    "rke2_mirror_ratelimit_remaining": ("gauge", "Pulls left at the source (Docker Hub ratelimit-remaining) at the end of the last run."),
    "rke2_mirror_ratelimit_limit": ("gauge", "The source's pull limit per window (Docker Hub ratelimit-limit)."),
    "rke2_mirror_kind_total": ("gauge", "Items in the last run by kind: image, chart, files (a set of install files)."),
    "rke2_mirror_kind_copied": ("gauge", "Items copied by the last run, by kind."),
    "rke2_mirror_kind_skipped": ("gauge", "Items already present at the target in the last run, by kind."),
    "rke2_mirror_kind_failed": ("gauge", "Items that failed in the last run, by kind."),
    "rke2_mirror_release_info": ("gauge", "A release the last run followed, and the version it resolved to."),
}


def render_textfile(values: Mapping[str, float | Mapping[str, float] | None], labels: Mapping[str, str],
                    releases: Sequence[Mapping[str, str]] = ()) -> str:
    """`values`: a number per metric, or {kind: number} for the per-kind gauges (a `kind` label each)."""
    lines: list[str] = []
    for name, (kind, help_) in METRICS.items():
        if name == "rke2_mirror_release_info":
            samples = [(_labels({**labels, **r}), 1.0) for r in releases]
        elif isinstance(values.get(name), Mapping):
            samples = [(_labels({**labels, "kind": k}), v) for k, v in values[name].items()]
        else:
            v = values.get(name)
            samples = [] if v is None else [(_labels(labels), v)]
        if not samples:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{lbl} {_num(v)}" for lbl, v in samples]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, *, labels: Mapping[str, str], finished: float, success: bool,
                   summary: Mapping[str, Any] | None, seconds: float, rate_limit: Mapping | None,
                   releases: Sequence[ImageSet] = (), kinds: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """`kinds`: the summary's per-kind counts ({image|chart|files: {total, copied, skipped, failed}})."""
    prev = read_textfile(path)
    copied = float((summary or {}).get("bytes", 0)) if summary else 0.0
    values: dict[str, float | Mapping[str, float] | None] = {
        "rke2_mirror_last_run_timestamp_seconds": round(finished, 3),
        "rke2_mirror_last_success_timestamp_seconds": round(finished, 3) if success else
        prev.get("rke2_mirror_last_success_timestamp_seconds"),
        "rke2_mirror_last_run_success": 1.0 if success else 0.0,
        "rke2_mirror_duration_seconds": round(seconds, 3),
        "rke2_mirror_bytes_copied_total": prev.get("rke2_mirror_bytes_copied_total", 0.0) + copied,
    }
    if summary is not None:
        values.update({
            "rke2_mirror_images_total": summary["total"],
            "rke2_mirror_images_copied": summary["copied"],
            "rke2_mirror_images_skipped": summary["skipped"],
            "rke2_mirror_images_failed": summary["failed"],
            "rke2_mirror_images_deferred": summary["deferred"],
            "rke2_mirror_bytes_copied_last_run": copied,
        })
    if kinds:
        for what in ("total", "copied", "skipped", "failed"):
            values[f"rke2_mirror_kind_{what}"] = {k: c[what] for k, c in kinds.items()}
    if rate_limit:
        values["rke2_mirror_ratelimit_remaining"] = rate_limit.get("remaining")
        values["rke2_mirror_ratelimit_limit"] = rate_limit.get("limit")
    info = [{"product": s.product, "release": s.release or "", "version": s.version or ""}
            for s in releases if s.product]
    write_atomic(path, render_textfile(values, labels, info), 0o644)
