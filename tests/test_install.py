"""Installing rke2-mirror like a tool (issue 17, item 7), the way the README's "Installing" section says:
a wheel built from the checkout, installed into a fresh venv, runs as `rke2-mirror` without the test kit;
an editable install (scripts/setup.sh) still gives the tests and the demo their test kit.

Needs the package index (PyPI) for the build backend and the dependencies, as `pip install` does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import rke2_mirror

ROOT = Path(__file__).resolve().parents[1]


def pip(venv: Path, *args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                           "--disable-pip-version-check", "-q", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_wheel_installs_the_tool_and_leaves_the_test_kit_out(tmp_path):
    # a copy of what a build reads: the working tree gets no build/ or *.egg-info
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "src", checkout / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)

    # `python3 -m pip wheel --no-deps -w dist .` (README, "Installing")
    proc = run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
                "-w", str(tmp_path / "dist"), str(checkout)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"rke2_mirror-{rke2_mirror.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("rke2_mirror_testkit")], "the test kit is in the wheel"
    assert "rke2_mirror/cli/app.py" in names and "rke2_mirror/jobs/sync/run.py" in names
    assert {n.split("/")[0] for n in names if not n.startswith("rke2_mirror-")} == {"rke2_mirror"}

    # a fresh venv, as /opt/rke2-mirror would be; the dependencies come from the index
    venv = tmp_path / "opt-rke2-mirror"
    proc = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pip(venv, "install", str(wheel), cwd=tmp_path)
    exe = venv / "bin" / "rke2-mirror"
    proc = run([str(exe), "--version"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"rke2-mirror {rke2_mirror.__version__}\n", proc.stderr
    proc = run([str(exe), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("mirror", "list", "registries-yaml", "verify", "save", "load", "inspect", "sync"):
        assert f"  {command} " in proc.stdout, command
    # a real command, offline, from the installed files only (every lazily imported module is there)
    proc = run([str(exe), "list", "v1.30.14+rke2r1", "--lists-dir", str(ROOT / "lists"), "--offline"], cwd=tmp_path)
    assert proc.returncode == 0 and "docker.io/rancher/rke2-runtime:v1.30.14-rke2r1" in proc.stdout.split(), proc.stderr
    # through a symlink, as /usr/local/bin/rke2-mirror runs it (systemd, cron)
    (tmp_path / "usr-local-bin").mkdir()
    (tmp_path / "usr-local-bin" / "rke2-mirror").symlink_to(exe)
    proc = run([str(tmp_path / "usr-local-bin" / "rke2-mirror"), "--version"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    python = str(venv / "bin" / "python")
    proc = run([python, "-c", "import rke2_mirror_testkit"], cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'rke2_mirror_testkit'" in proc.stderr

    # an editable install (scripts/setup.sh: pip install -e '.[test]') still has the test kit
    pip(venv, "install", "--no-deps", "-e", str(checkout), cwd=tmp_path)
    code = ("import importlib.util, rke2_mirror, rke2_mirror_testkit; print(rke2_mirror.__file__); "
            "print(importlib.util.find_spec('rke2_mirror_testkit.demo').origin)")  # (its imports need the test extra)
    proc = run([python, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [Path(p).resolve() for p in proc.stdout.split()] == [
        (checkout / "src" / "rke2_mirror" / "__init__.py").resolve(),
        (checkout / "src" / "rke2_mirror_testkit" / "demo.py").resolve()]
