"""`load` / `inspect` of docker archives (docker save, rancher-save-images.sh, RKE2's image tarballs):
plain, gzip, zstd, bzip2 and lz4 (made with the real bzip2 and lz4 tools when installed), against real
docker-registry processes (and skopeo's docker-archive: writer)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import pytest
import zstandard
from typer.testing import CliRunner

import rke2_mirror.endpoints.compression as codecs
import rke2_mirror.endpoints.dockerarchive as da
from rke2_mirror.model.errors import ArchiveError
from rke2_mirror.releases.checksums import arch_of
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror_testkit.images import (DOCKER_LIST, DOCKER_MANIFEST, ImagePusher, list_tags, push_blob, push_image,
                                        push_manifest, read_blob, read_manifest, sha256_digest)
from rke2_mirror_testkit.release_server import start_release_server

SKOPEO = shutil.which("skopeo")
TOOLS = {"bzip2": shutil.which("bzip2"), "lz4": shutil.which("lz4")}  # scripts/setup.sh installs them
SUFFIX = {"gzip": ".gz", "zstd": ".zst", "bzip2": ".bz2", "lz4": ".lz4"}
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def cli(*args, env: dict | None = None) -> tuple[int, str, str]:
    from rke2_mirror.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rke2-mirror: error:")]


# --------------------------------------------------------------------------- building docker archives


def layer_tar(seed: str, size: int) -> bytes:
    """An uncompressed layer: a tar with one file of `size` seeded bytes."""
    payload = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo(f"data/{seed.replace('/', '_')}.bin")
        ti.size, ti.mtime, ti.mode = size, 1704067200, 0o644
        tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


@dataclass
class DImage:
    tags: list[str]
    layers: list[bytes]  # as stored in the archive (uncompressed tars, or gzip when a test says so)
    diff_ids: list[str]
    config: bytes
    platform: tuple[str, str] = ("linux", "amd64")

    @property
    def image_id(self) -> str:
        return sha256_digest(self.config)


def make_image(tags: list[str], layers: list[bytes], *, platform=("linux", "amd64"), diff_ids=None) -> DImage:
    diff_ids = diff_ids or [sha256_digest(gzip.decompress(l) if l[:2] == b"\x1f\x8b" else l) for l in layers]
    config = json.dumps({"architecture": platform[1], "os": platform[0], "created": "2024-01-01T00:00:00Z",
                         "config": {"Cmd": ["/bin/sh"], "Labels": {"t": tags[0] if tags else "none"}},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]},
                        separators=(",", ":")).encode()
    return DImage(tags, layers, diff_ids, config, platform)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_docker_archive(path: Path, images: list[DImage], *, style: str = "legacy",
                         drop: set[str] = frozenset()) -> Path:
    """As `docker save` writes it: legacy (<id>/layer.tar, <config>.json, manifest.json and repositories,
    in name order) or docker25 (blobs/sha256/…, index.json, manifest.json, oci-layout).  `drop`:
    member names left out (to make broken archives)."""
    files: dict[str, bytes] = {}
    manifest = []
    index = []
    repositories: dict[str, dict[str, str]] = {}
    for img in images:
        layer_names = []
        parent = ""
        for data in img.layers:
            if style == "legacy":
                lid = hashlib.sha256((parent + sha256_digest(data)).encode()).hexdigest()
                files[f"{lid}/VERSION"] = b"1.0"
                files[f"{lid}/json"] = json.dumps({"id": lid, "parent": parent}).encode()
                files[f"{lid}/layer.tar"] = data
                layer_names.append(f"{lid}/layer.tar")
                parent = lid
            else:
                name = "blobs/sha256/" + sha256_digest(data)[7:]
                files[name] = data
                layer_names.append(name)
        cname = f"{img.image_id[7:]}.json" if style == "legacy" else "blobs/sha256/" + img.image_id[7:]
        files[cname] = img.config
        manifest.append({"Config": cname, "RepoTags": img.tags, "Layers": layer_names})
        for t in img.tags:
            repo, tag = t.rsplit(":", 1)
            repositories.setdefault(repo, {})[tag] = parent or img.image_id[7:]
        if style == "docker25":
            om = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                        "digest": img.image_id, "size": len(img.config)},
                             "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                         "digest": sha256_digest(l), "size": len(l)} for l in img.layers]}).encode()
            files["blobs/sha256/" + sha256_digest(om)[7:]] = om
            for t in img.tags:
                full = t if "/" in t.split(":")[0] and "." in t.split("/")[0] else f"docker.io/{t}"
                index.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256_digest(om),
                              "size": len(om), "annotations": {"io.containerd.image.name": full,
                                                               "org.opencontainers.image.ref.name": t.rsplit(":", 1)[1]}})
    files["manifest.json"] = json.dumps(manifest).encode()
    files["repositories"] = json.dumps(repositories).encode()
    if style == "docker25":
        files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": index}).encode()
        files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            if name not in drop:
                _add(tf, name, files[name])
    return path


def compress(path: Path, kind: str, out: Path | None = None) -> Path:
    """gzip, zstd, bzip2 or lz4; bzip2 and lz4 with their command-line tools (their defaults: lz4 frames
    with a content checksum, 900k bzip2 blocks) when installed, else in Python."""
    out = out or path.with_name(path.name + SUFFIX[kind])
    with open(path, "rb") as src, open(out, "wb") as dst:
        if kind == "gzip":
            with gzip.GzipFile(fileobj=dst, mode="wb", compresslevel=1, mtime=0) as gz:
                shutil.copyfileobj(src, gz, 1 << 20)
        elif kind == "zstd":
            zstandard.ZstdCompressor(level=3, write_checksum=True).copy_stream(src, dst)
        elif TOOLS.get(kind):
            subprocess.run([TOOLS[kind], "-c"], stdin=src, stdout=dst, check=True, timeout=300)
        elif kind == "bzip2":
            with bz2.BZ2File(dst, "wb") as bz:
                shutil.copyfileobj(src, bz, 1 << 20)
        else:
            with lz4.frame.LZ4FrameFile(dst, "wb", content_checksum=True) as lz:
                shutil.copyfileobj(src, lz, 1 << 20)
    return out


def compress_in_pieces(path: Path, kind: str, out: Path, pieces: int = 3) -> Path:
    """The file cut in `pieces`, each compressed on its own and the results joined: several bzip2 streams
    (as pbzip2 writes, or `cat a.bz2 b.bz2`), several lz4 frames."""
    data = path.read_bytes()
    step = -(-len(data) // pieces)
    with open(out, "wb") as dst:
        for i in range(pieces):
            part = out.with_name(f"{out.name}.in{i}")
            part.write_bytes(data[i * step:(i + 1) * step])
            dst.write(compress(part, kind).read_bytes())
    return out


@dataclass
class Set:
    images: dict[str, DImage]
    plain: Path
    gz: Path
    zst: Path
    base_diff: str = ""
    shared_layer: bytes = b""
    extra: dict = field(default_factory=dict)
    bz2: Path | None = None  # the real tools' output (see compress)
    lz4: Path | None = None


@pytest.fixture(scope="module")
def dset(tmp_path_factory) -> Set:
    """Three images: x and y (two names) share a base layer; z has a gzip-compressed layer."""
    work = tmp_path_factory.mktemp("dockerarchive")
    base = layer_tar("base", 40000)
    x = make_image(["rancher/x:v1"], [base, layer_tar("x1", 3000), layer_tar("x2", 100)])
    y = make_image(["rancher/y:v1", "quay.io/other/y:latest"], [base, layer_tar("y1", 5000)])
    zgz = gzip.compress(layer_tar("z1", 7000), compresslevel=9, mtime=0)
    z = make_image(["rancher/z:v2"], [zgz, layer_tar("z2", 2000)])
    plain = write_docker_archive(work / "images.tar", [x, y, z])
    return Set({"rancher/x:v1": x, "rancher/y:v1": y, "quay.io/other/y:latest": y, "rancher/z:v2": z},
               plain, compress(plain, "gzip"), compress(plain, "zstd"), sha256_digest(base), base,
               bz2=compress(plain, "bzip2"), lz4=compress(plain, "lz4"))


@pytest.fixture
def dst(registry_factory):
    return registry_factory(name="dst")


def repo_tag(name: str, prefix: str = "") -> tuple[str, str]:
    ref, tag = name.rsplit(":", 1)
    if ref.startswith("quay.io/"):
        ref = ref[len("quay.io/"):]
    return (f"{prefix}/{ref}" if prefix else ref), tag


def assert_loaded(url: str, images: dict[str, DImage], prefix: str = "", **kw) -> dict[str, str]:
    """Every image is pullable: a Docker schema2 manifest, its config as in the archive (image ID kept),
    gzip layers whose uncompressed content matches the config's diff_ids.  Returns name -> digest."""
    out = {}
    for name, img in images.items():
        repo, tag = repo_tag(name, prefix)
        mt, raw, digest = read_manifest(url, repo, tag, **kw)
        m = json.loads(raw)
        assert mt == DOCKER_MANIFEST and m["mediaType"] == DOCKER_MANIFEST
        assert m["config"] == {"mediaType": DOCKER_CONFIG, "size": len(img.config), "digest": img.image_id}
        assert read_blob(url, repo, img.image_id, **kw) == img.config
        cfg = json.loads(read_blob(url, repo, img.image_id, **kw))
        assert len(m["layers"]) == len(cfg["rootfs"]["diff_ids"])
        for layer, diff_id in zip(m["layers"], cfg["rootfs"]["diff_ids"]):
            assert layer["mediaType"] == DOCKER_LAYER
            blob = read_blob(url, repo, layer["digest"], **kw)
            assert sha256_digest(blob) == layer["digest"] and len(blob) == layer["size"]
            assert sha256_digest(gzip.decompress(blob)) == diff_id
        out[name] = digest
    return out


