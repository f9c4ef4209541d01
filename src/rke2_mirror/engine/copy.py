"""The copy: one image at a time from a Source to a Destination, through the one walk (engine.walk).

Per image: ask the target first (a rerun sends HEADs only), fetch the root, select platforms, walk the
graph (child manifests the target holds complete are pruned), then skip -> mount -> stream every blob
(each hashed while it streams), child manifests by digest, and the tag last: a crash leaves garbage,
never a dangling tag.  Images run in parallel, and the blobs of an image too; a blob claimed by one image
is uploaded once and mounted from there by the others.  Progress is reported through callbacks; nothing
here prints.  A `Cancel` token stops the run: no new image or blob starts, what runs is abandoned at its
next chunk or request, and the unfinished images are reported as `interrupted`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rke2_mirror.engine.blobs import blob_subject, checked
from rke2_mirror.engine.cancel import Cancel, Interrupted
from rke2_mirror.engine.protocols import Locator, counts_pulls
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.engine.walk import Graph, referrer_subjects, select_platforms, walk, walk_referrers
from rke2_mirror.model.errors import DigestMismatch, MirrorError, NotFound
from rke2_mirror.model.oci import INDEX_TYPES, Descriptor, Manifest, Platform, parse_manifest
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.model.reference import ImageRef

GRACE_SECONDS = 3.0  # after an interrupt: how long running images get to notice before they are reported


@dataclass(frozen=True)
class CopyTask:
    source: ImageRef
    target: ImageRef
    note: str | None = None  # added to the result when the image is copied (e.g. "new digest (...)")
    note_skipped: str | None = None  # ... and when it was there already
    done: "ImageResult | None" = None  # decided before the engine ran (reported as it is)
    # The digest the source's tag must resolve to (a digest a release publishes): another digest fails the
    # image before anything of it is written, naming both.
    expect_digest: str | None = None


@dataclass(frozen=True)
class CopyOptions:
    platforms: tuple[Platform, ...] = ()
    # Which referrers (signatures, attestations, SBOMs) travel with each image; None: none.
    referrers: ReferrerFilter | None = None
    jobs: int = 4
    blob_jobs: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dry_run: bool = False
    # Blobs the destination is known to hold though it can't tell (a delta archive's left-out blobs).
    assume_present: frozenset[str] = frozenset()
    # Asked before each image starts; a reason (str) stops the run cleanly: the rest is "deferred".
    stop_check: Callable[[], str | None] | None = None
    cancel: Cancel | None = None


@dataclass
class ImageResult:
    source: str
    target: str
    status: str  # copied | skipped | failed | missing (dry run) | would-copy (dry run) | deferred | interrupted
    digest: str | None = None
    source_digest: str | None = None
    bytes: int = 0
    error: str | None = None
    note: str | None = None
    seconds: float = 0.0
    referrers: list[dict] = field(default_factory=list)  # ReferrerEdge.to_json() + "status"

    def to_json(self) -> dict:
        d = {"source": self.source, "target": self.target, "digest": self.digest,
             "status": self.status, "error": self.error, "bytes": self.bytes}
        if self.source_digest and self.source_digest != self.digest:
            d["source_digest"] = self.source_digest
        if self.note:
            d["note"] = self.note
        if self.referrers:
            d["referrers"] = self.referrers
        return d

    def referrers_copied(self) -> int:
        return sum(1 for r in self.referrers if r["status"] in ("copied", "would-copy"))


NOT_IN_PLACE = ("failed", "missing", "deferred", "interrupted")


@dataclass
class Report:
    images: list[ImageResult]
    seconds: float = 0.0
    stopped: str | None = None  # why images were deferred
    rate_limit: dict | None = None
    interrupted: str | None = None  # why the run stopped early (a signal)

    def count(self, status: str) -> int:
        return sum(1 for r in self.images if r.status == status)

    @property
    def failed(self) -> list[ImageResult]:
        """Images not in place at the end: failed, missing at the source, deferred or interrupted."""
        return [r for r in self.images if r.status in NOT_IN_PLACE]

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.images)

    def to_json(self) -> dict:
        summary = {"total": len(self.images), "copied": self.count("copied"), "skipped": self.count("skipped"),
                   "failed": len(self.failed), "bytes": self.bytes, "seconds": round(self.seconds, 3)}
        if any(r.status == "would-copy" for r in self.images):
            summary["would_copy"] = self.count("would-copy")
        if any(r.referrers for r in self.images):
            summary["referrers"] = {"found": sum(len(r.referrers) for r in self.images),
                                    "copied": sum(r.referrers_copied() for r in self.images)}
        if self.stopped:
            summary["deferred"] = self.count("deferred")
            summary["stopped"] = self.stopped
        if self.interrupted:
            summary["interrupted"] = self.count("interrupted")
            summary["interrupted_by"] = self.interrupted
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


_DONE = threading.Event()  # what a finished blob's `done` becomes: one set Event shared by all of them
_DONE.set()


class _BlobState:
    __slots__ = ("done", "repos", "origin")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.repos: set[str] = set()
        self.origin: str | None = None  # the repository it was first put into: mounts come from there


class _Claims:
    """Per destination and digest: who moves a blob first, and which repositories this run put it into."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[int, str], _BlobState] = {}

    def claim(self, ep: object, digest: str) -> tuple[_BlobState, bool]:
        key = (id(ep), digest)
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = _BlobState()
                return st, True
            return st, False

    def first(self, ep: object, digest: str) -> bool:
        """Claim and release at once (a dry run counts each blob once)."""
        st, owner = self.claim(ep, digest)
        if owner:
            done, st.done = st.done, _DONE  # set too: a thread that got the state meanwhile may wait on it
            done.set()
        return owner


