"""save / load / inspect: the air-gap archive path, against real docker-registry processes (and skopeo)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

import rke2_mirror.endpoints.tarfiles as archive_mod
from rke2_mirror.endpoints.ociarchive import ArchiveReader
from rke2_mirror.endpoints.tarfiles import parse_size, resolve_parts, safe_member_name
from rke2_mirror.model.errors import ArchiveError, InputError
from rke2_mirror.endpoints.layout import CONTAINERD_NAME, REF_NAME, LayoutDir, name_entries
from rke2_mirror_testkit.release_server import start_release_server
from rke2_mirror_testkit.registry_proc import REGISTRY_BINARY, start_registry
from rke2_mirror_testkit.images import (DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, ImagePusher, PushedImage, list_tags,
                                        make_layer_blob, push_image, read_manifest, sha256_digest)

SKOPEO = shutil.which("skopeo")


def cli(*args) -> tuple[int, str, str]:
    from rke2_mirror.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rke2-mirror: error:")]


@dataclass
class Source:
    reg: object
    multi: PushedImage  # docker manifest list, linux/amd64 + linux/arm64/v8 + windows/amd64
    oci: PushedImage  # OCI index, linux/amd64 + linux/arm64
    single: PushedImage  # docker manifest, linux/amd64
    ocisingle: PushedImage  # OCI manifest, linux/amd64
    list_file: Path

    @property
    def endpoint(self) -> str:
        return f"docker.io={self.reg.url}"

    def all(self) -> dict[str, PushedImage]:
        return {"rancher/multi": self.multi, "rancher/oci": self.oci, "rancher/single": self.single,
                "rancher/ocisingle": self.ocisingle}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Iterator[Source]:
    """One source registry for the module: the tests only read from it."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip(f"{REGISTRY_BINARY} not installed")
    work = tmp_path_factory.mktemp("archive-src")
    reg = start_registry(work / "registry")
    try:
        base = make_layer_blob("base", 3000)
        with ImagePusher(reg.url) as p:
            multi = push_image(p, "rancher/multi", "v1", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")],
                               windows=True, base=base, seed="multi")
            oci = push_image(p, "rancher/oci", "v1", kind="oci", base=base, seed="oci",
                             annotations={"org.opencontainers.image.source": "test"})
            single = push_image(p, "rancher/single", "v1", platforms=None, base=base, seed="single")
            ocisingle = push_image(p, "rancher/ocisingle", "v1", kind="oci", platforms=None, seed="ocisingle")
        lst = work / "images.txt"
        lst.write_text("# test images\nrancher/multi:v1\nrancher/oci:v1\nrancher/single:v1\nrancher/ocisingle:v1\n")
        yield Source(reg, multi, oci, single, ocisingle, lst)
    finally:
        reg.stop()


@pytest.fixture
def dst(registry_factory):
    return registry_factory(name="dst")


def save(source: Source, out: Path, *extra) -> tuple[int, str, str]:
    return cli("save", "--images", source.list_file, "-o", out, "--source-endpoint", source.endpoint, *extra)


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def blob_names(path: Path) -> set[str]:
    return {n.split("/")[-1] for n in members(path) if n.startswith("blobs/sha256/")}


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --------------------------------------------------------------------------- units


