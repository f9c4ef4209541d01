"""`rke2-mirror sync CONFIG.yaml`: config validation, idempotence, the lock, a channel move, the report and
the textfile, shards, and a Docker Hub-like pull budget end to end."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

import rke2_mirror.jobs.sync as job
from rke2_mirror.model.reference import ImageRef
from rke2_mirror_testkit.images import ImagePusher, list_tags, make_layer_blob, push_image
from rke2_mirror_testkit.registry_proc import REGISTRY_BINARY, start_registry
from rke2_mirror_testkit.release_server import start_release_server

from .test_mirror import run_cli

OLD, NEW = "v1.28.9+rke2r1", "v1.30.14+rke2r1"
CORE = "rke2-images-core.linux-amd64.txt"
OLD_REFS = [
    "docker.io/rancher/rke2-runtime:v1.28.9-rke2r1",
    "docker.io/rancher/hardened-kubernetes:v1.28.9-rke2r1-build20240416",
    "docker.io/rancher/hardened-etcd:v3.5.9-k3s1-build20240418",
    "docker.io/rancher/mirrored-pause:3.6",
    "docker.io/rancher/klipper-lb:v0.4.7",
    "docker.io/rancher/mirrored-sig-storage-snapshot-validation-webhook:v6.2.2",
]
NEW_REFS = [
    "docker.io/rancher/rke2-runtime:v1.30.14-rke2r1",
    "docker.io/rancher/hardened-kubernetes:v1.30.14-rke2r1-build20250618",
    "docker.io/rancher/hardened-etcd:v3.5.21-k3s1-build20250612",
    "docker.io/rancher/mirrored-pause:3.6",
    "docker.io/rancher/klipper-lb:v0.4.7",
    "docker.io/rancher/mirrored-library-traefik:2.11.24",
]
ALL_REFS = list(dict.fromkeys(OLD_REFS + NEW_REFS))


def write_release(root: Path, version: str, refs: list[str]) -> None:
    """A release in the lists/ layout (core and all lists, amd64), with its sha256sum-amd64.txt."""
    d = root / "rke2" / version
    d.mkdir(parents=True, exist_ok=True)
    sums = []
    for asset in (CORE, "rke2-images-all.linux-amd64.txt"):
        data = ("\n".join(refs) + "\n").encode()
        (d / asset).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {asset}\n")
    (d / "sha256sum-amd64.txt").write_text("".join(sums))


@pytest.fixture(scope="module")
def lists_root(tmp_path_factory) -> Path:
    """Two small releases: the real versions' names, six images each, two shared."""
    root = tmp_path_factory.mktemp("lists")
    write_release(root, OLD, OLD_REFS)
    write_release(root, NEW, NEW_REFS)
    return root


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A docker.io stand-in holding the images of both releases (single-platform, tiny layers)."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip(f"{REGISTRY_BINARY} not installed")
    reg = start_registry(tmp_path_factory.mktemp("sync-src"))
    base = make_layer_blob("sync-base", 4_000)
    try:
        with ImagePusher(reg.url) as p:
            for ref in ALL_REFS:
                name, tag = ref.split("/", 1)[1].rsplit(":", 1)
                push_image(p, name, tag, base=base, seed=ref, layer_sizes=(1_500,), platforms=None)
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def releases(lists_root):
    server = start_release_server(lists_root, {"rke2": {"stable": OLD, "v1.30": NEW}})
    yield server
    server.stop()