# --------------------------------------------------------------------------- units


def test_zstd_frame_walker_tells_complete_from_truncated():
    data = random.Random(1).randbytes(300_000)
    one = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    two = one + zstandard.ZstdCompressor(level=1).compress(b"more")
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"12345"
    for stream in (one, two, skippable + two):
        w = codecs._ZstdFrames("s")
        for i in range(0, len(stream), 777):
            w.feed(stream[i:i + 777])
        w.finish()
        for cut in (len(stream) - 1, len(stream) - 5, len(stream) // 2):
            w = codecs._ZstdFrames("s")
            w.feed(stream[:cut])
            with pytest.raises(ArchiveError, match="truncated zstd"):
                w.finish()
    r = codecs.ZstdStream(io.BytesIO(two), "s")
    assert b"".join(iter(lambda: r.read(65536), b"")) == data + b"more"
    r = codecs.ZstdStream(io.BytesIO(two[:-3]), "s")
    with pytest.raises(ArchiveError, match="truncated zstd"):
        while r.read(65536):
            pass


def test_gzip_stream_members_padding_and_truncation():
    a, b = b"a" * 100_000, random.Random(2).randbytes(50_000)
    stream = gzip.compress(a) + gzip.compress(b) + b"\0" * 1000
    r = codecs.GzipStream(io.BytesIO(stream), "s")
    got = []
    while chunk := r.read(4096):
        assert len(chunk) <= 4096
        got.append(chunk)
    assert b"".join(got) == a + b and r.padded
    for bad, what in ((stream[:len(gzip.compress(a)) + 100], "truncated gzip"),
                      (gzip.compress(a) + b"garbage!", "corrupt gzip")):
        r = codecs.GzipStream(io.BytesIO(bad), "s")
        with pytest.raises(ArchiveError, match=what):
            while r.read(65536):
                pass


def _lz4(data: bytes) -> bytes:
    return lz4.frame.compress(data, content_checksum=True)


@pytest.mark.parametrize("kind", ["bzip2", "lz4"])
def test_bzip2_and_lz4_streams_units_truncation_and_garbage(kind):
    """Several bzip2 streams / lz4 frames (an empty one among them; lz4: a skippable frame too) read in
    bounded pieces; a stream cut inside a unit is truncated, one with anything after its last unit
    (garbage, zero padding, half a header) or a bad checksum is corrupt."""
    comp = bz2.compress if kind == "bzip2" else _lz4
    a, b = random.Random(3).randbytes(300_000), b"b" * 2_000_000
    one = comp(a)
    units = [one, comp(b""), comp(b)]
    if kind == "lz4":
        units.insert(1, b"\x5f\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc")
    stream = b"".join(units)
    assert codecs.kind_of(stream[:codecs.HEAD]) == kind and codecs.kind_of(stream[:3]) == "tar"  # too short to tell
    r = codecs.decoder(kind, io.BytesIO(stream), "s")
    got = []
    while chunk := r.read(4096):
        assert len(chunk) <= 4096
        got.append(chunk)
    assert b"".join(got) == a + b and not r.padded
    for cut in (12, len(one) // 2, len(one) - 1, len(stream) - 1, len(stream) - 3):
        r = codecs.decoder(kind, io.BytesIO(stream[:cut]), "s")
        with pytest.raises(ArchiveError, match=f"truncated {kind} stream"):
            while r.read(65536):
                pass
    flipped = bytearray(stream)
    flipped[len(one) // 2] ^= 0x55
    for bad in (stream + b"garbage!", stream + b"\0" * 512, stream + stream[:3], bytes(flipped)):
        r = codecs.decoder(kind, io.BytesIO(bad), "s")
        with pytest.raises(ArchiveError, match=f"corrupt {kind} stream"):
            while r.read(65536):
                pass
    r = codecs.decoder(kind, io.BytesIO(stream[:1000]), "layer", codecs.LayerStreamError)  # a member: its images fail
    with pytest.raises(codecs.LayerStreamError, match=f"layer: truncated {kind}"):
        while r.read(65536):
            pass
    named = io.BytesIO()  # a tar whose first member is named BZh…: not taken for bzip2
    with tarfile.open(fileobj=named, mode="w") as tf:
        _add(tf, "BZh9 notes", b"x")
    assert codecs.kind_of(named.getvalue()[:codecs.HEAD]) == "tar"


def test_bzip2_and_lz4_reads_stay_small_whatever_the_ratio():
    import tracemalloc

    zeros = 96 * 1024 * 1024
    for kind, packed in (("bzip2", bz2.compress(bytes(zeros))), ("lz4", _lz4(bytes(zeros)))):
        tracemalloc.start()
        try:
            r = codecs.decoder(kind, io.BytesIO(packed), "s")
            total = 0
            while chunk := r.read(codecs.CHUNK):
                total += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert total == zeros
        assert peak < 8 * 1024 * 1024, f"{kind}: peak {peak >> 20} MiB to read {zeros >> 20} MiB"


def test_gzip_blobs_are_deterministic_whatever_the_chunking():
    data = layer_tar("det", 300_000)
    whole = b"".join(codecs.gzip_chunks([data]))
    pieces = b"".join(codecs.gzip_chunks(data[i:i + 4097] for i in range(0, len(data), 4097)))
    assert whole == pieces and whole[4:8] == b"\0\0\0\0" and gzip.decompress(whole) == data


def test_arch_of_file_names():
    assert arch_of(Path("rke2-images.linux-arm64.tar.zst")) == "arm64"
    assert arch_of(Path("rke2-images-canal.linux-s390x.tar.gz")) == "s390x"
    assert arch_of(Path("rke2-windows-ltsc2022-amd64-images.tar.zst")) == "amd64"
    assert arch_of(Path("mine.tar.zst")) == "amd64"
    assert arch_of(Path("mine.tar.zst"), ["arm64"]) == "arm64"


# --------------------------------------------------------------------------- loading


def test_load_plain_gzip_and_zstd(dset, dst, monkeypatch):
    pushed: list[tuple[str, str]] = []
    original = Registry.push_blob

    def counting(self, repo, desc, chunks):
        pushed.append((repo, desc.digest))
        return original(self, repo, desc, chunks)

    monkeypatch.setattr(Registry, "push_blob", counting)
    digests = {}
    for prefix, path in (("plain", dset.plain), ("gz", dset.gz), ("zst", dset.zst)):
        pushed.clear()
        code, out, err = cli("load", path, "--to", f"{dst.url}/{prefix}", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["summary"]["copied"] == 4 and report["summary"]["failed"] == 0
        for row in report["images"]:
            assert row["note"] == da.NOTE and row["digest"].startswith("sha256:")
        digests[prefix] = assert_loaded(dst.url, dset.images, prefix)
        assert {r["digest"] for r in report["images"]} == set(digests[prefix].values())
        # every blob uploaded once: the base layer x and y share is mounted, not sent again
        assert len(pushed) == len({d for _, d in pushed})
        base_blob = json.loads(read_manifest(dst.url, f"{prefix}/rancher/x", "v1")[1])["layers"][0]["digest"]
        assert [r for r, d in pushed if d == base_blob] in ([f"{prefix}/rancher/x"], [f"{prefix}/rancher/y"],
                                                            [f"{prefix}/other/y"])
        assert "new digest (rebuilt from a docker archive)" in err
    assert digests["plain"] == digests["gz"] == digests["zst"]  # deterministic: the same manifests
    z = json.loads(read_manifest(dst.url, "zst/rancher/z", "v2")[1])  # the gzip layer is pushed as it is
    assert z["layers"][0]["digest"] == sha256_digest(dset.images["rancher/z:v2"].layers[0])

    pushed.clear()
    code, out, err = cli("load", dset.zst, "--to", f"{dst.url}/zst", "--json")  # rerun: nothing compressed again
    assert code == 0, err
    rows = json.loads(out)["images"]
    assert [r["status"] for r in rows] == ["skipped"] * 4 and pushed == []
    assert {r["digest"] for r in rows} == set(digests["zst"].values()) and rows[0]["note"] == da.NOTE_PRESENT
    assert "4 of 4 image(s) already at the target" in err and "pass 2" not in err


def test_load_bzip2_and_lz4_as_zstd(dset, dst, tmp_path):
    """.tar.bz2 / .tbz / .tar.lz4 (the real tools' output, and files of several bzip2 streams or lz4 frames
    joined) are told from their content and loaded as a .tar.zst is: streamed in two passes, the same
    image IDs and the same rebuilt digests as from the plain .tar."""
    code, out, err = cli("load", dset.plain, "--to", f"{dst.url}/plain", "--json")
    assert code == 0, err
    want = assert_loaded(dst.url, dset.images, "plain")
    tbz = tmp_path / "images.tbz"
    shutil.copy(dset.bz2, tbz)
    cases = {"bz2": (dset.bz2, "bzip2"), "tbz": (tbz, "bzip2"), "lz4": (dset.lz4, "lz4"),
             "bz2multi": (compress_in_pieces(dset.plain, "bzip2", tmp_path / "multi.tar.bz2"), "bzip2"),
             "lz4multi": (compress_in_pieces(dset.plain, "lz4", tmp_path / "multi.tar.lz4"), "lz4")}
    for prefix, (path, kind) in cases.items():
        code, out, err = cli("load", path, "--to", f"{dst.url}/{prefix}", "--json")
        assert code == 0, (prefix, err)
        report = json.loads(out)
        assert report["summary"]["copied"] == 4 and report["summary"]["failed"] == 0
        assert all(r["note"] == da.NOTE for r in report["images"])
        assert f"({kind}, " in err and "pass 2" in err  # detected from the content; streamed like a .tar.zst
        assert assert_loaded(dst.url, dset.images, prefix) == want, prefix
        assert {r["digest"] for r in report["images"]} == set(want.values())
    z = json.loads(read_manifest(dst.url, "lz4/rancher/z", "v2")[1])  # the gzip layer is pushed as it is
    assert z["layers"][0]["digest"] == sha256_digest(dset.images["rancher/z:v2"].layers[0])
    code, out, err = cli("load", dset.bz2, "--to", f"{dst.url}/bz2", "--json")  # rerun: nothing compressed again
    assert code == 0, err
    assert [r["status"] for r in json.loads(out)["images"]] == ["skipped"] * 4 and "pass 2" not in err
    code, text, err = cli("inspect", tbz)
    assert code == 0, err
    assert "bzip2-compressed" in text and "docker.io/rancher/x:v1" in text


def test_a_corrupt_bzip2_or_lz4_layer_fails_only_its_image(dst, tmp_path):
    """Layers stored bzip2- or lz4-compressed (docker reads bzip2 layers) are checked as gzip ones are:
    good ones load (pushed gzip-compressed, diff_ids matched), a truncated or corrupt one fails only
    the images using it; the same inside a plain .tar, a .tar.bz2 and a .tar.lz4."""
    good = make_image(["rancher/good:v1"], [layer_tar("g1", 3000)])
    raw_b, raw_l, cut, bad = (layer_tar(s, 20000) for s in ("b1", "l1", "c1", "c2"))
    packed = make_image(["rancher/packed:v1"], [bz2.compress(raw_b), _lz4(raw_l)],
                        diff_ids=[sha256_digest(raw_b), sha256_digest(raw_l)])
    cut_bz = make_image(["rancher/cutbz:v1"], [bz2.compress(cut)[:-20]], diff_ids=[sha256_digest(cut)])
    flipped = bytearray(_lz4(bad))
    flipped[-2] ^= 0xFF  # its content checksum
    bad_lz = make_image(["rancher/badlz:v1"], [bytes(flipped)], diff_ids=[sha256_digest(bad)])
    plain = write_docker_archive(tmp_path / "layers.tar", [good, packed, cut_bz, bad_lz])
    for prefix, path in (("plain", plain), ("bz2", compress(plain, "bzip2")), ("lz4", compress(plain, "lz4"))):
        code, out, err = cli("load", path, "--to", f"{dst.url}/{prefix}", "--json")
        assert code == 1, err
        rows = {r["source"]: r for r in json.loads(out)["images"]}
        assert rows["docker.io/rancher/good:v1"]["status"] == "copied"
        assert rows["docker.io/rancher/packed:v1"]["status"] == "copied"
        assert rows["docker.io/rancher/cutbz:v1"]["status"] == "failed"
        assert "truncated bzip2 stream" in rows["docker.io/rancher/cutbz:v1"]["error"]
        assert rows["docker.io/rancher/badlz:v1"]["status"] == "failed"
        assert "corrupt lz4 stream" in rows["docker.io/rancher/badlz:v1"]["error"]
        for repo in ("rancher/cutbz", "rancher/badlz"):
            assert list_tags(dst.url, f"{prefix}/{repo}") == []
        assert_loaded(dst.url, {"rancher/good:v1": good, "rancher/packed:v1": packed}, prefix)


def test_a_multi_platform_index_holding_the_image_is_kept(dset, dst):
    """The tag is an index (from `mirror`) whose amd64 child is this very image: skipped, not replaced."""
    x = dset.images["rancher/x:v1"]
    with ImagePusher(dst.url) as p:
        layers = [gzip.compress(l, mtime=0) for l in x.layers]
        for blob in [*layers, x.config]:
            push_blob(p, "rancher/x", blob)
        child = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                            "config": {"mediaType": DOCKER_CONFIG, "size": len(x.config), "digest": x.image_id},
                            "layers": [{"mediaType": DOCKER_LAYER, "size": len(l), "digest": sha256_digest(l)}
                                       for l in layers]}).encode()
        amd64 = push_manifest(p, "rancher/x", sha256_digest(child), child, DOCKER_MANIFEST)
        arm64 = push_image(p, "rancher/x", None, platforms=None, seed="arm")
        index = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": amd64, "size": len(child),
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": DOCKER_MANIFEST, "digest": arm64.digest, "size": len(arm64.manifest),
             "platform": {"os": "linux", "architecture": "arm64"}}]}).encode()
        index_digest = push_manifest(p, "rancher/x", "v1", index, DOCKER_LIST)
    code, out, err = cli("load", dset.zst, "--to", dst.url, "--json")
    assert code == 0, err
    rows = {r["source"]: r for r in json.loads(out)["images"]}
    x_row = rows["docker.io/rancher/x:v1"]
    assert x_row["status"] == "skipped" and x_row["digest"] == index_digest
    assert "multi-platform index (linux/amd64)" in x_row["note"]
    assert read_manifest(dst.url, "rancher/x", "v1")[2] == index_digest
    assert rows["docker.io/rancher/y:v1"]["status"] == "copied"


