"""The copy engine: walk index -> manifests -> config + layers between two endpoints.

Skip what exists, mount what this run already put elsewhere on the target, stream the rest;
children are written before parents and the tag last, so a crash leaves garbage, never a
dangling tag.  Endpoints are registries or OCI layouts (see `Endpoint`).  Progress is reported
through callbacks; nothing here prints.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from .errors import MirrorError, NotFound
from .oci import Descriptor, Manifest, Platform, checked_descriptor, filter_index, parse_manifest
from .reference import ImageRef
from .registry import RetryPolicy


class Endpoint(Protocol):
    """What the engine needs from a registry or an image layout, per repository."""

    def location(self, repo: str, reference: str) -> str: ...
    def repository_is_new(self, repo: str) -> bool: ...
    def head_manifest(self, repo: str, reference: str) -> Descriptor | None: ...
    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]: ...
    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str: ...
    def blob_exists(self, repo: str, desc: Descriptor) -> bool: ...
    def open_blob(self, repo: str, desc: Descriptor) -> AbstractContextManager[Iterable[bytes]]: ...
    def mount_blob(self, repo: str, desc: Descriptor, from_repo: str) -> bool: ...
    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None: ...


class Locator(Protocol):
    """Where an image reference lives: (endpoint, repository name at that endpoint)."""

    def locate(self, ref: ImageRef) -> tuple[Endpoint, str]: ...


@dataclass(frozen=True)
class CopyTask:
    source: ImageRef
    target: ImageRef


@dataclass(frozen=True)
class CopyOptions:
    platforms: tuple[Platform, ...] = ()
    signatures: bool = False
    jobs: int = 4
    blob_jobs: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dry_run: bool = False
    dry_run_heads_only: bool = False  # no manifest GETs at all (Docker Hub counts them as pulls)
    # Blobs to leave out (delta archives): digests the target is known to hold already.
    skip_blobs: frozenset[str] = frozenset()
    # Blobs up to this size are uploaded without asking the target first (HEAD): on a registry the
    # round trip costs more than re-sending a small blob that is there already.  0: always ask.
    upload_without_head_below: int = 0
    # Asked before each image starts; a reason (str) stops the run cleanly: the rest is "deferred".
    stop_check: Callable[[], str | None] | None = None


@dataclass
class ImageResult:
    source: str
    target: str
    status: str  # copied | skipped | failed | missing (dry run) | would-copy (dry run)
    digest: str | None = None
    source_digest: str | None = None
    bytes: int = 0
    error: str | None = None
    note: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = {"source": self.source, "target": self.target, "digest": self.digest,
             "status": self.status, "error": self.error, "bytes": self.bytes}
        if self.source_digest and self.source_digest != self.digest:
            d["source_digest"] = self.source_digest
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Report:
    images: list[ImageResult]
    seconds: float = 0.0
    stopped: str | None = None  # why images were deferred
    rate_limit: dict | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.images if r.status == status)

    @property
    def failed(self) -> list[ImageResult]:
        """Images not in place at the end: failed, missing at the source, or deferred."""
        return [r for r in self.images if r.status in ("failed", "missing", "deferred")]

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.images)

    def to_json(self) -> dict:
        summary = {"total": len(self.images), "copied": self.count("copied"), "skipped": self.count("skipped"),
                   "failed": len(self.failed), "bytes": self.bytes, "seconds": round(self.seconds, 3)}
        if any(r.status == "would-copy" for r in self.images):
            summary["would_copy"] = self.count("would-copy")
        if self.stopped:
            summary["deferred"] = self.count("deferred")
            summary["stopped"] = self.stopped
        if self.rate_limit:
            summary["rate_limit"] = self.rate_limit
        return {"summary": summary, "images": [r.to_json() for r in self.images]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


class Progress:
    """Callbacks from the engine (called from worker threads).  Subclass and override."""

    def start(self, total_images: int) -> None: ...
    def image_done(self, result: ImageResult) -> None: ...
    def bytes_copied(self, n: int) -> None: ...


class _BlobState:
    __slots__ = ("done", "repos", "origin")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.repos: set[str] = set()
        self.origin: str | None = None  # the repository it was first put into: mounts come from there


class _BlobTracker:
    """Per target endpoint: which repositories this run put each blob into, and who is uploading it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[int, str], _BlobState] = {}

    def claim(self, ep: Endpoint, digest: str) -> tuple[_BlobState, bool]:
        key = (id(ep), digest)
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = _BlobState()
                return st, True
            return st, False