def _edges(g: Graph, status: str) -> list[dict]:
    return [{**e.to_json(), "status": "present" if e.present else status} for e in g.referrers]


def _check_expected(task: CopyTask, digest: str) -> None:
    if task.expect_digest and digest != task.expect_digest:
        raise DigestMismatch(f"{task.source} is {digest} at the source, but the release publishes "
                             f"{task.expect_digest}: not copied")


class CopyEngine:
    def __init__(self, source: Locator, target: Locator, options: CopyOptions | None = None,
                 progress: Progress | None = None):
        self.source = source
        self.target = target
        self.opt = options or CopyOptions()
        self.progress = progress or Progress()
        self.cancel = self.opt.cancel or Cancel()  # a token of its own: an interrupt must not leak to later runs
        self._claims = _Claims()
        self._blob_pool: ThreadPoolExecutor | None = None
        self._fresh: dict[tuple[int, str], bool] = {}
        self._fresh_lock = threading.Lock()
        # (destination, repository, manifest digest) known complete there in this run: put, or found by a
        # HEAD; asked once however many images share it
        self._complete: set[tuple[int, str, str]] = set()

    # -- public ------------------------------------------------------------------------------
    def run(self, tasks: Sequence[CopyTask]) -> Report:
        t0 = time.monotonic()
        results: list[list[ImageResult] | None] = [None] * len(tasks)
        futures: dict[Future, int] = {}
        blob_pool = ThreadPoolExecutor(max(1, self.opt.blob_jobs), thread_name_prefix="blob")
        image_pool = ThreadPoolExecutor(max(1, self.opt.jobs), thread_name_prefix="image")
        self._blob_pool = blob_pool
        try:
            self.progress.start(len(tasks))
            for i, t in enumerate(tasks):
                if t.done is not None:
                    results[i] = [t.done]
                    self.progress.image_done(t.done)
                else:
                    futures[image_pool.submit(self._copy_one, t)] = i
            pending = set(futures)
            while pending and not self.cancel.is_set():
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    results[futures[f]] = f.result()
        except Interrupted as exc:
            self.cancel.set(exc.signum)
        finally:
            stopping = self.cancel.is_set()
            image_pool.shutdown(wait=not stopping, cancel_futures=stopping)
            blob_pool.shutdown(wait=not stopping, cancel_futures=stopping)
        if self.cancel.is_set():
            self._drain(tasks, futures, results)
        self._blob_pool = None
        done_list = [r for rs in results if rs for r in rs]
        stopped = next((r.error for r in done_list if r.status == "deferred"), None)
        interrupted = self.cancel.signal_name if self.cancel.is_set() else None
        return Report(done_list, time.monotonic() - t0, stopped=stopped, interrupted=interrupted)

    def _drain(self, tasks: Sequence[CopyTask], futures: dict[Future, int],
               results: list[list[ImageResult] | None]) -> None:
        """After an interrupt: give running images a moment to stop, report the rest as interrupted."""
        running = [f for f, i in futures.items() if results[i] is None and not f.cancelled()]
        try:
            wait(running, timeout=GRACE_SECONDS)
        except Interrupted:
            pass
        for f, i in futures.items():
            if results[i] is not None:
                continue
            if f.done() and not f.cancelled() and f.exception() is None:
                results[i] = f.result()
            else:
                t = tasks[i]
                results[i] = [ImageResult(str(t.source), str(t.target), "interrupted",
                                          error="interrupted before it completed")]

    # -- one image ---------------------------------------------------------------------------
    def _copy_one(self, task: CopyTask) -> list[ImageResult]:
        t0 = time.monotonic()
        res = ImageResult(str(task.source), str(task.target), "failed")
        if self.cancel.is_set():
            res.status, res.error = "interrupted", "not started: the run was interrupted"
            return [res]
        reason = self.opt.stop_check() if self.opt.stop_check else None
        if reason:
            res.status, res.error = "deferred", f"not started: {reason}"
            self.progress.image_done(res)
            return [res]
        try:
            self._copy_image(task, res)
        except MirrorError as exc:
            if self.cancel.is_set():
                res.status, res.error = "interrupted", "interrupted before it completed"
            else:
                res.status = "missing" if self.opt.dry_run and isinstance(exc, NotFound) else "failed"
                res.error = str(exc)
        except Exception as exc:  # a bug must not stop the other images; say what it was
            if self.cancel.is_set():  # e.g. a blob submitted after the pools were shut down
                res.status, res.error = "interrupted", "interrupted before it completed"
            else:
                res.status, res.error = "failed", f"internal error: {exc.__class__.__name__}: {exc}"
        if not res.note:
            res.note = task.note if res.status in ("copied", "would-copy") else \
                task.note_skipped if res.status == "skipped" else None
        res.seconds = time.monotonic() - t0
        self.progress.image_done(res)
        return [res]

    def _copy_image(self, task: CopyTask, res: ImageResult) -> None:
        src, src_repo = self.source.locate(task.source)
        dst, dst_repo = self.target.locate(task.target)
        ref = task.source.reference
        dst_ref = task.target.tag or task.target.digest or ref
        heads_only = self.opt.dry_run and counts_pulls(src)
        # The target first: when it lacks the tag (a cold copy) the source manifest is fetched at
        # once, without a HEAD before it.  When it has the tag (a rerun), a HEAD at the source says
        # whether it is current without a GET (Docker Hub counts manifest GETs as pulls).
        dst_head = None if self.opt.platforms else dst.head_manifest(dst_repo, dst_ref)
        if dst_head is not None or heads_only:
            src_head = src.head_manifest(src_repo, ref)
            if src_head is None:
                raise NotFound(f"not found at the source ({src.location(src_repo, ref)})")
            if src_head.digest and not self.opt.platforms:
                res.source_digest = res.digest = src_head.digest
                _check_expected(task, src_head.digest)
                if dst_head is not None and dst_head.digest == src_head.digest:
                    res.status = "skipped"
                    if self.opt.referrers is not None and not heads_only:
                        self._referrers_of_present(src, src_repo, dst, dst_repo, dst_head, res)
                    return
        if heads_only:
            res.status, res.note = "would-copy", "size not fetched"
            return
        try:
            desc, raw = src.get_manifest(src_repo, res.source_digest or ref)
        except NotFound:
            raise NotFound(f"not found at the source ({src.location(src_repo, ref)})") from None
        manifest = parse_manifest(desc.media_type or None, raw)
        res.source_digest = manifest.descriptor.digest
        _check_expected(task, res.source_digest)
        if self.opt.platforms:
            manifest = select_platforms(src, src_repo, manifest, self.opt.platforms, self.opt.retry)
            if manifest.descriptor.digest != res.source_digest:
                res.note = (f"platforms {', '.join(map(str, self.opt.platforms))} only: "
                            f"top-level digest changed from {res.source_digest}")
        res.digest = manifest.descriptor.digest
        if self.opt.platforms:
            head = dst.head_manifest(dst_repo, dst_ref)
            present = head is not None and head.digest == res.digest
        else:  # the target's answer from above (a source HEAD without a digest ends up here)
            present = dst_head is not None and dst_head.digest == res.digest
        if present:
            res.status = "skipped"
            if self.opt.referrers is not None:
                self._referrers_of_present(src, src_repo, dst, dst_repo, head if self.opt.platforms else dst_head,
                                           res, rebuilt=manifest.descriptor.digest != res.source_digest)
            return
        fresh = self._is_new(dst, dst_repo)
        graph = walk(src, src_repo, manifest, prune=lambda child: self._has_manifest(dst, dst_repo, child, fresh))
        if self.opt.referrers is not None:
            walk_referrers(src, src_repo, graph, self.opt.referrers,
                           subjects=referrer_subjects(graph, rebuilt=manifest.descriptor.digest != res.source_digest),
                           present=self._referrer_check(dst, dst_repo, fresh))
        if self.opt.dry_run:
            res.status = "would-copy"
            res.bytes = self._bytes_to_move(dst, dst_repo, graph, fresh)
            res.referrers = _edges(graph, "would-copy")
            return
        res.bytes = self._put(src, src_repo, dst, dst_repo, graph, dst_ref, fresh)
        res.referrers = _edges(graph, "copied")
        res.status = "copied"

    # -- referrers ---------------------------------------------------------------------------
    def _referrer_check(self, dst, repo: str, fresh: bool):
        """present(subject, descriptor, tag) for the walk: is that referrer findable at the destination
        (its referrers answer, or its tag)?  Asked once per subject, and only for subjects that have some."""
        find = getattr(dst, "referrers", None)
        cache: dict[str, set[str]] = {}

        def present(subject: str, desc: Descriptor, tag: str | None) -> bool:
            if (id(dst), repo, desc.digest) in self._complete:
                return True
            if fresh:
                return False
            if tag is not None:
                head = dst.head_manifest(repo, tag)
                return head is not None and head.digest == desc.digest
            if find is None:
                return dst.head_manifest(repo, desc.digest) is not None
            if subject not in cache:
                cache[subject] = {d.digest for d in find(repo, subject)}
            return desc.digest in cache[subject]
        return present

    def _referrers_of_present(self, src, src_repo: str, dst, dst_repo: str, head: Descriptor | None,
                              res: ImageResult, *, rebuilt: bool = False) -> None:
        """An image in place at the destination: carry the referrers it lacks (new signatures of an old
        image).  Its manifests are read from the destination (a source GET may count as a pull)."""
        if head is None or not res.digest or getattr(src, "referrers", None) is None:
            return
        root = Descriptor(head.media_type, res.digest, head.size)
        graph = Graph(root, Manifest(head.media_type, b""))
        present = self._referrer_check(dst, dst_repo, False)
        if not rebuilt:
            walk_referrers(src, src_repo, graph, self.opt.referrers, subjects=[res.digest], present=present)
        possible = getattr(src, "referrers_possible", None)
        if (head.media_type in INDEX_TYPES or not head.media_type) and (possible is None or possible(src_repo)):
            desc, raw = dst.get_manifest(dst_repo, res.digest)
            children = walk(dst, dst_repo, parse_manifest(desc.media_type or head.media_type or None, raw),
                            root_digest=res.digest, prune=lambda child: True)
            graph.pruned = children.pruned
            walk_referrers(src, src_repo, graph, self.opt.referrers, subjects=children.pruned, present=present)
        todo = [e for e in graph.referrers if not e.present]
        if todo and not self.opt.dry_run:
            res.bytes += self._copy_blobs(src, src_repo, dst, dst_repo, list(graph.blobs.values()), False)
            self._put_referrers(dst, dst_repo, graph)
        res.referrers = _edges(graph, "would-copy" if self.opt.dry_run else "copied")
        if self.opt.dry_run:
            res.bytes += self._bytes_to_move(dst, dst_repo, graph, False)

    def _put_referrers(self, dst, repo: str, g: Graph) -> None:
        """Each referrer not at the destination, after its subject: its child manifests, then itself (by
        digest; cosign's legacy form by its tag)."""
        for e in g.referrers:
            if e.graph is None:
                continue
            for desc, m in e.graph.children:
                self.cancel.check()
                dst.put_manifest(repo, desc.digest, m.media_type, m.raw)
            self.cancel.check()
            dst.put_manifest(repo, e.tag or e.descriptor.digest, e.graph.manifest.media_type, e.graph.manifest.raw)
            self._complete.add((id(dst), repo, e.descriptor.digest))

    def _is_new(self, ep, repo: str) -> bool:
        """Was the target repository unknown when this run first looked (asked once per repository)?
        Then its blobs and child manifests are uploaded without asking for each first: a cold copy
        saves a request per blob.  Blobs this run already put there are known from the claims."""
        key = (id(ep), repo)
        with self._fresh_lock:
            if key in self._fresh:
                return self._fresh[key]
        fresh = ep.repository_is_new(repo)
        with self._fresh_lock:
            return self._fresh.setdefault(key, fresh)

    def _has_manifest(self, dst, repo: str, desc: Descriptor, fresh: bool) -> bool:
        """Is this child manifest complete in dst's repo (so the walk need not descend)?"""
        key = (id(dst), repo, desc.digest)
        if key in self._complete:
            return True
        if fresh or dst.head_manifest(repo, desc.digest) is None:
            return False
        self._complete.add(key)
        return True

    def _bytes_to_move(self, dst, repo: str, g: Graph, fresh: bool) -> int:
        """A dry run: the bytes a real run would send for this image: each blob once in the whole run,
        none the target holds (or that another image of the run would mount)."""
        total = 0
        for d, b in g.blobs.items():
            if d in self.opt.assume_present or not self._claims.first(dst, d):
                continue
            if not fresh and dst.has_blob(repo, b):
                continue
            total += b.size
        return total

    # -- writing -----------------------------------------------------------------------------
    def _put(self, src, src_repo: str, dst, dst_repo: str, g: Graph, dst_ref: str, fresh: bool) -> int:
        """Blobs, then child manifests (by digest, children before parents), then the root under `dst_ref`."""
        copied = self._copy_blobs(src, src_repo, dst, dst_repo, list(g.blobs.values()), fresh)
        for desc, m in g.children:
            self.cancel.check()
            dst.put_manifest(dst_repo, desc.digest, m.media_type, m.raw)
            self._complete.add((id(dst), dst_repo, desc.digest))
        if any(not e.present for e in g.referrers):
            if any(e.subject == g.root.digest for e in g.referrers) and dst_ref != g.root.digest:
                self.cancel.check()  # the root by digest first: its referrers go before its tag
                dst.put_manifest(dst_repo, g.root.digest, g.manifest.media_type, g.manifest.raw)
            self._put_referrers(dst, dst_repo, g)
        self.cancel.check()
        dst.put_manifest(dst_repo, dst_ref, g.manifest.media_type, g.manifest.raw)
        return copied

    def _copy_blobs(self, src, src_repo: str, dst, dst_repo: str, blobs: list[Descriptor], fresh: bool) -> int:
        pool = self._blob_pool
        if pool is None or len(blobs) <= 1:
            return sum(self._ensure_blob(src, src_repo, dst, dst_repo, b, fresh) for b in blobs)
        futures = [pool.submit(self._ensure_blob, src, src_repo, dst, dst_repo, b, fresh) for b in blobs]
        total, first_error = 0, None
        for f in futures:  # wait for all, so no upload of this image is left running behind a failure
            try:
                total += f.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below (a cancelled future too)
                first_error = first_error or exc
        if first_error:
            if self.cancel.is_set() and not isinstance(first_error, MirrorError):
                self.cancel.check()
            raise first_error
        return total

    def _ensure_blob(self, src, src_repo: str, dst, dst_repo: str, desc: Descriptor, fresh: bool) -> int:
        """Make `desc` present in dst_repo: skip, mount, or stream.  Returns bytes transferred."""
        if desc.digest in self.opt.assume_present:
            return 0
        self.cancel.check()
        state, owner = self._claims.claim(dst, desc.digest)
        if not owner:
            while not state.done.wait(0.5):
                self.cancel.check()
            if dst_repo in state.repos:
                return 0
            # Mount from one repository only, so a token covers (this repo, origin) pairs, not every pair.
            if dst.reuse_blob(dst_repo, desc, fresh=fresh, mount_from=state.origin):
                state.repos.add(dst_repo)
                return 0
            return self._transfer(src, src_repo, dst, dst_repo, desc)
        try:
            n = 0 if dst.reuse_blob(dst_repo, desc, fresh=fresh, mount_from=None) else \
                self._transfer(src, src_repo, dst, dst_repo, desc)
            state.repos.add(dst_repo)
            state.origin = dst_repo
            return n
        finally:
            # the blob's own Event (a Condition, a lock, a deque: ~1.8 KB, kept for the whole run by its state)
            # is let go once set: waiters re-read `state.done` and see the shared set one
            done, state.done = state.done, _DONE
            done.set()

    def _transfer(self, src, src_repo: str, dst, dst_repo: str, desc: Descriptor) -> int:
        what = blob_subject(src, src_repo, desc)

        def once() -> int:
            with src.open_blob(src_repo, desc) as chunks:
                dst.push_blob(dst_repo, desc, checked(chunks, desc, what, on_bytes=self.progress.bytes_copied,
                                                      cancel=self.cancel))
            return desc.size
        return self.opt.retry.call(once, self.cancel)