def write_config(tmp_path: Path, src_reg, dst_reg, releases, *, follow=None, name="sync.yaml", **extra) -> Path:
    doc = {
        "version": 1,
        "target": {"url": dst_reg.url},
        "releases": follow if follow is not None else [{
            "channels": ["stable"], "flavors": ["core"],
            "release_url": releases.release_url("rke2"), "channel_url": releases.channel_url("rke2")}],
        "sources": {"endpoints": {"docker.io": src_reg.url}},
        "lists_dir": "cache",
        "outputs": {"report": "out/report.json", "textfile": "out/rke2_mirror.prom",
                    "registries_yaml": "node/registries.yaml", "config_yaml": "node/config.yaml"},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        elif value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def follow(releases, *items, flavors=("core",)):
    return [{"channels": [i for i in items if not i.startswith("v1.") or "+" not in i],
             "versions": [i for i in items if i.startswith("v1.") and "+" in i], "flavors": list(flavors),
             "release_url": releases.release_url("rke2"), "channel_url": releases.channel_url("rke2")}]


def sync_cli(config: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("sync", str(config), *args, env=env, timeout=60)


def read_report(config: Path, name="report.json") -> dict:
    return json.loads((config.parent / "out" / name).read_text())


def prom(path: Path) -> dict[str, float]:
    """Samples of a textfile, checked against the exposition format: HELP and TYPE before each family."""
    out, typed = {}, set()
    for line in path.read_text().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            assert line.split()[3] in ("gauge", "counter")
        elif line.startswith("# HELP "):
            continue
        else:
            m = re.fullmatch(r'([a-z_][a-z0-9_]*)(\{(?:[a-z_]+="[^"]*",?)*\})? (-?[0-9.e+]+)', line)
            assert m, line
            assert m.group(1) in typed, f"sample before its TYPE line: {line}"
            out.setdefault(m.group(1), float(m.group(3)))
    return out


def manifest_requests(lines: list[str], method: str) -> list[str]:
    return [l for l in lines if f'"{method} /v2/' in l and "/manifests/" in l]


def writes(lines: list[str]) -> list[str]:
    return [l for l in lines if re.search(r'"(PUT|POST|PATCH|DELETE) ', l)]


# --------------------------------------------------------------------------- config validation


def _err(text: str) -> str:
    with pytest.raises(job.ConfigError) as info:
        job.parse_config(text, "config.yaml", Path("/etc/rke2-mirror"))
    return str(info.value)


GOOD = """\
version: 1
target:
  url: https://harbor.example.com
releases:
  - channels: [stable]
"""


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("  url:", "  tsl: 1\n  url:"),
     "config.yaml:3: unknown key 'target.tsl' (known: url, ca_file, insecure_skip_verify, credentials, public_projects, "
     "strict_auth_realm)"),
    (GOOD + "  - versions: [v1.28.9+rke2r1]\n    chanels: [latest]\n",
     "config.yaml:7: unknown key 'releases[1].chanels' (known: product, channels, versions, arches, flavors, "
     "release_url, channel_url, offline, install_files, install_script)"),
    (GOOD.replace("version: 1", "version: 2"), "config.yaml:1: unsupported config version 2: this rke2-mirror reads version 1"),
    (GOOD.replace("version: 1\n", ""), "config.yaml:1: missing 'version: 1' (the config format version)"),
    (GOOD.replace("version: 1", "version: '1'"), "config.yaml:1: unsupported config version '1'"),
    ("", "config.yaml: empty config"),
    ("version: 1\nreleases: [{channels: [stable]}]\n", "config.yaml:1: missing required key 'target'"),
    ("version: 1\ntarget:\n  ca_file: ca.pem\nreleases: [{channels: [stable]}]\n",
     "config.yaml:2: missing required key 'target.url'"),
    (GOOD + "copy:\n  jobs: many\n", "config.yaml:7: copy.jobs: expected an integer, got str 'many'"),
    (GOOD + "copy:\n  jobs: 0\n", "config.yaml:7: copy.jobs: 0 is out of range (1..64)"),
    (GOOD + "copy:\n  max_rps: -1\n", "config.yaml:7: copy.max_rps: -1.0 must be > 0"),
    (GOOD + "copy:\n  timeout: 0.5\n", "config.yaml:7: copy.timeout: 0.5 is out of range (1..3600)"),
    (GOOD.replace("url: https://harbor.example.com", "url: https://harbor.example.com\n  insecure_skip_verify: yes please"),
     "config.yaml:4: target.insecure_skip_verify: expected true or false, got str 'yes please'"),
    (GOOD.replace("channels: [stable]", "channels: [1.30]"),
     "config.yaml:5: releases[0].channels[0]: expected a string, got float 1.3 (quote it)"),
    (GOOD.replace("channels: [stable]", "flavors: [core]"),
     "config.yaml:5: releases[0]: name at least one of 'channels'"),
    (GOOD.replace("channels: [stable]", "channels: [stable]\n    arches: [x86]"), "config.yaml:6: releases[0].arches:"),
    (GOOD.replace("channels: [stable]", "product: rke3\n    channels: [stable]"),
     "config.yaml:5: releases[0].product: unknown product 'rke3' (known: rke2, k3s, rancher)"),
    (GOOD + "target:\n  url: x\n", "config.yaml:6: duplicate key 'target'"),
    (GOOD + "outputs:\n  textfile: /tmp/rke2_mirror.txt\n", "config.yaml:7: outputs.textfile: '/tmp/rke2_mirror.txt': the "
     "node-exporter textfile collector reads only files ending in .prom"),
    (GOOD.replace("url: https://harbor.example.com", "url: https://harbor.example.com\n  credentials:\n    env: {username: U}"),
     "config.yaml:5: missing required key 'target.credentials.env.password'"),
    (GOOD.replace("url: https://harbor.example.com",
                  "url: https://harbor.example.com\n  credentials:\n    env: {username: U, password: P}\n    file: x.json"),
     "config.yaml:4: target.credentials: give exactly one of 'env' (variable names) or 'file'"),
    (GOOD.replace("url: https://harbor.example.com",
                  "url: https://harbor.example.com\n  credentials:\n    env: {username: admin, password: 'Harbor12345!'}"),
     "config.yaml:5: target.credentials.env.password: not an environment variable name (the config names the "
     "variable, never the secret itself; the value is not shown)"),
    (GOOD + "sources:\n  credentials:\n    env: {username: U, password: P}\n",
     "config.yaml:8: unknown key 'sources.credentials.env' (known: file)"),
    (GOOD + "sources:\n  endpoints: {docker.io: 'ftp://x'}\n", "config.yaml:7: sources.endpoints:"),
    (GOOD + "copy:\n  platforms: [linux]\n", "config.yaml:7: copy.platforms: invalid platform 'linux'"),
    (GOOD + "target: [\n", "config.yaml:7: invalid YAML"),
    ("version: 1\ntarget: {url: 'h'}\n", "config.yaml:1: nothing to mirror"),
    (GOOD + "node:\n  ca_file: /x\n  insecure_skip_verify: true\n",
     "config.yaml:6: node: give either 'ca_file' or 'insecure_skip_verify', not both"),
])
def test_config_errors_name_the_line_and_the_key(text, message):
    assert message in _err(text)