class _ImageFailed(MirrorError):
    pass


class CopyEngine:
    def __init__(self, source: Locator, target: Locator, options: CopyOptions | None = None,
                 progress: Progress | None = None):
        self.source = source
        self.target = target
        self.opt = options or CopyOptions()
        self.progress = progress or Progress()
        self._blobs = _BlobTracker()
        self._blob_pool: ThreadPoolExecutor | None = None
        self._fresh: dict[tuple[int, str], bool] = {}
        self._fresh_lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------
    def run(self, tasks: Sequence[CopyTask]) -> Report:
        t0 = time.monotonic()
        self.progress.start(len(tasks))
        results: list[ImageResult | None] = [None] * len(tasks)
        extra: list[ImageResult] = []
        with ThreadPoolExecutor(max(1, self.opt.blob_jobs), thread_name_prefix="blob") as blob_pool, \
                ThreadPoolExecutor(max(1, self.opt.jobs), thread_name_prefix="image") as image_pool:
            self._blob_pool = blob_pool
            futures = {image_pool.submit(self._copy_one, t): i for i, t in enumerate(tasks)}
            for fut, i in futures.items():
                res, sigs = fut.result()
                results[i] = res
                extra.extend(sigs)
        self._blob_pool = None
        done = [r for r in results if r is not None] + extra
        stopped = next((r.error for r in done if r.status == "deferred"), None)
        return Report(done, time.monotonic() - t0, stopped=stopped)

    # -- one image ---------------------------------------------------------------------------
    def _copy_one(self, task: CopyTask) -> tuple[ImageResult, list[ImageResult]]:
        t0 = time.monotonic()
        res = ImageResult(str(task.source), str(task.target), "failed")
        sigs: list[ImageResult] = []
        reason = self.opt.stop_check() if self.opt.stop_check else None
        if reason:
            res.status, res.error = "deferred", f"not started: {reason}"
            self.progress.image_done(res)
            return res, sigs
        try:
            self._copy_image(task, res)
            if self.opt.signatures and res.source_digest and not self.opt.platforms:
                sigs = self._copy_signature(task, res.source_digest)
        except MirrorError as exc:
            res.status, res.error = ("missing" if self.opt.dry_run and isinstance(exc, NotFound) else "failed"), str(exc)
        except Exception as exc:  # a bug must not stop the other images; say what it was
            res.status, res.error = "failed", f"internal error: {exc.__class__.__name__}: {exc}"
        res.seconds = time.monotonic() - t0
        self.progress.image_done(res)
        for s in sigs:
            self.progress.image_done(s)
        return res, sigs

    def _copy_signature(self, task: CopyTask, digest: str) -> list[ImageResult]:
        tag = digest.replace(":", "-") + ".sig"
        src_ep, src_repo = self.source.locate(task.source)
        sig_task = CopyTask(task.source.with_tag(tag), task.target.with_tag(tag))
        res = ImageResult(str(sig_task.source), str(sig_task.target), "failed", note="signature")
        try:
            if src_ep.head_manifest(src_repo, tag) is None:
                return []
            self._copy_image(sig_task, res)
        except MirrorError as exc:
            res.error = str(exc)
        return [res]

    def _copy_image(self, task: CopyTask, res: ImageResult) -> None:
        src_ep, src_repo = self.source.locate(task.source)
        dst_ep, dst_repo = self.target.locate(task.target)
        ref = task.source.reference
        dst_ref = task.target.tag or task.target.digest or ref
        heads_only = self.opt.dry_run and self.opt.dry_run_heads_only
        # The target first: when it lacks the tag (a cold copy) the source manifest is fetched at
        # once, without a HEAD before it.  When it has the tag (a rerun), a HEAD at the source says
        # whether it is current without a GET (Docker Hub counts manifest GETs as pulls).
        dst_head = None if self.opt.platforms else dst_ep.head_manifest(dst_repo, dst_ref)
        if dst_head is not None or heads_only:
            src_head = src_ep.head_manifest(src_repo, ref)
            if src_head is None:
                raise NotFound(f"not found at the source ({src_ep.location(src_repo, ref)})")
            if src_head.digest and not self.opt.platforms:
                res.source_digest = res.digest = src_head.digest
                if dst_head is not None and dst_head.digest == src_head.digest:
                    res.status = "skipped"
                    return
        if heads_only:
            res.status, res.note = "would-copy", "size not fetched"
            return
        try:
            desc, raw = src_ep.get_manifest(src_repo, res.source_digest or ref)
        except NotFound:
            raise NotFound(f"not found at the source ({src_ep.location(src_repo, ref)})") from None
        manifest = parse_manifest(desc.media_type or None, raw)
        res.source_digest = manifest.descriptor.digest
        if self.opt.platforms:
            manifest = self._select_platforms(src_ep, src_repo, manifest)
            if manifest.descriptor.digest != res.source_digest:
                res.note = (f"platforms {', '.join(map(str, self.opt.platforms))} only: "
                            f"top-level digest changed from {res.source_digest}")
        res.digest = manifest.descriptor.digest
        if self.opt.platforms:
            present = self._target_has(dst_ep, dst_repo, dst_ref, res.digest)
        else:  # the target's answer from above (a source HEAD without a digest ends up here)
            present = dst_head is not None and dst_head.digest == res.digest
        if present:
            res.status = "skipped"
            return
        if self.opt.dry_run:
            res.status = "would-copy"
            res.bytes = self._size_estimate(src_ep, src_repo, manifest)
            return
        fresh = self._is_new(dst_ep, dst_repo)
        res.bytes = self._put_tree(src_ep, src_repo, dst_ep, dst_repo, manifest, dst_ref, fresh)
        res.status = "copied"

    @staticmethod
    def _target_has(ep: Endpoint, repo: str, ref: str, digest: str) -> bool:
        """Does the target's `ref` already name exactly this manifest (a manifest HEAD)?"""
        head = ep.head_manifest(repo, ref)
        return head is not None and head.digest == digest

    def _is_new(self, ep: Endpoint, repo: str) -> bool:
        """Was the target repository unknown when this run first looked (asked once per repository)?
        Then its blobs and child manifests are uploaded without asking for each first: a cold copy
        saves a request per blob.  Blobs this run already put there are known from the tracker."""
        key = (id(ep), repo)
        with self._fresh_lock:
            if key in self._fresh:
                return self._fresh[key]
        fresh = ep.repository_is_new(repo)
        with self._fresh_lock:
            return self._fresh.setdefault(key, fresh)

    def _select_platforms(self, ep: Endpoint, repo: str, m: Manifest) -> Manifest:
        wanted = self.opt.platforms
        names = ", ".join(map(str, wanted))
        if m.is_index:
            filtered = filter_index(m, wanted)
            if not filtered.manifests:
                have = ", ".join(sorted({str(d.platform) for d in m.manifests if d.platform})) or "none"
                raise _ImageFailed(f"no manifest for platform {names} (the image has: {have})")
            if len(filtered.manifests) == len(m.manifests):
                return m  # nothing dropped: keep the original bytes and digest
            return filtered
        plat = self._manifest_platform(ep, repo, m)
        if plat is not None and not any(plat.matches(p) for p in wanted):
            raise _ImageFailed(f"single-platform image is {plat}, not {names}")
        return m

    def _manifest_platform(self, ep: Endpoint, repo: str, m: Manifest) -> Platform | None:
        if m.config is None or m.config.size > 4 * 1024 * 1024:
            return None
        def read() -> bytes:
            with ep.open_blob(repo, m.config) as chunks:
                return b"".join(chunks)
        try:
            doc = json.loads(self.opt.retry.call(read))
        except ValueError:
            return None
        if not isinstance(doc, dict) or "os" not in doc or "architecture" not in doc:
            return None
        return Platform(doc["os"], doc["architecture"], doc.get("variant"))

    def _size_estimate(self, ep: Endpoint, repo: str, m: Manifest) -> int:
        if not m.is_index:
            return sum(d.size for d in m.blobs)
        total = 0
        for child in m.manifests:
            _, raw = ep.get_manifest(repo, child.digest)
            total += self._size_estimate(ep, repo, parse_manifest(child.media_type, raw))
        return total

    # -- the graph walk ----------------------------------------------------------------------
    def _put_tree(self, src_ep: Endpoint, src_repo: str, dst_ep: Endpoint, dst_repo: str,
                  root: Manifest, dst_ref: str, fresh: bool = False) -> int:
        """Blobs, then child manifests (by digest), then the root under `dst_ref` (the tag) last."""
        children: list[tuple[Manifest, str]] = []
        blobs: dict[str, Descriptor] = {}

        def walk(m: Manifest) -> None:
            if not m.is_index:
                for b in m.blobs:
                    blobs.setdefault(b.digest, b)
                return
            for child in m.manifests:
                if not fresh and dst_ep.head_manifest(dst_repo, child.digest) is not None:
                    continue  # complete at the target already: children were written first
                desc, raw = src_ep.get_manifest(src_repo, child.digest)
                cm = parse_manifest(child.media_type or desc.media_type, raw)
                walk(cm)
                children.append((cm, child.digest))

        walk(root)
        copied = self._copy_blobs(src_ep, src_repo, dst_ep, dst_repo, list(blobs.values()), fresh)
        for m, digest in children:
            dst_ep.put_manifest(dst_repo, digest, m.media_type, m.raw)
        dst_ep.put_manifest(dst_repo, dst_ref, root.media_type, root.raw)
        return copied

    def _copy_blobs(self, src_ep: Endpoint, src_repo: str, dst_ep: Endpoint, dst_repo: str,
                    blobs: list[Descriptor], fresh: bool = False) -> int:
        pool = self._blob_pool
        if pool is None or len(blobs) <= 1:
            return sum(self._ensure_blob(src_ep, src_repo, dst_ep, dst_repo, b, fresh) for b in blobs)
        futures = [pool.submit(self._ensure_blob, src_ep, src_repo, dst_ep, dst_repo, b, fresh) for b in blobs]
        total, first_error = 0, None
        for f in futures:  # wait for all, so no upload of this image is left running behind a failure
            try:
                total += f.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below
                first_error = first_error or exc
        if first_error:
            raise first_error
        return total

    def _ensure_blob(self, src_ep: Endpoint, src_repo: str, dst_ep: Endpoint, dst_repo: str,
                     desc: Descriptor, fresh: bool = False) -> int:
        """Make `desc` present in dst_repo: skip, mount, or stream.  Returns bytes transferred."""
        if desc.digest in self.opt.skip_blobs:
            return 0
        state, owner = self._blobs.claim(dst_ep, desc.digest)
        if not owner:
            state.done.wait()
            if dst_repo in state.repos:
                return 0
            # Mount from one repository only, so a token covers (this repo, origin) pairs, not every pair.
            if state.origin and dst_ep.mount_blob(dst_repo, desc, state.origin):
                state.repos.add(dst_repo)
                return 0
            return self._head_or_transfer(src_ep, src_repo, dst_ep, dst_repo, desc, fresh)
        try:
            n = self._head_or_transfer(src_ep, src_repo, dst_ep, dst_repo, desc, fresh)
            state.repos.add(dst_repo)
            state.origin = dst_repo
            return n
        finally:
            state.done.set()

    def _head_or_transfer(self, src_ep: Endpoint, src_repo: str, dst_ep: Endpoint, dst_repo: str,
                          desc: Descriptor, fresh: bool = False) -> int:
        ask = not fresh and desc.size >= self.opt.upload_without_head_below
        if ask and dst_ep.blob_exists(dst_repo, desc):
            return 0

        def once() -> int:
            with src_ep.open_blob(src_repo, desc) as chunks:
                dst_ep.push_blob(dst_repo, desc, _Counted(chunks, self.progress.bytes_copied))
            return desc.size
        return self.opt.retry.call(once)


class _Counted:
    """Passes a blob's chunks on, reporting each one's size; says what the reader inside checks
    (oci.checked_descriptor), so a destination need not hash again what is checked already."""

    def __init__(self, chunks: Iterable[bytes], report: Callable[[int], None]):
        self._chunks = chunks
        self._report = report
        self.checks = checked_descriptor(chunks)

    def __iter__(self) -> Iterator[bytes]:
        for c in self._chunks:
            self._report(len(c))
            yield c
