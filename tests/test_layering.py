"""The package's layering, read from the source with `ast` (every import, also those inside functions,
under `if TYPE_CHECKING:` and `importlib.import_module("literal")`), and the run-time half of it: the
package and every command's --help work where the test-only dependencies cannot be imported.

The rules (README, "Development"):
- `rke2_mirror/model/` imports only the standard library and `rke2_mirror.model.*`;
- `rke2_mirror/engine/` imports nothing from `rke2_mirror.endpoints/.jobs/.node/.cli/.releases`, and no
  httpx, typer, tqdm;
- nothing outside `rke2_mirror/cli/` imports typer or tqdm;
- `rke2_mirror/releases/` imports no `rke2_mirror.engine/.jobs/.cli`;
- nothing in `src/rke2_mirror/` imports `rke2_mirror_testkit`, `cryptography` or `bcrypt`.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "rke2_mirror"
DYNAMIC_IMPORTERS = {"import_module", "__import__", "LazyModule"}  # called with a literal module name


@dataclass(frozen=True)
class Imp:
    file: Path
    line: int
    module: str  # absolute dotted name
    text: str  # the statement as written

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, level: int, module: str | None) -> str:
    """`from ..x import y` in `path` -> the absolute module name."""
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    base = pkg[: len(pkg) - (level - 1)] if level > 1 else pkg
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, src: str | None = None) -> list[Imp]:
    src = path.read_text() if src is None else src
    tree = ast.parse(src, filename=str(path))
    out: list[Imp] = []
    lines = src.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            continue
        text = lines[node.lineno - 1].strip()
        if isinstance(node, ast.Import):
            out += [Imp(path, node.lineno, a.name, text) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node.level, node.module) if node.level else (node.module or "")
            if mod == "__future__":
                continue
            out.append(Imp(path, node.lineno, mod, text))
            # `from rke2_mirror import cli` imports the sub-module rke2_mirror.cli
            if mod in ("rke2_mirror",) or mod.startswith("rke2_mirror."):
                out += [Imp(path, node.lineno, f"{mod}.{a.name}", text) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            arg = node.args[0]
            if name in DYNAMIC_IMPORTERS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append(Imp(path, node.lineno, arg.value, text))
    return out


def files_under(sub: str | None = None) -> list[Path]:
    base = PKG / sub if sub else PKG
    return sorted(base.rglob("*.py"))


@functools.lru_cache(maxsize=None)
def all_imports(sub: str | None = None) -> list[Imp]:
    return [i for f in files_under(sub) for i in imports_of(f)]


def top(mod: str) -> str:
    return mod.split(".", 1)[0]


def under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def report(bad: list[Imp], rule: str) -> str:
    return f"{rule}: {len(bad)} offending import(s)\n" + "\n".join("  " + i.where() for i in bad)


# --------------------------------------------------------------------------- the reader itself


def test_the_import_reader_sees_every_kind_of_import():
    """The rules below are only as good as the reader: it must see function-local, relative,
    TYPE_CHECKING and importlib imports (else a rule passes by not looking)."""
    fake = PKG / "engine" / "_layering_probe.py"  # never written: the source is given as a string
    probe = (
        "from __future__ import annotations\n"
        "import os, json\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import httpx\n"
        "from ..endpoints import registry\n"
        "from . import walk\n"
        "def f():\n"
        "    import typer\n"
        "    from rke2_mirror.cli.app import main\n"
        "    importlib.import_module('tqdm')\n"
        "    LazyModule('rke2_mirror.endpoints.ociarchive')\n"
    )
    mods = {(i.line, i.module) for i in imports_of(fake, probe)}
    assert (2, "os") in mods and (2, "json") in mods
    assert (5, "httpx") in mods
    assert (6, "rke2_mirror.endpoints") in mods and (6, "rke2_mirror.endpoints.registry") in mods
    assert (7, "rke2_mirror.engine.walk") in mods
    assert (9, "typer") in mods
    assert (10, "rke2_mirror.cli.app") in mods
    assert (11, "tqdm") in mods
    assert (12, "rke2_mirror.endpoints.ociarchive") in mods
    assert not any(m == "__future__" for _, m in mods)


def test_the_layout_is_the_one_the_rules_talk_about():
    for sub in ("model", "engine", "endpoints", "releases", "node", "jobs", "cli"):
        assert (PKG / sub / "__init__.py").is_file(), f"src/rke2_mirror/{sub}/ is not a package"
        assert files_under(sub), sub
    assert len(all_imports()) > 100  # the reader found the package's imports


# --------------------------------------------------------------------------- the rules


def test_model_imports_only_the_standard_library_and_itself():
    bad = [i for i in all_imports("model")
           if not (top(i.module) in sys.stdlib_module_names or under(i.module, "rke2_mirror.model"))]
    assert not bad, report(bad, "rke2_mirror/model/ may import only the standard library and rke2_mirror.model")


ENGINE_FORBIDDEN = ("rke2_mirror.endpoints", "rke2_mirror.jobs", "rke2_mirror.node", "rke2_mirror.cli",
                    "rke2_mirror.releases", "httpx", "typer", "tqdm")


def test_engine_knows_no_endpoint_job_node_cli_release_nor_http_or_terminal_library():
    bad = [i for i in all_imports("engine") if under(i.module, *ENGINE_FORBIDDEN)]
    assert not bad, report(bad, f"rke2_mirror/engine/ must not import {', '.join(ENGINE_FORBIDDEN)}")


def test_only_the_cli_imports_typer_and_tqdm():
    bad = [i for i in all_imports() if under(i.module, "typer", "tqdm")
           and not i.file.is_relative_to(PKG / "cli")]
    assert not bad, report(bad, "typer and tqdm belong to rke2_mirror/cli/ only")


def test_releases_do_not_import_engine_jobs_or_cli():
    forbidden = ("rke2_mirror.engine", "rke2_mirror.jobs", "rke2_mirror.cli")
    bad = [i for i in all_imports("releases") if under(i.module, *forbidden)]
    assert not bad, report(bad, f"rke2_mirror/releases/ must not import {', '.join(forbidden)}")


def test_only_the_cli_imports_jobs_and_nothing_imports_the_cli():
    """jobs/ are the use cases on top of everything else: endpoints, node and releases never reach up into
    them (e.g. verify --images-dir reads node tarballs through endpoints/, not through jobs/inspect)."""
    for part in ("model", "engine", "endpoints", "node", "releases"):
        bad = [i for i in all_imports(part) if under(i.module, "rke2_mirror.jobs", "rke2_mirror.cli")]
        assert not bad, report(bad, f"rke2_mirror/{part}/ must not import rke2_mirror.jobs or rke2_mirror.cli")
    bad = [i for i in all_imports("jobs") if under(i.module, "rke2_mirror.cli")]
    assert not bad, report(bad, "rke2_mirror/jobs/ must not import rke2_mirror.cli")


def test_the_product_never_imports_the_testkit_or_test_only_dependencies():
    forbidden = ("rke2_mirror_testkit", "rke2_mirror.testing", "cryptography", "bcrypt")
    bad = [i for i in all_imports() if under(i.module, *forbidden)]
    assert not bad, report(bad, f"src/rke2_mirror/ must not import {', '.join(forbidden)}")


def test_every_internal_import_names_a_module_that_exists():
    """A stale name left by the reorganisation (rke2_mirror.copy, rke2_mirror.cli_util, ...) is an import
    that only fails when that code path runs."""
    def exists(mod: str) -> bool:
        p = PKG.parent.joinpath(*mod.split("."))
        return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()

    bad = []
    for i in all_imports():
        if not under(i.module, "rke2_mirror") or exists(i.module):
            continue
        parent = i.module.rsplit(".", 1)[0]
        if "from " in i.text and exists(parent):
            continue  # `from rke2_mirror.x import name`: a name in module x, not a module
        bad.append(i)
    assert not bad, report(bad, "imports of rke2_mirror modules that do not exist")


# --------------------------------------------------------------------------- at run time

NO_TEST_DEPS = r'''
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = ("cryptography", "bcrypt")
tried = []

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"{name} is blocked for this test", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in BLOCKED:          # the finder works: the test's own imports of them fail
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could still be imported")
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(sys.modules)

import rke2_mirror
modules, errors = [], {}
for info in pkgutil.walk_packages(rke2_mirror.__path__, "rke2_mirror.",
                                  onerror=lambda n: errors.setdefault(n, repr(sys.exc_info()[1]))):
    if info.name.endswith(".__main__"):
        continue  # importing it runs the command line
    try:
        importlib.import_module(info.name)
        modules.append(info.name)
    except BaseException as exc:
        errors[info.name] = f"{type(exc).__name__}: {exc}"

import typer.main
from rke2_mirror.cli.app import app
import rke2_mirror.cli

def commands(cmd, path=()):
    yield path
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from commands(sub, path + (name,))

helps = {}
for path in commands(typer.main.get_command(app)):
    sys.argv = ["rke2-mirror", *path, "--help"]
    try:
        rke2_mirror.cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    helps[" ".join(path) or "(root)"] = code

print(json.dumps({"modules": modules, "errors": errors, "helps": helps, "tried": sorted(set(tried))}))
'''


def test_package_and_every_help_work_without_cryptography_and_bcrypt(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TEST_DEPS], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(doc["tried"]) >= {"cryptography", "bcrypt"}  # the finder did block them
    assert not doc["errors"], "modules that fail to import without the test dependencies:\n" + "\n".join(
        f"  {k}: {v}" for k, v in doc["errors"].items())
    expected = {module_name(f) for f in files_under() if f.name != "__main__.py"} - {"rke2_mirror"}
    missing = expected - set(doc["modules"])
    assert not missing, f"modules walk_packages did not import: {sorted(missing)}"
    helps = doc["helps"]
    for cmd in ("(root)", "mirror", "save", "load", "inspect", "list", "diff", "registries-yaml", "verify", "sync"):
        assert cmd in helps, f"no command {cmd!r}: {sorted(helps)}"
    bad = {k: v for k, v in helps.items() if v != 0}
    assert not bad, f"--help exit status != 0 without cryptography/bcrypt: {bad}\n{proc.stderr[-2000:]}"
