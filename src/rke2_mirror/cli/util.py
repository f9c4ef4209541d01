"""Small helpers of the command line that import nothing of it (every cli module may import this one)."""

from __future__ import annotations

import typer

PROG = "rke2-mirror"


def error_line(message: str) -> str:
    return f"{PROG}: error: {message}"


def stderr_log(message: str) -> None:
    """The `log` callback the core takes: one line on stderr."""
    typer.echo(f"{PROG}: {message}", err=True)


class LazyModule:
    """`archive = LazyModule("rke2_mirror.endpoints.ociarchive")`: imported on first use, so a command pays only
    for the modules it runs (start-up time is most of a no-op run)."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
