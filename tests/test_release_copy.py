"""--release wired into the copy commands: list --check and mirror --dry-run name what's missing, copy nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rke2_mirror_testkit.images import ImagePusher, list_tags, make_layer_blob, push_image
from rke2_mirror_testkit.release_server import start_release_server

from .test_mirror import run_cli

LISTS = Path(__file__).resolve().parents[1] / "lists"
VERSION = "v1.28.9+rke2r1"


@pytest.fixture
def release_env(registry_factory):
    refs = [l.strip() for l in (LISTS / "rke2" / VERSION / "rke2-images-core.linux-amd64.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    src = registry_factory(name="dockerhub")
    base = make_layer_blob("rel-base", 50_000)
    missing = refs[-1]
    with ImagePusher(src.url) as p:
        for i, ref in enumerate(refs[:-1]):
            name, tag = ref.split("/", 1)[1].rsplit(":", 1)
            push_image(p, name, tag, base=base, seed=ref, layer_sizes=(5_000,), platforms=(("linux", "amd64"),))
    server = start_release_server(LISTS, {"rke2": {"stable": VERSION}})
    env = {"RKE2_MIRROR_RELEASE_URL": server.release_url("rke2"), "RKE2_MIRROR_CHANNEL_URL": server.channel_url("rke2")}
    try:
        yield src, env, refs, missing
    finally:
        server.stop()


def test_list_check_names_the_missing_image(release_env, tmp_path):
    src, env, refs, missing = release_env
    proc = run_cli("list", "stable", "--flavor", "core", "--check", "--source-endpoint", f"docker.io={src.url}",
                   "--lists-dir", str(tmp_path / "cache"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"MISSING  {missing}" in proc.stdout
    assert sum(1 for l in proc.stdout.splitlines() if l.startswith("ok ")) == len(refs) - 1
    assert f"{len(refs) - 1} of {len(refs)} images present" in proc.stderr and VERSION in proc.stderr
    # HEADs only: nothing was pulled
    assert not [l for l in src.access_log() if '"GET /v2/' in l and "/manifests/" in l]


def test_mirror_release_dry_run_then_copy(release_env, registry_factory, tmp_path):
    src, env, refs, missing = release_env
    dst = registry_factory(name="dst")
    args = ("mirror", "--release", "stable", "--flavor", "core", "--to", dst.url, "--source-endpoint",
            f"docker.io={src.url}", "--lists-dir", str(tmp_path / "cache"), "--json")
    proc = run_cli(*args, "--dry-run", env=env)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    status = {i["source"]: i["status"] for i in rep["images"]}
    assert status[missing] == "missing"
    assert rep["summary"]["would_copy"] == len(refs) - 1 and rep["summary"]["copied"] == 0
    assert all(i["bytes"] > 0 for i in rep["images"] if i["status"] == "would-copy")
    assert not [l for l in dst.access_log() if '"PUT ' in l or '"POST ' in l]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 1
    rep = json.loads(proc.stdout)
    assert rep["summary"]["copied"] == len(refs) - 1 and rep["summary"]["failed"] == 1
    name, tag = refs[0].split("/", 1)[1].rsplit(":", 1)
    assert list_tags(dst.url, name) == [tag]
