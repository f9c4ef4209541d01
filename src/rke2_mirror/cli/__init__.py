"""The command line (typer): the only part that knows typer, tqdm, signals and the terminal.

`main` is the console script; the commands are loaded when it runs (`cli.app`), not when the package
is imported."""

from __future__ import annotations


def main() -> None:
    from rke2_mirror.cli.app import main as run

    run()


__all__ = ["main"]
