"""Image graphs that repeat, nest or explode, against real docker-registry processes and hand-built
OCI archives, through the real command line (subprocesses, so a walk that runs away is cut off by a
timeout instead of hanging the suite).

The engine's one walk (rke2_mirror/engine/walk.py) visits each distinct descriptor once, refuses
indexes nested more than MAX_DEPTH (8) deep and graphs of more than MAX_DESCRIPTORS distinct manifests
and blobs.  Work and requests must grow with the distinct content, never with the repetition: each test
counts what the source registry was asked (its access log) or bounds the time.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rke2_mirror_testkit.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    ImagePusher,
    blob_exists,
    list_tags,
    make_layer_blob,
    push_blob,
    push_image,
    push_manifest,
    read_manifest,
    sha256_digest,
)

from .test_mirror import write_list

FANOUT = 50
LEVELS = 4  # root index at level 4: 50**4 = 6.25 million paths to a manifest, 6 distinct manifests
MAX_DEPTH = 8
RUN_TIMEOUT = 60  # a subprocess that walks naively is cut off here (the test then fails, it doesn't hang)


def run(*args: str, timeout: float = RUN_TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`rke2-mirror {' '.join(args[:2])} …` still running after {timeout}s (a walk that "
                    f"follows every repetition?); stderr so far:\n{(exc.stderr or b'')[-2000:]!r}")
    return proc, time.monotonic() - t0


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=2).encode()


# --------------------------------------------------------------------------- graphs, built by hand


@dataclass
class Graph:
    """An image as bytes: blobs (configs + layers) and manifests by digest, and the root."""

    blobs: dict[str, Blob] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # digest -> (media type, bytes)
    order: list[str] = field(default_factory=list)  # manifests, children before parents
    root: str = ""

    def add_manifest(self, media_type: str, doc: dict) -> dict:
        raw = dumps(doc)
        d = sha256_digest(raw)
        if d not in self.manifests:
            self.manifests[d] = (media_type, raw)
            self.order.append(d)
        return {"mediaType": media_type, "digest": d, "size": len(raw)}

    @property
    def root_descriptor(self) -> dict:
        mt, raw = self.manifests[self.root]
        return {"mediaType": mt, "digest": self.root, "size": len(raw)}

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs.values())

    def push(self, url: str, repo: str, tag: str) -> None:
        with ImagePusher(url) as p:
            for b in self.blobs.values():
                push_blob(p, repo, b)
            for d in self.order:
                mt, raw = self.manifests[d]
                push_manifest(p, repo, tag if d == self.root else d, raw, mt)


def single_manifest(g: Graph, arch: str, seed: str, *, layers: list[Blob] | None = None,
                    annotations: dict | None = None) -> dict:
    layers = layers if layers is not None else [make_layer_blob(f"{seed}/{arch}", 3000)]
    config = Blob.of(dumps({"architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
                            "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
                            "config": {"Env": [f"SEED={seed}"]}}), OCI_CONFIG)
    for b in [config, *layers]:
        g.blobs[b.digest] = b
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(OCI_CONFIG),
           "layers": [l.descriptor(OCI_LAYER) for l in layers]}
    if annotations:
        doc["annotations"] = annotations
    return {**g.add_manifest(OCI_MANIFEST, doc), "platform": {"architecture": arch, "os": "linux"}}


def index(g: Graph, entries: list[dict]) -> dict:
    return g.add_manifest(OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def repeating_graph(seed: str = "repeat", levels: int = LEVELS, fanout: int = FANOUT) -> Graph:
    """linux/amd64 + linux/arm64 manifests; level 1: an index listing the two `fanout/2` times each;
    level k: an index listing level k-1 `fanout` times.  Distinct: 2 + `levels` manifests."""
    g = Graph()
    amd, arm = single_manifest(g, "amd64", seed), single_manifest(g, "arm64", seed)
    level = index(g, [amd, arm] * (fanout // 2))
    for _ in range(levels - 1):
        level = index(g, [level] * fanout)
    g.root = level["digest"]
    return g


def nested_graph(depth: int, seed: str) -> Graph:
    """`depth` indexes nested one in another (the root is the outermost), a manifest at the bottom."""
    g = Graph()
    level = single_manifest(g, "amd64", seed)
    for _ in range(depth):
        level = index(g, [level])
    g.root = level["digest"]
    return g


def write_oci_archive(path: Path, graphs: list[Graph], names: list[tuple[str, Graph]]) -> Path:
    """An OCI image layout in a tar, by hand: oci-layout, index.json naming `names`, blobs/sha256/…"""
    blobs: dict[str, bytes] = {}
    for g in graphs:
        blobs.update({d: b.data for d, b in g.blobs.items()})
        blobs.update({d: raw for d, (_, raw) in g.manifests.items()})
    idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**g.root_descriptor, "annotations": {"io.containerd.image.name": name,
                                              "org.opencontainers.image.ref.name": name}}
        for name, g in names]}

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 1704067200, 0o644
        tf.addfile(ti, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tf, "index.json", dumps(idx))
        for d in sorted(blobs):
            add(tf, "blobs/sha256/" + d.split(":", 1)[1], blobs[d])
    return path


# --------------------------------------------------------------------------- checks at a registry


def assert_complete_once(url: str, repo: str, tag: str) -> tuple[str, int]:
    """The tag resolves and every manifest and blob under it is there, each distinct one asked for once
    (test_mirror.assert_complete follows every repetition: 50**4 requests here).  Returns (digest,
    distinct manifests)."""
    from rke2_mirror.model.oci import parse_manifest

    mt, raw, top = read_manifest(url, repo, tag)
    todo, seen, blobs = [(mt, raw)], {top}, set()
    with ImagePusher(url) as p:
        while todo:
            m = parse_manifest(*todo.pop())
            if m.is_index:
                for c in m.manifests:
                    if c.digest not in seen:
                        seen.add(c.digest)
                        cmt, craw, cd = read_manifest(p, repo, c.digest)
                        assert cd == c.digest
                        todo.append((cmt, craw))
            else:
                for b in m.blobs:
                    if b.digest not in blobs:
                        blobs.add(b.digest)
                        assert blob_exists(p, repo, b.digest), f"{repo}: blob {b.digest} missing"
    return top, len(seen)


def manifest_gets(log: list[str]) -> list[str]:
    return [l for l in log if '"GET ' in l and "/manifests/" in l]


def writes(log: list[str]) -> list[str]:
    return [l for l in log if re.search(r'"(PUT|POST|PATCH|DELETE) ', l)]


def summary_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if re.match(r"^\d+ images: ", l)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("rke2-mirror: error:")]


# --------------------------------------------------------------------------- repeating graphs


@pytest.fixture
def repeating_src(registry_factory, tmp_path):
    src = registry_factory(name="src")
    g = repeating_graph()
    g.push(src.url, "rancher/repeat", "v1")
    assert len(g.manifests) == 2 + LEVELS
    return src, g, write_list(tmp_path / "images.txt", ["docker.io/rancher/repeat:v1"])


def test_repeating_index_mirrors_in_seconds_asking_each_manifest_once(repeating_src, registry_factory):
    src, g, lst = repeating_src
    dst = registry_factory(name="dst")
    distinct = len(g.manifests)
    base = ("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}", "--json")

    before = len(src.access_log())
    dry, secs = run(*base, "--dry-run")
    no_traceback(dry)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert secs < 20, f"dry run took {secs:.1f}s"
    (img,) = json.loads(dry.stdout)["images"]
    assert img["status"] == "would-copy" and img["digest"] == g.root
    dry_gets = manifest_gets(src.access_log()[before:])
    assert 1 <= len(dry_gets) <= 2 * distinct, f"dry run: {len(dry_gets)} manifest GETs for {distinct} distinct manifests"
    assert writes(dst.access_log()) == []

    before = len(src.access_log())
    real, secs = run(*base)
    no_traceback(real)
    assert real.returncode == 0, real.stderr[-3000:]
    assert secs < 20, f"mirror took {secs:.1f}s"
    rep = json.loads(real.stdout)
    (img,) = rep["images"]
    assert img["status"] == "copied" and img["digest"] == g.root
    src_log = src.access_log()[before:]
    gets = manifest_gets(src_log)
    # each distinct manifest fetched once (the root by tag, the others by digest), never per repetition
    assert distinct <= len(gets) <= 2 * distinct, f"{len(gets)} manifest GETs for {distinct} distinct manifests:\n" + "\n".join(gets)
    blob_gets = [l for l in src_log if '"GET ' in l and "/blobs/" in l]
    assert len(blob_gets) <= 2 * len(g.blobs), blob_gets
    top, seen = assert_complete_once(dst.url, "rancher/repeat", "v1")
    assert top == g.root and seen == distinct
    # the manifests went up once each too
    dst_puts = [l for l in dst.access_log() if '"PUT ' in l and "/manifests/" in l]
    assert len(dst_puts) <= 2 * distinct, dst_puts
    assert dry.stdout and json.loads(dry.stdout)["summary"]["bytes"] == rep["summary"]["bytes"]


def test_repeating_index_save_inspect_load(repeating_src, registry_factory, tmp_path):
    src, g, lst = repeating_src
    out = tmp_path / "repeat.tar"
    before = len(src.access_log())
    proc, secs = run("save", "--images", str(lst), "--output", str(out), "--source-endpoint", f"docker.io={src.url}")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secs < 20, f"save took {secs:.1f}s"
    gets = manifest_gets(src.access_log()[before:])
    assert len(gets) <= 2 * len(g.manifests), f"save: {len(gets)} manifest GETs for {len(g.manifests)} distinct"
    with tarfile.open(out) as tf:
        names = [n for n in tf.getnames() if n.startswith("blobs/sha256/")]
    assert len(names) == len(set(names)) == len(g.manifests) + len(g.blobs)

    proc, secs = run("inspect", str(out), "--json")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secs < 10, f"inspect took {secs:.1f}s"
    (img,) = json.loads(proc.stdout)["images"]
    assert img["digest"] == g.root

    fresh = registry_factory(name="fresh")
    proc, secs = run("load", str(out), "--to", fresh.url, "--json")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secs < 20, f"load took {secs:.1f}s"
    top, seen = assert_complete_once(fresh.url, "rancher/repeat", "v1")
    assert top == g.root and seen == len(g.manifests)
    puts = [l for l in fresh.access_log() if '"PUT ' in l and "/manifests/" in l]
    assert len(puts) <= 2 * len(g.manifests), puts


def test_one_root_named_2000_times_in_an_archive_is_walked_once(tmp_path):
    """2,000 names for one root whose graph holds 400+ distinct manifests under repetition: walking it
    once per name would read ~800,000 manifests; once per root, ~400."""
    g = Graph()
    shared = make_layer_blob("many/shared", 2000)
    leaves = [single_manifest(g, "amd64", "many", layers=[shared], annotations={"n": str(i)}) for i in range(400)]
    l1 = [index(g, leaves[i:i + 50] * 2) for i in range(0, 400, 50)]  # 8 distinct, each entry twice
    l2 = index(g, l1 * 6)
    g.root = index(g, [l2] * FANOUT)["digest"]
    assert len(g.manifests) == 400 + 8 + 2
    names = [(f"docker.io/rancher/many{i}:v1", g) for i in range(2000)]
    out = write_oci_archive(tmp_path / "many.tar", [g], names)

    proc, secs = run("inspect", str(out), "--json", timeout=60)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert len(doc["images"]) == 2000
    assert {im["digest"] for im in doc["images"]} == {g.root}
    assert not doc["problems"], doc["problems"][:5]
    assert secs < 10, f"inspect of 2,000 names of one root took {secs:.1f}s: walked once per name?"


# --------------------------------------------------------------------------- nesting


def test_index_nested_nine_deep_fails_its_image_alone(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    deep = nested_graph(MAX_DEPTH + 1, "deep")
    deep.push(src.url, "rancher/deep", "v1")
    ok8 = nested_graph(MAX_DEPTH, "eight")  # as deep as allowed
    ok8.push(src.url, "rancher/eight", "v1")
    with ImagePusher(src.url) as p:
        plain = push_image(p, "rancher/plain", "v1", seed="plain")
    lst = write_list(tmp_path / "images.txt", ["docker.io/rancher/plain:v1", "docker.io/rancher/deep:v1",
                                               "docker.io/rancher/eight:v1"])
    proc, _ = run("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                  "--json")
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]
    by_src = {i["source"]: i for i in json.loads(proc.stdout)["images"]}
    bad = by_src["docker.io/rancher/deep:v1"]
    assert bad["status"] == "failed" and f"nested more than {MAX_DEPTH} deep" in bad["error"], bad
    lines = [l for l in proc.stderr.splitlines() if "nested" in l]
    assert len(lines) == 1 and "rancher/deep" in lines[0], proc.stderr[-3000:]
    assert by_src["docker.io/rancher/plain:v1"]["status"] == "copied"
    assert by_src["docker.io/rancher/eight:v1"]["status"] == "copied", by_src["docker.io/rancher/eight:v1"]
    assert assert_complete_once(dst.url, "rancher/plain", "v1")[0] == plain.digest
    assert assert_complete_once(dst.url, "rancher/eight", "v1")[0] == ok8.root
    assert list_tags(dst.url, "rancher/deep") == []


def test_archive_with_an_index_nested_nine_deep_is_refused(registry_factory, tmp_path):
    deep = nested_graph(MAX_DEPTH + 1, "deep")
    plain = nested_graph(1, "plain")
    out = write_oci_archive(tmp_path / "deep.tar", [deep, plain],
                            [("docker.io/rancher/plain:v1", plain), ("docker.io/rancher/deep:v1", deep)])
    dst = registry_factory(name="dst")
    for args in (("inspect", str(out)), ("load", str(out), "--to", dst.url)):
        proc, _ = run(*args)
        no_traceback(proc)
        assert proc.returncode == 2, (args[0], proc.returncode, proc.stderr[-3000:])
        (line,) = error_lines(proc.stderr)
        assert f"nested more than {MAX_DEPTH} deep" in line, line
        assert len([l for l in proc.stderr.splitlines() if l.strip()]) <= 2, proc.stderr  # one line (+ a note)
    assert writes(dst.access_log()) == [], writes(dst.access_log())
    assert list_tags(dst.url, "rancher/plain") == []


# --------------------------------------------------------------------------- dry-run bytes


def test_dry_run_bytes_equal_the_real_run(registry_factory, tmp_path):
    """Two images sharing a big base layer (one of them an index: the base twice), one whose layer list
    repeats a blob; one of its layers already at the target.  Dry run == real run, then 0."""
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    base = make_layer_blob("dry/base", 1_500_000)
    with ImagePusher(src.url) as p:
        a = push_image(p, "rancher/a", "v1", platforms=None, base=base, seed="dry-a", layer_sizes=(20_000,))
        b = push_image(p, "rancher/b", "v1", kind="oci", base=base, seed="dry-b", layer_sizes=(30_000,))
    rep_layer = make_layer_blob("dry/c-twice", 50_000)
    present = make_layer_blob("dry/c-present", 70_000)
    c = Graph()
    c.root = single_manifest(c, "amd64", "dry-c", layers=[rep_layer, rep_layer, present])["digest"]
    c.push(src.url, "rancher/c", "v1")
    old = Graph()  # rancher/c:old at the target already holds `present`
    old.root = single_manifest(old, "amd64", "dry-c-old", layers=[present])["digest"]
    old.push(dst.url, "rancher/c", "old")

    sizes = {bd: size_of(src.url, "rancher/a", bd) for bd in a.blobs}
    sizes.update({bd: size_of(src.url, "rancher/b", bd) for bd in b.blobs})
    sizes.update({bd: bl.size for bd, bl in c.blobs.items() if bd != present.digest})
    assert base.digest in sizes and len(c.blobs) == 3  # config, the repeated layer, the present one
    expected = sum(sizes.values())  # every distinct blob once, the present one not at all
    lst = write_list(tmp_path / "images.txt", ["docker.io/rancher/a:v1", "docker.io/rancher/b:v1",
                                               "docker.io/rancher/c:v1"])
    args = ("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}", "--json")

    dst_before = len(dst.access_log())
    dry, _ = run(*args, "--dry-run")
    no_traceback(dry)
    assert dry.returncode == 0, dry.stderr[-3000:]
    d = json.loads(dry.stdout)
    assert [i["status"] for i in d["images"]] == ["would-copy"] * 3, d["images"]
    dry_line = summary_line(dry.stderr)
    assert writes(dst.access_log()[dst_before:]) == []  # a dry run writes nothing

    real, _ = run(*args)
    no_traceback(real)
    assert real.returncode == 0, real.stderr[-3000:]
    r = json.loads(real.stdout)
    assert r["summary"]["copied"] == 3
    assert d["summary"]["bytes"] == r["summary"]["bytes"], (
        f"dry run said {d['summary']['bytes']} bytes, the copy moved {r['summary']['bytes']}; per image: "
        f"dry {[i['bytes'] for i in d['images']]}, real {[i['bytes'] for i in r['images']]}")
    assert r["summary"]["bytes"] == expected, (r["summary"]["bytes"], expected)
    # the target's log agrees: the present blob was not sent, the base once, the repeated blob once
    log = dst.access_log()
    for blob, times in ((present.digest, 0), (base.digest, 1), (rep_layer.digest, 1)):
        sent = [l for l in log if '"PUT ' in l and "digest=" + blob.replace(":", "%3A") in l]
        assert len(sent) == times, (blob, sent)

    again, _ = run(*args, "--dry-run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["summary"]["bytes"] == 0
    again_line = summary_line(again.stderr)

    # the dry run's summary line says how many would be copied, once, without contradicting itself
    assert dry_line.startswith("3 images: 3 would copy, 0 already present, 0 failed"), dry_line
    assert dry_line.count("would copy") == 1, f"the summary line contradicts itself: {dry_line!r}"
    assert again_line.startswith("3 images: 0 would copy, 3 already present, 0 failed"), again_line
    assert again_line.count("would copy") == 1, f"the summary line contradicts itself: {again_line!r}"


def size_of(url: str, repo: str, digest: str) -> int:
    import httpx

    r = httpx.head(f"{url}/v2/{repo}/blobs/{digest}", follow_redirects=True)
    assert r.status_code == 200, (repo, digest, r.status_code)
    return int(r.headers["Content-Length"])
