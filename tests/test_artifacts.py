"""Helm charts and RKE2's install files as OCI artifacts: save --chart / --install-files -> inspect -> load /
extract, and mirror --chart; against a chart repository over http, real docker-registry processes and the
local release server."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from rke2_mirror.model.artifacts import HELM_CHART_LAYER, HELM_CONFIG, parse_chart_spec
from rke2_mirror.model.errors import InputError
from rke2_mirror_testkit.chart_repo import build_chart, start_chart_repo
from rke2_mirror_testkit.images import ImagePusher, make_layer_blob, push_blob, push_image, push_manifest, read_blob, read_manifest
from rke2_mirror_testkit.release_server import add_install_files, start_release_server

from .test_mirror import run_cli

LISTS = Path(__file__).resolve().parents[1] / "lists"
VERSION = "v1.28.9+rke2r1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def push_oci_chart(reg_url: str, repo: str, name: str, version: str) -> tuple[bytes, str]:
    """A chart pushed as helm push does (config + one chart layer); (the .tgz, manifest digest)."""
    tgz = build_chart(name, version)
    config = json.dumps({"name": name, "version": version, "apiVersion": "v2"}, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": HELM_CONFIG, "digest": "sha256:" + sha(config), "size": len(config)},
        "layers": [{"mediaType": HELM_CHART_LAYER, "digest": "sha256:" + sha(tgz), "size": len(tgz)}],
        "annotations": {"org.opencontainers.image.title": name, "org.opencontainers.image.version": version},
    }).encode()
    with ImagePusher(reg_url) as p:
        push_blob(p, repo, config)
        push_blob(p, repo, tgz)
        digest = push_manifest(p, repo, version, manifest, OCI_MANIFEST)
    return tgz, digest


def test_chart_spec_parsing():
    s = parse_chart_spec("https://charts.jetstack.io/cert-manager@v1.15.3")
    assert (s.repo_url, s.name, s.version, s.repository, s.tag) == (
        "https://charts.jetstack.io", "cert-manager", "v1.15.3", "charts/cert-manager", "v1.15.3")
    s = parse_chart_spec("oci://registry.example:5000/helm/rancher:2.9.1+up1")
    assert (s.oci_ref, s.name, s.tag) == ("registry.example:5000/helm/rancher:2.9.1_up1", "rancher", "2.9.1_up1")
    for bad in ("https://charts.jetstack.io/cert-manager", "oci://host/name", "ftp://x/y@1", "https://x/@1",
                "oci://host/p/n:a/b"):
        with pytest.raises(InputError):
            parse_chart_spec(bad)


def chart_manifest(reg_url: str, repo: str, tag: str) -> tuple[dict, bytes]:
    mt, raw, _ = read_manifest(reg_url, repo, tag)
    m = json.loads(raw)
    assert mt == OCI_MANIFEST and m["mediaType"] == OCI_MANIFEST and m["schemaVersion"] == 2
    assert m["config"]["mediaType"] == HELM_CONFIG
    assert [l["mediaType"] for l in m["layers"]] == [HELM_CHART_LAYER]
    return m, read_blob(reg_url, repo, m["layers"][0]["digest"])


def test_charts_save_inspect_load_and_mirror(registry_factory, tmp_path):
    src = registry_factory(name="charts-src")
    dst = registry_factory(name="charts-dst")
    oci_tgz, oci_digest = push_oci_chart(src.url, "helm/mychart", "mychart", "0.1.0")
    host = src.url.split("://", 1)[1]
    with start_chart_repo() as repo:
        tgz = repo.add_chart("cert-manager", "v1.15.3")
        repo.add_chart("cert-manager", "v1.14.0")
        charts = ["--chart", f"{repo.url}/cert-manager@v1.15.3", "--chart", f"oci://{host}/helm/mychart:0.1.0",
                  "--source-endpoint", f"{host}={src.url}"]
        out = tmp_path / "charts.tar"
        proc = run_cli("save", "-o", str(out), *charts)
        assert proc.returncode == 0, proc.stderr
        assert "verified against" in proc.stderr

        proc = run_cli("inspect", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["counts"] == {"image": 0, "chart": 2, "files": 0}
        by_ref = {i["reference"]: i for i in doc["images"]}
        cm = by_ref["rke2-mirror.local/charts/cert-manager:v1.15.3"]
        assert cm["content"] == "chart" and cm["chart"] == {"name": "cert-manager", "version": "v1.15.3"}
        assert by_ref["rke2-mirror.local/charts/mychart:0.1.0"]["digest"] == oci_digest  # digest preserved
        text = run_cli("inspect", str(out)).stdout
        assert "2 chart(s)" in text and "rke2-mirror.local/charts/cert-manager:v1.15.3" in text

        proc = run_cli("load", str(out), "--to", f"{dst.url}/mirror", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["summary"]["kinds"]["chart"] == {"total": 2, "copied": 2, "skipped": 0,
                                                                       "failed": 0}
        assert "2 items (0 images, 2 charts): 2 loaded" in proc.stderr, proc.stderr
        m, layer = chart_manifest(dst.url, "mirror/charts/cert-manager", "v1.15.3")
        assert layer == tgz  # the .tgz bytes unchanged
        config = json.loads(read_blob(dst.url, "mirror/charts/cert-manager", m["config"]["digest"]))
        assert config["name"] == "cert-manager" and config["version"] == "v1.15.3" and config["apiVersion"] == "v2"
        assert m["annotations"]["org.opencontainers.image.title"] == "cert-manager"
        _, layer = chart_manifest(dst.url, "mirror/charts/mychart", "0.1.0")
        assert layer == oci_tgz

        # mirror: the same charts straight into a registry, under charts/ of the --to prefix
        proc = run_cli("mirror", "--to", f"{dst.url}/direct", *charts, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["summary"]["copied"] == 2
        _, layer = chart_manifest(dst.url, "direct/charts/cert-manager", "v1.15.3")
        assert layer == tgz
        _, _, digest = read_manifest(dst.url, "direct/charts/mychart", "0.1.0")
        assert digest == oci_digest
        # a rerun finds them in place (the synthesized manifest is the same every run)
        proc = run_cli("mirror", "--to", f"{dst.url}/direct", *charts, "--json")
        assert json.loads(proc.stdout)["summary"]["skipped"] == 2, proc.stdout

        # --split and --since work for charts as for images: parts load; a delta leaves out what OLD has
        parts = tmp_path / "split.tar"
        proc = run_cli("save", "-o", str(parts), "--split", "4K", *charts)
        assert proc.returncode == 0, proc.stderr
        assert len(list(tmp_path.glob("split.tar.part*"))) > 1
        proc = run_cli("load", str(tmp_path / "split.tar.part001"), "--to", f"{dst.url}/parts", "--json")
        assert proc.returncode == 0, proc.stderr
        _, layer = chart_manifest(dst.url, "parts/charts/cert-manager", "v1.15.3")
        assert layer == tgz
        delta = tmp_path / "delta.tar"
        proc = run_cli("save", "-o", str(delta), "--since", str(out), *charts)
        assert proc.returncode == 0, proc.stderr
        assert "left out" in proc.stderr and delta.stat().st_size < out.stat().st_size
        proc = run_cli("load", str(delta), "--to", f"{dst.url}/mirror", "--json")  # OLD is there already
        assert proc.returncode == 0, proc.stderr


def test_chart_digest_mismatch_is_one_line(tmp_path):
    with start_chart_repo() as repo:
        repo.add_chart("evil", "1.0.0", wrong_digest=True)
        out = tmp_path / "x.tar"
        proc = run_cli("save", "-o", str(out), "--chart", f"{repo.url}/evil@1.0.0")
        assert proc.returncode != 0
        errors = [l for l in proc.stderr.splitlines() if "error" in l]
        assert len(errors) == 1 and "does not match its index.yaml digest" in errors[0], proc.stderr
        assert not out.exists()
        proc = run_cli("save", "-o", str(out), "--chart", f"{repo.url}/evil@9.9.9")
        assert proc.returncode == 2 and "has no version 9.9.9" in proc.stderr


@pytest.fixture
def release_with_files(tmp_path, registry_factory):
    root = tmp_path / "lists"
    shutil.copytree(LISTS / "rke2" / VERSION, root / "rke2" / VERSION)
    files = add_install_files(root / "rke2" / VERSION, "amd64")
    refs = [l.strip() for l in (root / "rke2" / VERSION / "rke2-images-core.linux-amd64.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    src = registry_factory(name="dockerhub")
    base = make_layer_blob("files-base", 20_000)
    with ImagePusher(src.url) as p:
        for ref in refs:
            name, tag = ref.split("/", 1)[1].rsplit(":", 1)
            push_image(p, name, tag, base=base, seed=ref, layer_sizes=(2_000,), platforms=(("linux", "amd64"),))
    server = start_release_server(root, {"rke2": {"stable": VERSION}})
    env = {"RKE2_MIRROR_RELEASE_URL": server.release_url("rke2"), "RKE2_MIRROR_CHANNEL_URL": server.channel_url("rke2")}
    try:
        yield src, env, files
    finally:
        server.stop()


def test_install_files_save_inspect_extract(release_with_files, tmp_path):
    src, env, files = release_with_files
    script = tmp_path / "install.sh"
    script.write_text("#!/bin/sh\necho install rke2\n")
    out = tmp_path / "airgap.tar"
    proc = run_cli("save", "-o", str(out), "--release", "stable", "--flavor", "core", "--arch", "amd64",
                   "--install-files", "--install-script", str(script), "--source-endpoint", f"docker.io={src.url}",
                   "--lists-dir", str(tmp_path / "cache"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "rke2.linux-amd64.tar.gz verified against sha256sum-amd64.txt" in proc.stderr
    assert proc.stderr.count(f"rke2 channel stable -> {VERSION}") == 1, proc.stderr  # the images' version, reused

    doc = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert doc["counts"]["files"] == 1 and doc["counts"]["image"] > 0
    (entry,) = [i for i in doc["images"] if i["content"] == "files"]
    assert entry["reference"] == "rke2-mirror.local/files/rke2:v1.28.9_rke2r1-amd64"
    assert sorted(f["title"] for f in entry["files"]) == ["install.sh", "rke2.linux-amd64.tar.gz", "sha256sum-amd64.txt"]
    tar = next(f for f in entry["files"] if f["title"] == "rke2.linux-amd64.tar.gz")
    assert tar["verified_sha256"] == sha(files["rke2.linux-amd64.tar.gz"])

    dest = tmp_path / "artifacts"
    proc = run_cli("extract", str(out), "--to", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["install.sh", "rke2.linux-amd64.tar.gz", "sha256sum-amd64.txt"]
    for name, data in files.items():
        assert sha((dest / name).read_bytes()) == sha(data), name
    assert (dest / "install.sh").read_bytes() == script.read_bytes()


def _hostile_archive(path: Path, title: str) -> None:
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        blobs[sha(data)] = data
        return "sha256:" + sha(data)

    payload = b"not what it seems\n"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.rke2-mirror.files.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": add(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": add(payload), "size": len(payload),
                    "annotations": {"org.opencontainers.image.title": title}}]}).encode()
    mdigest = add(manifest)
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": mdigest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "rke2-mirror.local/files/rke2:v1-amd64",
                        "io.containerd.image.name": "rke2-mirror.local/files/rke2:v1-amd64"}}]}).encode()
    with tarfile.open(path, "w") as tf:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        put("index.json", index)
        for h, data in blobs.items():
            put(f"blobs/sha256/{h}", data)


@pytest.mark.parametrize("title", ["../x", "a/b", "..", "/etc/passwd"])
def test_extract_refuses_a_hostile_title(tmp_path, title):
    arch = tmp_path / "evil.tar"
    _hostile_archive(arch, title)
    dest = tmp_path / "d" / "out"
    proc = run_cli("extract", str(arch), "--to", str(dest))
    assert proc.returncode != 0
    assert "not a plain file name" in proc.stderr, proc.stderr
    assert not (tmp_path / "d" / "x").exists() and not dest.exists()


def test_chart_images_join_the_image_set_and_kinds_are_counted(registry_factory, tmp_path):
    """A chart that declares two images (artifacthub.io/images): save/mirror --chart copy them too, once
    each with the image list that names one of them; --no-chart-images leaves them out; the JSON summary
    counts images, charts and files apart."""
    src = registry_factory(name="chartimg-src")
    dst = registry_factory(name="chartimg-dst")
    host = src.url.split("://", 1)[1]
    base = make_layer_blob("chartimg-base", 10_000)
    with ImagePusher(src.url) as p:
        for name, tag in (("team/app-a", "1.0"), ("team/app-b", "2.0")):
            push_image(p, name, tag, base=base, seed=name, layer_sizes=(1_000,), platforms=(("linux", "amd64"),))
    listed = tmp_path / "images.txt"
    listed.write_text(f"{host}/team/app-a:1.0\n")
    with start_chart_repo() as repo:
        repo.add_chart("webapp", "1.2.0", images=[f"{host}/team/app-a:1.0", f"{host}/team/app-b:2.0"])
        args = ["--chart", f"{repo.url}/webapp@1.2.0", "--source-endpoint", f"{host}={src.url}"]
        out = tmp_path / "web.tar"
        proc = run_cli("save", "-o", str(out), "--images", str(listed), *args, "--json")
        assert proc.returncode == 0, proc.stderr
        assert "chart webapp 1.2.0: 2 image(s) declared (artifacthub.io/images)" in proc.stderr
        assert "charts' images: 2 declared, 1 not already in the image set" in proc.stderr
        summary = json.loads(proc.stdout)["summary"]
        assert summary["total"] == 3
        assert summary["kinds"]["image"]["total"] == 2 and summary["kinds"]["image"]["copied"] == 2
        assert summary["kinds"]["chart"] == {"total": 1, "copied": 1, "skipped": 0, "failed": 0}
        assert summary["kinds"]["files"]["total"] == 0
        assert "3 items (2 images, 1 chart): 3 saved" in proc.stderr, proc.stderr  # not "3 images"
        doc = json.loads(run_cli("inspect", str(out), "--json").stdout)
        assert doc["counts"] == {"image": 2, "chart": 1, "files": 0}

        # sharded: the declared images are cut with the rest (each in one shard), the chart is shard 0's
        copied = []
        for i in range(3):
            proc = run_cli("mirror", "--to", f"{dst.url}/sh", "--images", str(listed), *args, "--shard", f"{i}/3",
                           "--json")
            assert proc.returncode == 0, proc.stderr
            rows = json.loads(proc.stdout)["images"]
            copied += [r["target"] for r in rows if r["status"] == "copied"]
            assert any("charts/" in r["target"] for r in rows) == (i == 0), rows
        assert sorted(t.split("/", 2)[2] for t in copied) == ["charts/webapp:1.2.0", "team/app-a:1.0",
                                                               "team/app-b:2.0"], copied
        proc = run_cli("mirror", "--to", f"{dst.url}/m", *args, "--no-chart-images", "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)["summary"]
        assert summary["total"] == 1 and summary["kinds"]["chart"]["copied"] == 1, summary
        proc = run_cli("mirror", "--to", f"{dst.url}/m", *args, "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)["summary"]
        assert summary["kinds"]["image"]["copied"] == 2 and summary["kinds"]["chart"]["skipped"] == 1, summary
        read_manifest(dst.url, "m/team/app-b", "2.0")


def test_declared_images_annotation_is_read_bounded():
    from rke2_mirror.jobs.artifacts import declared_images
    ok = {"annotations": {"artifacthub.io/images": "- name: a\n  image: quay.io/x/a:1\n  platforms: [linux/amd64]\n"
                                                   "- name: a2\n  image: quay.io/x/a:1\n- name: b\n  image: b:2\n"}}
    assert [str(r) for r in declared_images(ok, "c")] == ["quay.io/x/a:1", "docker.io/library/b:2"]
    assert declared_images({"name": "x"}, "c") == []
    for bad in ("{a: 1}", "- name: a\n", "- image: 'UPPER CASE!'\n", "&a [*a, *a", 5):
        with pytest.raises(InputError) as exc:
            declared_images({"annotations": {"artifacthub.io/images": bad}}, "chart c 1")
        assert "chart c 1" in str(exc.value) and "--no-chart-images" in str(exc.value)


def test_sync_copies_charts_install_files_and_chart_images(release_with_files, registry_factory, tmp_path):
    """sync: `charts:` and `install_files: true` go to the target with the images; the report and the textfile
    count each kind; --check-config refuses a bad chart string offline, naming the line."""
    import yaml
    src, env, files = release_with_files
    dst = registry_factory(name="sync-artifacts-dst")
    (tmp_path / "install.sh").write_text("#!/bin/sh\necho install rke2\n")
    core = next(l.strip() for l in (LISTS / "rke2" / VERSION / "rke2-images-core.linux-amd64.txt").read_text()
                .splitlines() if l.strip() and not l.startswith("#"))
    with start_chart_repo() as repo:
        repo.add_chart("webapp", "1.2.0", images=[core])
        doc = {"version": 1, "target": {"url": f"{dst.url}/site"},
               "releases": [{"versions": [VERSION], "flavors": ["core"], "arches": ["amd64"],
                             "release_url": env["RKE2_MIRROR_RELEASE_URL"],
                             "channel_url": env["RKE2_MIRROR_CHANNEL_URL"],
                             "install_files": True, "install_script": "install.sh"}],
               "charts": [f"{repo.url}/webapp@1.2.0"],
               "sources": {"endpoints": {"docker.io": src.url}}, "lists_dir": "cache",
               "outputs": {"report": "out/report.json", "textfile": "out/rke2_mirror.prom"}}
        config = tmp_path / "sync.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert run_cli("sync", str(config), "--check-config").returncode == 0
        proc = run_cli("sync", str(config), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "charts' images: 1 declared, 0 not already in the image set" in proc.stderr
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        kinds = report["summary"]["kinds"]
        assert kinds["chart"]["copied"] == 1 and kinds["files"]["copied"] == 1 and kinds["image"]["failed"] == 0
        assert kinds["image"]["total"] == report["summary"]["total"] - 2
        assert {r["name"] for r in report["releases"]} >= {"charts", "install files"}
        prom = (tmp_path / "out" / "rke2_mirror.prom").read_text()
        assert 'rke2_mirror_kind_copied{config="sync",kind="chart"} 1' in prom
        assert 'rke2_mirror_kind_copied{config="sync",kind="files"} 1' in prom
        _, layer = chart_manifest(dst.url, "site/charts/webapp", "1.2.0")
        assert layer == build_chart("webapp", "1.2.0", images=[core])
        _, raw, _ = read_manifest(dst.url, "site/files/rke2", "v1.28.9_rke2r1-amd64")
        titles = {l["annotations"]["org.opencontainers.image.title"]: l["digest"] for l in json.loads(raw)["layers"]}
        assert titles["rke2.linux-amd64.tar.gz"] == "sha256:" + sha(files["rke2.linux-amd64.tar.gz"])
        # a rerun: everything in place
        proc = run_cli("sync", str(config), timeout=120)
        assert proc.returncode == 0, proc.stderr
        kinds = json.loads((tmp_path / "out" / "report.json").read_text())["summary"]["kinds"]
        assert kinds["chart"]["skipped"] == 1 and kinds["files"]["skipped"] == 1 and kinds["image"]["copied"] == 0

    doc["charts"] = ["https://charts.example.com/cert-manager"]  # no @VERSION
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("sync", str(config), "--check-config")
    assert proc.returncode == 2 and "charts: [0]:" in proc.stderr and "sync.yaml:" in proc.stderr, proc.stderr
