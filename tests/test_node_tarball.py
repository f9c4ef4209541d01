"""`save --for-node`: tarballs an RKE2 node reads from agent/images with both of its readers, checked with
the real tools: skopeo's docker-archive transport (a docker-tarball reader, as go-containerregistry's
is for RKE2's runtime-image lookup), `zstd -lv` (the window RKE2's decoder accepts) and containerd's
importer (`ctr images import`, a private containerd started here); and `inspect` on such files."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from rke2_mirror.endpoints.nodetarball import docker_tarball_names, ggcr_tag_name, zstd_max_window
from rke2_mirror.endpoints.tarfiles import ZSTD_WINDOW_LOG, open_tar_writer, output_compression
from rke2_mirror.model.errors import InputError
from rke2_mirror_testkit.images import ImagePusher, PushedImage, make_layer_blob, push_image

SKOPEO = shutil.which("skopeo")
ZSTD = shutil.which("zstd")
HARBOR = "harbor.example.com"
TIMEOUT = 60


def cli(*args) -> tuple[int, str, str]:
    from rke2_mirror.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw)


def config_digest(manifest: bytes) -> str:
    return json.loads(manifest)["config"]["digest"]


# --------------------------------------------------------------------------- units


def test_names_compare_as_go_containerregistry_compares_them():
    """What tarball.Image(..., &tag) matches (pkg/name: docker.io -> index.docker.io, library/, latest)."""
    same = {"rancher/x:t", "docker.io/rancher/x:t", "index.docker.io/rancher/x:t"}
    assert {ggcr_tag_name(n) for n in same} == {"index.docker.io/rancher/x:t"}
    assert ggcr_tag_name("busybox") == ggcr_tag_name("docker.io/library/busybox:latest") == \
        "index.docker.io/library/busybox:latest"
    assert ggcr_tag_name(f"{HARBOR}/rancher/x:t") == f"{HARBOR}/rancher/x:t" != ggcr_tag_name("rancher/x:t")
    assert ggcr_tag_name("localhost:5000/x:t") == "localhost:5000/x:t"
    assert ggcr_tag_name(f"{HARBOR}:8443/mirror/rancher/x:t") == f"{HARBOR}:8443/mirror/rancher/x:t"
    assert ggcr_tag_name("registry-1.docker.io/rancher/x:t") != ggcr_tag_name("rancher/x:t")  # only docker.io is rewritten
    for bad in ("Rancher/x:t", "rancher/x:", "rancher/x@sha256:" + "a" * 64, ""):
        with pytest.raises(ValueError):
            ggcr_tag_name(bad)
    # a name go-containerregistry refuses ends every lookup that reaches it
    found = docker_tarball_names([{"RepoTags": ["rancher/a:1"]}, {"RepoTags": ["Bad/b:1", "rancher/c:1"]}])
    assert [n for n, _, _ in found.names] == ["index.docker.io/rancher/a:1"] and "Bad/b:1" in found.error


def test_output_compression_is_chosen_by_the_name():
    assert output_compression(Path("a.tar")) is None
    assert output_compression(Path("a.TAR.GZ")) == output_compression(Path("a.tgz")) == "gzip"
    assert output_compression(Path("rke2-images.linux-amd64.tar.zst")) == output_compression(Path("a.tzst")) == "zstd"
    for bad in ("a.tar.xz", "a.zst", "a", ".tar"):
        with pytest.raises(InputError):
            output_compression(Path(bad))


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_compressed_writer_streams_and_renames_into_place(tmp_path, kind):
    out = tmp_path / f"x.tar.{'zst' if kind == 'zstd' else 'gz'}"
    src = tmp_path / "src"
    data = os.urandom(3 * 1024 * 1024 + 7)
    src.write_bytes(data)
    w = open_tar_writer(out, None, kind)
    w.write(b"head")
    fd = os.open(src, os.O_RDONLY)
    try:
        w.copy_from(fd, len(data))
    finally:
        os.close(fd)
    assert not out.exists() and w.temps[0].exists() and w.tell() == 4 + len(data)
    assert w.commit() == [out] and not w.temps[0].exists()
    raw = out.read_bytes()
    if kind == "gzip":
        assert gzip.decompress(raw) == b"head" + data
    else:
        import zstandard
        assert zstandard.ZstdDecompressor().decompressobj().decompress(raw) == b"head" + data
        assert zstd_max_window(out) == 1 << ZSTD_WINDOW_LOG


def test_zstd_window_of_a_long_mode_file_is_seen(tmp_path):
    """What inspect warns about: a --long=27 file (128 MiB window) fails on a node."""
    if ZSTD is None:
        pytest.skip("zstd not installed")
    src = tmp_path / "a.tar"
    src.write_bytes(os.urandom(4096))
    for args, name in ((["--long=27"], "long.tar.zst"), ([], "plain.tar.zst")):  # from stdin: size unknown
        with open(src, "rb") as f:
            assert subprocess.run([ZSTD, "-q", *args, "-o", str(tmp_path / name)], stdin=f, timeout=TIMEOUT).returncode == 0
    assert zstd_max_window(tmp_path / "long.tar.zst") == 1 << 27
    assert zstd_max_window(tmp_path / "plain.tar.zst") <= 1 << 25
    assert zstd_max_window(src) is None


# --------------------------------------------------------------------------- against a registry


@dataclass
class Source:
    reg: object
    runtime: PushedImage  # docker manifest list: linux/amd64 + linux/arm64
    oci: PushedImage  # OCI index: linux/amd64 + linux/arm64
    single: PushedImage  # docker manifest, linux/amd64
    list_file: Path

    @property
    def endpoint(self) -> str:
        return f"docker.io={self.reg.url}"

    def all(self) -> dict[str, PushedImage]:
        return {"rancher/rke2-runtime": self.runtime, "rancher/oci": self.oci, "rancher/single": self.single}

    def platform_manifest(self, repo: str, platform: str = "linux/amd64") -> tuple[str, bytes]:
        img = self.all()[repo]
        if not img.children:
            return img.digest, img.manifest
        d = img.child(platform)
        return d, img.child_manifests[d]


@pytest.fixture
def source(registry_factory, tmp_path) -> Source:
    reg = registry_factory(name="node-src")
    base = make_layer_blob("node-base", 4000)
    with ImagePusher(reg.url) as p:
        runtime = push_image(p, "rancher/rke2-runtime", "v1", base=base, seed="runtime")
        oci = push_image(p, "rancher/oci", "v1", kind="oci", base=base, seed="oci")
        single = push_image(p, "rancher/single", "v1", platforms=None, seed="single")
    lst = tmp_path / "images.txt"
    lst.write_text("rancher/rke2-runtime:v1\nrancher/oci:v1\nrancher/single:v1\n")
    return Source(reg, runtime, oci, single, lst)


def save_for_node(source: Source, out: Path, *extra) -> tuple[int, str, str]:
    return cli("save", "--for-node", "--images", source.list_file, "-o", out, "--source-endpoint", source.endpoint,
               *extra)


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def read_member(path: Path, name: str):
    with tarfile.open(path) as tf:
        return json.load(tf.extractfile(name))


def decompress_zstd(src: Path, dest: Path) -> Path:
    r = run(ZSTD, "-q", "-d", src, "-o", dest)
    assert r.returncode == 0, r.stderr
    return dest


def test_node_tarball_is_read_by_both_readers_under_both_names(source, tmp_path):
    if ZSTD is None:
        pytest.skip("zstd not installed")
    out = tmp_path / "rke2-images.linux-amd64.tar.zst"
    code, _, err = save_for_node(source, out, "--system-default-registry", HARBOR)
    assert code == 0, err
    assert out.is_file() and not list(tmp_path.glob("*.partial")) and not (tmp_path / (out.name + ".work")).exists()

    # the zstd window a node's decoder accepts (rancher/wharfie MaxDecoderMemory = 1 << 25)
    r = run(ZSTD, "-lv", out)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Window Size:.*\((\d+) B\)", r.stdout)
    assert m and int(m.group(1)) <= 32 * 1024 * 1024, r.stdout

    tar = decompress_zstd(out, tmp_path / "rke2-images.linux-amd64.tar")
    names = members(tar)
    assert names[:3] == ["oci-layout", "index.json", "manifest.json"]
    blobs = [n for n in names if n.startswith("blobs/sha256/")]
    assert len(blobs) == len(set(blobs))  # each blob once: the base layer is shared by all images
    expected: set[str] = set()
    docker = read_member(tar, "manifest.json")
    index = read_member(tar, "index.json")
    by_tag = {t: e for e in docker for t in e["RepoTags"]}
    by_name = {e["annotations"]["io.containerd.image.name"]: e for e in index["manifests"]}
    for repo in source.all():
        digest, manifest = source.platform_manifest(repo)
        doc = json.loads(manifest)
        expected |= {digest, doc["config"]["digest"], *(l["digest"] for l in doc["layers"])}
        for name in (f"docker.io/{repo}:v1", f"{HARBOR}/{repo}:v1"):
            e = by_tag[name]  # docker manifest.json: the image ID is the source's config digest
            assert e["Config"] == "blobs/sha256/" + config_digest(manifest).split(":")[1]
            assert e["Layers"] == ["blobs/sha256/" + l["digest"].split(":")[1] for l in doc["layers"]]
            assert by_name[name]["digest"] == digest  # index.json: the amd64 manifest itself, never the index
    assert {n.split("/")[-1] for n in blobs} == {d.split(":")[1] for d in expected}  # no arm64 blob, no index
    assert len(docker) == 3 and len(index["manifests"]) == 6

    # a docker-tarball reader (skopeo's docker-archive:) finds each image under both names, same image ID
    if SKOPEO is None:
        pytest.skip("skopeo not installed")
    for repo in source.all():
        _, manifest = source.platform_manifest(repo)
        for name in (f"docker.io/{repo}:v1", f"{HARBOR}/{repo}:v1"):
            for f in (tar, out):  # skopeo decompresses a .tar.zst itself
                r = run(SKOPEO, "inspect", "--raw", f"docker-archive:{f}:{name}")
                assert r.returncode == 0, r.stderr
                assert config_digest(r.stdout.encode()) == config_digest(manifest)
    r = run(SKOPEO, "inspect", "--raw", f"docker-archive:{tar}:docker.io/rancher/absent:v1")
    assert r.returncode != 0
    # and reads the runtime image whole: every layer checked against the config's diff_ids on the way
    dest = tmp_path / "runtime-dir"
    r = run(SKOPEO, "copy", f"docker-archive:{out}:{HARBOR}/rancher/rke2-runtime:v1", f"dir:{dest}")
    assert r.returncode == 0, r.stderr
    _, manifest = source.platform_manifest("rancher/rke2-runtime")
    assert (dest / config_digest(manifest).split(":")[1]).is_file()

    # inspect: the names RKE2's lookup finds, the runtime image among them; the zstd window
    code, text, err = cli("inspect", out, "--json")
    assert code == 0, err
    node = json.loads(text)["node"]
    assert node["warnings"] == [] and node["docker_manifest"] and node["zstd_window"] == 1 << 25
    assert set(node["runtime"]) == {"index.docker.io/rancher/rke2-runtime:v1", f"{HARBOR}/rancher/rke2-runtime:v1"}
    assert len(node["runtime_lookup"]) == 6
    code, text, _ = cli("inspect", tar)
    assert code == 0 and "serves RKE2's runtime image" in text and f"{HARBOR}/rancher/rke2-runtime:v1" in text


def test_platform_from_arch_and_gzip(source, tmp_path):
    out = tmp_path / "rke2-images.linux-arm64.tar.gz"
    code, _, err = save_for_node(source, out, "--arch", "arm64")
    assert code == 1  # the single-platform amd64 image has no arm64: named, the others are written
    assert "rancher/single" in err and "linux/amd64" in err
    tar = tmp_path / "arm64.tar"
    tar.write_bytes(gzip.decompress(out.read_bytes()))
    docker = read_member(tar, "manifest.json")
    assert sorted(t for e in docker for t in e["RepoTags"]) == ["docker.io/rancher/oci:v1", "docker.io/rancher/rke2-runtime:v1"]
    for e in docker:
        repo = e["RepoTags"][0].split(":")[0].removeprefix("docker.io/")
        _, manifest = source.platform_manifest(repo, "linux/arm64")
        assert e["Config"] == "blobs/sha256/" + config_digest(manifest).split(":")[1]


def test_rerun_resumes_in_the_work_dir_and_writes_the_same_bytes(source, tmp_path):
    out = tmp_path / "node.tar.zst"
    code, _, err = save_for_node(source, out, "--keep-work-dir", "--system-default-registry", HARBOR)
    assert code == 0, err
    assert (tmp_path / "node.tar.zst.work" / "oci-layout").is_file()
    first = out.read_bytes()
    code, text, err = save_for_node(source, out, "--json", "--system-default-registry", HARBOR)
    assert code == 0, err
    assert json.loads(text)["summary"]["skipped"] == 3  # nothing fetched again: the work dir had it all
    assert out.read_bytes() == first and not (tmp_path / "node.tar.zst.work").exists()


def test_a_system_default_registry_name_never_hides_an_image_of_that_name(source, tmp_path):
    """harbor.example.com/rancher/single:v1 asked for itself (another image) keeps its name; the alias of
    docker.io/rancher/single:v1 is left out with a warning."""
    with ImagePusher(source.reg.url) as p:
        other = push_image(p, "other/rancher/single", "v1", platforms=None, seed="other")
    lst = tmp_path / "more.txt"
    lst.write_text(f"rancher/single:v1\n{HARBOR}/rancher/single:v1\n")
    out = tmp_path / "n.tar"
    code, _, err = cli("save", "--for-node", "--images", lst, "-o", out, "--source-endpoint", source.endpoint,
                       "--source-endpoint", f"{HARBOR}={source.reg.url}/other", "--system-default-registry", HARBOR)
    assert code == 0, err
    assert f"{HARBOR}/rancher/single:v1 is the name of another image" in err
    docker = {t: e for e in read_member(out, "manifest.json") for t in e["RepoTags"]}
    assert set(docker) == {"docker.io/rancher/single:v1", f"{HARBOR}/rancher/single:v1"}
    assert docker[f"{HARBOR}/rancher/single:v1"]["Config"] == "blobs/sha256/" + config_digest(other.manifest).split(":")[1]
    assert docker["docker.io/rancher/single:v1"]["Config"] == \
        "blobs/sha256/" + config_digest(source.single.manifest).split(":")[1]


def test_for_node_refuses_what_a_node_cannot_read(source, tmp_path):
    lst = source.list_file
    for extra, msg in ((["-o", tmp_path / "x.tar.xz"], ".tar.zst"),
                       (["-o", tmp_path / "x.tar", "--platform", "linux/amd64", "--platform", "linux/arm64"], "one --platform"),
                       (["-o", tmp_path / "x.tar", "--arch", "amd64", "--arch", "arm64"], "one --arch"),
                       (["-o", tmp_path / "x.tar", "--platform", "linux/arm64", "--arch", "amd64"], "disagree"),
                       (["-o", tmp_path / "x.tar", "--split", "1G"], "--split"),
                       (["-o", tmp_path / "x.tar", "--system-default-registry", "https://h.example.com"], "scheme")):
        code, _, err = cli("save", "--for-node", "--images", lst, "--source-endpoint", source.endpoint, *extra)
        assert code == 2 and msg in err, (extra, err)
    code, _, err = cli("save", "--images", lst, "-o", tmp_path / "x.tar", "--system-default-registry", HARBOR)
    assert code == 2 and "--for-node" in err
    assert not list(tmp_path.glob("x.tar*"))


def test_inspect_warns_that_an_oci_only_archive_hides_the_runtime_image(source, tmp_path):
    out = tmp_path / "plain.tar"
    code, _, err = cli("save", "--images", source.list_file, "-o", out, "--source-endpoint", source.endpoint)
    assert code == 0, err
    code, text, _ = cli("inspect", out, "--json")
    node = json.loads(text)["node"]
    assert code == 0 and not node["docker_manifest"] and node["runtime"] == []
    assert any("docker.io/rancher/rke2-runtime:v1" in w and "save --for-node" in w for w in node["warnings"])
    code, text, _ = cli("inspect", out)
    assert "OCI-only" in text and "warning:" in text


# --------------------------------------------------------------------------- containerd's importer


@dataclass
class Containerd:
    sock: Path

    def ctr(self, *args, **kw) -> subprocess.CompletedProcess:
        return run("ctr", "-a", self.sock, "-n", "k8s.io", *args, **kw)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A private containerd (own root, state and socket; CRI off, native snapshotter only), stopped at teardown."""
    if not (shutil.which("containerd") and shutil.which("ctr")):
        pytest.skip("containerd not installed (apt-get install containerd)")
    d = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))  # short: a unix socket path has at most 107 bytes
    sock = d / "sock"
    (d / "config.toml").write_text(f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
""")
    log = open(d / "containerd.log", "wb")
    proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml"), "--root", str(d / "root"),
                             "--state", str(d / "state"), "--address", str(sock)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = Containerd(sock)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.skip(f"containerd cannot start here: {(d / 'containerd.log').read_text()[-400:]}")
            if sock.exists() and ready.ctr("version").returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.skip(f"containerd did not answer within 20s: {(d / 'containerd.log').read_text()[-400:]}")
            time.sleep(0.2)
        yield ready
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_containerd_imports_the_node_tarball_whole(source, containerd, tmp_path):
    """As k3s imports agent/images (WithAllPlatforms: every blob an entry reaches must be there), decoded by
    the file's name first (zstd -dc | ctr images import -)."""
    if ZSTD is None:
        pytest.skip("zstd not installed")
    out = tmp_path / "rke2-images.linux-amd64.tar.zst"
    code, _, err = save_for_node(source, out, "--system-default-registry", HARBOR)
    assert code == 0, err
    dec = subprocess.Popen([ZSTD, "-q", "-dc", str(out)], stdout=subprocess.PIPE)
    try:
        r = containerd.ctr("images", "import", "--all-platforms", "--no-unpack", "-", stdin=dec.stdout)
    finally:
        dec.stdout.close()
        dec.wait(TIMEOUT)
    assert r.returncode == 0, r.stderr + r.stdout
    r = containerd.ctr("images", "ls")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line.split()[2] for line in r.stdout.splitlines()[1:] if line.strip()}
    for repo in source.all():
        digest, _ = source.platform_manifest(repo)
        for name in (f"docker.io/{repo}:v1", f"{HARBOR}/{repo}:v1"):
            assert listed.get(name) == digest, (name, r.stdout)
    assert len(listed) == 6
