"""The command line's entry point: it imports every command module and defines `main()` (the console
script `rke2-mirror`, and `python -m rke2_mirror`).

The modules of cli/, each importing only those below it:
- `app` (this one) -> the command modules `mirror`, `releases` (list, diff), `node` (registries-yaml,
  verify), `archive` (save, load, inspect), `sync`; each defines its commands with `@app.command`;
- -> `base`: the typer app and what the commands share (errors, progress, `finish`, the image set);
- -> `options` (option declarations and the option groups), `signals` (SIGINT/SIGTERM), `util`.
"""

from __future__ import annotations

import sys

from rke2_mirror.cli.base import app, err
from rke2_mirror.cli.signals import Reported, hard_exit, signal_name
from rke2_mirror.cli.util import PROG, error_line
from rke2_mirror.engine.cancel import Interrupted
from rke2_mirror.model.errors import MirrorError

# The command modules: importing one adds its commands to `app`, in this order in --help.
from rke2_mirror.cli import mirror, releases, node, archive, sync  # noqa: F401, I001

__all__ = ["app", "main"]


def main() -> None:
    """Run the command line.  An interrupted command ends the process with os._exit once its output is
    flushed (130 after SIGINT, 143 after SIGTERM): worker threads may still sit in a blocking read."""
    try:
        app()
    except Interrupted as exc:
        # Reported: the command printed its summary already; else the interrupt came outside the engine
        # (a list download, reading an archive, spooling) and unwound through the command's `finally`s.
        hard_exit(exc.exit_code, None if isinstance(exc, Reported) else f"{PROG}: interrupted ({signal_name(exc.signum)})")
    except KeyboardInterrupt:  # before a command installed its handlers
        hard_exit(130, f"{PROG}: interrupted (SIGINT)")
    except MirrorError as exc:
        err(error_line(str(exc)))
        sys.exit(exc.exit_code)