def test_config_defaults_and_relative_paths():
    cfg = job.parse_config(GOOD + "images: [extra.txt]\noutputs: {report: out/r.json}\n", "c.yaml",
                           Path("/etc/rke2-mirror"))
    assert cfg.images == ("/etc/rke2-mirror/extra.txt",) and cfg.outputs.report == "/etc/rke2-mirror/out/r.json"
    r = cfg.releases[0]
    assert (r.product, r.arches, r.flavors, r.versions) == ("rke2", ("amd64",), ("all",), ())
    assert cfg.copy.jobs == 4 and cfg.copy.max_rps is None and cfg.node.system_default_registry is True
    one = job.parse_config(GOOD.replace("channels: [stable]", "channels: stable\n    arches: arm64"), "c", Path("/"))
    assert one.releases[0].channels == ("stable",) and one.releases[0].arches == ("arm64",)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "sync.yaml"
    path.write_text(GOOD.replace("  url:", "  tsl: x\n  url:"))
    proc = sync_cli(path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"rke2-mirror: error: {path}:3: unknown key 'target.tsl' (known: url, ca_file, "
                                   "insecure_skip_verify, credentials, public_projects, strict_auth_realm)")
    assert not (tmp_path / "sync.yaml.lock").exists()  # refused before anything else


# --------------------------------------------------------------------------- the job


class Logs(list):
    def __call__(self, message: str) -> None:
        self.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self)


def run(config: Path, **kw) -> tuple[job.SyncResult, Logs]:
    logs = Logs()
    return job.sync(config, log=logs, **kw), logs


def refs(*names: str) -> set[str]:
    return {str(ImageRef.parse(n)) for n in names}