def test_parse_size():
    assert parse_size("4G") == 4 * 1024 ** 3
    assert parse_size("4GiB") == 4 * 1024 ** 3
    assert parse_size("4GB") == 4 * 1000 ** 3
    assert parse_size("700m") == 700 * 1024 ** 2
    assert parse_size("1.5M") == 1536 * 1024
    assert parse_size("8192") == 8192
    for bad in ("", "G", "4X", "-1", "1"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_member_names_are_validated():
    assert safe_member_name("./blobs//sha256/ab") == "blobs/sha256/ab"
    for bad in ("/etc/passwd", "../x", "blobs/../../x", "a/..", "x\x00y"):
        with pytest.raises(ArchiveError):
            safe_member_name(bad)


def _entry(annotations: dict | None, digest: str = "sha256:" + "a" * 64) -> dict:
    e = {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10}
    if annotations is not None:
        e["annotations"] = annotations
    return e


def test_index_entries_are_named_by_documented_rules():
    full = {"manifests": [_entry({CONTAINERD_NAME: "docker.io/rancher/x:v1", REF_NAME: "v1"}),
                          _entry({REF_NAME: "index.docker.io/library/alpine:3.19"}, "sha256:" + "b" * 64),
                          _entry({REF_NAME: "busybox:1"}, "sha256:" + "c" * 64)]}
    assert [str(i.ref) for i in name_entries(full)] == [
        "docker.io/rancher/x:v1", "docker.io/library/alpine:3.19", "docker.io/library/busybox:1"]
    short = {"manifests": [_entry({REF_NAME: "v1"})]}
    with pytest.raises(InputError, match="--name"):
        name_entries(short)
    assert [str(i.ref) for i in name_entries(short, "docker.io/rancher/x")] == ["docker.io/rancher/x:v1"]
    unnamed = {"manifests": [_entry(None)]}
    with pytest.raises(InputError, match="--name"):
        name_entries(unnamed)
    assert [str(i.ref) for i in name_entries(unnamed, "rancher/x")] == ["docker.io/rancher/x:latest"]
    assert [str(i.ref) for i in name_entries(unnamed, "rancher/x:v2")] == ["docker.io/rancher/x:v2"]
    two = {"manifests": [_entry(None), _entry(None, "sha256:" + "b" * 64)]}
    with pytest.raises(InputError, match="only one"):
        name_entries(two, "rancher/x")
    bad = {"manifests": [_entry(None, "sha256:../../etc/passwd")]}
    with pytest.raises(InputError):
        name_entries(bad, "rancher/x")


def test_resolve_parts(tmp_path):
    base = tmp_path / "a.tar"
    for n in (1, 2, 3):
        (tmp_path / f"a.tar.part{n:03d}").write_bytes(b"x")
    want = [tmp_path / f"a.tar.part{n:03d}" for n in (1, 2, 3)]
    assert resolve_parts(base) == want
    assert resolve_parts(tmp_path / "a.tar.part002") == want
    (tmp_path / "a.tar.part002").unlink()
    with pytest.raises(InputError, match="part 002 is missing"):
        resolve_parts(base)
    with pytest.raises(InputError, match="no such file"):
        resolve_parts(tmp_path / "nothing.tar")


def test_layout_commits_a_blob_only_when_the_engine_checked_stream_ends(tmp_path, monkeypatch):
    """The engine hashes every blob while it streams (engine.blobs.checked); the layout does not hash
    again, and renames a blob into place only once the checked stream ended without an error."""
    import hashlib as real_hashlib
    import types

    import rke2_mirror.endpoints.layout as layout_mod
    from rke2_mirror.engine.blobs import checked
    from rke2_mirror.model.errors import DigestMismatch
    from rke2_mirror.model.oci import Descriptor

    calls = []
    monkeypatch.setattr(layout_mod, "hashlib", types.SimpleNamespace(
        sha256=lambda *a: calls.append(1) or real_hashlib.sha256(*a)), raising=False)
    layout = LayoutDir(tmp_path / "l")
    good = b"right content"
    desc = Descriptor("application/octet-stream", sha256_digest(good), len(good))
    layout.push_blob("docker.io/x/y", desc, checked([good[:5], good[5:]], desc, "blob"))
    assert calls == [] and layout.blob_path(desc.digest).read_bytes() == good

    wrong = b"wrong content"  # same length, other bytes
    desc2 = Descriptor("application/octet-stream", sha256_digest(b"other content"), len(wrong))
    with pytest.raises(DigestMismatch):
        layout.push_blob("docker.io/x/y", desc2, checked([wrong[:3], wrong[3:]], desc2, "blob"))
    assert calls == []
    assert not layout.blob_path(desc2.digest).exists()
    assert [p.name for p in layout.blob_dir.iterdir()] == [desc.digest.split(":")[1]]


def test_layout_dir_writes_atomically_and_names_tags(tmp_path):
    from rke2_mirror.model.oci import Descriptor

    layout = LayoutDir(tmp_path / "l")
    data = b"hello blob"
    desc = Descriptor("application/octet-stream", sha256_digest(data), len(data))
    from rke2_mirror.engine.blobs import checked

    with pytest.raises(Exception):
        layout.push_blob("docker.io/x/y", desc, checked([b"hello blub"], desc, "blob"))  # wrong: nothing committed
    assert not layout.has_blob("docker.io/x/y", desc)
    assert [p.name for p in layout.blob_dir.iterdir()] == []
    layout.push_blob("docker.io/x/y", desc, checked([b"hello ", b"blob"], desc, "blob"))
    assert layout.has_blob("docker.io/x/y", desc)
    cfg = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": desc.digest, "size": desc.size},
           "layers": []}
    raw = json.dumps(cfg).encode()
    layout.put_manifest("docker.io/x/y", "v1", OCI_MANIFEST, raw)
    index = json.loads((tmp_path / "l" / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {CONTAINERD_NAME: "docker.io/x/y:v1", REF_NAME: "docker.io/x/y:v1"}
    assert layout.head_manifest("docker.io/x/y", "v1").digest == sha256_digest(raw)
    layout.blob_path(desc.digest).unlink()  # incomplete: no longer "present"
    assert LayoutDir(tmp_path / "l").head_manifest("docker.io/x/y", "v1") is None


# --------------------------------------------------------------------------- round trip


def test_save_load_round_trip_every_manifest_kind(source, dst, tmp_path):
    out = tmp_path / "rke2-images.tar"
    code, _, err = save(source, out)
    assert code == 0, err
    assert out.is_file() and not (tmp_path / "rke2-images.tar.work").exists()
    assert not list(tmp_path.glob("*.partial"))

    names = members(out)
    assert names[:2] == ["oci-layout", "index.json"]
    blobs = [n for n in names if n.startswith("blobs/sha256/")]
    assert len(blobs) == len(set(blobs))  # each blob once (the base layer is shared by three images)
    every = set()
    for img in source.all().values():
        every |= img.blobs | {img.digest} | set(img.child_manifests)
    assert {n.split("/")[-1] for n in blobs} == {d.split(":")[1] for d in every}
    with tarfile.open(out) as tf:
        assert json.load(tf.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.load(tf.extractfile("index.json"))
        for m in tf.getmembers():
            assert m.mtime == 0 and m.uid == 0
    by_name = {e["annotations"][REF_NAME]: e for e in index["manifests"]}
    assert set(by_name) == {f"docker.io/{repo}:v1" for repo in source.all()}
    for repo, img in source.all().items():
        e = by_name[f"docker.io/{repo}:v1"]
        assert e["digest"] == img.digest and e["mediaType"] == img.media_type
        assert e["annotations"][CONTAINERD_NAME] == f"docker.io/{repo}:v1"

    code, text, _ = cli("inspect", out)
    assert code == 0
    assert "docker.io/rancher/multi:v1" in text and "linux/arm64/v8" in text and "windows/amd64" in text
    code, text, _ = cli("inspect", out, "--json", "--check")
    doc = json.loads(text)
    assert code == 0 and doc["checked"] == len(blobs) and doc["problems"] == [] and doc["delta"] is None

    code, text, err = cli("load", out, "--to", dst.url, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["summary"]["copied"] == 4 and report["summary"]["failed"] == 0
    for repo, img in source.all().items():
        mt, _, digest = read_manifest(dst.url, repo, "v1")
        assert (mt, digest) == (img.media_type, img.digest)
        for child in img.child_manifests:
            assert read_manifest(dst.url, repo, child)[2] == child

    code, text, _ = cli("load", out, "--to", dst.url, "--json")  # idempotent
    assert code == 0 and json.loads(text)["summary"]["skipped"] == 4


def test_platform_subset_on_save_and_on_load(source, dst, registry_factory, tmp_path):
    out = tmp_path / "amd64.tar"
    code, _, err = save(source, out, "--platform", "linux/amd64")
    assert code == 0, err
    code, _, err = cli("load", out, "--to", dst.url)
    assert code == 0, err
    _, raw, digest = read_manifest(dst.url, "rancher/multi", "v1")
    assert digest != source.multi.digest
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["amd64"]
    child = source.multi.child("linux/amd64")
    assert read_manifest(dst.url, "rancher/multi", child)[2] == child
    assert read_manifest(dst.url, "rancher/single", "v1")[2] == source.single.digest  # single-platform: unchanged
    assert source.multi.child("linux/arm64/v8").split(":")[1] not in blob_names(out)

    full = tmp_path / "full.tar"
    assert save(source, full)[0] == 0
    dst2 = registry_factory(name="dst2")
    code, _, err = cli("load", full, "--to", dst2.url, "--platform", "linux/arm64")
    assert code == 1  # the two single-platform amd64 images are not arm64: named as failed
    assert "single-platform image is linux/amd64" in err
    _, raw, _ = read_manifest(dst2.url, "rancher/oci", "v1")
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["arm64"]


# --------------------------------------------------------------------------- resume, split, disk full


def test_interrupted_save_resumes_fetching_only_what_is_missing(source, tmp_path, monkeypatch):
    out = tmp_path / "out.tar"
    work = tmp_path / "out.tar.work"
    original = LayoutDir.push_blob
    calls = {"n": 0}

    def dying(self, repo, desc, chunks):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(self, repo, desc, chunks)

    monkeypatch.setattr(LayoutDir, "push_blob", dying)
    with pytest.raises(KeyboardInterrupt):
        import rke2_mirror.jobs.save as archive
        from rke2_mirror.jobs.common import SourceOptions, TLSOptions
        from rke2_mirror.engine.copy import CopyOptions
        from rke2_mirror.model.reference import RegistryURL, parse_image_lines

        refs = parse_image_lines(source.list_file.read_text())
        archive.save(refs, out, source=SourceOptions(TLSOptions(), {"docker.io": RegistryURL.parse(source.reg.url)}),
                     options=CopyOptions(jobs=1, blob_jobs=1))
    assert not out.exists() and not list(tmp_path.glob("out.tar*.partial"))
    have = {p.name for p in (work / "blobs" / "sha256").iterdir() if not p.name.startswith(".")}
    assert len(have) == 5

    fetched: list[str] = []

    def counting(self, repo, desc, chunks):
        fetched.append(desc.digest)
        return original(self, repo, desc, chunks)

    monkeypatch.setattr(LayoutDir, "push_blob", counting)
    code, _, err = save(source, out)
    assert code == 0, err
    every = set().union(*(img.blobs for img in source.all().values()))
    assert len(fetched) == len(every) - 5 and not {d.split(":")[1] for d in fetched} & have
    assert out.is_file() and not work.exists()


def test_interrupted_archive_write_leaves_no_file(source, tmp_path, monkeypatch):
    out = tmp_path / "out.tar"

    def boom(self, src_fd, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(archive_mod._PartWriter, "copy_from", boom)
    code, _, _ = save(source, out)
    assert code != 0
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert (tmp_path / "out.tar.work" / "index.json").is_file()  # kept: a rerun resumes
    monkeypatch.undo()
    code, _, err = save(source, out)
    assert code == 0 and "0 saved, 4 already present" in err


def test_a_blob_left_by_an_earlier_run_is_hashed_again_before_it_goes_into_the_tar(source, tmp_path, monkeypatch):
    out = tmp_path / "out.tar"
    work = tmp_path / "out.tar.work"
    monkeypatch.setattr(archive_mod._PartWriter, "copy_from", lambda self, fd, size: (_ for _ in ()).throw(KeyboardInterrupt))
    assert save(source, out)[0] != 0 and (work / "index.json").is_file()
    monkeypatch.undo()
    blobs = sorted(p for p in (work / "blobs" / "sha256").iterdir() if p.stat().st_size > 64)
    flip_byte(blobs[0], 10)  # same size, other content: only a hash finds it
    code, _, err = save(source, out)
    assert code != 0 and f"blob sha256:{blobs[0].name} in the work dir" in err and "corrupt (removed)" in err
    assert not out.exists() and not blobs[0].exists()
    code, _, err = save(source, out)  # the rerun fetches it again
    assert code == 0, err
    assert blobs[0].name in blob_names(out)
    code, text, err = cli("inspect", out, "--check")
    assert code == 0, err


@pytest.mark.parametrize("kernel_can", ["sendfile", "neither", "macos"])
def test_archive_bytes_are_the_same_without_copy_file_range(source, tmp_path, monkeypatch, kernel_can):
    import errno as _errno

    reference = tmp_path / "ref.tar"
    assert save(source, reference)[0] == 0

    def refuse(*a, **kw):
        raise OSError(_errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(archive_mod.os, "copy_file_range", refuse)
    if kernel_can == "neither":
        monkeypatch.setattr(archive_mod.os, "sendfile", lambda *a: (_ for _ in ()).throw(OSError(_errno.ENOSYS, "no")))
    if kernel_can == "macos":  # no copy_file_range at all; sendfile only to a socket
        monkeypatch.delattr(archive_mod.os, "copy_file_range")
        monkeypatch.setattr(archive_mod.os, "sendfile",
                            lambda *a: (_ for _ in ()).throw(OSError(_errno.ENOTSOCK, "Socket operation on non-socket")))
    out = tmp_path / "out.tar"
    code, _, err = save(source, out, "--split", "10K")
    assert code == 0, err
    joined = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("out.tar.part*")))
    assert joined == reference.read_bytes()


def test_split_parts_round_trip(source, dst, tmp_path):
    whole = tmp_path / "whole.tar"
    assert save(source, whole)[0] == 0
    out = tmp_path / "parts.tar"
    code, _, err = save(source, out, "--split", "16K")
    assert code == 0, err
    parts = sorted(tmp_path.glob("parts.tar.part*"))
    assert len(parts) >= 3 and not out.exists()
    assert all(p.stat().st_size <= 16 * 1024 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == whole.read_bytes()  # deterministic, byte-split
    code, text, _ = cli("inspect", parts[0], "--check")
    assert code == 0 and f"{len(parts)} parts" in text
    code, _, err = cli("load", out, "--to", dst.url)
    assert code == 0, err
    assert read_manifest(dst.url, "rancher/multi", "v1")[2] == source.multi.digest

    parts[-1].rename(tmp_path / "elsewhere")
    code, _, err = cli("load", parts[0], "--to", dst.url)
    assert code == 2 and "truncated" in err and len(error_lines(err)) == 1
    (tmp_path / "elsewhere").rename(parts[-1])
    parts[1].unlink()
    code, _, err = cli("inspect", out)
    assert code == 2 and "part 002 is missing" in err


def test_full_disk_during_save_fails_cleanly(source, tmp_path):
    out = tmp_path / "out.tar"
    limit = 16 * 1024  # every single blob fits; the tar does not
    prog = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from rke2_mirror.cli.app import main\n"
        f"sys.argv = ['rke2-mirror', 'save', '--images', {str(source.list_file)!r}, '-o', {str(out)!r},"
        f" '--source-endpoint', {source.endpoint!r}]\n"
        "main()\n"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = error_lines(r.stderr)
    assert "File too large" in line and "no archive was written" in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


# --------------------------------------------------------------------------- delta


OLD, NEW = "v1.0.0+rke2r1", "v1.0.1+rke2r1"


def test_delta_archive(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    base = make_layer_blob("base", 20000)
    with ImagePusher(src.url) as p:
        x1 = push_image(p, "rancher/x", "v1", base=base, seed="x1")
        y1 = push_image(p, "rancher/y", "v1", kind="oci", platforms=None, base=base, seed="y1")
        x2 = push_image(p, "rancher/x", "v2", base=base, seed="x2")
        z1 = push_image(p, "rancher/z", "v1", platforms=None, base=base, seed="z1")  # a new repository
    old_list, new_list = tmp_path / "old.txt", tmp_path / "new.txt"
    old_list.write_text("rancher/x:v1\nrancher/y:v1\n")
    new_list.write_text("rancher/x:v2\nrancher/y:v1\nrancher/z:v1\n")
    served = tmp_path / "served"  # the two releases, as GitHub would serve their lists
    for version, lst in ((OLD, old_list), (NEW, new_list)):
        d = served / "rke2" / version
        d.mkdir(parents=True)
        body = lst.read_bytes()
        (d / "rke2-images-all.linux-amd64.txt").write_bytes(body)
        (d / "sha256sum-amd64.txt").write_text(f"{sha256_digest(body)[7:]}  rke2-images-all.linux-amd64.txt\n")
    ep = f"docker.io={src.url}"
    old_tar, delta, delta2, delta3 = (tmp_path / n for n in ("old.tar", "delta.tar", "delta2.tar", "delta3.tar"))
    with start_release_server(served, {}) as rs:
        rel = ["--release-url", rs.release_url("rke2"), "--lists-dir", tmp_path / "lists", "--source-endpoint", ep]
        assert cli("save", "--release", OLD, "-o", old_tar, *rel)[0] == 0
        code, _, err = cli("save", "--release", NEW, "--since", OLD, "-o", delta, *rel)
    assert code == 0, err
    assert "left out" in err

    stored = blob_names(delta)
    old_blobs = {d.split(":")[1] for d in x1.blobs | y1.blobs}
    assert base.digest.split(":")[1] not in stored and not stored & old_blobs
    for img in (x2, y1, z1):  # every manifest of NEW is there
        assert img.digest.split(":")[1] in stored
        assert {d.split(":")[1] for d in img.child_manifests} <= stored
    assert {d.split(":")[1] for d in (x2.blobs | z1.blobs) - x1.blobs - y1.blobs} <= stored
    assert delta.stat().st_size < old_tar.stat().st_size

    code, text, _ = cli("inspect", delta)
    assert code == 0 and "delta:" in text and f"against {OLD}" in text
    for since, out in ((old_tar, delta2), (old_list, delta3)):  # an earlier archive, an image list
        code, _, err = cli("save", "-i", new_list, "--since", since, "-o", out, "--source-endpoint", ep)
        assert code == 0, err
        assert blob_names(out) == stored

    code, _, err = cli("load", delta, "--to", dst.url)  # onto an empty target: refused, naming the blobs
    assert code == 2
    (line,) = error_lines(err)
    assert base.digest in line and OLD in line
    assert list_tags(dst.url, "rancher/x") == []

    assert cli("load", old_tar, "--to", dst.url)[0] == 0
    code, text, err = cli("load", delta, "--to", dst.url, "--json")
    assert code == 0, err
    assert json.loads(text)["summary"] == {**json.loads(text)["summary"], "copied": 2, "skipped": 1, "failed": 0}
    for repo, tag, img in (("rancher/x", "v2", x2), ("rancher/y", "v1", y1), ("rancher/z", "v1", z1)):
        assert read_manifest(dst.url, repo, tag)[2] == img.digest


# --------------------------------------------------------------------------- other tools


@pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")
def test_skopeo_reads_our_archive(source, dst, tmp_path):
    out = tmp_path / "out.tar"
    assert save(source, out)[0] == 0
    for repo, img in (("rancher/oci", source.oci), ("rancher/ocisingle", source.ocisingle)):
        r = subprocess.run([SKOPEO, "--tmpdir", str(tmp_path), "copy", "--all", "--preserve-digests",
                            "--dest-tls-verify=false", f"oci-archive:{out}:docker.io/{repo}:v1",
                            f"docker://{dst.host}/skopeo/{repo}:v1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert read_manifest(dst.url, f"skopeo/{repo}", "v1")[2] == img.digest


@pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed")
def test_we_load_archives_written_by_skopeo(source, dst, tmp_path):
    short = tmp_path / "short.tar"  # ref.name = "v1" only
    full = tmp_path / "full.tar"  # ref.name = a full reference, as crane --annotate-ref writes it
    layout_dir = tmp_path / "layout"
    for dest in (f"oci-archive:{short}:v1", f"oci:{layout_dir}:index.docker.io/rancher/oci:v1"):
        r = subprocess.run([SKOPEO, "--tmpdir", str(tmp_path), "copy", "--all", "--preserve-digests",
                            "--src-tls-verify=false", f"docker://{source.reg.host}/rancher/oci:v1", dest],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    subprocess.run(["tar", "-C", str(layout_dir), "-cf", str(full), "."], check=True)  # members "./blobs/…"

    code, _, err = cli("load", short, "--to", dst.url)
    assert code == 2 and "--name" in error_lines(err)[0]
    code, _, err = cli("load", short, "--to", dst.url, "--name", "docker.io/rancher/fromskopeo")
    assert code == 0, err
    assert read_manifest(dst.url, "rancher/fromskopeo", "v1")[2] == source.oci.digest
    code, _, err = cli("load", full, "--to", dst.url)
    assert code == 0, err
    assert read_manifest(dst.url, "rancher/oci", "v1")[2] == source.oci.digest


# --------------------------------------------------------------------------- corrupt and hostile


def test_corrupted_blob_is_named_and_its_image_not_tagged(source, dst, tmp_path):
    out = tmp_path / "out.tar"
    assert save(source, out)[0] == 0
    others = source.multi.blobs | source.oci.blobs | source.ocisingle.blobs
    victim = sorted(source.single.blobs - others)[0]
    with tarfile.open(out) as tf:
        m = tf.getmember("blobs/sha256/" + victim.split(":")[1])
    flip_byte(out, m.offset_data + m.size // 2)

    code, _, err = cli("inspect", out, "--check")
    assert code == 1 and victim in err
    code, text, err = cli("load", out, "--to", dst.url, "--json")
    assert code == 1
    failed = [i for i in json.loads(text)["images"] if i["status"] == "failed"]
    assert [i["source"] for i in failed] == ["docker.io/rancher/single:v1"] and victim in failed[0]["error"]
    assert list_tags(dst.url, "rancher/single") == []
    assert read_manifest(dst.url, "rancher/multi", "v1")[2] == source.multi.digest


def _tar(path: Path, files: list[tuple[str, bytes | None]], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size = len(data or b"")
            tf.addfile(ti, io.BytesIO(data or b""))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return path


def _copy_without(src: Path, dest: Path, drop: str) -> Path:
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            if m.name != drop:
                tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
    return dest


def test_hostile_and_broken_archives_are_refused(source, dst, tmp_path):
    good = tmp_path / "good.tar"
    assert save(source, good)[0] == 0
    layout = b'{"imageLayoutVersion": "1.0.0"}'
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    gz = tmp_path / "good.tar.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    cases = {
        "points outside": _tar(tmp_path / "dotdot.tar", [("oci-layout", layout), ("index.json", index),
                                                          ("../evil", b"x")]),
        "absolute path": _tar(tmp_path / "abs.tar", [("index.json", index), ("/tmp/evil", b"x")]),
        "no index.json": _tar(tmp_path / "link.tar", [("oci-layout", layout)], links={"index.json": "/etc/passwd"}),
        "gzip-compressed": gz,
        "truncated": cut,
        "not a tar archive": junk,
    }
    for what, path in cases.items():
        for cmd in (("load", path, "--to", dst.url), ("inspect", path)):
            code, _, err = cli(*cmd)
            assert code == 2, (what, err)
            (line,) = error_lines(err)
            assert what in line, (what, line)
    assert not (tmp_path.parent / "evil").exists()

    # a missing blob: the image that needs it fails (named), nothing of it is tagged, the others load
    victim = sorted(source.single.blobs - source.multi.blobs - source.oci.blobs - source.ocisingle.blobs)[0]
    holed = _copy_without(good, tmp_path / "holed.tar", "blobs/sha256/" + victim.split(":")[1])
    code, _, err = cli("inspect", holed)
    assert code == 1 and victim in err
    code, _, err = cli("load", holed, "--to", dst.url)
    assert code == 1 and victim in err and "missing" in err
    assert list_tags(dst.url, "rancher/single") == []
    assert read_manifest(dst.url, "rancher/oci", "v1")[2] == source.oci.digest


def test_archive_reader_reads_in_place(source, tmp_path):
    out = tmp_path / "out.tar"
    assert save(source, out)[0] == 0
    with ArchiveReader(out) as r:
        assert {str(i.ref) for i in r.images} == {f"docker.io/{repo}:v1" for repo in source.all()}
        d = r.head_manifest("docker.io/rancher/multi", "v1")
        assert d.digest == source.multi.digest and d.media_type == DOCKER_LIST
        assert r.head_manifest("docker.io/rancher/oci", "v1").media_type == OCI_INDEX
        assert r.delta is None and r.layout_version == "1.0.0"


# --------------------------------------------------------------------------- Harbor


def test_load_creates_harbor_projects(source, harbor, pki, rke2_mirror_env, tmp_path):
    out = tmp_path / "out.tar"
    assert save(source, out)[0] == 0
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    code, _, err = cli("load", out, "--to", harbor.url, "--ca-file", pki.cert_path)
    assert code == 0, err
    assert "rancher" in harbor.projects and harbor.projects["rancher"].public is False
    got = read_manifest(harbor.url, "rancher/multi", "v1", auth=("admin", "Harbor12345"), verify=harbor.ca_file)
    assert got[2] == source.multi.digest


def test_save_never_writes_through_a_link_planted_at_its_partial_name(source, tmp_path):
    """Anyone who can write into the output directory could plant FILE.tar.partial -> /etc/something:
    the root job must remove the link and create its own file, never write through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out.tar"
    (tmp_path / "out.tar.partial").symlink_to(victim)
    code, _, err = save(source, out)
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert out.is_file() and not out.is_symlink() and not (tmp_path / "out.tar.partial").exists()


def test_save_refuses_a_compressed_name_without_for_node(source, tmp_path):
    """A plain `save` writes an uncompressed tar; a .tar.zst name would lie about it."""
    code, _, err = save(source, tmp_path / "out.tar.zst")
    assert code == 2
    (line,) = error_lines(err)
    assert "--for-node" in line and not list(tmp_path.glob("out.tar*"))
