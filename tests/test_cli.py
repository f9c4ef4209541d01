"""The command line's own machinery: no import cycle in cli/, the option groups, the interrupt handling
and `files.write_atomic` (no registry needed).  Real-process interrupts of copying commands are in
test_interrupt.py."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Annotated

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import rke2_mirror.files as files
from rke2_mirror.cli.base import finish
from rke2_mirror.cli.options import OptionGroup, ReportOutput, options
from rke2_mirror.cli.signals import Reported, interrupts
from rke2_mirror.engine.cancel import Cancel, Cancelled, Interrupted
from rke2_mirror.engine.copy import ImageResult, Report
from rke2_mirror.model.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "src" / "rke2_mirror" / "cli"
runner = CliRunner()


def cli_modules() -> list[str]:
    return sorted(f"rke2_mirror.cli.{p.stem}" for p in CLI.glob("*.py") if p.stem != "__init__")


# --------------------------------------------------------------------------- no import cycles


def cli_imports(path: Path) -> set[str]:
    """The cli modules `path` imports, at module level or inside functions."""
    known = set(cli_modules())
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module if not node.level else f"rke2_mirror.cli.{node.module}"
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from rke2_mirror.cli import sync`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            if getattr(node.func, "id", getattr(node.func, "attr", None)) in ("LazyModule", "import_module"):
                out.add(str(node.args[0].value))
    return out & known


def test_no_cli_module_imports_a_module_that_imports_it_back():
    graph = {f"rke2_mirror.cli.{p.stem}": cli_imports(p) for p in CLI.glob("*.py") if p.stem != "__init__"}
    assert graph["rke2_mirror.cli.app"] >= {"rke2_mirror.cli.mirror", "rke2_mirror.cli.archive", "rke2_mirror.cli.node",
                                            "rke2_mirror.cli.releases", "rke2_mirror.cli.sync"}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            mod, path = stack.pop()
            for nxt in graph.get(mod, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, "import cycles in cli/: " + "; ".join(" -> ".join(c) for c in cycles)
    commands = {"rke2_mirror.cli.mirror", "rke2_mirror.cli.archive", "rke2_mirror.cli.node",
                "rke2_mirror.cli.releases", "rke2_mirror.cli.sync"}
    for mod in commands:  # command modules import the base, never each other nor the entry module
        assert "rke2_mirror.cli.base" in graph[mod], mod
        assert not graph[mod] & (commands | {"rke2_mirror.cli.app"}), (mod, graph[mod])


IMPORT_ORDERS = r'''
import importlib, json, random, sys

mods = json.loads(sys.argv[1])
def purge():
    for name in [m for m in sys.modules if m == "rke2_mirror.cli" or m.startswith("rke2_mirror.cli.")]:
        del sys.modules[name]

failures = []
orders = [[first] + [m for m in order if m != first] for first in mods for order in (mods, mods[::-1])]
rng = random.Random(0)
for _ in range(40):  # and a spread of others
    orders.append(rng.sample(mods, len(mods)))
for order in orders:
    purge()
    for name in order:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{' '.join(order)}: {name}: {exc}")
            break
import typer.main
from rke2_mirror.cli.app import app
print(json.dumps({"failures": failures, "orders": len(orders),
                  "commands": sorted(typer.main.get_command(app).commands)}))
'''


def test_every_cli_module_imports_first_or_in_any_order_in_a_fresh_interpreter():
    mods = ["rke2_mirror.cli", *cli_modules()]
    for first in mods:  # each one alone, first thing in a fresh interpreter
        proc = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"import {first}:\n{proc.stderr[-2000:]}"
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDERS, json.dumps(mods)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert not doc["failures"], "\n".join(doc["failures"])
    assert doc["orders"] >= 2 * len(mods)
    assert doc["commands"] == ["diff", "extract", "inspect", "list", "load", "mirror", "registries-yaml", "save", "sync",
                               "verify"]


def test_util_quiet_log_is_gone_and_the_package_exports_main():
    import rke2_mirror.cli
    import rke2_mirror.cli.util as util

    assert not hasattr(util, "quiet_log")
    assert callable(rke2_mirror.cli.main)


# --------------------------------------------------------------------------- option groups


def point(x: Annotated[int, typer.Option("--x", help="The x coordinate.")] = 1,
          y: Annotated[int, typer.Option("--y", "-y", metavar="Y", help="The y coordinate.")] = 2) -> tuple[int, int]:
    if x < 0:
        raise typer.BadParameter("--x must not be negative")
    return (x, y)


def label(name: Annotated[str, typer.Option("--name", help="A label.")] = "origin") -> str:
    return name.upper()


POINT = OptionGroup(point)
LABEL = OptionGroup(label)
seen: list[tuple] = []
demo = typer.Typer(rich_markup_mode=None)


@demo.command("show")
@options(where=POINT, tag=LABEL)
def show(*, verbose: Annotated[bool, typer.Option("--verbose")] = False, where: tuple[int, int],
         scale: Annotated[int, typer.Option("--scale")] = 1, tag: str) -> None:
    seen.append((verbose, where, scale, tag))


@demo.command("flat")
@options(where=POINT.without("y"))
def flat(*, where: tuple[int, int]) -> None:
    seen.append(where)


def test_an_option_group_adds_its_options_in_place_and_passes_the_built_object():
    help_text = runner.invoke(demo, ["show", "--help"]).output
    for opt, text in (("--x", "The x coordinate."), ("-y, --y Y", "The y coordinate."), ("--name", "A label.")):
        assert opt in help_text and text in help_text, help_text
    # the group's options stand where the group's parameter stands
    assert help_text.index("--verbose") < help_text.index("--x") < help_text.index("--y") < help_text.index("--scale") \
        < help_text.index("--name")
    seen.clear()
    res = runner.invoke(demo, ["show", "--x", "5", "-y", "7", "--scale", "3", "--name", "pole"])
    assert res.exit_code == 0, res.output
    assert seen == [(False, (5, 7), 3, "POLE")]
    seen.clear()
    assert runner.invoke(demo, ["show"]).exit_code == 0
    assert seen == [(False, (1, 2), 1, "ORIGIN")]  # the builders' defaults


def test_without_leaves_options_out_and_the_builder_default_is_used():
    assert "--y" not in runner.invoke(demo, ["flat", "--help"]).output
    assert runner.invoke(demo, ["flat", "--y", "3"]).exit_code == 2  # no such option
    seen.clear()
    assert runner.invoke(demo, ["flat", "--x", "4"]).exit_code == 0
    assert seen == [(4, 2)]
    with pytest.raises(TypeError, match="no option z"):
        POINT.without("z")


def test_option_group_misuse_is_refused_when_the_command_is_defined():
    with pytest.raises(TypeError, match="no parameter nowhere"):
        @options(nowhere=POINT)
        def f(*, where: tuple) -> None: ...
    with pytest.raises(TypeError, match="clash: x"):
        @options(where=POINT)
        def g(*, where: tuple, x: int = 0) -> None: ...


def test_the_commands_declare_each_group_once_and_help_lists_its_options():
    from rke2_mirror.cli.app import app

    cmd = typer.main.get_command(app)

    def opts(name: str) -> set[str]:
        return {o for p in cmd.commands[name].params for o in p.opts}

    release = {"--product", "--arch", "--flavor", "--release-url", "--channel-url", "--lists-dir", "--offline"}
    source = {"--src-ca-file", "--src-insecure-skip-verify", "--source-endpoint"}
    tls = {"--ca-file", "--insecure-skip-verify"}
    tuning = {"--jobs", "--retries", "--timeout"}
    output = {"--json", "--failed-list"}
    images = {"--images", "--release"}
    assert images | release | source | tls | tuning | output <= opts("mirror")
    assert images | release | source | tuning | output <= opts("save")
    assert (release - {"--flavor"}) | tls | tuning | output <= opts("load") and "--flavor" not in opts("load")
    for name in ("registries-yaml", "verify"):
        assert images | (release - {"--product"}) <= opts(name) and "--product" not in opts(name)
    assert release | source <= opts("list") and release <= opts("diff")
    mirror_help = " ".join(runner.invoke(app, ["mirror", "--help"]).output.split())  # however the columns wrap
    assert "CA certificate (PEM) for the source registries." in mirror_help
    assert "Attempts per operation on transient errors" in mirror_help


def test_a_group_error_is_one_line_and_exit_2(tmp_path):
    from rke2_mirror.cli.app import app

    res = runner.invoke(app, ["mirror", "--to", "http://127.0.0.1:1", "--images", str(tmp_path / "x.txt"),
                              "--ca-file", str(tmp_path / "missing.pem")])
    assert res.exit_code == 2
    assert f"rke2-mirror: error: --ca-file {tmp_path / 'missing.pem'}: no such file" in res.output


# --------------------------------------------------------------------------- interrupts


def interrupted_report() -> Report:
    return Report([ImageResult("docker.io/a/b:1", "t/a/b:1", "copied", bytes=10),
                   ImageResult("docker.io/a/c:1", "t/a/c:1", "interrupted", error="the run was interrupted")],
                  seconds=1.0, interrupted="SIGTERM")


def test_finish_prints_the_report_of_an_interrupted_run_then_raises_reported(tmp_path, capsys):
    cancel = Cancel()
    cancel.set(signal.SIGTERM)
    failed = tmp_path / "failed.txt"
    old_umask = os.umask(0o077)
    try:
        with pytest.raises(Reported) as info:
            finish(interrupted_report(), ReportOutput(as_json=True, failed_list=failed), cancel)
    finally:
        os.umask(old_umask)
    assert info.value.exit_code == 143
    out, err = capsys.readouterr()
    assert json.loads(out)["summary"]["interrupted"] == 1
    assert "2 images: 1 copied, 0 already present, 1 failed, 1 interrupted (SIGTERM)" in err
    assert failed.read_text().splitlines()[1:] == ["docker.io/a/c:1"]
    assert stat.S_IMODE(failed.stat().st_mode) == 0o644  # explicitly, whatever the umask


def test_interrupts_raises_interrupted_sets_the_token_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info:
        with interrupts() as cancel:
            with interrupts() as inner:
                assert inner is cancel  # nested: one token, one set of handlers
            signal.raise_signal(signal.SIGTERM)
    assert info.value.exit_code == 143
    assert cancel.is_set() and cancel.exit_code == 143
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(Interrupted):  # a job's Cancelled once the token is set: an interrupt, not an error
        with interrupts() as cancel:
            cancel.set(signal.SIGINT)
            raise Cancelled("interrupted")
    with pytest.raises(Cancelled):
        with interrupts():
            raise Cancelled("not by a signal")


SCRIPT = r'''
import signal, sys, time
import typer
from rke2_mirror.cli.base import app, finish, run_command
from rke2_mirror.cli.options import ReportOutput
from rke2_mirror.cli.signals import interrupts
from rke2_mirror.engine.copy import ImageResult, Report

@app.command("outside")
@run_command
def outside() -> None:
    try:
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)
    finally:
        print("cleaned up", file=sys.stderr, flush=True)

@app.command("reported")
@run_command
def reported() -> None:
    with interrupts() as cancel:
        try:
            signal.raise_signal(signal.SIGINT)  # as if inside the engine, which catches it and reports
        except BaseException:
            pass
        finish(Report([ImageResult("a", "b", "interrupted")], interrupted="SIGINT"), ReportOutput(), cancel)

@app.command("twice")
@run_command
def twice() -> None:
    try:
        signal.raise_signal(signal.SIGINT)
    except BaseException:
        print("first", file=sys.stderr, flush=True)
    signal.raise_signal(signal.SIGTERM)
    print("not reached", file=sys.stderr, flush=True)

from rke2_mirror.cli.app import main
sys.argv = ["rke2-mirror", sys.argv[1]]
main()
'''


@pytest.mark.parametrize("command, code, lines", [
    ("outside", 143, ["cleaned up", "rke2-mirror: interrupted (SIGTERM)"]),
    ("reported", 130, ["1 images: 0 copied, 0 already present, 1 failed, 1 interrupted (SIGINT); 0 B in 0.0s"]),
    ("twice", 143, ["first", "rke2-mirror: interrupted again (SIGTERM): exiting at once"]),
])
def test_main_ends_an_interrupted_command_with_the_signal_status_and_no_traceback(command, code, lines):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, command], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines() == lines
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- files.write_atomic


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def test_write_atomic_never_follows_a_symlink_planted_at_the_temp_name(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out.txt"
    # the old predictable name, and the first name the random sequence will give
    (tmp_path / f".out.txt.tmp{os.getpid()}").symlink_to(victim)
    (tmp_path / ".out.txt.planted.tmp").symlink_to(victim)
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", "fresh"]))
    files.write_atomic(out, "new\n", 0o640)
    assert victim.read_text() == "precious\n"
    assert out.read_text() == "new\n" and not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert (tmp_path / ".out.txt.planted.tmp").is_symlink()  # left as it was: not ours
    assert leftovers(tmp_path, "out.txt") == [".out.txt.planted.tmp", f".out.txt.tmp{os.getpid()}"]


def test_write_atomic_exact_mode_parents_bytes_and_replacing_a_symlink(tmp_path):
    old_umask = os.umask(0o077)
    try:
        target = tmp_path / "a" / "b" / "c.prom"
        files.write_atomic(target, b"x 1\n", 0o644, parents=True)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"x 1\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(victim)
    files.write_atomic(link, "y: 1\n", 0o600)
    assert victim.read_text() == "precious\n" and not link.is_symlink() and link.read_text() == "y: 1\n"


def test_write_atomic_failure_is_one_input_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match=r"^cannot write .*dir: Is a directory$"):
        files.write_atomic(tmp_path / "dir", "text")
    assert leftovers(tmp_path, "dir") == []

    out = tmp_path / "out.txt"
    out.write_text("old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(InputError, match="cannot write .*out.txt: Input/output error"):
        files.write_atomic(out, "new\n")
    assert out.read_text() == "old\n"
    assert leftovers(tmp_path, "out.txt") == []
    with pytest.raises(InputError, match="cannot write .*missing/x: No such file or directory"):
        files.write_atomic(tmp_path / "missing" / "x", "text")
