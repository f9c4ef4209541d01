"""SIGINT and SIGTERM with real processes: `mirror`, `save` and `load` stop cleanly.

What is expected: no new image or blob starts after the signal; requests in flight are abandoned within
a few seconds; the summary line (stderr, "interrupted"), the `--json` report (unfinished images have
status "interrupted", the summary an "interrupted" count) and the `--failed-list` file (the unfinished
images) are still written; exit status 130 for SIGINT, 143 for SIGTERM; temporary files and directories
are removed, a `save` leaves no archive under its final name; a rerun completes.

How the copy is made slow enough to interrupt deterministically: a fault proxy (testkit) sits in front of
the source (or the target) and stalls every blob of the "slow" images for a minute: the "fast" images
are copied, the slow ones hang in flight.  The signal is sent only once the target shows the fast images
done and the proxy shows a slow blob under way (bounded polling), so it always lands mid-copy; a
process that still waits for its stalled requests cannot exit within the few seconds asserted.  Both
proxies record when each request arrived, so "nothing new started after the signal" is checked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from rke2_mirror_testkit.faultproxy import Fault, FaultProxy, start_fault_proxy
from rke2_mirror_testkit.images import ImagePusher, list_tags, push_image, read_manifest

from .test_mirror import assert_complete, write_list

FAST = [f"docker.io/rancher/fast{i}:v1" for i in range(4)]
SLOW = [f"docker.io/rancher/slow{i}:v1" for i in range(8)]
STALL = 60.0  # seconds a stalled request hangs: far longer than the exit we wait for
EXIT_WITHIN = 6.0  # seconds from the signal to the exit (~5 s asked; some slack for a loaded machine)
MARGIN = 1.0  # a request that reached a proxy this long after the signal was started after it
POLL_BOUND = 30.0
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def repo_of(ref: str) -> str:
    return ref.split("/", 1)[1].rsplit(":", 1)[0]


# --------------------------------------------------------------------------- plumbing


class Timed:
    """A fault proxy that also records when each request arrived (monotonic time, method, path)."""

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        self.times: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        orig = proxy.decide

        def decide(method, raw_path, headers):
            with self._lock:
                self.times.append((time.monotonic(), method, raw_path))
            return orig(method, raw_path, headers)

        proxy.decide = decide  # the handler calls it through the instance

    @property
    def url(self) -> str:
        return self.proxy.url

    def after(self, t: float, pattern: str = r"/v2/.+/(blobs|manifests)/") -> list[str]:
        with self._lock:
            return [f"{m} {p}" for ts, m, p in self.times if ts > t and re.search(pattern, p)]

    def seen(self, method: str | None = None, match: str | None = None) -> int:
        return self.proxy.seen(method=method, match=match)


@dataclass
class Run:
    proc: subprocess.Popen
    out: Path
    err: Path
    signalled_at: float | None = None
    exited_after: float | None = None
    snapshots: dict = field(default_factory=dict)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")


def start(tmp_path: Path, name: str, *args: str) -> Run:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "rke2_mirror", *args], stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL, env={**os.environ})
    return Run(proc, out, err)


def wait_for(run: Run, what: str, cond: Callable[[], bool], bound: float = POLL_BOUND) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if cond():
            return
        if run.proc.poll() is not None:
            pytest.fail(f"the process exited ({run.proc.returncode}) before {what}:\n{run.stderr()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {bound}s:\n{run.stderr()[-3000:]}")


def interrupt(run: Run, sig: int) -> None:
    """Send `sig`, wait (bounded) for the exit; a process still running is killed and the test fails."""
    run.signalled_at = time.monotonic()
    run.proc.send_signal(sig)
    try:
        run.proc.wait(timeout=EXIT_WITHIN + 10)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait(10)
        pytest.fail(f"still running {EXIT_WITHIN + 10:.0f}s after {signal.Signals(sig).name} (requests in flight "
                    f"not abandoned?); stderr:\n{run.stderr()[-3000:]}")
    run.exited_after = time.monotonic() - run.signalled_at


def stop_if_running(run: Run | None) -> None:
    if run is not None and run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait(10)


def summary_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if re.match(r"^\d+ images: ", l)]
    assert lines, f"no summary line on stderr:\n{stderr[-3000:]}"
    return lines[-1]


def failed_list(path: Path) -> list[str]:
    assert path.is_file(), f"--failed-list {path} not written"
    return [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]


def check_interrupted_outputs(run: Run, sig: int, *, done: list[str], unfinished: list[str],
                              failed_path: Path) -> dict:
    """Exit status, time to exit, summary line, JSON report and failed list after an interrupt."""
    code = EXIT_CODES[sig]
    err = run.stderr()
    assert run.proc.returncode == code, (f"{signal.Signals(sig).name}: exit {run.proc.returncode}, "
                                         f"expected {code}\n{err[-3000:]}")
    assert run.exited_after is not None and run.exited_after < EXIT_WITHIN, (
        f"exited {run.exited_after:.1f}s after {signal.Signals(sig).name}, expected < {EXIT_WITHIN}s")
    assert "Traceback" not in err, err[-3000:]
    line = summary_line(err)
    assert "interrupted" in line, line
    doc = json.loads(run.stdout())
    status = {i["source"]: i["status"] for i in doc["images"]}
    wrong = {i["source"]: f"{i['status']}: {i.get('error')}" for i in doc["images"]
             if (i["source"] in unfinished and i["status"] != "interrupted")
             or (i["source"] in done and i["status"] != "copied")}
    assert not wrong, f"wrong status (expected the fast images copied, the rest interrupted): {wrong}"
    assert set(status) >= set(done) | set(unfinished), status
    assert doc["summary"].get("interrupted") == len(unfinished), doc["summary"]
    assert sorted(failed_list(failed_path)) == sorted(unfinished)
    return doc


def no_new_requests_after(run: Run, *proxies: Timed) -> None:
    assert run.signalled_at is not None
    for p in proxies:
        late = p.after(run.signalled_at + MARGIN)
        assert not late, (f"{len(late)} blob/manifest requests started more than {MARGIN}s after the signal "
                          f"(at {p.url}):\n" + "\n".join(late[:20]))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def slow_source(registry_factory, tmp_path):
    """4 fast and 8 slow single-platform images; the source behind a proxy that stalls every blob GET of
    the slow ones for a minute (after the headers, before a byte of the body)."""
    src = registry_factory(name="src")
    images = {}
    with ImagePusher(src.url) as p:
        for ref in FAST + SLOW:
            images[ref] = push_image(p, repo_of(ref), "v1", platforms=None, seed=ref, layer_sizes=(40_000,),
                                     kind="oci" if "slow" in ref else "docker")
    proxy = Timed(start_fault_proxy(src.url, stall_slow_blobs()))
    try:
        yield src, proxy, images, write_list(tmp_path / "images.txt", FAST + SLOW)
    finally:
        proxy.proxy.stop()


def stall_slow_blobs() -> list[Fault]:
    return [Fault("stall", method="GET", target="blob", match=r"^/v2/rancher/slow", always=True, transient=False,
                  seconds=STALL, after_bytes=0, name="stall-slow-blob")]


def tag_put(repo: str) -> str:
    return rf'"PUT /v2/{re.escape(repo)}/manifests/v1 HTTP/1\.1" 201'


def fast_done_and_slow_under_way(dst, src_proxy: Timed) -> bool:
    log = "\n".join(dst.access_log())
    return (all(re.search(tag_put(repo_of(r)), log) for r in FAST)
            and src_proxy.proxy.total("stall-slow-blob") >= 1)  # a slow blob is being held


# --------------------------------------------------------------------------- mirror


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_mirror_interrupted_mid_copy_reports_and_a_rerun_completes(sig, slow_source, registry_factory, tmp_path):
    src, src_proxy, images, lst = slow_source
    dst = registry_factory(name="dst")
    dst_proxy = Timed(start_fault_proxy(dst.url, []))  # pass-through: when each target request arrived
    failed = tmp_path / "failed.txt"
    run = None
    try:
        run = start(tmp_path, "mirror", "mirror", "--images", str(lst), "--to", dst_proxy.url, "--source-endpoint",
                    f"docker.io={src_proxy.url}", "--jobs", "4", "--json", "--failed-list", str(failed))
        wait_for(run, "fast images copied and a slow blob in flight", lambda: fast_done_and_slow_under_way(dst, src_proxy))
        uploads = [l for l in dst.access_log() if re.search(r'"PUT \S*/blobs/uploads/\S*digest=', l)]
        assert 0 < len(uploads) < 2 * len(images), len(uploads)  # under way: some blobs, not all
        assert src_proxy.proxy.injected["stall-slow-blob"] >= 1
        interrupt(run, sig)
    finally:
        stop_if_running(run)
        dst_proxy.proxy.stop()
    check_interrupted_outputs(run, sig, done=FAST, unfinished=SLOW, failed_path=failed)
    no_new_requests_after(run, src_proxy, dst_proxy)
    for ref in SLOW:
        assert list_tags(dst.url, repo_of(ref)) == []  # nothing half-copied is tagged

    src_proxy.proxy.set_plan([])  # the source is fast again: a rerun completes
    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", "mirror", "--images", str(lst), "--to", dst.url,
                           "--source-endpoint", f"docker.io={src_proxy.url}", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout)["summary"]
    assert rep["skipped"] == len(FAST) and rep["copied"] == len(SLOW), rep
    for ref, img in images.items():
        assert assert_complete(dst.url, repo_of(ref), "v1") == img.digest


# --------------------------------------------------------------------------- save


def test_save_interrupted_leaves_no_archive_and_a_rerun_completes(slow_source, registry_factory, tmp_path):
    src, src_proxy, images, lst = slow_source
    out = tmp_path / "images.tar"
    work = tmp_path / "images.tar.work"
    failed = tmp_path / "failed.txt"
    args = ("save", "--images", str(lst), "--output", str(out), "--source-endpoint", f"docker.io={src_proxy.url}",
            "--jobs", "4", "--json", "--failed-list", str(failed))

    def under_way() -> bool:
        try:
            names = {m["annotations"].get("io.containerd.image.name")
                     for m in json.loads((work / "index.json").read_text())["manifests"]}
        except (OSError, ValueError, KeyError):
            return False
        return set(FAST) <= names and src_proxy.proxy.total("stall-slow-blob") >= 1

    run = None
    try:
        run = start(tmp_path, "save", *args)
        wait_for(run, "fast images in the work dir and a slow blob in flight", under_way)
        blobs_then = {p.name for p in (work / "blobs" / "sha256").iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)}
        assert 0 < len(blobs_then) < 3 * len(images)
        interrupt(run, signal.SIGINT)
    finally:
        stop_if_running(run)
    check_interrupted_outputs(run, signal.SIGINT, done=FAST, unfinished=SLOW, failed_path=failed)
    no_new_requests_after(run, src_proxy)
    assert not out.exists(), "an interrupted save left an archive under the final name"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("images.tar") and p.name != "images.tar.work"]
    assert leftovers == [], leftovers  # no .partial, no parts
    assert work.is_dir(), "the work dir must be kept for the rerun"

    src_proxy.proxy.set_plan([])
    fast_blob_gets = src_proxy.seen("GET", r"^/v2/rancher/fast\d/blobs/")
    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    # resumed: what the first run fetched is not fetched again
    assert src_proxy.seen("GET", r"^/v2/rancher/fast\d/blobs/") == fast_blob_gets
    fresh = registry_factory(name="fresh")
    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", "load", str(out), "--to", fresh.url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ref, img in images.items():
        assert assert_complete(fresh.url, repo_of(ref), "v1") == img.digest


# --------------------------------------------------------------------------- load of a compressed docker archive


def test_load_of_a_gzip_docker_archive_interrupted_removes_its_spool_dir(registry_factory, tmp_path):
    from .test_dockerarchive import compress, layer_tar, make_image, write_docker_archive

    imgs = [make_image([f"rancher/dl{i}:v1"], [layer_tar(f"dl{i}/{j}", 150_000) for j in range(3)])
            for i in range(6)]
    plain = write_docker_archive(tmp_path / "images.tar", imgs)
    gz = compress(plain, "gzip")
    plain.unlink()
    dst = registry_factory(name="dst")
    # every upload's final PUT: committed at the registry, the answer held back for a minute
    proxy = Timed(start_fault_proxy(dst.url, [Fault("stall", method="PUT", target="upload", always=True,
                                                    transient=False, seconds=STALL, name="stall-put")]))
    spool_parent = tmp_path / "spool"
    spool_parent.mkdir()
    failed = tmp_path / "failed.txt"
    args = ("load", str(gz), "--to", proxy.url, "--tmp-dir", str(spool_parent), "--json", "--failed-list", str(failed))
    run = None
    try:
        run = start(tmp_path, "load", *args)
        wait_for(run, "a spool dir and an upload held in flight",
                 lambda: any(spool_parent.glob("rke2-mirror-load-*")) and proxy.proxy.total("stall-put") >= 1)
        interrupt(run, signal.SIGTERM)
    finally:
        stop_if_running(run)
        proxy.proxy.stop()
    err = run.stderr()
    assert run.proc.returncode == 143, f"exit {run.proc.returncode}\n{err[-3000:]}"
    assert run.exited_after < EXIT_WITHIN, f"exited {run.exited_after:.1f}s after SIGTERM"
    assert "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in spool_parent.iterdir()) == [], "the spool dir was left behind"
    assert "interrupted" in summary_line(err)
    doc = json.loads(run.stdout())
    unfinished = [i["source"] for i in doc["images"] if i["status"] == "interrupted"]
    assert unfinished and doc["summary"].get("interrupted") == len(unfinished), doc
    assert sorted(failed_list(failed)) == sorted(unfinished)
    assert all(i["status"] in ("copied", "interrupted") for i in doc["images"]), doc["images"]
    no_new_requests_after(run, proxy)

    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", "load", str(gz), "--to", dst.url,
                           "--tmp-dir", str(spool_parent)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(6):
        mt, raw, digest = read_manifest(dst.url, f"rancher/dl{i}", "v1")
        assert assert_complete(dst.url, f"rancher/dl{i}", "v1") == digest
    assert sorted(p.name for p in spool_parent.iterdir()) == []
