"""A run killed with SIGKILL mid-copy never leaves a tag pointing at missing content, and a rerun
completes; concurrent runs into one target don't corrupt it; memory stays flat on a big blob."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rke2_mirror_testkit.faultproxy import Fault, start_fault_proxy
from rke2_mirror_testkit.images import ImagePusher, make_layer_blob, push_image

from .test_mirror import assert_complete, write_list

KILLS = 6  # one per pair of images: each kill run has blobs of its own left to upload (4 images left for the final run)
MIN_UPLOADS = 1  # a kill lands after at least this many blob uploads of its run ...
MAX_UPLOADS = 4  # ... and at most this many (each image has 4 blobs of its own: the first tag can't be near)
HOLD = 1.5  # seconds the target's answer to each final blob PUT is held back (the blob is committed)
POLL_BOUND = 30.0
BLOB_UPLOAD = re.compile(r'"PUT \S*/blobs/uploads/\S*[?&]digest=\S* HTTP/1\.1" 201 ')
TAG_PUT = re.compile(r'"PUT /v2/\S+/manifests/(?!sha256:)[^\s/]+ HTTP/1\.1"')


def catalog(url: str) -> dict[str, list[str]]:
    out = {}
    with httpx.Client(base_url=url) as c:
        repos = c.get("/v2/_catalog", params={"n": 1000}).json().get("repositories") or []
        for r in repos:
            out[r] = c.get(f"/v2/{r}/tags/list").json().get("tags") or []
    return out


@pytest.fixture
def many_images(registry_factory):
    src = registry_factory(name="src")
    base = make_layer_blob("crash-base", 400_000)
    images = {}

    def one(i: int):
        with ImagePusher(src.url) as p:
            return push_image(p, f"rancher/img{i}", "v1", seed=f"crash{i}", base=base,
                              layer_sizes=(150_000 + 10_000 * i,), kind="oci" if i % 2 else "docker")

    with ThreadPoolExecutor(4) as pool:
        for i, img in enumerate(pool.map(one, range(16))):
            images[f"docker.io/rancher/img{i}:v1"] = img
    return src, images


def _mirror_cmd(lst, dst, src, jobs: int = 4):
    return [sys.executable, "-m", "rke2_mirror", "mirror", "--images", str(lst), "--to", dst.url,
            "--source-endpoint", f"docker.io={src.url}", "--jobs", str(jobs)]


def _uploads_and_tags(lines: list[str]) -> tuple[int, list[str]]:
    return sum(1 for l in lines if BLOB_UPLOAD.search(l)), [l for l in lines if TAG_PUT.search(l)]


def test_sigkill_mid_copy_never_leaves_a_dangling_tag(many_images, registry_factory, tmp_path):
    """Each run copies two images it has to itself.  Even runs are killed at a random point after they
    uploaded between MIN_UPLOADS and MAX_UPLOADS blobs and before they wrote their first tag; odd runs
    right after their first tag landed (one image at a time), while the other image's uploads are still held (so a tag written
    before its content was committed would be caught: every tag present is checked complete).  Both read
    from the target's access log (polled, bounded) and asserted.  The window is wide by construction: a proxy in
    front of the target holds back the answer to every final blob PUT for HOLD seconds (the registry
    has committed and logged the blob), and an image's manifests and tag only go up once all of its own
    4+ blob uploads were answered.  Then every tag in the target must resolve to complete content, and a
    final run of all images completes."""
    src, images = many_images
    dst = registry_factory(name="dst")
    hold = start_fault_proxy(dst.url, [Fault("stall", method="PUT", target="upload", always=True, transient=False,
                                             seconds=HOLD, name="hold")])
    refs = list(images)
    rng = random.Random(20261128)
    checked = 0
    killed_after: list[tuple[int, int, float]] = []  # (blob uploads seen, tags written, seconds after start)
    try:
        for k in range(KILLS):
            lst = write_list(tmp_path / f"images-{k}.txt", refs[2 * k:2 * k + 2])
            start = len(dst.access_log())
            want = rng.randint(MIN_UPLOADS, MAX_UPLOADS)
            after_tag = k % 2 == 1
            t0 = time.monotonic()
            # a kill after the first tag: one image at a time, so the other one's uploads are surely still held
            # (two at once can both finish inside one wave of held answers, once shared blobs are in place)
            proc = subprocess.Popen(_mirror_cmd(lst, hold, src, jobs=1 if after_tag else 4), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + POLL_BOUND
                while True:
                    uploads, tags = _uploads_and_tags(dst.access_log()[start:])
                    if (tags if after_tag else uploads >= want or tags) or proc.poll() is not None \
                            or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                if not after_tag:
                    time.sleep(rng.uniform(0, HOLD / 3))  # a random point inside the window
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            assert proc.returncode == -signal.SIGKILL, f"run {k} ended by itself ({proc.returncode}):\n{stderr[-2000:]}"
            time.sleep(0.2)  # the registry logs a request when it is done with it
            _, after_tags = _uploads_and_tags(dst.access_log()[start:])
            if after_tag:
                assert tags, f"run {k}: no tag within {POLL_BOUND}s"
                assert len(after_tags) < 2, f"run {k} finished both images before the kill: nothing left half-done"
            else:
                assert uploads >= want, f"run {k}: only {uploads} blob uploads within {POLL_BOUND}s (wanted {want})"
                assert not tags and not after_tags, f"run {k} wrote a tag before it was killed: {(tags + after_tags)[:3]}"
            killed_after.append((uploads, len(after_tags), round(time.monotonic() - t0, 1)))
            for repo, tags_ in catalog(dst.url).items():
                for tag in tags_:
                    assert_complete(dst.url, repo, tag)  # every tag resolves to complete content
                    checked += 1
        assert hold.total("hold") > 0
        assert checked >= KILLS // 2  # the after-the-first-tag kills left tags to check
    finally:
        hold.stop()
    final = subprocess.run(_mirror_cmd(write_list(tmp_path / "images.txt", refs), dst, src), capture_output=True,
                           text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    for ref, img in images.items():
        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert assert_complete(dst.url, repo, "v1") == img.digest
    print(f"{KILLS} runs killed mid-copy after (blob uploads, tags, seconds) {killed_after}, {checked} tags checked complete, "
          f"{len(images)} images verified after rerun")


def test_concurrent_runs_into_one_target(many_images, registry_factory, tmp_path):
    src, images = many_images
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", list(images))
    procs = [subprocess.Popen(_mirror_cmd(lst, dst, src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr + "\n" + "\n".join(l for l in dst.log_tail(400).splitlines() if "level=error" in l)[-3000:]
    for ref, img in images.items():
        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert assert_complete(dst.url, repo, "v1") == img.digest


def _push_raw_blob_image(url: str, repo: str, size: int, seed: int) -> str:
    """An image whose one layer is `size` pseudo-random bytes, streamed (never in memory at once)."""
    import hashlib
    import json

    def chunks():
        r = random.Random(seed)
        left = size
        while left:
            n = min(left, 4 << 20)
            left -= n
            yield r.randbytes(n)

    h = hashlib.sha256()
    for c in chunks():
        h.update(c)
    digest = "sha256:" + h.hexdigest()
    with httpx.Client(base_url=url, timeout=120) as c:
        loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
        loc = str(httpx.URL(url).join(loc).copy_merge_params({"digest": digest}))
        r = c.put(loc, content=chunks(), headers={"Content-Length": str(size)})
        assert r.status_code == 201, r.text
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        cdig = "sha256:" + hashlib.sha256(cfg).hexdigest()
        loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
        c.put(str(httpx.URL(url).join(loc).copy_merge_params({"digest": cdig})), content=cfg)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig,
                                          "size": len(cfg)},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                           "digest": digest, "size": size}]}).encode()
        r = c.put(f"/v2/{repo}/manifests/v1", content=manifest,
                  headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 201, r.text
    return digest


def test_memory_does_not_grow_with_blob_size(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    size = 256 * 1024 * 1024
    _push_raw_blob_image(src.url, "rancher/huge", size, 7)
    lst = write_list(tmp_path / "images.txt", ["rancher/huge:v1"])
    # Measure the mirror process alone: a wrapper runs it and reports its children's peak RSS.
    wrapper = ("import resource, subprocess, sys;"
               "r = subprocess.run(sys.argv[1:]);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
               "sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *_mirror_cmd(lst, dst, src)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB while copying a {size >> 20} MB blob"