def test_load_into_token_tls_registry(dset, token_registry, pki, rke2_mirror_env):
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    code, _, err = cli("load", dset.gz, "--to", token_registry.url, "--ca-file", pki.cert_path)
    assert code == 0, err
    assert_loaded(token_registry.url, dset.images, auth=("admin", "Harbor12345"), verify=pki.cert_path)


def test_load_creates_harbor_projects(dset, harbor, pki, rke2_mirror_env):
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    code, _, err = cli("load", dset.plain, "--to", harbor.url, "--ca-file", pki.cert_path)
    assert code == 0, err
    assert {"rancher", "other"} <= set(harbor.projects)


def test_newer_docker_save_with_an_oci_layout(dst, tmp_path):
    img = make_image(["rancher/new:v1"], [layer_tar("n1", 4000), layer_tar("n2", 100)])
    plain = write_docker_archive(tmp_path / "new.tar", [img], style="docker25")
    code, out, err = cli("load", plain, "--to", f"{dst.url}/oci", "--json")  # plain: the OCI layout, as it is
    assert code == 0, err
    row = json.loads(out)["images"][0]
    assert row["status"] == "copied" and "note" not in row
    mt, raw, _ = read_manifest(dst.url, "oci/rancher/new", "v1")
    assert json.loads(raw)["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    code, out, err = cli("load", compress(plain, "zstd"), "--to", f"{dst.url}/zst", "--json")  # a stream: manifest.json
    assert code == 0, err
    assert json.loads(out)["images"][0]["note"] == da.NOTE
    assert_loaded(dst.url, {"rancher/new:v1": img}, "zst")


@pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")
def test_we_load_what_skopeo_writes(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        pushed = push_image(p, "rancher/sk", "v1", platforms=None, layer_sizes=(3000, 7000), seed="sk")
    cfg_digest = json.loads(pushed.manifest)["config"]["digest"]
    out = tmp_path / "sk.tar"
    r = subprocess.run([SKOPEO, "--tmpdir", str(tmp_path), "copy", "--src-tls-verify=false",
                        f"docker://{src.host}/rancher/sk:v1", f"docker-archive:{out}:rancher/sk:v1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for path in (out, compress(out, "zstd")):
        code, text, err = cli("load", path, "--to", dst.url, "--json")
        assert code == 0, err
        mt, raw, digest = read_manifest(dst.url, "rancher/sk", "v1")
        m = json.loads(raw)
        assert m["config"]["digest"] == cfg_digest  # the image ID survives the round trip
        cfg = json.loads(read_blob(dst.url, "rancher/sk", cfg_digest))
        assert [sha256_digest(gzip.decompress(read_blob(dst.url, "rancher/sk", l["digest"]))) for l in m["layers"]] \
            == cfg["rootfs"]["diff_ids"]
    code, text, _ = cli("inspect", out)
    assert code == 0 and "docker.io/rancher/sk:v1" in text and cfg_digest[:19] in text


# --------------------------------------------------------------------------- release checksums


def test_release_tarball_is_verified_against_its_checksum_file(dset, dst, tmp_path):
    version = "v1.30.14+rke2r1"
    asset = "rke2-images.linux-amd64.tar.zst"
    tarball = tmp_path / asset
    shutil.copy(dset.zst, tarball)
    served = tmp_path / "served" / "rke2" / version
    served.mkdir(parents=True)
    good = hashlib.sha256(tarball.read_bytes()).hexdigest()
    (served / "sha256sum-amd64.txt").write_text(f"{'0' * 64}  rke2-images.linux-amd64.txt\n{good}  {asset}\n")
    lists = tmp_path / "lists"
    with start_release_server(tmp_path / "served", {}) as rs:
        rel = ["--release", version, "--release-url", rs.release_url("rke2"), "--lists-dir", lists]
        tampered = tmp_path / "t" / asset
        tampered.parent.mkdir()
        data = bytearray(tarball.read_bytes())
        data[len(data) // 2] ^= 0x01
        tampered.write_bytes(bytes(data))
        code, _, err = cli("load", tampered, "--to", dst.url, *rel)
        assert code == 2
        (line,) = error_lines(err)
        assert "does not match sha256sum-amd64.txt" in line and good in line and "refusing" in line
        assert list_tags(dst.url, "rancher/x") == []

        renamed = tmp_path / "mine.tar.zst"  # not named, but its content is a release asset
        shutil.copy(tarball, renamed)
        code, _, err = cli("load", renamed, "--to", f"{dst.url}/renamed", *rel)
        assert code == 0, err
        assert f"it is {asset}" in err

        code, _, err = cli("load", tarball, "--to", dst.url, *rel)
        assert code == 0, err
    assert f"{asset} verified" in err
    assert_loaded(dst.url, dset.images)
    # offline: the checksum file from the lists cache
    code, _, err = cli("load", tampered, "--to", dst.url, "--release", version, "--lists-dir", lists, "--offline")
    assert code == 2 and "does not match" in error_lines(err)[0]
    code, _, err = cli("load", dset.plain, "--to", dst.url, "--release", version, "--lists-dir", lists, "--offline")
    assert code == 2 and "not named in sha256sum-amd64.txt" in error_lines(err)[0]


# --------------------------------------------------------------------------- bad input


def test_truncated_and_corrupt_streams_are_refused(dset, dst, tmp_path):
    cases = {}
    for src, kind in ((dset.gz, "gzip"), (dset.zst, "zstd"), (dset.bz2, "bzip2"), (dset.lz4, "lz4")):
        data = src.read_bytes()
        for frac in (0.5, 0.999):
            p = tmp_path / f"cut-{frac}-{src.name}"
            p.write_bytes(data[: int(len(data) * frac)])
            cases[p] = "truncated" if kind in ("gzip", "zstd") else f"truncated {kind} stream"
        p = tmp_path / f"flipped-{src.name}"
        b = bytearray(data)
        b[len(b) // 3] ^= 0xFF
        p.write_bytes(bytes(b))
        cases[p] = "corrupt" if kind == "gzip" else ""
    cut = tmp_path / "cut.tar"  # a plain docker archive cut short
    cut.write_bytes(dset.plain.read_bytes()[: dset.plain.stat().st_size // 2])
    cases[cut] = "truncated"
    for path, what in cases.items():
        for cmd in (("load", path, "--to", dst.url), ("inspect", path)):
            code, _, err = cli(*cmd)
            assert code == 2, (path.name, err)
            (line,) = error_lines(err)
            assert what in line, (path.name, line)
    for repo in ("rancher/x", "rancher/y", "rancher/z", "other/y"):
        assert list_tags(dst.url, repo) == []


def test_missing_member_and_wrong_diff_id_fail_only_their_image(dset, dst, tmp_path):
    good = dset.images["rancher/x:v1"]
    lying = make_image(["rancher/lying:v1"], [layer_tar("l1", 3000)], diff_ids=[sha256_digest(b"something else")])
    holed = make_image(["rancher/holed:v1"], [layer_tar("h1", 3000), layer_tar("h2", 1000)])
    plain = tmp_path / "bad.tar"
    lid = hashlib.sha256((sha256_digest(holed.layers[0])).encode()).hexdigest()  # first layer id (legacy style)
    write_docker_archive(plain, [good, lying, holed], drop={f"{lid}/layer.tar"})
    for path in (plain, compress(plain, "gzip")):
        code, out, err = cli("load", path, "--to", f"{dst.url}/{path.suffix[1:]}", "--json")
        assert code == 1, err
        rows = {r["source"]: r for r in json.loads(out)["images"]}
        assert rows["docker.io/rancher/x:v1"]["status"] == "copied"
        assert rows["docker.io/rancher/lying:v1"]["status"] == "failed"
        assert "does not match the config's diff_ids" in rows["docker.io/rancher/lying:v1"]["error"]
        assert rows["docker.io/rancher/holed:v1"]["status"] == "failed"
        assert f"{lid}/layer.tar" in rows["docker.io/rancher/holed:v1"]["error"]
        assert "missing from the archive" in rows["docker.io/rancher/holed:v1"]["error"]
        for repo in ("rancher/lying", "rancher/holed"):
            assert list_tags(dst.url, f"{path.suffix[1:]}/{repo}") == []
    code, out, err = cli("inspect", plain, "--check", "--json")
    assert code == 1
    problems = {p["image"]: p["error"] for p in json.loads(out)["problems"]}
    assert set(problems) == {"docker.io/rancher/lying:v1", "docker.io/rancher/holed:v1"}


def test_platform_mismatch_is_reported(dset, dst, tmp_path):
    code, _, err = cli("load", dset.zst, "--to", dst.url, "--platform", "linux/arm64")
    assert code == 2
    (line,) = error_lines(err)
    assert "no image for platform linux/arm64" in line and "linux/amd64" in line
    mixed = write_docker_archive(tmp_path / "mixed.tar", [
        make_image(["rancher/a:v1"], [layer_tar("a", 100)]),
        make_image(["rancher/b:v1"], [layer_tar("b", 100)], platform=("linux", "arm64"))])
    code, out, err = cli("load", mixed, "--to", dst.url, "--platform", "linux/arm64", "--json")
    assert code == 1
    rows = {r["source"]: r for r in json.loads(out)["images"]}
    assert rows["docker.io/rancher/b:v1"]["status"] == "copied"
    assert "single-platform image is linux/amd64, not linux/arm64" in rows["docker.io/rancher/a:v1"]["error"]
    assert list_tags(dst.url, "rancher/a") == []


def test_unnamed_images_need_a_name(dst, tmp_path):
    img = make_image([], [layer_tar("u", 100)])
    path = write_docker_archive(tmp_path / "unnamed.tar", [img])
    code, _, err = cli("load", path, "--to", dst.url)
    assert code == 2 and "--name" in error_lines(err)[0]
    code, _, err = cli("load", path, "--to", dst.url, "--name", "rancher/named:v3")
    assert code == 0, err
    assert list_tags(dst.url, "rancher/named") == ["v3"]


def test_no_room_to_spool_fails_cleanly(dst, tmp_path):
    img = make_image(["rancher/roomy:v1"], [layer_tar("r1", 300_000)])
    path = compress(write_docker_archive(tmp_path / "roomy.tar", [img]), "zstd")
    spool = tmp_path / "spool"
    spool.mkdir()
    limit = 64 * 1024  # the layer compressed does not fit
    prog = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from rke2_mirror.cli.app import main\n"
        f"sys.argv = ['rke2-mirror', 'load', {str(path)!r}, '--to', {dst.url!r}, '--tmp-dir', {str(spool)!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert f"cannot write to {spool}" in line and "File too large" in line and "--tmp-dir" in line
    assert list(spool.iterdir()) == [] and list_tags(dst.url, "rancher/roomy") == []


# --------------------------------------------------------------------------- inspect


def test_inspect_docker_archives(dset):
    for path, comp in ((dset.plain, None), (dset.zst, "zstd"), (dset.gz, "gzip"), (dset.bz2, "bzip2"),
                       (dset.lz4, "lz4")):
        code, text, err = cli("inspect", path)
        assert code == 0, err
        assert "docker archive (docker save)" in text and (comp is None or f"{comp}-compressed" in text)
        assert "docker.io/rancher/y:v1" in text and "quay.io/other/y:latest" in text and "linux/amd64" in text
        code, text, _ = cli("inspect", path, "--json")
        doc = json.loads(text)
        assert doc["compression"] == comp and doc["problems"] == []
        rows = {r["reference"]: r for r in doc["images"]}
        y = dset.images["rancher/y:v1"]
        assert rows["docker.io/rancher/y:v1"]["image_id"] == y.image_id
        assert rows["docker.io/rancher/y:v1"]["size"] == len(y.config) + sum(len(l) for l in y.layers)
        assert doc["blobs"]["count"] == 6 + 3  # distinct layers + configs
    code, text, _ = cli("inspect", dset.plain, "--check", "--json")
    assert code == 0 and json.loads(text)["checked"] == 6


# --------------------------------------------------------------------------- memory


def _big_layer_archive(path: Path, size: int, kind: str = "zstd") -> None:
    """A docker archive (zstd, or `kind`) with one layer of `size` bytes, written without holding it in memory."""
    block = random.Random(5).randbytes(8192)

    class Gen(io.RawIOBase):
        def __init__(self):
            self.left = size
            self.i = 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left, 8192)
            if not n:
                return 0
            self.i += 1
            chunk = bytes([self.i & 0xFF]) + block[1:n]  # compressible, not trivially
            b[:n] = chunk
            self.left -= n
            return n

    inner = path.with_suffix(".layer.tar")
    h = hashlib.sha256()
    with open(inner, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            ti = tarfile.TarInfo("big.bin")
            ti.size = size
            tf.addfile(ti, io.BufferedReader(Gen(), 1 << 20))
    with open(inner, "rb") as f:
        while d := f.read(1 << 20):
            h.update(d)
    diff = "sha256:" + h.hexdigest()
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    tar = path.with_suffix(".tar")
    with tarfile.open(tar, "w") as tf:
        tf.add(inner, "big/layer.tar")
        _add(tf, sha256_digest(cfg)[7:] + ".json", cfg)
        _add(tf, "manifest.json", json.dumps([{"Config": sha256_digest(cfg)[7:] + ".json",
                                               "RepoTags": ["rancher/big:v1"], "Layers": ["big/layer.tar"]}]).encode())
    inner.unlink()
    compress(tar, kind, path)
    tar.unlink()


@pytest.mark.parametrize("kind", ["zstd", "lz4"])  # bzip2: the same decoder as lz4's (_Units), 40 s to compress
def test_memory_stays_flat_on_a_large_layer(dst, tmp_path, kind):
    size = 200 * 1024 * 1024
    path = tmp_path / f"big.tar{SUFFIX[kind]}"
    _big_layer_archive(path, size, kind)
    wrapper = ("import resource, subprocess, sys;"
               "r = subprocess.run(sys.argv[1:]);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
               "sys.exit(r.returncode)")
    spool = tmp_path / "spool"
    spool.mkdir()
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "rke2_mirror", "load", str(path),
                           "--to", dst.url, "--tmp-dir", str(spool)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB while loading a {size >> 20} MB layer"
    assert list(spool.iterdir()) == []  # the spool directory is removed
    _, raw, _ = read_manifest(dst.url, "rancher/big", "v1")
    assert len(json.loads(raw)["layers"]) == 1
