"""The basics a newcomer reaches for first (issue 17, item 8), through the real command line:
`--version`, shell completion, and `list --json`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rke2_mirror
from rke2_mirror.cli.app import app
from rke2_mirror_testkit.images import ImagePusher, push_image
from rke2_mirror_testkit.release_server import start_release_server

ROOT = Path(__file__).resolve().parents[1]
REPO_LISTS = ROOT / "lists"
NEW = "v1.30.14+rke2r1"
runner = CliRunner()


def console_script() -> Path:
    """The installed `rke2-mirror` entry point next to this interpreter (the venv's bin/)."""
    path = Path(sys.executable).parent / "rke2-mirror"
    if not path.exists():
        pytest.skip("the rke2-mirror console script is not installed next to this python")
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(console_script()), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------- --version


def test_version_from_the_package_metadata():
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"rke2-mirror {rke2_mirror.__version__}\n"
    assert rke2_mirror.__version__ == importlib.metadata.version("rke2-mirror")
    # also as `python -m rke2_mirror`, and before a command's own options
    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"rke2-mirror {rke2_mirror.__version__}\n", proc.stderr
    res = runner.invoke(app, ["--version", "list", "stable"])
    assert res.exit_code == 0 and res.stdout.strip() == f"rke2-mirror {rke2_mirror.__version__}"
    assert "--version" in runner.invoke(app, ["--help"]).stdout


# --------------------------------------------------------------------------- shell completion


def test_shell_completion_is_offered_and_completes_commands_and_options():
    help_text = runner.invoke(app, ["--help"]).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    # the shell is found from the process tree (typer < 0.29 with shellingham): ask from a bash that stays
    # the parent (a lone command would be exec'd in its place)
    proc = subprocess.run(["bash", "-c", f"'{console_script()}' --show-completion; exit $?"], capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    assert "_RKE2_MIRROR_COMPLETE=complete_bash" in proc.stdout and "complete " in proc.stdout
    # what bash asks when the user presses Tab
    proc = run(env={"_RKE2_MIRROR_COMPLETE": "complete_bash", "COMP_WORDS": "rke2-mirror mi", "COMP_CWORD": "1"})
    assert proc.returncode == 0 and proc.stdout.split() == ["mirror"], proc.stderr
    proc = run(env={"_RKE2_MIRROR_COMPLETE": "complete_bash", "COMP_WORDS": "rke2-mirror sync --check-c",
                    "COMP_CWORD": "2"})
    assert proc.stdout.split() == ["--check-config"], proc.stderr


# --------------------------------------------------------------------------- list --json


@pytest.fixture
def releases(tmp_path):
    server = start_release_server(REPO_LISTS, {"rke2": {"stable": NEW}})
    yield server
    server.stop()


def source_args(server, tmp_path: Path) -> list[str]:
    return ["--release-url", server.release_url("rke2"), "--channel-url", server.channel_url("rke2"),
            "--lists-dir", str(tmp_path / "lists")]


def test_list_json(releases, tmp_path):
    res = runner.invoke(app, ["list", "stable", "--json", "--flavor", "core", "--flavor", "canal",
                              *source_args(releases, tmp_path)])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["product"], doc["release"], doc["version"]) == ("rke2", "stable", NEW)
    assert doc["arches"] == ["amd64"] and doc["flavors"] == ["core", "canal"]
    names = ["rke2-images-core.linux-amd64.txt", "rke2-images-canal.linux-amd64.txt"]
    assert [f["name"] for f in doc["lists"]] == names
    expected: list[str] = []
    for f, name in zip(doc["lists"], names):
        data = (REPO_LISTS / "rke2" / NEW / name).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["verified_against"] == "sha256sum-amd64.txt" and (f["arch"], f["flavor"]) == ("amd64", name.split("-")[2].split(".")[0])
        refs = [l.strip() for l in data.decode().splitlines() if l.strip() and not l.startswith("#")]
        assert f["images"] == len(refs)
        expected += [r for r in refs if r not in expected]
    assert doc["images"] == expected
    # the same images as the plain output, in the same order
    plain = runner.invoke(app, ["list", "stable", "--flavor", "core", "--flavor", "canal", *source_args(releases, tmp_path)])
    assert plain.stdout.split() == doc["images"]
    # offline, from the cache just written: the origin is the cached file
    res = runner.invoke(app, ["list", NEW, "--json", "--flavor", "core", "--offline", "--lists-dir", str(tmp_path / "lists")])
    assert res.exit_code == 0, res.stderr
    (f,) = json.loads(res.stdout)["lists"]
    assert Path(f["origin"]).parent == tmp_path / "lists" / "rke2" / NEW


def test_list_check_json(releases, registry, tmp_path):
    doc = json.loads(runner.invoke(app, ["list", NEW, "--json", "--flavor", "core", *source_args(releases, tmp_path)]).stdout)
    present = doc["images"][:2]
    with ImagePusher(registry.url) as p:
        for ref in present:
            name, tag = ref.split("/", 1)[1].rsplit(":", 1)
            push_image(p, name, tag, platforms=None, layer_sizes=(100,), seed=ref)
    res = runner.invoke(app, ["list", NEW, "--json", "--check", "--flavor", "core", "--source-endpoint",
                              f"docker.io={registry.url}", *source_args(releases, tmp_path)])
    assert res.exit_code == 1, res.stderr  # some are missing
    out = json.loads(res.stdout)
    assert out["images"] == doc["images"]
    check = out["check"]
    assert (check["present"], check["missing"]) == (2, len(doc["images"]) - 2)
    by_image = {c["image"]: c for c in check["images"]}
    assert all(by_image[r]["digest"].startswith("sha256:") and by_image[r]["error"] is None for r in present)
    assert by_image[doc["images"][-1]]["digest"] is None and by_image[doc["images"][-1]]["error"]
