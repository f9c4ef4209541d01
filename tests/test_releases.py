"""Release image lists: channels, assets behind redirects, checksum verification, the cache, k3s, diff.

Everything runs against `start_release_server` (a local GitHub-downloads look-alike) that serves a copy
of the repository's lists/ directory."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from rke2_mirror.cli.app import app as cli_app
from rke2_mirror.cli.base import collect_images, load_releases
from rke2_mirror.cli.options import ReleaseOptions
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.releases import (
    ReleaseSource,
    default_lists_dir,
    diff_refs,
    parse_checksums,
    parse_release,
    release_images,
    resolve_version,
)
from rke2_mirror_testkit.release_server import start_release_server

REPO_LISTS = Path(__file__).resolve().parents[1] / "lists"
OLD, NEW, K3S = "v1.28.9+rke2r1", "v1.30.14+rke2r1", "v1.28.9+k3s1"
CHANNELS = {
    "rke2": {"stable": NEW, "latest": NEW, "v1.28": OLD, "v1.30": NEW},
    "k3s": {"stable": K3S, "v1.28": K3S},
}
R = "docker.io/rancher/"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RKE2_MIRROR_RELEASE_URL", raising=False)
    monkeypatch.delenv("RKE2_MIRROR_CHANNEL_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """A copy of lists/ that a test may tamper with."""
    dest = tmp_path / "served"
    shutil.copytree(REPO_LISTS, dest)
    return dest


@pytest.fixture
def server(served: Path):
    srv = start_release_server(served, CHANNELS)
    yield srv
    srv.stop()


@pytest.fixture
def client():
    # No follow_redirects here: the release code must ask for it itself.
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def src(server, cache: Path, product: str = "rke2", offline: bool = False) -> ReleaseSource:
    return ReleaseSource.default(
        product, server.release_url(product), server.channel_url(product), cache, offline, env={}
    )


def offline_src(cache: Path, product: str = "rke2") -> ReleaseSource:
    return ReleaseSource.default(product, lists_dir=cache, offline=True, env={})


def refs_of(path: Path) -> list[str]:
    return [str(ImageRef.parse(line)) for line in path.read_text().splitlines() if line.strip()]


def tamper_line(path: Path) -> None:
    path.write_text(path.read_text().replace("hardened-etcd", "evil-etcd"))


def drop_checksum_entry(checksum_file: Path, asset: str) -> None:
    lines = [l for l in checksum_file.read_text().splitlines(keepends=True) if not l.rstrip().endswith(asset)]
    checksum_file.write_text("".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(cli_app, list(args), env=env)


def cli_source_args(server, cache: Path, product: str = "rke2") -> list[str]:
    return [
        "--product", product,
        "--release-url", server.release_url(product),
        "--channel-url", server.channel_url(product),
        "--lists-dir", str(cache),
    ]


# --------------------------------------------------------------------------- parsing


def test_parse_release_versions_and_channels() -> None:
    assert parse_release("v1.28.9+rke2r1") == ("v1.28.9+rke2r1", False)
    assert parse_release("v1.29.0-rc1+rke2r1") == ("v1.29.0-rc1+rke2r1", False)
    assert parse_release("v1.28.9-rke2r1") == ("v1.28.9+rke2r1", False)  # the docker tag spelling
    assert parse_release("v1.28.9-k3s1") == ("v1.28.9+k3s1", False)
    assert parse_release("stable") == ("stable", True)
    assert parse_release("v1.28") == ("v1.28", True)
    for bad in ("../etc", "a/b", "", "v1.28.9+rke2r1/../x"):
        with pytest.raises(InputError, match="invalid release"):
            parse_release(bad)


def test_parse_checksums() -> None:
    text = f"{'a' * 64}  rke2-images.linux-amd64.txt\n\n{'B' * 64} *rke2.linux-amd64.tar.gz\n"
    assert parse_checksums(text, "x") == {
        "rke2-images.linux-amd64.txt": "a" * 64,
        "rke2.linux-amd64.tar.gz": "b" * 64,
    }
    with pytest.raises(InputError, match=r"sums:2: not a sha256sum line"):
        parse_checksums(f"{'a' * 64}  ok.txt\nnot a checksum\n", "sums")


def test_default_sources_and_env() -> None:
    s = ReleaseSource.default("rke2", env={"HOME": "/home/u"})
    assert s.release_url == "https://github.com/rancher/rke2/releases/download"
    assert s.channel_url == "https://update.rke2.io/v1-release/channels"
    assert s.lists_dir == Path("/home/u/.cache/rke2-mirror/lists")
    k = ReleaseSource.default("k3s", env={"XDG_CACHE_HOME": "/xdg"})
    assert k.release_url == "https://github.com/k3s-io/k3s/releases/download"
    assert k.channel_url == "https://update.k3s.io/v1-release/channels"
    assert k.lists_dir == Path("/xdg/rke2-mirror/lists")
    env = {"RKE2_MIRROR_RELEASE_URL": "http://mirror.local/rel/", "RKE2_MIRROR_CHANNEL_URL": "http://mirror.local/ch"}
    e = ReleaseSource.default("rke2", env=env)
    assert (e.release_url, e.channel_url) == ("http://mirror.local/rel", "http://mirror.local/ch")
    assert ReleaseSource.default("rke2", release_url="http://x/y", env=env).release_url == "http://x/y"
    assert default_lists_dir({"XDG_CACHE_HOME": "relative/ignored", "HOME": "/h"}) == Path("/h/.cache/rke2-mirror/lists")
    with pytest.raises(InputError, match="unknown product 'rke1'"):
        ReleaseSource.default("rke1", env={})
    with pytest.raises(InputError, match="--release-url 'ftp://x'"):
        ReleaseSource.default("rke2", release_url="ftp://x", env={})


# --------------------------------------------------------------------------- resolving


def test_version_is_used_as_is(server, client, cache) -> None:
    assert resolve_version(OLD, src(server, cache), client) == OLD
    assert server.requests == []


def test_channel_resolves_and_says_so(server, client, cache) -> None:
    notes: list[str] = []
    assert resolve_version("stable", src(server, cache), client, notes.append) == NEW
    assert resolve_version("v1.28", src(server, cache), client, notes.append) == OLD
    assert notes == [f"rke2 channel stable -> {NEW}", f"rke2 channel v1.28 -> {OLD}"]


def test_unknown_channel_lists_the_channels(server, client, cache) -> None:
    with pytest.raises(InputError) as e:
        resolve_version("nightly", src(server, cache), client)
    assert "unknown rke2 channel 'nightly'" in str(e.value)
    assert "channels: stable, latest, v1.28, v1.30" in str(e.value)
    with pytest.raises(InputError, match=r"needs its build suffix, e\.g\. v1\.28\.9\+rke2r1"):
        resolve_version("v1.28.9", src(server, cache), client)


def test_cli_list_channel_prints_version_on_stderr(server, cache) -> None:
    res = cli("list", "stable", "--flavor", "core", *cli_source_args(server, cache))
    assert res.exit_code == 0, res.stderr
    assert f"rke2 channel stable -> {NEW}" in res.stderr
    assert res.stdout.splitlines() == refs_of(REPO_LISTS / "rke2" / NEW / "rke2-images-core.linux-amd64.txt")


# --------------------------------------------------------------------------- assets, redirects, merging


def test_list_follows_redirects_to_object_storage(server, client, cache) -> None:
    result = release_images(OLD, src(server, cache), client)
    assert result.version == OLD
    assert [str(r) for r in result.images] == refs_of(REPO_LISTS / "rke2" / OLD / "rke2-images-all.linux-amd64.txt")
    assert [f.name for f in result.files] == ["rke2-images-all.linux-amd64.txt"]
    seen = [(r.path.split("/")[1], r.status) for r in server.requests]
    assert seen == [("rke2", 302), ("objects", 200), ("rke2", 302), ("objects", 200)]
    assert "%2B" in server.requests[0].path  # the + of the version is encoded


def test_flavors_merge_deduplicated_in_stable_order(server, client, cache) -> None:
    result = release_images(OLD, src(server, cache), client, flavors=["canal", "flannel"])
    assert [str(r) for r in result.images] == [
        R + "hardened-calico:v3.27.3-build20240423",
        R + "hardened-flannel:v0.25.1-build20240423",  # in both lists, kept once
        R + "hardened-cni-plugins:v1.4.1-build20240325",
    ]
    assert [(f.flavor, f.count) for f in result.files] == [("canal", 2), ("flannel", 2)]


def test_default_flavor_is_core_plus_canal(server, client, cache) -> None:
    d = release_images(OLD, src(server, cache), client, flavors=["default"])
    cc = release_images(OLD, src(server, cache), client, flavors=["core", "canal"])
    assert d.images == cc.images
    assert d.files[0].name == "rke2-images.linux-amd64.txt"


def test_arches_merge_and_each_is_verified_against_its_own_checksum_file(server, client, cache) -> None:
    result = release_images(OLD, src(server, cache), client, arches=["amd64", "arm64"], flavors=["core"])
    assert [f.name for f in result.files] == ["rke2-images-core.linux-amd64.txt", "rke2-images-core.linux-arm64.txt"]
    assert len(result.images) == 16  # the same multi-arch images: merged
    paths = [r.path for r in server.requests if r.status == 302]
    assert any(p.endswith("/sha256sum-amd64.txt") for p in paths)
    assert any(p.endswith("/sha256sum-arm64.txt") for p in paths)


def test_windows_list_is_normalised(server, client, cache) -> None:
    result = release_images(OLD, src(server, cache), client, flavors=["windows"])
    assert result.files[0].name == "rke2-images.windows-amd64.txt"
    assert [str(r) for r in result.images] == [
        R + "rke2-runtime:v1.28.9-rke2r1-windows-amd64",
        R + "mirrored-pause:3.6-windows-1809-amd64",
        R + "mirrored-pause:3.6-windows-ltsc2022-amd64",
    ]


# --------------------------------------------------------------------------- integrity


def test_tampered_list_is_refused_naming_file_and_both_digests(server, client, cache, served) -> None:
    listed = served / "rke2" / OLD / "rke2-images-core.linux-amd64.txt"
    expected = hashlib.sha256(listed.read_bytes()).hexdigest()
    tamper_line(listed)
    actual = hashlib.sha256(listed.read_bytes()).hexdigest()
    with pytest.raises(InputError) as e:
        release_images(OLD, src(server, cache), client, flavors=["core"])
    msg = str(e.value)
    assert "rke2-images-core.linux-amd64.txt" in msg and "sha256sum-amd64.txt" in msg
    assert expected in msg and actual in msg
    assert not (cache / "rke2" / OLD / "rke2-images-core.linux-amd64.txt").exists()  # never cached

    res = cli("list", OLD, "--flavor", "core", *cli_source_args(server, cache))
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.startswith("rke2-mirror: error: rke2-images-core.linux-amd64.txt of rke2 v1.28.9+rke2r1")
    assert expected in res.stderr and actual in res.stderr
    assert "Traceback" not in res.stderr


def test_list_missing_from_checksum_file_is_refused(server, client, cache, served) -> None:
    drop_checksum_entry(served / "rke2" / OLD / "sha256sum-amd64.txt", "rke2-images-flannel.linux-amd64.txt")
    with pytest.raises(InputError) as e:
        release_images(OLD, src(server, cache), client, flavors=["flannel"])
    msg = str(e.value)
    assert "rke2-images-flannel.linux-amd64.txt" in msg
    assert "is not named in sha256sum-amd64.txt" in msg
    res = cli("list", OLD, "--flavor", "flannel", *cli_source_args(server, cache))
    assert res.exit_code == 2 and "is not named in sha256sum-amd64.txt" in res.stderr


# --------------------------------------------------------------------------- what does not exist


def test_unknown_release(server, client, cache) -> None:
    with pytest.raises(InputError) as e:
        release_images("v9.9.9+rke2r1", src(server, cache), client)
    assert str(e.value).startswith(f"release v9.9.9+rke2r1 not found at {server.release_url('rke2')}")
    res = cli("list", "v9.9.9+rke2r1", *cli_source_args(server, cache))
    assert res.exit_code == 2
    assert f"rke2-mirror: error: release v9.9.9+rke2r1 not found at {server.release_url('rke2')}" in res.stderr


def test_k3s_version_with_rke2_product_gets_a_hint(server, client, cache) -> None:
    with pytest.raises(InputError, match=r"looks like a k3s version: add --product k3s"):
        release_images(K3S, src(server, cache), client)


def test_unknown_flavor_lists_the_published_ones(server, client, cache) -> None:
    with pytest.raises(InputError) as e:
        release_images(OLD, src(server, cache), client, flavors=["cilium"])
    msg = str(e.value)
    assert msg == (f"{OLD} publishes no rke2-images-cilium list for amd64 (rke2-images-cilium.linux-amd64.txt is "
                   "not in sha256sum-amd64.txt); it has: core, canal, flannel, windows, all, default")
    # traefik exists in the newer release only; windows never for arm64
    assert release_images(NEW, src(server, cache), client, flavors=["traefik"]).images
    with pytest.raises(InputError, match=r"publishes no rke2-images-traefik list for amd64 \(rke2-images-traefik"
                                         r"\.linux-amd64\.txt is not in sha256sum-amd64\.txt\); it has"):
        release_images(OLD, src(server, cache), client, flavors=["traefik"])  # no v1.36.0 note before v1.36.0
    with pytest.raises(InputError, match=r"publishes no rke2-images\.windows list for arm64 .*; it has: core, canal, "
                                         r"flannel, all, default$"):
        release_images(OLD, src(server, cache), client, arches=["arm64"], flavors=["windows"])


V136 = "v1.36.0+rke2r1"
V136_LISTS = {  # a v1.36.0-like release: Traefik in core, no traefik list, ingress-nginx and a flavor not in the table
    "core": [R + "hardened-etcd:v3.5.21-k3s1-build20260101", R + "rke2-runtime:v1.36.0-rke2r1",
             R + "mirrored-library-traefik:3.3.6"],
    "canal": [R + "hardened-calico:v3.30.1-build20260101"],
    "ingress-nginx": [R + "nginx-ingress-controller:v1.13.1-hardened1"],
    "gateway-api": [R + "mirrored-envoyproxy-gateway:v1.4.0"],
}


def add_v136(served: Path) -> None:
    """Serve V136: its checksum file names core, canal, ingress-nginx, gateway-api, all and default, no traefik."""
    d = served / "rke2" / V136
    d.mkdir(parents=True)
    lists = {f"rke2-images-{f}.linux-amd64.txt": refs for f, refs in V136_LISTS.items()}
    lists["rke2-images-all.linux-amd64.txt"] = [r for refs in V136_LISTS.values() for r in refs]
    lists["rke2-images.linux-amd64.txt"] = V136_LISTS["core"] + V136_LISTS["canal"]
    sums = []
    for name, refs in lists.items():
        data = ("\n".join(refs) + "\n").encode()
        (d / name).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (d / "sha256sum-amd64.txt").write_text("".join(sums))


V136_PUBLISHED = ["core", "canal", "ingress-nginx", "gateway-api", "all", "default"]
V136_NO_TRAEFIK = (f"{V136} publishes no rke2-images-traefik list for amd64 (rke2-images-traefik.linux-amd64.txt is not "
                   f"in sha256sum-amd64.txt; Traefik moved into core in v1.36.0); it has: {', '.join(V136_PUBLISHED)}")


def test_flavors_are_read_from_the_release_checksum_file(server, client, cache, served) -> None:
    add_v136(served)
    everything = release_images(V136, src(server, cache), client)  # all: the release's own all list
    assert [f.name for f in everything.files] == ["rke2-images-all.linux-amd64.txt"]
    assert "docker.io/rancher/mirrored-library-traefik:3.3.6" in [str(r) for r in everything.images]
    assert everything.published == (("amd64", tuple(V136_PUBLISHED)),)
    # ingress-nginx (new in v1.36.0) and a flavor the fixed table does not know are taken from the checksum file
    both = release_images(V136, src(server, cache), client, flavors=["ingress-nginx", "gateway-api"])
    assert [str(r) for r in both.images] == V136_LISTS["ingress-nginx"] + V136_LISTS["gateway-api"]
    with pytest.raises(InputError) as e:
        release_images(V136, src(server, cache), client, flavors=["core", "traefik"])
    assert str(e.value) == V136_NO_TRAEFIK
    with pytest.raises(InputError) as e:  # offline: the same, from the cached checksum file
        release_images(V136, offline_src(cache), None, flavors=["traefik"])
    assert str(e.value) == V136_NO_TRAEFIK
    with pytest.raises(InputError, match=r"; it has: core, .*; did you mean 'ingress-nginx'\?$"):
        release_images(V136, src(server, cache), client, flavors=["ingres-nginx"])
    # a v1.30-like release: traefik has its own list, ingress-nginx none
    old = release_images(NEW, src(server, cache), client, flavors=["traefik"])
    assert [f.name for f in old.files] == ["rke2-images-traefik.linux-amd64.txt"]
    assert old.published == (("amd64", ("core", "canal", "flannel", "traefik", "windows", "all", "default")),)
    with pytest.raises(InputError) as e:
        release_images(NEW, src(server, cache), client, flavors=["ingress-nginx"])
    assert str(e.value) == (f"{NEW} publishes no rke2-images-ingress-nginx list for amd64 (rke2-images-ingress-nginx"
                            ".linux-amd64.txt is not in sha256sum-amd64.txt); it has: core, canal, flannel, traefik, "
                            "windows, all, default")


def test_cli_list_says_which_flavors_a_release_publishes(server, cache, served) -> None:
    add_v136(served)
    line = f"FLAVORS published by {V136} (amd64): {', '.join(V136_PUBLISHED)}"
    res = cli("list", V136, "--flavor", "ingress-nginx", *cli_source_args(server, cache))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split() == V136_LISTS["ingress-nginx"]
    assert line in res.stderr.splitlines()
    res = cli("list", V136, "--json", "--flavor", "gateway-api", *cli_source_args(server, cache))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["flavors"] == ["gateway-api"] and doc["flavors_published"] == {"amd64": V136_PUBLISHED}
    assert line in res.stderr.splitlines()
    res = cli("list", V136, "--flavor", "traefik", *cli_source_args(server, cache))
    assert res.exit_code == 2 and res.stderr == f"rke2-mirror: error: {V136_NO_TRAEFIK}\n"
    doc = json.loads(cli("list", NEW, "--json", "--flavor", "traefik", *cli_source_args(server, cache)).stdout)
    assert doc["flavors_published"] == {"amd64": ["core", "canal", "flannel", "traefik", "windows", "all", "default"]}
    # two arches: one line per set of flavors (windows is published for amd64 only)
    res = cli("list", OLD, "--arch", "amd64", "--arch", "arm64", "--flavor", "core", *cli_source_args(server, cache))
    assert [l for l in res.stderr.splitlines() if l.startswith("FLAVORS")] == [
        f"FLAVORS published by {OLD} (amd64): core, canal, flannel, windows, all, default",
        f"FLAVORS published by {OLD} (arm64): core, canal, flannel, all, default"]


def test_flavor_names_before_any_download() -> None:
    """Before any download a well-formed flavor is accepted unless it is clearly a typo of a known one."""
    from rke2_mirror.releases import PRODUCTS, check_flavors

    rke2 = PRODUCTS["rke2"]
    assert check_flavors(["Ingress-Nginx", "gateway-api"]) == ("ingress-nginx", "gateway-api")
    for fine in ("all", "traefik", "ingress-nginx", "gateway-api", "kube-vip"):
        assert rke2.unknown_flavor(fine) is None
    for typo, meant in (("al", "all"), ("trafik", "traefik"), ("calcio", "calico"), ("ingres-nginx", "ingress-nginx")):
        assert rke2.unknown_flavor(typo).endswith(f"; did you mean {meant!r}?)")
    assert rke2.unknown_flavor("al").startswith("unknown rke2 flavor 'al' (known: all, default, core, ")
    assert PRODUCTS["k3s"].unknown_flavor("core") == "unknown k3s flavor 'core' (known: all, default)"


def test_unknown_arch_and_bad_flavor_fail_before_any_request(server, client, cache) -> None:
    with pytest.raises(InputError, match=r"unknown arch 'riscv64' \(one of: amd64, arm64, s390x\)"):
        release_images(OLD, src(server, cache), client, arches=["riscv64"])
    with pytest.raises(InputError, match="invalid flavor"):
        release_images(OLD, src(server, cache), client, flavors=["../x"])
    assert server.requests == []


def test_unreachable_url(client, cache) -> None:
    url = f"http://127.0.0.1:{free_port()}/rke2/releases/download"
    source = ReleaseSource.default("rke2", url, url, cache, env={})
    with pytest.raises(InputError, match=r"^cannot reach http://127\.0\.0\.1:\d+/rke2/releases/download/"):
        release_images(OLD, source, client)


def test_tls_failure_names_the_url(served, cache, pki, tmp_path) -> None:
    cert, key = pki.issue(tmp_path / "tls", ["127.0.0.1", "localhost"])
    with start_release_server(served, CHANNELS, tls=(cert, key)) as srv:
        source = src(srv, cache)
        with httpx.Client() as untrusting:
            with pytest.raises(InputError) as e:
                resolve_version("stable", source, untrusting)
        assert str(e.value).startswith(f"TLS verification failed for {srv.channel_url('rke2')}")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.cert_path))) as trusting:
            assert release_images("stable", source, trusting, flavors=["core"]).version == NEW


def test_temporary_server_errors_are_retried(monkeypatch, cache) -> None:
    import rke2_mirror.releases.source as releases

    monkeypatch.setattr(releases, "_RETRY_DELAYS", (0, 0))
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503)
        return httpx.Response(200, json={"data": [{"id": "stable", "latest": NEW}]})

    source = ReleaseSource.default("rke2", "http://rel.test/d", "http://rel.test/channels", cache, env={})
    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        assert resolve_version("stable", source, c) == NEW
    assert len(calls) == 3

    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as c:
        with pytest.raises(InputError, match=r"^HTTP 500 fetching http://rel\.test/channels$"):
            resolve_version("stable", source, c)


# --------------------------------------------------------------------------- the cache and offline use


def test_verified_lists_are_cached_with_their_checksum_file(server, client, cache) -> None:
    release_images(OLD, src(server, cache), client, arches=["amd64", "arm64"], flavors=["core"])
    d = cache / "rke2" / OLD
    assert sorted(p.name for p in d.iterdir()) == [
        "rke2-images-core.linux-amd64.txt",
        "rke2-images-core.linux-arm64.txt",
        "sha256sum-amd64.txt",
        "sha256sum-arm64.txt",
    ]  # no temporary files left behind
    for name in ("rke2-images-core.linux-amd64.txt", "sha256sum-arm64.txt"):
        assert (d / name).read_bytes() == (REPO_LISTS / "rke2" / OLD / name).read_bytes()


def test_offline_uses_only_the_cache(server, client, cache) -> None:
    online = release_images("stable", src(server, cache), client, flavors=["core", "flannel"])
    server.stop()
    notes: list[str] = []
    offline = release_images(NEW, offline_src(cache), None, flavors=["core", "flannel"], log=notes.append)
    assert offline.images == online.images
    assert offline.files[0].origin == str(cache / "rke2" / NEW / "rke2-images-core.linux-amd64.txt")
    assert any("read from the cache" in n for n in notes)

    res = cli("list", NEW, "--flavor", "core", "--offline", "--lists-dir", str(cache))
    assert res.exit_code == 0, res.stderr
    assert len(res.stdout.splitlines()) == 15


def test_offline_channel_is_an_error_not_the_newest_cached_version(server, client, cache) -> None:
    release_images(OLD, src(server, cache), client, flavors=["core"])
    with pytest.raises(InputError) as e:
        release_images("stable", offline_src(cache), None)
    msg = str(e.value)
    assert "'stable' is a channel" in msg and "give a version" in msg
    assert f"cached rke2 versions: {OLD}" in msg
    res = cli("list", "stable", "--offline", "--lists-dir", str(cache))
    assert res.exit_code == 2 and "give a version" in res.stderr


def test_offline_reverifies_the_cached_list(server, client, cache) -> None:
    release_images(OLD, src(server, cache), client, flavors=["core"])
    cached = cache / "rke2" / OLD / "rke2-images-core.linux-amd64.txt"
    expected = hashlib.sha256(cached.read_bytes()).hexdigest()
    tamper_line(cached)
    with pytest.raises(InputError) as e:
        release_images(OLD, offline_src(cache), None, flavors=["core"])
    assert expected in str(e.value) and hashlib.sha256(cached.read_bytes()).hexdigest() in str(e.value)
    assert str(cached) in str(e.value)


def test_offline_without_cache_says_what_to_do(cache) -> None:
    with pytest.raises(InputError) as e:
        release_images(OLD, offline_src(cache), None)
    assert f"no cached sha256sum-amd64.txt for rke2 {OLD} in {cache / 'rke2' / OLD}" in str(e.value)
    assert "--lists-dir" in str(e.value)


def test_offline_flavor_not_cached_or_not_published(server, client, cache) -> None:
    release_images(OLD, src(server, cache), client, flavors=["core"])
    with pytest.raises(InputError, match=r"rke2-images-canal\.linux-amd64\.txt of rke2 .* is not in the cache"):
        release_images(OLD, offline_src(cache), None, flavors=["canal"])
    with pytest.raises(InputError, match=r"publishes no rke2-images-cilium list.*: core, canal, flannel, windows, "
                                         r"all, default$"):
        release_images(OLD, offline_src(cache), None, flavors=["cilium"])


@pytest.mark.parametrize("product", ["rke2", "k3s"])
def test_repository_lists_dir_verifies_offline(product: str) -> None:
    """lists/ is in the cache layout and every list in it matches its checksum file."""
    source = offline_src(REPO_LISTS, product)
    for version_dir in sorted((REPO_LISTS / product).iterdir()):
        for sums in sorted(version_dir.glob("sha256sum-*.txt")):
            arch = sums.name[len("sha256sum-"):-len(".txt")]
            flavors = source.spec.published_flavors(parse_checksums(sums.read_text(), str(sums)), arch)
            assert flavors
            for flavor in flavors:
                result = release_images(version_dir.name, source, None, [arch], [flavor])
                assert 1 <= len(result.images) <= 25, (version_dir.name, flavor)
    assert (REPO_LISTS / "README.md").is_file()


# --------------------------------------------------------------------------- k3s


def test_k3s_release_and_channel(server, client, cache) -> None:
    notes: list[str] = []
    result = release_images("stable", src(server, cache, "k3s"), client, log=notes.append)
    assert result.version == K3S and result.product == "k3s"
    assert [f.name for f in result.files] == ["k3s-images.txt"]
    assert [str(r) for r in result.images] == refs_of(REPO_LISTS / "k3s" / K3S / "k3s-images.txt")
    (note,) = notes  # one line for the release: the channel, the lists verified, the images
    assert note.startswith(f"k3s channel stable -> {K3S}: 1 list verified against sha256sum-amd64.txt")
    assert (cache / "k3s" / K3S / "k3s-images.txt").is_file()
    with pytest.raises(InputError, match=r"k3s publishes a single image list \(k3s-images\.txt\)"):
        release_images(K3S, src(server, cache, "k3s"), client, flavors=["canal"])
    res = cli("list", K3S, *cli_source_args(server, cache, "k3s"))
    assert res.exit_code == 0, res.stderr
    assert R + "local-path-provisioner:v0.0.26" in res.stdout.splitlines()


# --------------------------------------------------------------------------- diff


def test_diff_refs_added_removed_changed() -> None:
    p = ImageRef.parse
    old = [p("rancher/a:1"), p("rancher/b:1"), p("rancher/keep:1"), p("rancher/multi:1"), p("rancher/multi:2")]
    new = [p("rancher/keep:1"), p("rancher/a:2"), p("rancher/c:1"), p("rancher/multi:3")]
    d = diff_refs(old, new)
    assert [str(r) for r in d.added] == [R + "c:1"]
    assert [str(r) for r in d.removed] == [R + "b:1", R + "multi:2"]
    assert [(str(c.old), str(c.new)) for c in d.changed] == [(R + "a:1", R + "a:2"), (R + "multi:1", R + "multi:3")]
    assert [str(r) for r in d.unchanged] == [R + "keep:1"]
    assert diff_refs(old, old).empty


def test_cli_diff_human(server, cache) -> None:
    res = cli("diff", "v1.28", "stable", *cli_source_args(server, cache))
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"rke2 {OLD} -> {NEW}: 1 added, 1 removed, 17 changed, 1 unchanged"
    assert f"  + {R}mirrored-library-traefik:2.11.24" in lines
    assert f"  - {R}mirrored-sig-storage-snapshot-validation-webhook:v6.2.2" in lines
    assert f"  ~ {R}hardened-kubernetes: v1.28.9-rke2r1-build20240416 -> v1.30.14-rke2r1-build20250618" in lines
    assert f"rke2 channel stable -> {NEW}" in res.stderr


def test_cli_diff_json(server, cache) -> None:
    res = cli("diff", OLD, NEW, "--json", "--flavor", "core", *cli_source_args(server, cache))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["old"] == {"release": OLD, "version": OLD, "lists": ["rke2-images-core.linux-amd64.txt"]}
    assert doc["new"]["version"] == NEW
    assert doc["summary"] == {"added": 0, "removed": 1, "changed": 14, "unchanged": 1}
    assert doc["removed"] == [R + "mirrored-sig-storage-snapshot-validation-webhook:v6.2.2"]
    runtime = next(c for c in doc["changed"] if c["name"] == R + "rke2-runtime")
    assert runtime["old"] == R + "rke2-runtime:v1.28.9-rke2r1"
    assert (runtime["old_tag"], runtime["new_tag"]) == ("v1.28.9-rke2r1", "v1.30.14-rke2r1")
    assert doc["unchanged"] == [R + "mirrored-pause:3.6"]


def test_cli_diff_of_list_files_and_offline(tmp_path, server, client, cache) -> None:
    old_file = tmp_path / "old.txt"
    old_file.write_text("# before\nrancher/a:1\nrancher/b:1\n")
    new_file = tmp_path / "new.txt"
    new_file.write_text("rancher/a:2\nquay.io/x/c:1\n")
    res = cli("diff", str(old_file), str(new_file), "--json", "--offline", "--lists-dir", str(cache))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["old"] == {"file": str(old_file)} and doc["added"] == ["quay.io/x/c:1"]
    assert doc["removed"] == [R + "b:1"] and doc["changed"][0]["new"] == R + "a:2"
    # a file against a release from the cache
    release_images(OLD, src(server, cache), client, flavors=["core"])
    res = cli("diff", str(old_file), OLD, "--flavor", "core", "--offline", "--lists-dir", str(cache))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith(f"rke2 {old_file} -> {OLD}: 16 added, 2 removed, 0 changed, 0 unchanged")


# --------------------------------------------------------------------------- helpers for mirror/save/verify


def test_collect_images_merges_files_and_releases(tmp_path, server, client, cache) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("registry.example.com/team/app:1.0\ndocker.io/rancher/mirrored-pause:3.6\n")
    opts = ReleaseOptions.from_cli(
        "rke2", None, ["canal"], server.release_url("rke2"), server.channel_url("rke2"), cache, False
    )
    refs = collect_images([extra], ["v1.28", NEW], opts, client=client, log=lambda _: None)
    assert [str(r) for r in refs] == [
        "registry.example.com/team/app:1.0",
        R + "mirrored-pause:3.6",
        R + "hardened-calico:v3.27.3-build20240423",
        R + "hardened-flannel:v0.25.1-build20240423",
        R + "hardened-calico:v3.30.1-build20250611",
        R + "hardened-flannel:v0.27.0-build20250611",
    ]
    (r,) = load_releases(["stable"], opts, client=client, log=lambda _: None)
    assert r.version == NEW


def test_collect_images_errors(tmp_path, cache) -> None:
    opts = ReleaseOptions.from_cli(lists_dir=cache, offline=True)
    with pytest.raises(InputError, match="no images given"):
        collect_images([], [], opts)
    bad = tmp_path / "bad.txt"
    bad.write_text("rancher/ok:1\n\nNot A Valid//Ref\n")
    with pytest.raises(InputError, match=rf"^{bad}:3: invalid"):
        collect_images([bad], [], opts)
    with pytest.raises(InputError, match="no such file"):
        collect_images([tmp_path / "missing.txt"], [], opts)


def test_cli_release_url_from_env(server, cache) -> None:
    env = {
        "RKE2_MIRROR_RELEASE_URL": server.release_url("rke2"),
        "RKE2_MIRROR_CHANNEL_URL": server.channel_url("rke2"),
    }
    res = cli("list", "latest", "--flavor", "traefik", "--lists-dir", str(cache), env=env)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{R}mirrored-library-traefik:2.11.24\n"


def test_a_list_redirected_from_https_to_http_is_refused(server, cache, pki, tmp_path: Path) -> None:
    """An https release URL whose answers redirect to plain http (the real release server behind it): the
    checksum file would come over plain http, vouched for by nothing; refused, nothing cached."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    plain = server.release_url("rke2")

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", plain + self.path.removeprefix("/d"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    front.daemon_threads = True
    front.handle_error = lambda request, address: None  # a client that hangs up mid-handshake: not news
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, pki.issue(tmp_path / "tls")))
    front.socket = ctx.wrap_socket(front.socket, server_side=True)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        source = ReleaseSource.default("rke2", f"https://127.0.0.1:{front.server_address[1]}/d",
                                       server.channel_url("rke2"), cache, env={})
        with httpx.Client(timeout=10, verify=ssl.create_default_context(cafile=str(pki.cert_path))) as c, \
                pytest.raises(InputError, match=r"redirected from https to http://127\.0\.0\.1:\d+/rke2/.*refused"):
            release_images(OLD, source, c)
    finally:
        front.shutdown()
        front.server_close()
    assert not any(cache.rglob("*.txt"))
    assert not server.requests  # nothing was fetched from the plain-http side
