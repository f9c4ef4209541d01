"""Small helpers shared by the typer command modules. Only the CLI layer imports this."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer

from .errors import MirrorError

PROG = "rke2-mirror"

F = TypeVar("F", bound=Callable[..., object])


def error_line(message: str) -> str:
    return f"{PROG}: error: {message}"


def run_command(fn: F) -> F:
    """Decorate a typer command: a `MirrorError` becomes ``rke2-mirror: error: <msg>`` on stderr and
    exit status ``exc.exit_code``, with no traceback. The signature is kept (functools.wraps), so
    typer still sees the options."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except MirrorError as exc:
            typer.echo(error_line(str(exc)), err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def stderr_log(message: str) -> None:
    """The `log` callback the core takes: one line on stderr."""
    typer.echo(f"{PROG}: {message}", err=True)


def quiet_log(_: str) -> None:
    pass


class LazyModule:
    """`archive = LazyModule("rke2_mirror.archive")`: imported on first use, so a command pays only
    for the modules it runs (start-up time is most of a no-op run)."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
