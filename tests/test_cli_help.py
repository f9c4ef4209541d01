"""What a newcomer reads first (issue 17, item 9), through the real command line: the top-level summaries
are whole sentences, no option or argument shows typer's `<str>` / `<list[str]>` / `<int range>` type, the
help of `list --jobs` and `load --arch` says what they do there, and a usage error is one line, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from rke2_mirror.cli.app import app

runner = CliRunner()
COMMANDS = ["mirror", "list", "diff", "registries-yaml", "verify", "save", "load", "inspect", "extract", "sync"]
TYPE_PLACEHOLDER = re.compile(r"<(?:str|list|int|float|path|bool|text|file|dir|choice|rke2\|)[^>]*>")


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line (the console script), as a user runs it, 80 columns wide."""
    script = Path(sys.executable).parent / "rke2-mirror"
    if not script.exists():
        pytest.skip("the rke2-mirror console script is not installed next to this python")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "80"})


def test_every_command_is_in_the_help_and_every_value_option_has_a_metavar():
    cmd = typer.main.get_command(app)
    assert sorted(cmd.commands) == sorted(COMMANDS)
    missing = [f"{name} {'/'.join(p.opts)}" for name, c in cmd.commands.items() for p in c.params
               if not getattr(p, "is_flag", False) and not getattr(p, "count", False) and not p.metavar]
    assert not missing, f"options and arguments without a metavar (typer shows <str> etc. instead): {missing}"


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]], ids=["top", *COMMANDS])
def test_help_has_no_type_placeholders(command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    found = TYPE_PLACEHOLDER.findall(proc.stdout)
    assert not found, f"{' '.join(['rke2-mirror', *command, '--help'])} shows {found}:\n{proc.stdout}"


def test_top_level_summaries_are_whole_one_line_sentences():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout.split("Commands:\n", 1)[1]
    rows = [line for line in section.splitlines() if line.strip()]
    summaries = {}
    for line in rows:
        m = re.match(r"^  (\S+)\s+(.*)$", line)
        assert m, f"a summary wraps onto a second line at 80 columns: {line!r}"
        summaries[m[1]] = m[2]
    assert sorted(summaries) == sorted(COMMANDS)
    cmd = typer.main.get_command(app)
    for name, text in summaries.items():
        assert not text.endswith("..."), f"{name}: summary cut: {text!r}"
        assert re.search(r"\w[.)]$", text), f"{name}: summary does not end with a full word and a period: {text!r}"
        first_paragraph = " ".join(cmd.commands[name].help.strip().split("\n\n")[0].split())
        assert text == first_paragraph  # the docstring's first line, whole


def test_list_jobs_and_load_arch_say_what_they_do_there():
    listing = " ".join(cli("list", "--help").stdout.split())
    assert "--jobs N Images checked at once (with --check)." in listing and "copied" not in listing
    load = " ".join(cli("load", "--help").stdout.split())
    arch = load.split("--arch ARCH", 1)[1].split(" --release-url", 1)[0]
    assert "sha256sum-<arch>.txt FILE is checked against" in arch and "merged" not in arch
    # the other commands still merge lists per --arch
    assert "Repeatable; the lists are merged." in " ".join(cli("save", "--help").stdout.split())


@pytest.mark.parametrize("args,line", [
    (["mirror", "--to", "h", "--images", "x", "--jobs", "abc"],
     "--jobs 'abc': not a whole number (see 'rke2-mirror mirror -h')"),
    (["mirror", "--to", "h", "--images", "x", "--jobs", "100"],
     "--jobs 100: more than 64, the most accepted (see 'rke2-mirror mirror -h')"),
    (["mirror", "--to", "h", "--max-rps", "0"],
     "--max-rps 0: less than 0.1, the least accepted (see 'rke2-mirror mirror -h')"),
    (["list", "stable", "--product", "k4s"],
     "--product: 'k4s' is not one of 'rke2', 'k3s', 'rancher' (see 'rke2-mirror list -h')"),
    (["list"], "missing argument RELEASE (see 'rke2-mirror list -h')"),
    (["mirror", "--images", "x"], "missing option --to TARGET (see 'rke2-mirror mirror -h')"),
    (["verify", "--bogus"], "no such option --bogus (see 'rke2-mirror verify -h')"),
    (["verify", "--registries"], "no such option --registries (did you mean --registries-yaml?) "
                                 "(see 'rke2-mirror verify -h')"),
    (["lst"], "no such command 'lst'. Did you mean 'list'? (see 'rke2-mirror -h')"),
    (["inspect", "a.tar", "b.tar"], "got unexpected extra argument(s) (b.tar) (see 'rke2-mirror inspect -h')"),
])
def test_a_usage_error_is_one_line_and_exit_2(args, line):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"rke2-mirror: error: {line}\n"
    assert "Input should be" not in proc.stderr and "Usage:" not in proc.stderr


def test_help_and_no_arguments_still_show_the_help():
    proc = cli()
    assert "Commands:" in proc.stdout + proc.stderr and "error" not in proc.stderr
    proc = cli("sync", "-h")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: rke2-mirror sync [OPTIONS] {CONFIG.yaml}")
    res = runner.invoke(app, ["mirror", "--jobs", "zero", "--to", "h"])  # the same through CliRunner
    assert res.exit_code == 2
    assert res.stderr == "rke2-mirror: error: --jobs 'zero': not a whole number (see 'rke2-mirror mirror -h')\n"