def test_sync_copies_then_is_idempotent(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    config = write_config(tmp_path, source, dst, releases)
    proc = sync_cli(config, "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"rke2 stable: {OLD} ({len(OLD_REFS)} images)" in proc.stderr
    rep = json.loads(proc.stdout)
    assert rep == read_report(config)
    assert rep["result"] == "ok" and rep["exit_code"] == 0 and rep["summary"]["copied"] == len(OLD_REFS)
    (rel,) = rep["releases"]
    assert (rel["name"], rel["release"], rel["version"], rel["lists"]) == ("rke2 stable", "stable", OLD, [CORE])
    assert set(rel["copied"]) == refs(*OLD_REFS) and rel["failed"] == [] and rel["skipped"] == []
    assert rel["summary"]["bytes"] > 0 and rel["summary"]["seconds"] > 0
    name, tag = OLD_REFS[0].split("/", 1)[1].rsplit(":", 1)
    assert list_tags(dst.url, name) == [tag]
    m1 = prom(tmp_path / "out" / "rke2_mirror.prom")
    assert m1["rke2_mirror_images_total"] == len(OLD_REFS) and m1["rke2_mirror_images_failed"] == 0
    assert m1["rke2_mirror_last_run_success"] == 1 and m1["rke2_mirror_bytes_copied_last_run"] == rep["summary"]["bytes"]
    assert abs(m1["rke2_mirror_last_success_timestamp_seconds"] - time.time()) < 60
    regs = tmp_path / "node" / "registries.yaml"
    doc = yaml.safe_load(regs.read_text())
    assert doc["mirrors"]["docker.io"]["endpoint"] == [dst.url]
    assert yaml.safe_load((tmp_path / "node" / "config.yaml").read_text()) == {"system-default-registry": dst.host}
    before = regs.stat()

    src_seen, dst_seen = len(source.access_log()), len(dst.access_log())
    proc = sync_cli(config)
    assert proc.returncode == 0, proc.stderr
    src_log, dst_log = source.access_log()[src_seen:], dst.access_log()[dst_seen:]
    assert not manifest_requests(src_log, "GET") and len(manifest_requests(src_log, "HEAD")) == len(OLD_REFS)
    assert not writes(dst_log) and not [l for l in dst_log if "/blobs/" in l]  # manifest HEADs only
    assert "skipped" not in proc.stderr  # an unchanged run logs no line per image
    assert f"sync done: {len(OLD_REFS)} images, 0 copied, {len(OLD_REFS)} already present" in proc.stderr
    rep = read_report(config)
    assert rep["summary"]["skipped"] == len(OLD_REFS) and rep["summary"]["bytes"] == 0
    after = regs.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    m2 = prom(tmp_path / "out" / "rke2_mirror.prom")
    assert m2["rke2_mirror_bytes_copied_total"] == m1["rke2_mirror_bytes_copied_total"]  # a counter: kept
    assert m2["rke2_mirror_last_success_timestamp_seconds"] >= m1["rke2_mirror_last_success_timestamp_seconds"]


def test_channel_move_copies_what_is_new_and_deletes_nothing(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    config = write_config(tmp_path, source, dst, releases)
    assert run(config)[0].exit_code == 0
    releases.set_channels("rke2", {"stable": NEW})
    result, logs = run(config)
    assert result.exit_code == 0, logs.text
    assert f"rke2 stable: {NEW} ({len(NEW_REFS)} images)" in logs
    (rel,) = result.report["releases"]
    shared = refs(*set(OLD_REFS) & set(NEW_REFS))
    assert rel["version"] == NEW and set(rel["skipped"]) == shared and len(shared) == 2
    assert set(rel["copied"]) == refs(*NEW_REFS) - shared
    for ref in ALL_REFS:  # the old release's images are all still there
        name, tag = ref.split("/", 1)[1].rsplit(":", 1)
        assert list_tags(dst.url, name) == sorted({tag} | {r.rsplit(":", 1)[1] for r in ALL_REFS
                                                          if r.split("/", 1)[1].rsplit(":", 1)[0] == name}), ref
    assert f"(RKE2 {NEW})" in (tmp_path / "node" / "registries.yaml").read_text()
    info = [l for l in (tmp_path / "out" / "rke2_mirror.prom").read_text().splitlines()
            if l.startswith("rke2_mirror_release_info")]
    assert info == [f'rke2_mirror_release_info{{config="sync",product="rke2",release="stable",version="{NEW}"}} 1']


def test_failures_do_not_stop_the_rest_and_keep_the_last_success(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    (tmp_path / "extra.txt").write_text(f"# ours\n{OLD_REFS[0]}\ndocker.io/rancher/not-there:v0\n")
    (tmp_path / "extra-ok.txt").write_text(f"{OLD_REFS[0]}\n")
    config = write_config(tmp_path, source, dst, releases, images=["extra.txt"])
    good = write_config(tmp_path, source, dst, releases, images=["extra-ok.txt"], follow=[], name="good.yaml")
    assert run(good)[0].exit_code == 0
    first = prom(tmp_path / "out" / "rke2_mirror.prom")["rke2_mirror_last_success_timestamp_seconds"]
    time.sleep(0.01)
    result, logs = run(config)
    assert result.exit_code == 1 and not result.ok
    rep = read_report(config)
    assert rep == result.report
    assert rep["result"] == "failed" and rep["exit_code"] == 1 and rep["summary"]["failed"] == 1
    assert rep["summary"]["copied"] == len(OLD_REFS) - 1  # the rest went on
    stable, ours = rep["releases"]
    assert stable["summary"]["failed"] == 0 and stable["summary"]["total"] == len(OLD_REFS)
    assert ours["name"] == f"images {tmp_path / 'extra.txt'}" and ours["summary"]["total"] == 2
    (failed,) = ours["failed"]
    assert failed["source"] == "docker.io/rancher/not-there:v0" and "not found" in failed["error"]
    # an image listed twice counts for both, the engine copies it once
    assert ours["skipped"] == stable["skipped"] == [str(ImageRef.parse(OLD_REFS[0]))]
    assert len(rep["images"]) == len(OLD_REFS) + 1
    m = prom(tmp_path / "out" / "rke2_mirror.prom")
    assert m["rke2_mirror_last_run_success"] == 0 and m["rke2_mirror_images_failed"] == 1
    assert m["rke2_mirror_last_success_timestamp_seconds"] == first
    assert m["rke2_mirror_last_run_timestamp_seconds"] > first


def test_cli_failed_image_exits_1(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    (tmp_path / "extra.txt").write_text(f"{OLD_REFS[0]}\ndocker.io/rancher/not-there:v0\n")
    config = write_config(tmp_path, source, dst, releases, follow=[], images=["extra.txt"])
    proc = sync_cli(config)
    assert proc.returncode == 1, proc.stderr
    assert "failed   docker.io/rancher/not-there:v0" in proc.stderr
    assert "rke2-mirror: sync incomplete: 2 images, 1 copied, 0 already present, 1 failed" in proc.stderr


def test_unreachable_target_is_exit_2_and_the_textfile_says_so(source, releases, tmp_path):
    class Gone:
        url = "http://127.0.0.1:1"
    config = write_config(tmp_path, source, Gone, releases, copy={"retries": 1})
    with pytest.raises(job.InputError, match="target .*cannot connect"):
        run(config)
    m = prom(tmp_path / "out" / "rke2_mirror.prom")
    assert m["rke2_mirror_last_run_success"] == 0 and "rke2_mirror_last_success_timestamp_seconds" not in m
    assert not (tmp_path / "out" / "report.json").exists()


def test_an_unwritable_output_is_refused_before_copying(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    (tmp_path / "not-a-dir").write_text("")
    config = write_config(tmp_path, source, dst, releases, outputs={"report": "not-a-dir/report.json"})
    with pytest.raises(job.InputError, match="outputs.report: cannot write .*not-a-dir/report.json"):
        run(config)
    assert not writes(dst.access_log())


def test_dry_run_writes_nothing(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    config = write_config(tmp_path, source, dst, releases)
    result, _ = run(config, dry_run=True)
    assert result.exit_code == 0 and result.report["summary"]["would_copy"] == len(OLD_REFS)
    assert result.report["releases"][0]["would_copy"]
    assert not writes(dst.access_log()) and not (tmp_path / "out").exists() and not (tmp_path / "node").exists()


def test_split_report_counts_shared_images_for_each_release_with_their_referrers():
    from rke2_mirror.engine.copy import ImageResult, Report

    a, b, c, d = (ImageRef.parse(f"rancher/{n}:1") for n in "abcd")
    sets = [job.ImageSet("rke2 stable", (a, b), "rke2", "stable", NEW), job.ImageSet("images x.txt", (b, c, d), file="x.txt")]
    sig = {"subject": "sha256:" + "1" * 64, "digest": "sha256:" + "2" * 64, "artifactType": "", "kind": "signature",
           "size": 5, "tag": "sha256-" + "1" * 64 + ".sig", "status": "copied"}
    report = Report([ImageResult(str(a), "t", "copied", bytes=10, seconds=1.0),
                     ImageResult(str(b), "t", "skipped", source_digest="sha256:" + "1" * 64, seconds=0.5, bytes=5,
                                 referrers=[sig]),
                     ImageResult(str(c), "t", "failed", error="boom")])  # d: another shard's
    stable, extra = job.split_report(report, sets)
    assert stable["summary"] == {"total": 2, "copied": 1, "skipped": 1, "failed": 0, "deferred": 0, "bytes": 15,
                                 "seconds": 1.5, "in_release": 2}
    assert stable["copied"] == [str(a)] and stable["skipped"] == [str(b)] and stable["deferred"] == []
    assert extra["summary"]["total"] == 2 and extra["summary"]["in_release"] == 3
    assert extra["failed"] == [{"source": str(c), "error": "boom"}] and extra["file"] == "x.txt"
    assert stable["version"] == NEW and "file" not in stable and "version" not in extra


# --------------------------------------------------------------------------- credentials


def test_credentials_from_env_names_and_registries_yaml_0600(source, releases, basic_registry, tmp_path,
                                                             monkeypatch):
    user, password = next(iter(basic_registry.users.items()))
    (tmp_path / "one.txt").write_text(OLD_REFS[0] + "\n")
    config = write_config(tmp_path, source, basic_registry, releases, follow=[], images=["one.txt"],
                          target={"url": basic_registry.url,
                                  "credentials": {"env": {"username": "MIRROR_USER", "password": "MIRROR_PW"}}},
                          node={"with_auth": True, "system_default_registry": False})
    with pytest.raises(job.InputError, match="environment variable.s. MIRROR_USER, MIRROR_PW not set"):
        run(config)
    monkeypatch.setenv("MIRROR_USER", user)
    monkeypatch.setenv("MIRROR_PW", password)
    result, logs = run(config)
    assert result.exit_code == 0, logs.text
    assert password not in logs.text + (tmp_path / "out" / "report.json").read_text()
    assert "RKE2_MIRROR_PASSWORD" not in os.environ  # scoped to the run
    regs = tmp_path / "node" / "registries.yaml"
    assert regs.stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load(regs.read_text())["configs"][basic_registry.host]["auth"] == {"username": user,
                                                                                        "password": password}


def test_credentials_from_a_docker_config_file(source, releases, basic_registry, tmp_path):
    import base64

    user, password = next(iter(basic_registry.users.items()))
    secret = tmp_path / "secret" / "config.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"auths": {basic_registry.host: {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    (tmp_path / "one.txt").write_text(OLD_REFS[0] + "\n")
    config = write_config(tmp_path, source, basic_registry, releases, follow=[], images=["one.txt"],
                          target={"url": basic_registry.url, "credentials": {"file": "secret/config.json"}})
    result, logs = run(config)
    assert result.exit_code == 0 and result.report["summary"]["copied"] == 1, logs.text
    secret.write_text(json.dumps({"auths": {"elsewhere.example": {"auth": "eDp5"}}}))
    with pytest.raises(job.InputError, match=rf"no 'auths' entry \(nor a credential helper's answer\) for {basic_registry.host}"):
        run(config)


# --------------------------------------------------------------------------- the lock


HOLD = """
import sys, time
from pathlib import Path
from rke2_mirror.jobs.sync import SyncLock
lock = SyncLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_overlap_exits_3_and_a_dead_holder_does_not_block(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    (tmp_path / "one.txt").write_text(OLD_REFS[0] + "\n")
    config = write_config(tmp_path, source, dst, releases, follow=[], images=["one.txt"])
    lock_file = Path(str(config) + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        proc = sync_cli(config)
        assert proc.returncode == 3, proc.stderr
        assert time.monotonic() - t0 < 15  # exits at once, does not wait
        line = proc.stderr.strip()
        assert line.startswith("rke2-mirror: error: another rke2-mirror sync of ") and line.endswith(": exiting")
        assert f"pid {holder.pid}, host {socket.gethostname()}, started " in line and f"lock {lock_file})" in line
        assert not writes(dst.access_log()) and not (tmp_path / "out").exists()
        with pytest.raises(job.LockHeld) as info:
            run(config)
        assert info.value.exit_code == 3
        assert run(config, shard=(0, 1))[0].exit_code == 0  # another shard has its own lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without unlocking: its pid is still in the file, but the kernel dropped the flock
    assert f"pid={holder.pid}" in lock_file.read_text()
    result, logs = run(config)
    assert result.exit_code == 0
    assert f"taking over the lock {lock_file} left by pid {holder.pid} (started " in logs.text
    assert "no longer running" in logs.text
    assert lock_file.read_text() == ""  # released at the end


def test_lock_in_an_unwritable_place_is_a_config_error(tmp_path):
    cfg = job.LoadedConfig(tmp_path / "c.yaml", job.parse_config(GOOD, "c.yaml", tmp_path))
    lock = job.SyncLock(cfg.lock_path(None, tmp_path / "missing-dir" / "x.lock"))
    with pytest.raises(job.InputError, match="cannot create the lock file .*missing-dir/x.lock"):
        lock.acquire()
    assert cfg.lock_path() == tmp_path / "c.yaml.lock"
    assert cfg.lock_path((1, 4)) == tmp_path / "c.yaml.shard-1-of-4.lock"


# --------------------------------------------------------------------------- shards


def _fake_engine(monkeypatch):
    """jobs.mirror.mirror replaced: every image it is given is reported as copied (no registries involved)."""
    from rke2_mirror.engine.copy import ImageResult, Report

    def fake_mirror(refs, target, **kw):
        return Report([ImageResult(str(r), f"{target.host}/{r.repository}:{r.tag}", "copied", bytes=1) for r in refs])

    monkeypatch.setattr(job.run.mirror_job, "mirror", fake_mirror)


def test_shards_of_a_sync_partition_its_image_set(releases, monkeypatch, tmp_path):
    _fake_engine(monkeypatch)

    class Reg:
        url = "http://127.0.0.1:1"
    (tmp_path / "extra.txt").write_text("".join(f"docker.io/example/app{i}:v{i}\n" for i in range(40)))
    config = write_config(tmp_path, Reg, Reg, releases, follow=follow(releases, OLD, NEW), images=["extra.txt"],
                          outputs=None)
    cfg = job.load_config(config)
    sets = job.resolve_image_sets(cfg)
    monkeypatch.setattr(job.run, "resolve_image_sets", lambda *a, **k: sets)  # resolved once
    everything = refs(*ALL_REFS) | {f"docker.io/example/app{i}:v{i}" for i in range(40)}
    for n in (1, 2, 3, 5, 8):
        parts = []
        for i in range(n):
            rep = job.run_sync(cfg, shard=(i, n)).report
            assert rep["shard"] == (f"{i}/{n}") and rep["summary"]["total"] == len(rep["images"])
            parts.append([img["source"] for img in rep["images"]])
            # the per-release split: the shard's images of each release, an image of two releases in both
            for rel, s in zip(rep["releases"], sets):
                assert set(rel["copied"]) == {str(r) for r in s.images} & set(parts[-1])
                assert rel["summary"]["in_release"] == len(s.images)
        flat = [s for p in parts for s in p]
        assert len(flat) == len(set(flat)) and set(flat) == everything, n  # disjoint, and together the whole
        if n > 1:
            assert all(parts), n


def test_indexed_job_shards_copy_the_whole_set(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    config = write_config(tmp_path, source, dst, releases, follow=follow(releases, OLD, NEW))
    procs = [subprocess.Popen([sys.executable, "-m", "rke2_mirror", "sync", str(config)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "JOB_COMPLETION_INDEX": str(i), "RKE2_MIRROR_SHARDS": "2"})
             for i in range(2)]  # at the same time: each shard has its own lock, report and textfile
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    reports = [read_report(config, f"report.shard-{i}-of-2.json") for i in range(2)]
    assert sum(r["summary"]["copied"] for r in reports) == len(ALL_REFS)
    for i in range(2):
        textfile = tmp_path / "out" / f"rke2_mirror.shard-{i}-of-2.prom"
        assert prom(textfile)["rke2_mirror_images_failed"] == 0 and f'shard="{i}/2"' in textfile.read_text()
    result, _ = run(config)  # the whole set, after both shards: nothing left to copy
    rep = result.report
    assert rep["summary"]["skipped"] == len(ALL_REFS) and rep["summary"]["copied"] == 0
    assert [r["summary"]["skipped"] for r in rep["releases"]] == [len(OLD_REFS), len(NEW_REFS)]


# --------------------------------------------------------------------------- rate limits


class HubFront:
    """A reverse proxy in front of a registry that answers like Docker Hub: every manifest GET costs one
    pull from a budget, manifest responses carry ratelimit-limit / ratelimit-remaining, and past the budget
    a 429 TOOMANYREQUESTS.  `stale` is added to the remaining count it reports (others pulling meanwhile)."""

    def __init__(self, upstream: str, budget: int):
        self.limit = self.left = budget
        self.stale = 0
        self.manifest_gets = 0
        self.lock = threading.Lock()
        self.client = httpx.Client(base_url=upstream, timeout=30)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._proxy()

            def do_GET(self):
                self._proxy()

            def _proxy(self):
                manifest = "/manifests/" in self.path
                with front.lock:
                    if manifest and self.command == "GET":
                        front.manifest_gets += 1
                        front.left -= 1
                    left, shown = front.left, max(front.left + front.stale, 0)
                hub = {"ratelimit-limit": f"{front.limit};w=21600", "ratelimit-remaining": f"{shown};w=21600"}
                if left < 0:
                    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}'
                    self._send(429, {"ratelimit-limit": hub["ratelimit-limit"], "ratelimit-remaining": "0;w=21600",
                                     "Content-Type": "application/json"}, body)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                r = front.client.request(self.command, self.path, headers=headers)
                keep = {k: v for k, v in r.headers.items()
                        if k.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding")}
                self._send(r.status_code, {**keep, **(hub if manifest else {})}, r.content,
                           length=r.headers.get("content-length") if self.command == "HEAD" else None)

            def _send(self, status, headers, body, length=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


def test_pull_budget_stops_cleanly_then_the_next_run_finishes(source, releases, registry_factory, tmp_path):
    dst = registry_factory(name="dst")
    hub = HubFront(source.url, budget=5)
    try:
        class Src:
            url = hub.url
        config = write_config(tmp_path, Src, dst, releases, copy={"jobs": 1, "pull_floor": 2, "retries": 2})
        proc = sync_cli(config, "--json")
        assert proc.returncode == 1, proc.stderr
        rep = json.loads(proc.stdout)
        s = rep["summary"]
        assert (s["copied"], s["deferred"], s["failed"]) == (3, len(OLD_REFS) - 3, 0)  # 5 pulls, floor 2
        assert rep["result"] == "stopped" and "floor 2" in rep["stopped"]
        assert rep["rate_limit"]["remaining"] == 2 and rep["rate_limit"]["limit"] == 5
        (rel,) = rep["releases"]
        assert len(rel["deferred"]) == s["deferred"] == rel["summary"]["deferred"]
        assert f"stopped early, {s['deferred']} images deferred to the next run: " in proc.stderr
        assert "pulls left for the next run: 2 of 5" in proc.stderr
        assert "sync incomplete:" in proc.stderr and f"{s['deferred']} deferred" in proc.stderr
        m = prom(tmp_path / "out" / "rke2_mirror.prom")
        assert m["rke2_mirror_ratelimit_remaining"] == 2 and m["rke2_mirror_ratelimit_limit"] == 5
        assert m["rke2_mirror_images_deferred"] == s["deferred"] and m["rke2_mirror_last_run_success"] == 0
        assert hub.manifest_gets == 3

        # others pulled meanwhile: the headers still promise plenty, then a 429 says the limit is reached
        with hub.lock:
            hub.left, hub.stale = 1, 40
        gets = hub.manifest_gets
        result, logs = run(config, pull_floor=0)
        assert result.exit_code == 1
        s = result.report["summary"]
        assert s["copied"] == 1 and "429" in result.report["stopped"] and s["deferred"] >= 1
        assert hub.manifest_gets - gets <= 1 + 2  # the refused GET is not hammered

        with hub.lock:  # the window resets
            hub.left = hub.limit = 100
            hub.stale = 0
        result, logs = run(config)
        assert result.exit_code == 0, logs.text
        s = result.report["summary"]
        assert s["copied"] == len(OLD_REFS) - 4 and s["skipped"] == 4
        assert prom(tmp_path / "out" / "rke2_mirror.prom")["rke2_mirror_ratelimit_remaining"] == 100 - s["copied"]
    finally:
        hub.stop()


def test_max_rps_and_pull_floor_come_from_the_config_unless_overridden(monkeypatch, tmp_path):
    seen = {}

    def fake_mirror(refs, target, **kw):
        seen.update(kw, n=len(refs))
        from rke2_mirror.engine.copy import Report
        return Report([])

    monkeypatch.setattr(job.run.mirror_job, "mirror", fake_mirror)
    (tmp_path / "l.txt").write_text("rancher/x:1\nrancher/y:2\n")
    cfg = job.LoadedConfig(tmp_path / "c.yaml", job.parse_config(
        "version: 1\ntarget: {url: 'http://127.0.0.1:1'}\nimages: [l.txt]\ncopy: {max_rps: 7.5, pull_floor: 3, jobs: 2}\n",
        "c.yaml", tmp_path))
    assert job.run_sync(cfg).exit_code == 0
    assert (seen["max_rps"], seen["pull_floor"], seen["options"].jobs, seen["n"]) == (7.5, 3, 2, 2)
    job.run_sync(cfg, max_rps=2, pull_floor=0, jobs_override=6)
    assert (seen["max_rps"], seen["pull_floor"], seen["options"].jobs) == (2, 0, 6)


# --------------------------------------------------------------------------- interrupts


INTERRUPT_CONFIG = """\
version: 1
target: {url: 'http://127.0.0.1:1'}
images: [l.txt]
outputs: {report: out/report.json, textfile: out/sync.prom, registries_yaml: node/registries.yaml}
"""


def test_a_run_interrupted_before_copying_writes_its_report_and_releases_the_lock(monkeypatch, tmp_path):
    from rke2_mirror.engine.cancel import Cancel, Interrupted

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start once the run is interrupted")

    monkeypatch.setattr(job.run.mirror_job, "mirror", no_engine)
    (tmp_path / "l.txt").write_text("rancher/x:1\nrancher/y:2\n")
    config = tmp_path / "c.yaml"
    config.write_text(INTERRUPT_CONFIG)
    cancel = Cancel()
    cancel.set(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        job.sync(config, cancel=cancel)
    assert info.value.exit_code == 130
    rep = read_report(config)
    assert (rep["result"], rep["exit_code"], rep["interrupted"]) == ("interrupted", 130, "SIGINT")
    assert [i["status"] for i in rep["images"]] == ["interrupted", "interrupted"]
    assert rep["summary"]["interrupted"] == 2 and rep["releases"][0]["interrupted"] == [i["source"] for i in rep["images"]]
    assert prom(tmp_path / "out" / "sync.prom")["rke2_mirror_last_run_success"] == 0
    assert not (tmp_path / "node").exists()  # an interrupted run writes no node files
    assert Path(str(config) + ".lock").read_text() == ""
    with job.SyncLock(Path(str(config) + ".lock")):  # released
        pass


def test_an_engine_run_interrupted_by_sigterm_is_exit_143_with_its_report(monkeypatch, tmp_path):
    from rke2_mirror.engine.cancel import Cancel
    from rke2_mirror.engine.copy import ImageResult, Report

    seen = {}

    def interrupted_engine(refs, target, **kw):
        seen["cancel"] = kw["options"].cancel
        kw["options"].cancel.set(signal.SIGTERM)  # as the CLI's signal handler does
        first, rest = str(refs[0]), [str(r) for r in refs[1:]]
        return Report([ImageResult(first, "t/" + first, "copied", bytes=5)]
                      + [ImageResult(s, "t/" + s, "interrupted", error="interrupted before it completed") for s in rest],
                      interrupted="SIGTERM")

    monkeypatch.setattr(job.run.mirror_job, "mirror", interrupted_engine)
    (tmp_path / "l.txt").write_text("rancher/x:1\nrancher/y:2\nrancher/z:3\n")
    config = tmp_path / "c.yaml"
    config.write_text(INTERRUPT_CONFIG)
    cancel = Cancel()
    result = job.sync(config, cancel=cancel)
    assert seen["cancel"] is cancel
    assert result.exit_code == 143 and not result.ok
    assert result.messages[-1] == "interrupted by SIGTERM: 2 images not finished, left to the next run"
    assert result.messages[0].endswith(": 3 images, 1 copied, 0 already present, 0 failed, 2 interrupted")
    rep = read_report(config)
    assert (rep["result"], rep["exit_code"]) == ("interrupted", 143)
    assert (rep["summary"]["copied"], rep["summary"]["interrupted"]) == (1, 2)
    assert prom(tmp_path / "out" / "sync.prom")["rke2_mirror_last_run_success"] == 0
    assert not (tmp_path / "node").exists()
    assert Path(str(config) + ".lock").read_text() == ""
