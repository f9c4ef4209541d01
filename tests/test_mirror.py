"""`rke2-mirror mirror` against real docker-registry processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rke2_mirror_testkit.images import (
    ImagePusher,
    blob_exists,
    list_tags,
    make_layer_blob,
    push_image,
    push_signature,
    read_manifest,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_list(path: Path, refs: list[str]) -> Path:
    path.write_text("# test images\n" + "\n".join(refs) + "\n")
    return path


def report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout)


@pytest.fixture
def seeded(registry_factory):
    """A source registry with every manifest kind an RKE2 release holds, sharing a base layer."""
    src = registry_factory(name="src")
    p = ImagePusher(src.url)
    base = make_layer_blob("base-layer", 300_000)
    images = {
        "docker.io/rancher/hardened-etcd:v3.5.9": push_image(p, "rancher/hardened-etcd", "v3.5.9", kind="docker",
                                                             base=base, seed="etcd", windows=True),
        "docker.io/rancher/rke2-runtime:v1.28.9-rke2r1": push_image(p, "rancher/rke2-runtime", "v1.28.9-rke2r1",
                                                                    kind="oci", base=base, seed="runtime"),
        "docker.io/rancher/mirrored-pause:3.6": push_image(p, "rancher/mirrored-pause", "3.6", kind="docker",
                                                           platforms=None, base=base, seed="pause"),
        "docker.io/library/busybox:1.36": push_image(p, "library/busybox", "1.36", kind="oci", platforms=None,
                                                     seed="busybox"),
    }
    p.close()
    return src, images


def assert_complete(url: str, repo: str, tag: str, *, verify=True, auth=None) -> str:
    """The tag resolves, and every manifest and blob under it exists: returns the digest."""
    from rke2_mirror.model.oci import parse_manifest
    mt, raw, digest = read_manifest(url, repo, tag, verify=verify, auth=auth)
    todo = [(mt, raw)]
    with ImagePusher(url, verify=verify, auth=auth) as p:
        while todo:
            mt, raw = todo.pop()
            m = parse_manifest(mt, raw)
            if m.is_index:
                for child in m.manifests:
                    cmt, craw, cdigest = read_manifest(url, repo, child.digest, verify=verify, auth=auth)
                    assert cdigest == child.digest
                    todo.append((cmt, craw))
            else:
                for b in m.blobs:
                    assert blob_exists(p, repo, b.digest), f"{repo}: blob {b.digest} missing"
    return digest


def test_mirror_every_manifest_kind_keeps_digests(seeded, registry_factory, tmp_path):
    src, images = seeded
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", list(images) + ["rancher/hardened-etcd:v3.5.9"])
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    rep = report(proc)
    assert rep["summary"]["total"] == 4 and rep["summary"]["copied"] == 4 and rep["summary"]["failed"] == 0
    for ref, img in images.items():
        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert assert_complete(dst.url, repo, img.tag) == img.digest
    # Windows entry (os.version) copied under its own digest
    etcd = images["docker.io/rancher/hardened-etcd:v3.5.9"]
    win = etcd.child("windows/amd64")
    assert read_manifest(dst.url, "rancher/hardened-etcd", win)[2] == win
    by_source = {i["source"]: i for i in rep["images"]}
    assert by_source["docker.io/rancher/hardened-etcd:v3.5.9"]["digest"] == etcd.digest
    assert by_source["docker.io/rancher/hardened-etcd:v3.5.9"]["target"] == f"{dst.host}/rancher/hardened-etcd:v3.5.9"


def test_second_run_uploads_nothing(seeded, registry_factory, tmp_path):
    src, images = seeded
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", list(images))
    args = ("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}", "--json")
    src_before = len(src.access_log())
    assert run_cli(*args).returncode == 0
    cold_src = src.access_log()[src_before:]
    # a cold copy GETs each tag's manifest at once: no HEAD at the source first
    assert not [l for l in cold_src if '"HEAD ' in l and "/manifests/" in l], cold_src
    assert len([l for l in cold_src if '"GET ' in l and "/manifests/" in l and "sha256" not in l]) == 4
    before, src_before = len(dst.access_log()), len(src.access_log())
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    rep = report(proc)
    assert rep["summary"]["skipped"] == 4 and rep["summary"]["copied"] == 0 and rep["summary"]["bytes"] == 0
    new = dst.access_log()[before:]
    writes = [l for l in new if '"PUT ' in l or '"POST ' in l or '"PATCH ' in l]
    assert writes == []
    assert all('"HEAD ' in l or '"GET /v2/ ' in l or '"GET /api/v2.0/' in l for l in new), new
    # the rerun asks the source with a HEAD per tag, never a GET (Docker Hub counts GETs as pulls)
    noop_src = src.access_log()[src_before:]
    assert len([l for l in noop_src if '"HEAD ' in l and "/manifests/" in l]) == 4
    assert not [l for l in noop_src if '"GET ' in l and "/manifests/" in l], noop_src


def test_shared_base_layer_is_uploaded_once_then_mounted(seeded, registry_factory, tmp_path):
    src, images = seeded
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", list(images))
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}")
    assert proc.returncode == 0, proc.stderr
    base = make_layer_blob("base-layer", 300_000).digest
    log = dst.access_log()
    # exactly one upload of the base layer's bytes (its final PUT names the digest) ...
    assert sum(1 for l in log if '"PUT ' in l and base.replace(":", "%3A") in l) == 1
    # ... and the other repositories got it by cross-repository mount
    assert sum(1 for l in log if '"POST ' in l and "mount=" + base.replace(":", "%3A") in l) >= 2
    for repo in ("rancher/hardened-etcd", "rancher/rke2-runtime", "rancher/mirrored-pause"):
        with ImagePusher(dst.url) as p:
            assert blob_exists(p, repo, base)


def test_platform_subset_rebuilds_index(seeded, registry_factory, tmp_path):
    src, images = seeded
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", ["rancher/hardened-etcd:v3.5.9", "rancher/rke2-runtime:v1.28.9-rke2r1",
                                               "rancher/mirrored-pause:3.6"])
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url + "/sub", "--source-endpoint",
                   f"docker.io={src.url}", "--platform", "linux/arm64", "--json")
    assert proc.returncode == 1  # the single-platform amd64 pause image has no arm64
    rep = {i["source"]: i for i in report(proc)["images"]}
    etcd = images["docker.io/rancher/hardened-etcd:v3.5.9"]
    r = rep["docker.io/rancher/hardened-etcd:v3.5.9"]
    assert r["status"] == "copied" and r["digest"] != etcd.digest and r["source_digest"] == etcd.digest
    assert "digest changed" in r["note"]
    from rke2_mirror.model.oci import parse_manifest
    mt, raw, digest = read_manifest(dst.url, "sub/rancher/hardened-etcd", "v3.5.9")
    m = parse_manifest(mt, raw)
    assert [str(d.platform) for d in m.manifests] == ["linux/arm64"]
    assert m.manifests[0].digest == etcd.child("linux/arm64")
    assert_complete(dst.url, "sub/rancher/hardened-etcd", "v3.5.9")
    # the amd64 and windows children were not copied
    with pytest.raises(LookupError):
        read_manifest(dst.url, "sub/rancher/hardened-etcd", etcd.child("linux/amd64"))
    pause = rep["docker.io/rancher/mirrored-pause:3.6"]
    assert pause["status"] == "failed" and "linux/amd64" in pause["error"]
    assert list_tags(dst.url, "sub/rancher/mirrored-pause") == []


def test_signatures_copied_when_asked(seeded, registry_factory, tmp_path):
    src, images = seeded
    etcd = images["docker.io/rancher/hardened-etcd:v3.5.9"]
    with ImagePusher(src.url) as p:
        sig = push_signature(p, "rancher/hardened-etcd", etcd.digest)
    lst = write_list(tmp_path / "images.txt", ["rancher/hardened-etcd:v3.5.9"])
    dst = registry_factory(name="dst")
    base = ("mirror", "--images", str(lst), "--source-endpoint", f"docker.io={src.url}")
    assert run_cli(*base, "--to", dst.url + "/nosig", "--no-referrers").returncode == 0
    sig_tag = etcd.digest.replace(":", "-") + ".sig"
    assert sig_tag not in list_tags(dst.url, "nosig/rancher/hardened-etcd")
    proc = run_cli(*base, "--to", dst.url, "--signatures", "--json")
    assert proc.returncode == 0, proc.stderr
    assert assert_complete(dst.url, "rancher/hardened-etcd", sig_tag) == sig
    (img,) = report(proc)["images"]
    assert img["referrers"] == [{"subject": etcd.digest, "digest": sig, "artifactType": "", "kind": "signature",
                                 "size": img["referrers"][0]["size"], "tag": sig_tag, "status": "copied"}]
    # the default carries it too, into an image already in place (nosig/ has the image, not its signature)
    proc = run_cli(*base, "--to", dst.url + "/nosig", "--json")
    assert proc.returncode == 0, proc.stderr
    (img,) = report(proc)["images"]
    assert img["status"] == "skipped" and img["referrers"][0]["status"] == "copied"
    assert assert_complete(dst.url, "nosig/rancher/hardened-etcd", sig_tag) == sig


def test_missing_image_fails_alone_and_failed_list_reads_back(seeded, registry_factory, tmp_path):
    src, images = seeded
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", ["rancher/hardened-etcd:v3.5.9", "rancher/never-pushed:v0"])
    failed = tmp_path / "failed.txt"
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                   "--failed-list", str(failed))
    assert proc.returncode == 1
    assert "never-pushed" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert list_tags(dst.url, "rancher/hardened-etcd") == ["v3.5.9"]
    from rke2_mirror.model.reference import parse_image_lines
    assert [str(r) for r in parse_image_lines(failed.read_text())] == ["docker.io/rancher/never-pushed:v0"]


def test_unparseable_line_names_file_and_line(tmp_path, registry):
    lst = tmp_path / "bad.txt"
    lst.write_text("rancher/ok:v1\n\nnot a valid ref\n")
    proc = run_cli("mirror", "--images", str(lst), "--to", registry.url)
    assert proc.returncode == 2
    assert f"{lst}:3" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_target_is_one_line_exit_2(tmp_path, seeded):
    src, _ = seeded
    from rke2_mirror_testkit.registry_proc import free_port
    lst = write_list(tmp_path / "images.txt", ["rancher/hardened-etcd:v3.5.9"])
    proc = run_cli("mirror", "--images", str(lst), "--to", f"http://127.0.0.1:{free_port()}",
                   "--source-endpoint", f"docker.io={src.url}", "--retries", "1")
    assert proc.returncode == 2, proc.stderr
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_basic_auth_target_with_env_credentials(seeded, basic_registry, tmp_path):
    src, images = seeded
    lst = write_list(tmp_path / "images.txt", ["rancher/hardened-etcd:v3.5.9"])
    args = ("mirror", "--images", str(lst), "--to", basic_registry.url, "--source-endpoint", f"docker.io={src.url}")
    proc = run_cli(*args)
    assert proc.returncode == 2 and "requires credentials" in proc.stderr
    proc = run_cli(*args, env={"RKE2_MIRROR_USERNAME": "alice", "RKE2_MIRROR_PASSWORD": "not-the-password"})
    assert proc.returncode == 2 and "rejected" in proc.stderr
    assert "not-the-password" not in proc.stderr + proc.stdout
    proc = run_cli(*args, env={"RKE2_MIRROR_USERNAME": "alice", "RKE2_MIRROR_PASSWORD": "wonderland-pw"})
    assert proc.returncode == 0, proc.stderr
    auth = ("alice", "wonderland-pw")
    assert assert_complete(basic_registry.url, "rancher/hardened-etcd", "v3.5.9", auth=auth) == \
        images["docker.io/rancher/hardened-etcd:v3.5.9"].digest


def test_source_credentials_from_docker_config_and_auth_file(basic_tls_registry, registry_factory, tmp_path,
                                                             rke2_mirror_env):
    src = basic_tls_registry
    with ImagePusher(src.url, auth=("alice", "wonderland-pw"), verify=src.ca_file) as p:
        img = push_image(p, "rancher/private", "v1", seed="private")
    dst = registry_factory(name="dst")
    lst = write_list(tmp_path / "images.txt", [f"{src.host}/rancher/private:v1"])
    args = ("mirror", "--images", str(lst), "--to", dst.url, "--src-ca-file", str(src.ca_file), "--json")
    proc = run_cli(*args)
    assert proc.returncode == 2 and "source" in proc.stderr and "credentials" in proc.stderr
    rke2_mirror_env.write_docker_auth(src.host, "alice", "wonderland-pw")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(dst.url, "rancher/private", "v1")[2] == img.digest
    # REGISTRY_AUTH_FILE is read too (and wins over the docker config)
    rke2_mirror_env.docker_config_file.unlink()
    rke2_mirror_env.write_auth_file(src.host, "alice", "wonderland-pw")
    proc = run_cli(*args[:-1], "--to", dst.url + "/again")
    assert proc.returncode == 0, proc.stderr


def test_tls_target_needs_ca_flag(seeded, tls_registry, tmp_path):
    src, images = seeded
    lst = write_list(tmp_path / "images.txt", ["rancher/mirrored-pause:3.6"])
    args = ("mirror", "--images", str(lst), "--to", tls_registry.url, "--source-endpoint", f"docker.io={src.url}")
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "--ca-file" in proc.stderr and "--insecure-skip-verify" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli(*args, "--ca-file", str(tls_registry.ca_file)).returncode == 0
    assert run_cli(*args[:-4], "--to", tls_registry.url + "/insecure", "--source-endpoint", f"docker.io={src.url}",
                   "--insecure-skip-verify").returncode == 0
    assert read_manifest(tls_registry.url, "insecure/rancher/mirrored-pause", "3.6",
                         verify=tls_registry.ca_file)[2] == images["docker.io/rancher/mirrored-pause:3.6"].digest


def test_https_source_names_src_flags(tls_registry, registry, tmp_path):
    lst = write_list(tmp_path / "images.txt", [f"{tls_registry.host}/rancher/x:v1"])
    proc = run_cli("mirror", "--images", str(lst), "--to", registry.url)
    assert proc.returncode == 2 and "--src-ca-file" in proc.stderr


def test_token_auth_target_reuses_tokens(seeded, token_registry, tmp_path):
    src, images = seeded
    lst = write_list(tmp_path / "images.txt", list(images))
    proc = run_cli("mirror", "--images", str(lst), "--to", token_registry.url, "--ca-file",
                   str(token_registry.ca_file), "--source-endpoint", f"docker.io={src.url}", "--json",
                   env={"RKE2_MIRROR_USERNAME": "admin", "RKE2_MIRROR_PASSWORD": "Harbor12345"})
    assert proc.returncode == 0, proc.stderr
    reqs = [r for r in token_registry.token_requests if r.user == "admin"]  # before the checks below add theirs
    for ref, img in images.items():
        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        auth = ("admin", "Harbor12345")
        assert assert_complete(token_registry.url, repo, img.tag, verify=token_registry.ca_file, auth=auth) == img.digest
    # one token per repository scope (plus mount scopes and the ping), never one per request
    scopes = [r.scopes for r in reqs]
    assert len(scopes) == len(set(scopes)), scopes  # never the same scope twice
    assert len(reqs) <= 3 * len(images) + 1, scopes
    assert all(any(":pull,push" in s for s in r.scopes) or not r.scopes or
               any(s.endswith(":pull") for s in r.scopes) for r in reqs)


def test_token_auth_wrong_password(seeded, token_registry, tmp_path):
    src, _ = seeded
    lst = write_list(tmp_path / "images.txt", ["rancher/mirrored-pause:3.6"])
    proc = run_cli("mirror", "--images", str(lst), "--to", token_registry.url, "--ca-file",
                   str(token_registry.ca_file), "--source-endpoint", f"docker.io={src.url}",
                   env={"RKE2_MIRROR_USERNAME": "admin", "RKE2_MIRROR_PASSWORD": "wrong-secret"})
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "wrong-secret" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_harbor_creates_missing_projects_private(seeded, harbor, tmp_path):
    src, images = seeded
    lst = write_list(tmp_path / "images.txt", list(images))
    args = ("mirror", "--images", str(lst), "--to", harbor.url, "--ca-file", str(harbor.ca_file),
            "--source-endpoint", f"docker.io={src.url}")
    env = {"RKE2_MIRROR_USERNAME": "admin", "RKE2_MIRROR_PASSWORD": "Harbor12345"}
    # a dry run first: the projects do not exist yet (Harbor answers 401 there), so everything would be
    # copied, and nothing is created
    dry = run_cli(*args, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)["summary"]
    assert summary["would_copy"] == len(images) and summary["failed"] == 0 and summary["bytes"] > 0
    assert "would create Harbor project(s)" in dry.stderr and not harbor.projects
    proc = run_cli(*args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["bytes"] == summary["bytes"]  # the dry run said what would move
    assert set(harbor.projects) >= {"rancher", "library"}
    assert not harbor.projects["rancher"].public
    auth = ("admin", "Harbor12345")
    img = images["docker.io/rancher/rke2-runtime:v1.28.9-rke2r1"]
    assert assert_complete(harbor.url, "rancher/rke2-runtime", img.tag, verify=harbor.ca_file, auth=auth) == img.digest


def test_harbor_public_projects_flag(seeded, harbor, tmp_path):
    src, _ = seeded
    lst = write_list(tmp_path / "images.txt", ["rancher/mirrored-pause:3.6"])
    proc = run_cli("mirror", "--images", str(lst), "--to", harbor.url, "--ca-file", str(harbor.ca_file),
                   "--source-endpoint", f"docker.io={src.url}", "--public-projects",
                   env={"RKE2_MIRROR_USERNAME": "admin", "RKE2_MIRROR_PASSWORD": "Harbor12345"})
    assert proc.returncode == 0, proc.stderr
    assert harbor.projects["rancher"].public


def test_harbor_user_without_rights_gets_one_line(seeded, harbor, tmp_path):
    src, _ = seeded
    lst = write_list(tmp_path / "images.txt", ["rancher/mirrored-pause:3.6"])
    args = ("mirror", "--images", str(lst), "--to", harbor.url, "--ca-file", str(harbor.ca_file),
            "--source-endpoint", f"docker.io={src.url}")
    dev = {"RKE2_MIRROR_USERNAME": "dev", "RKE2_MIRROR_PASSWORD": "dev-pw"}
    proc = run_cli(*args, env=dev)
    assert proc.returncode == 2
    assert "'rancher'" in proc.stderr and "permission" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "rancher" not in harbor.projects
    # once the project exists, the member may push into it
    harbor.add_project("rancher")
    proc = run_cli(*args, env=dev)
    assert proc.returncode == 0, proc.stderr


def test_corrupt_source_blob_is_never_tagged(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        good = push_image(p, "rancher/good", "v1", seed="good", platforms=None)
        bad = push_image(p, "rancher/bad", "v1", seed="bad", layer_sizes=(50_000,))
    # Flip bytes of one layer on the source registry's disk: same size, wrong content.
    from rke2_mirror.model.oci import parse_manifest
    child = bad.child("linux/arm64")
    layer = parse_manifest(None, bad.child_manifests[child]).layers[-1].digest
    hexd = layer.split(":")[1]
    data = src.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data.read_bytes())
    raw[100:110] = bytes(10)
    data.write_bytes(bytes(raw))
    lst = write_list(tmp_path / "images.txt", ["rancher/good:v1", "rancher/bad:v1"])
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                   "--json")
    assert proc.returncode == 1
    rep = {i["source"]: i for i in report(proc)["images"]}
    assert rep["docker.io/rancher/bad:v1"]["status"] == "failed"
    assert layer in rep["docker.io/rancher/bad:v1"]["error"] and "hashes to" in rep["docker.io/rancher/bad:v1"]["error"]
    assert list_tags(dst.url, "rancher/bad") == []
    with ImagePusher(dst.url) as p:
        assert not blob_exists(p, "rancher/bad", layer)
    with pytest.raises(LookupError):
        read_manifest(dst.url, "rancher/bad", child)
    assert rep["docker.io/rancher/good:v1"]["status"] == "copied"


def test_cold_copy_asks_nothing_per_blob_and_a_bump_reuses_layers(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    base = make_layer_blob("bump-base", 400_000)
    with ImagePusher(src.url) as p:
        push_image(p, "rancher/app", "v1", seed="v1", base=base, platforms=None, layer_sizes=(100_000,))
        push_image(p, "rancher/app", "v2", seed="v2", base=base, platforms=None, layer_sizes=(100_000,))
    args = ("--to", dst.url, "--source-endpoint", f"docker.io={src.url}")
    assert run_cli("mirror", "--images", str(write_list(tmp_path / "a.txt", ["rancher/app:v1"])), *args).returncode == 0
    cold = dst.access_log()
    assert not [l for l in cold if '"HEAD /v2/rancher/app/blobs/' in l]  # a new repository: no HEAD per blob
    # the release bump: a new tag of a known repository shares the base layer, which is not sent again
    proc = run_cli("mirror", "--images", str(write_list(tmp_path / "b.txt", ["rancher/app:v2"])), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    bump = dst.access_log()[len(cold):]
    assert any(f'"HEAD /v2/rancher/app/blobs/{base.digest}' in l for l in bump)
    assert not [l for l in bump if '"PUT ' in l and base.digest.replace(":", "%3A") in l]
    assert report(proc)["images"][0]["bytes"] < 400_000
