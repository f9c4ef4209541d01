"""`rke2-mirror verify` (and `registries-yaml` feeding it) against real registries on loopback:
both experiments of the seed post, a path prefix with rewrites, TLS unknown authority, 401, not found.

Loopback registries are checked as if a node reached them by a routable name (see node.resolver: the
"localhost with a port means http" special case is deliberately not modelled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.node.verify import check_images
from rke2_mirror.model.reference import ImageRef, RegistryURL
from rke2_mirror.node.registries import Registries
from rke2_mirror.node.versions import RKE2Version
from rke2_mirror.node.writer import NodeConfig, build_registries, dump_registries
from rke2_mirror_testkit.images import ImagePusher, push_image

RUNTIME = "docker.io/rancher/rke2-runtime:v1.22.8-rke2r1"
SYSTEM = [RUNTIME, "docker.io/rancher/hardened-etcd:v3.5.9-k3s1", "docker.io/rancher/mirrored-pause:3.6"]
HARBOR_ADMIN = ("admin", "Harbor12345")


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def push_all(url: str, refs=SYSTEM, *, prefix: str = "", auth=None, verify=True, platforms=(("linux", "amd64"),)):
    with ImagePusher(url, auth=auth, verify=verify) as p:
        for r in refs:
            ref = ImageRef.parse(r)
            repo = f"{prefix}/{ref.repository}" if prefix else ref.repository
            push_image(p, repo, ref.tag, platforms=platforms, seed=ref.repository, layer_sizes=(256,))


def files(tmp_path: Path, registries: dict | str, sdr: str | None = None, refs=SYSTEM) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    reg = tmp_path / "registries.yaml"
    reg.write_text(registries if isinstance(registries, str) else yaml.safe_dump(registries))
    lst = tmp_path / "images.txt"
    lst.write_text("\n".join(refs) + "\n")
    args = ["--images", str(lst), "--registries-yaml", str(reg)]
    if sdr:
        conf = tmp_path / "config.yaml"
        conf.write_text(yaml.safe_dump({"token": "x", "system-default-registry": sdr}))
        args += ["--config-yaml", str(conf)]
    return args


def verify(args: list[str], *extra: str) -> tuple[int, dict]:
    proc = run_cli("verify", *args, "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def by_image(report: dict) -> dict[str, dict]:
    return {i["image"]: i for i in report["images"]}


# -- the seed's experiment 1: plain-http registry as system-default-registry --------------------------------
@pytest.mark.parametrize("version", [None, "v1.22.8+rke2r1", "v1.30.14+rke2r1"])
def test_seed_1a_without_a_mirror_entry_for_the_host_every_system_image_goes_to_https(registry, tmp_path, version):
    push_all(registry.url)
    regs = {"mirrors": {"docker.io": {"endpoint": [registry.url]}}}  # no entry for the host itself
    args = files(tmp_path, regs, sdr=registry.host)
    code, rep = verify(args, *(["--rke2-version", version] if version else []))
    assert code == 1
    assert rep["summary"] == {"total": 3, "found": 0, "failed": 3}
    for img in rep["images"]:
        assert img["name"].startswith(registry.host + "/rancher/")
        assert f"https://{registry.host}/v2/" in img["error"]
        assert img["reason"] == "https-to-http-server"
        assert "http://" + registry.host in img["fix"]


def test_seed_1a_table_on_the_terminal(registry, tmp_path):
    push_all(registry.url)
    proc = run_cli("verify", *files(tmp_path, {}, sdr=registry.host))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["STATUS", "IMAGE"]
    assert sum(1 for ln in lines if ln.startswith("FAILED")) == 3
    assert any(ln.startswith("fix: ") for ln in lines)
    assert "3 images: 0 found, 3 would fail" in proc.stderr


def test_seed_1b_token_auth_http_harbor_on_v1_22_8(harbor_factory, tmp_path):
    harbor = harbor_factory(tls=False, projects={"rancher": {"public": True}})
    push_all(harbor.url, auth=HARBOR_ADMIN)
    # the seed's registries.yaml: a mirror entry for the host itself, with an http endpoint
    regs = {"mirrors": {harbor.host: {"endpoint": [f"http://{harbor.host}"]}}}
    args = files(tmp_path, regs, sdr=harbor.host)
    code, rep = verify(args, "--rke2-version", "v1.22.8+rke2r1")
    assert code == 1
    imgs = by_image(rep)
    runtime = imgs[RUNTIME]
    assert runtime["status"] == "failed" and runtime["reason"] == "token-over-https"
    assert "rancher/rke2#4308" in runtime["error"]
    assert [a["default"] for a in runtime["attempts"]] == [False, True]  # then https://HOST/v2 fails as well
    assert runtime["attempts"][1]["url"].startswith(f"https://{harbor.host}/v2/")
    others = [i for name, i in imgs.items() if name != RUNTIME]
    assert all(i["status"] == "found" and i["endpoint"] == f"http://{harbor.host}/v2" for i in others)
    # fixed releases pull the runtime image over http too
    code, rep = verify(args, "--rke2-version", "v1.27.3+rke2r1")
    assert code == 0, rep
    # and registries-yaml refuses to write this for v1.22.8
    proc = run_cli("registries-yaml", "--to", harbor.url, "--rke2-version", "v1.22.8+rke2r1")
    assert proc.returncode == 2 and "rancher/rke2#4308" in proc.stderr


def test_seed_1b_workload_image_over_http_without_sdr(harbor_factory, tmp_path):
    """The seed: without system-default-registry the cluster started and harbor/rancher/nginx was pulled over http."""
    harbor = harbor_factory(tls=False, projects={"rancher": {"public": True}})
    push_all(harbor.url, ["docker.io/rancher/nginx:1.25"], auth=HARBOR_ADMIN)
    regs = {"mirrors": {harbor.host: {"endpoint": [f"http://{harbor.host}"]}}}
    code, rep = verify(files(tmp_path, regs, refs=[f"{harbor.host}/rancher/nginx:1.25"]), "--rke2-version", "v1.22.8+rke2r1")
    assert code == 0 and rep["images"][0]["endpoint"] == f"http://{harbor.host}/v2"


# -- the seed's experiment 2: https with a self-signed certificate and insecure_skip_verify ------------------
@pytest.mark.parametrize("version", [None, "v1.22.8+rke2r1"])
def test_seed_2_https_self_signed_insecure_skip_verify_every_image_found(harbor_factory, tmp_path, version):
    harbor = harbor_factory(tls=True, projects={"rancher": {"public": True}})
    push_all(harbor.url, auth=HARBOR_ADMIN, verify=harbor.ca_file)
    regs = {"mirrors": {harbor.host: {"endpoint": [f"https://{harbor.host}"]}},
            "configs": {harbor.host: {"tls": {"insecure_skip_verify": True}}}}
    code, rep = verify(files(tmp_path, regs, sdr=harbor.host), *(["--rke2-version", version] if version else []))
    assert code == 0, rep
    assert rep["summary"]["found"] == 3


def test_seed_2_without_tls_config_names_the_key(harbor_factory, tmp_path):
    harbor = harbor_factory(tls=True, projects={"rancher": {"public": True}})
    push_all(harbor.url, auth=HARBOR_ADMIN, verify=harbor.ca_file)
    regs = {"mirrors": {harbor.host: {"endpoint": [f"https://{harbor.host}"]}}}
    code, rep = verify(files(tmp_path, regs, sdr=harbor.host))
    assert code == 1
    for img in rep["images"]:
        assert img["reason"] == "tls-unknown-authority"
        assert f'configs."{harbor.host}".tls.ca_file' in img["fix"] and "insecure_skip_verify" in img["fix"]


def test_default_endpoint_tls_ignored_in_the_5658_window(harbor_factory, tmp_path):
    harbor = harbor_factory(tls=True, projects={"rancher": {"public": True}})
    push_all(harbor.url, ["docker.io/rancher/hardened-etcd:v3"], auth=HARBOR_ADMIN, verify=harbor.ca_file)
    regs = {"mirrors": {harbor.host: {"endpoint": [f"https://{harbor.host}"]}},
            "configs": {harbor.host: {"tls": {"ca_file": str(harbor.ca_file)}}}}
    args = files(tmp_path, regs, sdr=harbor.host, refs=["docker.io/rancher/hardened-etcd:v3"])
    code, rep = verify(args, "--rke2-version", "v1.28.8+rke2r1")
    assert code == 1 and rep["images"][0]["reason"] == "tls-unknown-authority"
    assert "rancher/rke2#5658" in rep["images"][0]["fix"] and "trust store" in rep["images"][0]["fix"]
    assert verify(args, "--rke2-version", "v1.28.9+rke2r1")[0] == 0


# -- a path prefix with rewrite rules ------------------------------------------------------------------------
def _node_files(tmp_path: Path, cfg: NodeConfig, refs: list[str]) -> list[str]:
    doc, _ = build_registries(cfg)
    return files(tmp_path, dump_registries(doc, cfg), sdr=cfg.system_default_registry_value,
                 refs=refs)


def test_prefix_and_rewrite(token_registry, tmp_path):
    refs = SYSTEM + ["docker.io/library/busybox:1.36"]
    push_all(token_registry.url, refs, prefix="mirror", auth=HARBOR_ADMIN, verify=token_registry.ca_file)
    target = RegistryURL.parse(token_registry.url + "/mirror")
    images = [ImageRef.parse(r) for r in refs]
    common = dict(node_ca_file=str(token_registry.ca_file), auth=Credentials(*HARBOR_ADMIN))
    # workload names through the docker.io mirror: rancher/x is looked up as mirror/rancher/x
    no_sdr = NodeConfig.for_images(target, images, system_default_registry=False, **common)
    code, rep = verify(_node_files(tmp_path / "a", no_sdr, refs))
    assert code == 0, rep
    assert all(a["url"].split("/v2/")[1].startswith("mirror/") for i in rep["images"] for a in i["attempts"])
    # system-default-registry on a legacy-config release: the registry's own entry carries the rewrite
    old = RKE2Version.parse("v1.25.16+rke2r1")
    sdr = NodeConfig.for_images(target, images, system_default_registry=True, rke2_version=old, **common)
    code, rep = verify(_node_files(tmp_path / "b", sdr, refs), "--rke2-version", str(old))
    assert code == 0, rep
    # on hosts.toml releases that entry is the default endpoint, where no rewrite applies (rancher/rke2#6889)
    code, rep = verify(_node_files(tmp_path / "c", sdr, refs), "--rke2-version", "v1.30.14+rke2r1")
    assert code == 1
    etcd = by_image(rep)["docker.io/rancher/hardened-etcd:v3.5.9-k3s1"]
    assert etcd["reason"] == "not-found" and "/v2/rancher/hardened-etcd/" in etcd["attempts"][0]["url"]
    runtime = by_image(rep)[RUNTIME]
    assert runtime["status"] == "found"  # RKE2's own puller does not merge it into the default endpoint


# -- TLS unknown authority, 401, not found, platform ------------------------------------------------------------
def test_tls_unknown_authority_names_the_key_then_ca_file_fixes_it(tls_registry, tmp_path):
    push_all(tls_registry.url, SYSTEM[1:], verify=tls_registry.ca_file)
    regs = {"mirrors": {"docker.io": {"endpoint": [tls_registry.url]}}}
    code, rep = verify(files(tmp_path / "a", regs, refs=SYSTEM[1:]))
    assert code == 1
    img = rep["images"][0]
    assert img["reason"] == "tls-unknown-authority"
    assert f'configs."{tls_registry.host}".tls.ca_file' in img["fix"]
    assert img["attempts"][-1]["status"] == "upstream-not-checked"  # index.docker.io is never contacted
    regs["configs"] = {tls_registry.host: {"tls": {"ca_file": str(tls_registry.ca_file)}}}
    code, rep = verify(files(tmp_path / "b", regs, refs=SYSTEM[1:]))
    assert code == 0, rep


def test_401_without_and_with_wrong_credentials(basic_registry, tmp_path):
    push_all(basic_registry.url, SYSTEM[1:2], auth=("alice", "wonderland-pw"))
    regs = {"mirrors": {"docker.io": {"endpoint": [basic_registry.url]}}}
    code, rep = verify(files(tmp_path / "a", regs, refs=SYSTEM[1:2]))
    assert code == 1 and rep["images"][0]["reason"] == "unauthorized"
    assert f'configs."{basic_registry.host}".auth' in rep["images"][0]["fix"]
    regs["configs"] = {basic_registry.host: {"auth": {"username": "alice", "password": "not-the-pw"}}}
    proc = run_cli("verify", *files(tmp_path / "b", regs, refs=SYSTEM[1:2]))
    assert proc.returncode == 1 and "unauthorized" in proc.stdout
    assert "not-the-pw" not in proc.stdout + proc.stderr
    regs["configs"][basic_registry.host]["auth"]["password"] = "wonderland-pw"
    assert verify(files(tmp_path / "c", regs, refs=SYSTEM[1:2]))[0] == 0


def test_not_found_and_missing_platform(registry, tmp_path):
    push_all(registry.url, SYSTEM[1:2], platforms=(("linux", "arm64"),))
    regs = {"mirrors": {"docker.io": {"endpoint": [registry.url]}}}
    refs = SYSTEM[1:]
    code, rep = verify(files(tmp_path, regs, refs=refs))
    imgs = by_image(rep)
    assert code == 1
    assert imgs[SYSTEM[1]]["reason"] == "platform-missing" and "linux/arm64" in imgs[SYSTEM[1]]["error"]
    assert imgs[SYSTEM[2]]["reason"] == "not-found"
    code, rep = verify(files(tmp_path, regs, refs=SYSTEM[1:2]), "--arch", "arm64")
    assert code == 0


def test_check_images_api_progress(registry):
    push_all(registry.url, SYSTEM[1:])
    regs = Registries.from_dict({"mirrors": {registry.host: {"endpoint": [registry.url]}}})
    seen = []
    report = check_images([ImageRef.parse(r) for r in SYSTEM[1:]], regs, system_default_registry=registry.host,
                          rke2_version=None, progress=seen.append, jobs=2)
    assert report.ok and len(seen) == 2
    assert all(c.found.attempt.endpoint.url == f"{registry.url}/v2" for c in report.images)


# -- mirror -> registries-yaml -> verify ------------------------------------------------------------------------
def test_registries_yaml_output_fed_to_verify_finds_every_image_mirror_copied(registry_factory, token_registry, tmp_path):
    src = registry_factory(name="src")
    refs = SYSTEM + ["docker.io/library/busybox:1.36"]
    push_all(src.url, refs, platforms=(("linux", "amd64"), ("linux", "arm64")))
    lst = tmp_path / "images.txt"
    lst.write_text("\n".join(refs) + "\n")
    env = {"RKE2_MIRROR_USERNAME": HARBOR_ADMIN[0], "RKE2_MIRROR_PASSWORD": HARBOR_ADMIN[1]}
    proc = run_cli("mirror", "--images", str(lst), "--to", token_registry.url, "--ca-file", str(token_registry.ca_file),
                   "--source-endpoint", f"docker.io={src.url}", env=env)
    assert proc.returncode == 0, proc.stderr
    reg, conf = tmp_path / "registries.yaml", tmp_path / "config.yaml"
    conf.write_text("token: secret\n")
    proc = run_cli("registries-yaml", "--to", token_registry.url, "--images", str(lst), "--with-auth",
                   "--node-ca-file", str(token_registry.ca_file), "-o", str(reg), "--config-yaml", str(conf), env=env)
    assert proc.returncode == 0, proc.stderr
    assert oct(reg.stat().st_mode & 0o777) == "0o600"
    assert HARBOR_ADMIN[1] not in proc.stderr + proc.stdout
    proc = run_cli("verify", "--images", str(lst), "--registries-yaml", str(reg), "--config-yaml", str(conf), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["summary"] == {"total": 4, "found": 4, "failed": 0}
    assert rep["rke2_version"] == "v1.22.8+rke2r1"  # read from the rke2-runtime tag of the list
    assert by_image(rep)["docker.io/library/busybox:1.36"]["name"] == f"{token_registry.host}/library/busybox:1.36"


# -- RKE2 of 2025-2026: a path in system-default-registry, disable-default-registry-endpoint, the embedded registry ---
def _with_config(tmp_path: Path, registries: dict, config: dict, refs: list[str]) -> list[str]:
    args = files(tmp_path, registries, refs=refs)
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({"token": "x", **config}))
    return args + ["--config-yaml", str(conf)]


def test_sdr_with_path_resolved_per_version(registry, tmp_path):
    push_all(registry.url, prefix="docker.io")
    target = RegistryURL.parse(registry.url + "/docker.io")
    images = [ImageRef.parse(r) for r in SYSTEM]
    new = NodeConfig.for_images(target, images, rke2_version=RKE2Version.parse("v1.34.6+rke2r1"))
    assert new.system_default_registry_value == f"{registry.host}/docker.io"
    proc = run_cli("verify", *_node_files(tmp_path / "a", new, SYSTEM), "--json", "--rke2-version", "v1.34.6+rke2r1")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 0, rep
    for img in rep["images"]:  # the node asks for HOST/docker.io/rancher/x, found through the host's own entry
        assert img["name"].startswith(f"{registry.host}/docker.io/rancher/")
        assert f"{registry.url}/v2/docker.io/rancher/" in img["attempts"][0]["url"]
    assert "refuses to start" not in proc.stderr
    # the same files on a release before rancher/rke2#9404: RKE2 would not start with that config.yaml
    proc = run_cli("verify", *_node_files(tmp_path / "b", new, SYSTEM), "--json", "--rke2-version", "v1.34.5+rke2r1")
    assert "refuses to start" in proc.stderr and "#9404" in proc.stderr
    # written for v1.34.5: host only, and rewrite rules: found too
    old = NodeConfig.for_images(target, images, rke2_version=RKE2Version.parse("v1.34.5+rke2r1"))
    assert old.system_default_registry_value == registry.host
    code, rep = verify(_node_files(tmp_path / "c", old, SYSTEM), "--rke2-version", "v1.34.5+rke2r1")
    assert code == 0, rep


def test_disable_default_endpoint_containerd_stops_but_the_runtime_pull_falls_back(registry, tmp_path):
    regs = {"mirrors": {"docker.io": {"endpoint": [registry.url]}}}  # nothing pushed: every image missing
    args = _with_config(tmp_path, regs, {"disable-default-registry-endpoint": True}, SYSTEM)
    code, rep = verify(args, "--rke2-version", "v1.30.14+rke2r1")
    imgs = by_image(rep)
    assert code == 1
    etcd = imgs[SYSTEM[1]]
    assert [a["default"] for a in etcd["attempts"]] == [False] and etcd["reason"] == "not-found"
    runtime = imgs[RUNTIME]  # RKE2's own pull (wharfie) still tries the default endpoint last
    assert [a["default"] for a in runtime["attempts"]] == [False, True]
    assert any("wharfie" in n for n in runtime["notes"])
    # before v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1 the key does not exist: containerd falls back as always
    proc = run_cli("verify", *args, "--json", "--rke2-version", "v1.29.0+rke2r1")
    etcd = by_image(json.loads(proc.stdout))[SYSTEM[1]]
    assert [a["default"] for a in etcd["attempts"]] == [False, True]
    assert "does not have it" in proc.stderr


def test_embedded_registry_reports_what_peers_can_serve(registry, tmp_path):
    refs = SYSTEM + ["docker.io/library/busybox:latest", "quay.io/cilium/cilium:v1.15.4"]
    push_all(registry.url, refs[:-1])
    regs = {"mirrors": {"docker.io": {"endpoint": [registry.url]}}}  # no entry for quay.io
    args = _with_config(tmp_path, regs, {"embedded-registry": True}, refs)
    proc = run_cli("verify", *args, "--json", "--rke2-version", "v1.30.14+rke2r1")
    rep = json.loads(proc.stdout)
    imgs = by_image(rep)
    assert imgs[SYSTEM[1]]["embedded_registry"] == "shared"
    assert imgs["docker.io/library/busybox:latest"]["embedded_registry"] == "latest"
    assert imgs["quay.io/cilium/cilium:v1.15.4"]["embedded_registry"] == "not-mirrored"
    assert rep["embedded_registry"] == {"shared": 3, "latest": 1, "not_mirrored": 1}
    assert any("never share it" in n for n in imgs["docker.io/library/busybox:latest"]["notes"])
    assert "embedded registry: 3 of 5 images can be served by peers" in proc.stderr
    assert "tagged latest are never shared" in proc.stderr and "busybox:latest" in proc.stderr
    # the table has a note per image
    proc = run_cli("verify", *args, "--rke2-version", "v1.30.14+rke2r1")
    assert sum(1 for ln in proc.stdout.splitlines() if ln.startswith("note: ") and "peer" in ln) == 5
    # a release without the embedded registry: nothing modelled, and said so
    proc = run_cli("verify", *args, "--json", "--rke2-version", "v1.28.5+rke2r1")
    assert json.loads(proc.stdout)["embedded_registry"] is None and "does not have it" in proc.stderr


# -- --images-dir: a copy of a node's agent/images --------------------------------------------------------------
def _save(registry, tmp_path: Path, out_name: str, *extra: str) -> Path:
    lst = tmp_path / "save-images.txt"
    lst.write_text("\n".join(SYSTEM) + "\n")
    out = tmp_path / "saved" / out_name
    out.parent.mkdir(exist_ok=True)
    proc = run_cli("save", "--images", str(lst), "-o", str(out), "--source-endpoint", f"docker.io={registry.url}",
                   *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def _images_dir(tmp_path: Path, *files: Path) -> Path:
    d = tmp_path / "agent-images"
    d.mkdir(exist_ok=True)
    for f in files:
        f.rename(d / f.name)
    return d


@pytest.mark.parametrize("sdr", [None, "harbor.example.com"])
def test_images_dir_node_tarball_serves_every_image_without_a_registry(registry, tmp_path, sdr):
    push_all(registry.url)
    tarball = _save(registry, tmp_path, "rke2-images.linux-amd64.tar.zst", "--for-node",
                    *(["--system-default-registry", sdr] if sdr else []))
    d = _images_dir(tmp_path, tarball)
    (d / ".hidden.tar").write_bytes(b"not read by a node")  # dot-files and other names are skipped
    (d / "pull-list.txt").write_text("docker.io/library/busybox:1.36\n")
    args = files(tmp_path / "node", {}, sdr=sdr)  # no registry configured
    code, rep = verify(args, "--images-dir", str(d), "--rke2-version", "v1.30.14+rke2r1")
    assert code == 0, rep
    assert rep["summary"] == {"total": 3, "found": 3, "failed": 0} and rep["warnings"] == []
    for img in rep["images"]:
        assert img["images_file"] == tarball.name and img["attempts"] == [] and img["endpoint"] is None
        assert img["name"].startswith(f"{sdr}/rancher/" if sdr else "docker.io/rancher/")
    proc = run_cli("verify", *args, "--images-dir", str(d))
    assert proc.returncode == 0 and f"in agent/images {tarball.name}" in proc.stdout
    # without it, the same node finds nothing (upstream only: not contacted)
    if sdr is None:
        code, rep = verify(args)
        assert code == 1 and rep["summary"]["found"] == 0


def test_images_dir_oci_only_archive_hides_the_runtime_image_from_rke2s_lookup(registry, tmp_path):
    push_all(registry.url)
    plain = _save(registry, tmp_path, "plain.tar")  # an OCI layout, no manifest.json
    d = _images_dir(tmp_path, plain)
    code, rep = verify(files(tmp_path / "node", {}), "--images-dir", str(d))
    assert code == 1
    imgs = by_image(rep)
    runtime = imgs[RUNTIME]
    assert runtime["status"] == "failed" and runtime["images_file"] is None
    assert runtime["reason"] == "upstream-not-checked" and runtime["attempts"]  # fell through to the registries
    assert any("plain.tar" in n and "runtime lookup will not find it" in n and "OCI-only" in n
               for n in runtime["notes"])
    for r in SYSTEM[1:]:  # containerd imports the other images from it
        assert imgs[r]["status"] == "found" and imgs[r]["images_file"] == "plain.tar"


def test_images_dir_unreadable_file_is_one_warning(registry, tmp_path):
    push_all(registry.url)
    tarball = _save(registry, tmp_path, "rke2-images.linux-amd64.tar", "--for-node")
    d = _images_dir(tmp_path, tarball)
    (d / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data at all")
    proc = run_cli("verify", *files(tmp_path / "node", {}), "--images-dir", str(d), "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["summary"]["found"] == 3
    assert len(rep["warnings"]) == 1 and "broken.tar.gz" in rep["warnings"][0]
    assert sum("broken.tar.gz" in ln for ln in proc.stderr.splitlines()) == 1


def test_images_dir_must_be_a_directory(tmp_path):
    proc = run_cli("verify", *files(tmp_path, {}), "--images-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "--images-dir" in proc.stderr
