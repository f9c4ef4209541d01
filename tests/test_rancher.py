"""`--product rancher`: a Rancher release's rancher-images.txt (and rancher-windows-images.txt) verified against
its sha256sum.txt, the digests it publishes (rancher-images-digests-*.txt, verified against
images-digests-sha256sum.txt) checked on every copy, versions without a build suffix, the cache, sync configs.

The release is written by `write_rancher_release` (the testkit's copy of the asset names and formats of
rancher/rancher's release workflow) and served by the local release server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import rke2_mirror.jobs.sync as job
from rke2_mirror.cli.app import app as cli_app
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.releases import PRODUCTS, ReleaseSource, parse_digests, parse_release, release_images
from rke2_mirror_testkit.images import ImagePusher, list_tags, make_layer_blob, push_image
from rke2_mirror_testkit.release_server import start_release_server, write_rancher_release

from .test_mirror import run_cli

VERSION = "v2.12.3"
IMAGES = ["rancher/rancher:v2.12.3", "rancher/fleet:v0.13.0", "rancher/shell:v0.5.0", "busybox:1.36"]
WINDOWS = ["rancher/wins:v0.5.0"]
D = {name: f"sha256:{c * 64}" for name, c in zip(IMAGES + WINDOWS, "abcde")}

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(cli_app, list(args))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RKE2_MIRROR_RELEASE_URL", raising=False)
    monkeypatch.delenv("RKE2_MIRROR_CHANNEL_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    write_rancher_release(root, VERSION, IMAGES, windows_images=WINDOWS, digests=D)
    return root


@pytest.fixture
def server(served: Path):
    srv = start_release_server(served)
    yield srv
    srv.stop()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def source_args(server, cache: Path) -> list[str]:
    return ["--product", "rancher", "--release-url", server.release_url("rancher"), "--lists-dir", str(cache)]


def rancher_src(server, cache: Path, offline: bool = False) -> ReleaseSource:
    return ReleaseSource.default("rancher", None if offline else server.release_url("rancher"), None, cache,
                                 offline, env={})


# --------------------------------------------------------------------------- the product


def test_real_asset_names_and_urls() -> None:
    """As rancher/rancher publishes them (.github/workflows/release.yml, scripts/artifacts-list.sh)."""
    spec = PRODUCTS["rancher"]
    src = ReleaseSource.default("rancher", env={})
    assert src.asset_url(VERSION, spec.list_asset("all", "amd64")) == \
        "https://github.com/rancher/rancher/releases/download/v2.12.3/rancher-images.txt"
    assert spec.list_asset("windows", "amd64") == "rancher-windows-images.txt"
    assert spec.checksum_asset("amd64") == spec.checksum_asset("arm64") == "sha256sum.txt"
    assert spec.digest_checksums == ("images-digests-sha256sum.txt",)
    assert spec.digest_assets("all", "arm64") == ("rancher-images-digests-linux.txt",
                                                  "rancher-images-digests-linux-arm64.txt")
    assert spec.digest_assets("windows", "amd64")[0] == "rancher-images-digests-windows.txt"
    assert src.channel_url == ""  # no channel server
    with pytest.raises(InputError, match="rancher-images.txt .*--flavor all.*rancher-windows-images.txt"):
        spec.list_asset("core", "amd64")


def test_versions_per_product_and_the_wrong_shape_in_one_line() -> None:
    assert parse_release("v2.12.3", "rancher") == ("v2.12.3", False)
    assert parse_release("v2.13.0-rc1", "rancher") == ("v2.13.0-rc1", False)
    assert parse_release("v1.30.14+rke2r1", "rke2") == ("v1.30.14+rke2r1", False)
    cases = [
        ("v2.12.3", "rke2", "'v2.12.3' is not an rke2 version (rke2 versions look like v1.28.9+rke2r1); it looks "
                            "like a rancher version: use --product rancher"),
        ("v2.12.3", "k3s", "use --product rancher"),
        ("v1.30.14+rke2r1", "rancher", "'v1.30.14+rke2r1' is not a rancher version (rancher versions look like "
                                       "v2.12.3); it looks like an rke2 version: use --product rke2"),
        ("v1.30.14-rke2r1", "rancher", "use --product rke2"),
        ("v1.28.9+k3s1", "rancher", "use --product k3s"),
        ("2.12.3", "rancher", "needs the 'v' prefix, e.g. v2.12.3"),
        ("v1.28.9", "rancher", "is not a rancher version"),
        ("bad version!", "rancher", "give a version like v2.12.3"),
    ]
    for value, product, message in cases:
        with pytest.raises(InputError) as e:
            parse_release(value, product)
        assert message in str(e.value) and "\n" not in str(e.value), (value, product, e.value)


def test_a_channel_is_refused_without_a_channel_server(server, cache) -> None:
    with pytest.raises(InputError, match="rancher has no channel server .*give the full version"):
        release_images("stable", rancher_src(server, cache), None)
    res = cli("list", "v2.12", *source_args(server, cache))
    assert res.exit_code == 2
    assert "no channel server" in res.output and len(res.output.strip().splitlines()) == 1


def test_parse_digests_formats() -> None:
    text = ("docker.io/rancher/rancher:v2.12.3 sha256:" + "a" * 64 + "\n"
            "registry.rancher.com/rancher/fleet:v0.13.0 sha256:" + "b" * 64 + "\n"
            "docker.io/library/busybox:1.36 sha256:" + "c" * 64 + "\n"
            "docker.io/rancher/shell:v0.5.0 \n"          # not found when the file was made: no digest
            "docker.io/rancher/odd:v1 md5:abc\n")
    got, unusable = parse_digests(text)
    assert got == {ImageRef.parse("rancher/rancher:v2.12.3"): "sha256:" + "a" * 64,
                   ImageRef.parse("rancher/fleet:v0.13.0"): "sha256:" + "b" * 64,
                   ImageRef.parse("busybox:1.36"): "sha256:" + "c" * 64}
    assert unusable == 2


# --------------------------------------------------------------------------- list, cache, verification


def test_list_rancher_release_and_its_digests(server, cache) -> None:
    res = cli("list", VERSION, *source_args(server, cache))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines == [str(ImageRef.parse(i)) for i in IMAGES]
    err = res.stderr
    assert f"rancher {VERSION}: 1 list verified against sha256sum.txt (4 images; 4 with a published digest" in err
    assert "rancher-images-digests-linux.txt verified against images-digests-sha256sum.txt" in err
    # cached as RKE2 lists are: lists/rancher/<version>/
    have = sorted(p.name for p in (cache / "rancher" / VERSION).iterdir())
    assert have == ["images-digests-sha256sum.txt", "rancher-images-digests-linux.txt", "rancher-images.txt",
                    "sha256sum.txt"]
    res = cli("list", VERSION, "--json", *source_args(server, cache))
    doc = json.loads(res.stdout)
    assert doc["product"] == "rancher" and doc["lists"][0]["verified_against"] == "sha256sum.txt"
    assert doc["digest_files"] == ["rancher-images-digests-linux.txt"]
    assert doc["digests"]["docker.io/rancher/fleet:v0.13.0"] == D["rancher/fleet:v0.13.0"]


def test_offline_reads_the_cache_and_verifies_it_again(server, cache) -> None:
    assert cli("list", VERSION, *source_args(server, cache)).exit_code == 0
    server.stop()
    res = cli("list", VERSION, "--product", "rancher", "--lists-dir", str(cache), "--offline")
    assert res.exit_code == 0, res.output
    assert len(res.stdout.splitlines()) == len(IMAGES)
    assert "read from the cache" in res.stderr and "4 with a published digest" in res.stderr
    r = release_images(VERSION, rancher_src(server, cache, offline=True), None)
    assert r.digests[ImageRef.parse("busybox:1.36")] == D["busybox:1.36"]
    (cache / "rancher" / VERSION / "rancher-images.txt").write_text("rancher/evil:v1\n")
    res = cli("list", VERSION, "--product", "rancher", "--lists-dir", str(cache), "--offline")
    assert res.exit_code == 2 and "does not match sha256sum.txt" in res.output


def test_tampered_list_fails_in_one_line_naming_both_digests(server, served, cache) -> None:
    path = served / "rancher" / VERSION / "rancher-images.txt"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text(path.read_text() + "rancher/evil:v1\n")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    res = cli("list", VERSION, *source_args(server, cache))
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert line.startswith("rke2-mirror: error: rancher-images.txt of rancher v2.12.3 does not match sha256sum.txt")
    assert expected in line and actual in line
    assert not (cache / "rancher" / VERSION / "rancher-images.txt").exists()


def test_tampered_digests_file_fails_too(server, served, cache) -> None:
    path = served / "rancher" / VERSION / "rancher-images-digests-linux.txt"
    path.write_text(path.read_text().replace("a" * 64, "f" * 64))
    res = cli("list", VERSION, *source_args(server, cache))
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert "rancher-images-digests-linux.txt of rancher v2.12.3 does not match images-digests-sha256sum.txt" in line


def test_windows_list_and_per_arch_digests_of_older_releases(tmp_path, cache) -> None:
    root = tmp_path / "old"
    write_rancher_release(root, "v2.11.3", IMAGES, windows_images=WINDOWS, digests=D, digests_layout="per-arch")
    with start_release_server(root) as srv, httpx.Client() as client:
        src = ReleaseSource.default("rancher", srv.release_url("rancher"), None, cache, env={})
        lines: list[str] = []
        r = release_images("v2.11.3", src, client, ["amd64", "arm64"], ["all", "windows"], lines.append)
        assert [f.name for f in r.files] == ["rancher-images.txt", "rancher-windows-images.txt"]  # once each
        assert r.digest_files == ("rancher-images-digests-linux-amd64.txt", "rancher-images-digests-windows-ltsc2022.txt",
                                  "rancher-images-digests-linux-arm64.txt")
        assert r.digests[ImageRef.parse("rancher/wins:v0.5.0")] == D["rancher/wins:v0.5.0"]
        assert len(r.digests) == 5
        assert sum(1 for q in srv.requests if q.path.endswith("/releases/download/v2.11.3/sha256sum.txt")) == 1


def test_a_release_without_a_digests_file_says_digests_are_not_checked(tmp_path, cache) -> None:
    root = tmp_path / "nodigests"
    write_rancher_release(root, "v2.8.5", IMAGES)
    with start_release_server(root) as srv:
        res = cli("list", "v2.8.5", "--product", "rancher", "--release-url", srv.release_url("rancher"),
                  "--lists-dir", str(cache))
    assert res.exit_code == 0, res.output
    assert "no digests file named in images-digests-sha256sum.txt, sha256sum.txt: image digests are not checked" \
        in res.stderr


# --------------------------------------------------------------------------- copies check the published digest


def test_mirror_fails_the_image_whose_published_digest_differs(registry_factory, tmp_path) -> None:
    src = registry_factory(name="dockerhub")
    dst = registry_factory(name="dst")
    base = make_layer_blob("rancher-base", 20_000)
    pushed = {}
    with ImagePusher(src.url) as p:
        for ref in IMAGES:
            repo, tag = ImageRef.parse(ref).repository, ImageRef.parse(ref).tag
            pushed[ref] = push_image(p, repo, tag, base=base, seed=ref, layer_sizes=(3_000,)).digest
    bad = "rancher/fleet:v0.13.0"
    published = dict(pushed, **{bad: "sha256:" + "0" * 64})
    root = tmp_path / "served"
    write_rancher_release(root, VERSION, IMAGES, digests=published)
    with start_release_server(root) as srv:
        args = ("mirror", "--release", VERSION, "--product", "rancher", "--release-url", srv.release_url("rancher"),
                "--lists-dir", str(tmp_path / "cache"), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                "--json")
        proc = run_cli(*args)
        check = run_cli("list", VERSION, "--product", "rancher", "--release-url", srv.release_url("rancher"),
                        "--lists-dir", str(tmp_path / "cache"), "--source-endpoint", f"docker.io={src.url}", "--check")
    # list --check names the image whose digest differs from the published one (exit 1), the others ok
    assert check.returncode == 1, check.stderr
    lines = {l.split()[1]: l for l in check.stdout.splitlines()}
    bad_line = lines[str(ImageRef.parse(bad))]
    assert bad_line.startswith("DIGEST") and pushed[bad] in bad_line and "sha256:" + "0" * 64 in bad_line
    assert sum(l.startswith("ok") for l in lines.values()) == len(IMAGES) - 1
    assert "1 with another digest than the release publishes" in check.stderr
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    status = {i["source"]: i for i in rep["images"]}
    failed = status[str(ImageRef.parse(bad))]
    assert failed["status"] == "failed"
    assert pushed[bad] in failed["error"] and "sha256:" + "0" * 64 in failed["error"]
    assert rep["summary"]["copied"] == len(IMAGES) - 1 and rep["summary"]["failed"] == 1
    assert list_tags(dst.url, "rancher/fleet") == []
    assert list_tags(dst.url, "rancher/rancher") == ["v2.12.3"]
    assert list_tags(dst.url, "library/busybox") == ["1.36"]


def test_save_checks_the_published_digests_too(registry_factory, tmp_path) -> None:
    src = registry_factory(name="dockerhub")
    with ImagePusher(src.url) as p:
        pushed = {ref: push_image(p, ImageRef.parse(ref).repository, ImageRef.parse(ref).tag, seed=ref,
                                  layer_sizes=(2_000,)).digest for ref in IMAGES}
    bad = "rancher/rancher:v2.12.3"
    root = tmp_path / "served"
    write_rancher_release(root, VERSION, IMAGES, digests=dict(pushed, **{bad: "sha256:" + "2" * 64}))
    with start_release_server(root) as srv:
        proc = run_cli("save", "--release", VERSION, "--product", "rancher", "--release-url",
                       srv.release_url("rancher"), "--lists-dir", str(tmp_path / "cache"), "--source-endpoint",
                       f"docker.io={src.url}", "--output", str(tmp_path / "rancher.tar"), "--json")
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    (failed,) = [i for i in rep["images"] if i["status"] == "failed"]
    assert failed["source"] == str(ImageRef.parse(bad))
    assert pushed[bad] in failed["error"] and "sha256:" + "2" * 64 in failed["error"]
    assert rep["summary"]["copied"] == len(IMAGES) - 1
    assert (tmp_path / "rancher.tar").is_file()


# --------------------------------------------------------------------------- sync


GOOD = """\
version: 1
target: {url: http://127.0.0.1:5000}
releases:
  - product: rancher
    versions: [v2.12.3]
    flavors: [all, windows]
"""


def test_sync_config_with_product_rancher(tmp_path) -> None:
    cfg = job.parse_config(GOOD, "c.yaml", tmp_path)
    (spec,) = cfg.releases
    assert spec.product == "rancher" and spec.pinned == ("v2.12.3",)
    variants = {
        GOOD.replace("versions: [v2.12.3]", "channels: [stable]"):
            "rancher has no channel server: pin 'versions' (e.g. v2.12.3), or give 'channel_url'",
        GOOD.replace("v2.12.3", "v1.30.14+rke2r1"): "it looks like an rke2 version: use --product rke2",
        GOOD.replace("[all, windows]", "[core]"): "unknown rancher flavor 'core' (known: all, default, windows",
    }
    for text, message in variants.items():
        with pytest.raises(InputError) as e:
            job.parse_config(text, "c.yaml", tmp_path)
        assert message in str(e.value) and "\n" not in str(e.value), (message, e.value)
    path = tmp_path / "sync.yaml"
    path.write_text(GOOD)
    proc = run_cli("sync", str(path), "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout + proc.stderr


def test_sync_checks_the_published_digests(registry_factory, tmp_path) -> None:
    src = registry_factory(name="dockerhub")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        pushed = {ref: push_image(p, ImageRef.parse(ref).repository, ImageRef.parse(ref).tag, seed=ref,
                                  layer_sizes=(2_000,)).digest for ref in IMAGES}
    bad = "rancher/shell:v0.5.0"
    root = tmp_path / "served"
    write_rancher_release(root, VERSION, IMAGES, digests=dict(pushed, **{bad: "sha256:" + "1" * 64}))
    with start_release_server(root) as srv:
        path = tmp_path / "sync.yaml"
        path.write_text(f"""\
version: 1
target: {{url: {dst.url}}}
releases:
  - product: rancher
    versions: [{VERSION}]
    release_url: {srv.release_url("rancher")}
sources:
  endpoints: {{docker.io: {src.url}}}
lists_dir: {tmp_path / "cache"}
outputs: {{report: {tmp_path / "report.json"}}}
""")
        proc = run_cli("sync", str(path))
    assert proc.returncode == 1, proc.stderr
    assert "4 with a published digest" in proc.stderr
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["summary"]["copied"] == 3 and doc["summary"]["failed"] == 1
    (rel,) = doc["releases"]
    (failed,) = rel["failed"]
    text = json.dumps(failed)
    assert "rancher/shell" in text and pushed[bad] in text and "sha256:" + "1" * 64 in text
