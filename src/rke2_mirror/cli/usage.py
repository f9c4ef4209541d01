"""How the command line presents itself, on top of typer: `Group`, the class of the top-level command.

- A usage error (an unknown option, a missing argument, `--jobs abc`) is one line,
  ``rke2-mirror: error: --jobs 'abc': not a whole number (see 'rke2-mirror mirror -h')``, exit status 2 --
  not click's usage block with typer's validation wording (`usage_message`).
- A command's summary in the top-level --help is the first paragraph of its docstring, whole: click would
  cut it at the terminal's width, mid-sentence.  Write it as one short line ending with a period.
- An argument shows its metavar alone (`RELEASE`), without typer's type after it (`RELEASE <str>`);
  options show theirs when they have one (every option taking a value should: tests/test_cli_help.py).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from rke2_mirror.cli.util import PROG, error_line

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click.exceptions import (BadParameter, ClickException, MissingParameter, NoArgsIsHelpError,
                                         NoSuchOption, UsageError)
except ImportError:  # pragma: no cover - typer on top of click
    from click.exceptions import (BadParameter, ClickException, MissingParameter,  # type: ignore[no-redef]
                                  NoSuchOption, UsageError)

    NoArgsIsHelpError = ()  # type: ignore[assignment, misc]

Abort = typer.Abort

__all__ = ["Group", "usage_message"]


class Group(TyperGroup):
    """The top-level command: its sub-commands' summaries whole, usage errors on one line."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in self.commands.values():
            _tidy(command)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # `rke2-mirror` alone: the help
            exc.show()
            sys.exit(exc.exit_code)
        except UsageError as exc:
            typer.echo(error_line(usage_message(exc)), err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.echo(error_line(_one_line(exc.format_message())), err=True)
            sys.exit(exc.exit_code)
        except Abort:
            typer.echo(f"{PROG}: aborted", err=True)
            sys.exit(1)
        # not standalone, click returns a command's return value, or the status of a typer.Exit
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _tidy(command: Any) -> None:
    if not getattr(command, "short_help", None) and getattr(command, "help", None):
        first = command.help.strip().split("\n\n", 1)[0]
        command.short_help = " ".join(first.split())
    for param in getattr(command, "params", ()):
        if param.param_type_name == "argument" and param.metavar:
            param.display_type_rich = _no_type  # help shows `RELEASE`, not `RELEASE <str>`


def _no_type(ctx: Any = None) -> None:
    return None


# --------------------------------------------------------------------------- messages


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _param_name(param: Any) -> str:
    """`--jobs`, or an argument's metavar (`RELEASE`)."""
    if param is None:
        return "a value"
    if param.param_type_name == "argument":
        return param.metavar or (param.name or "ARGUMENT").upper()
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs or list(param.opts) or [param.name or "?"])[0]


def _shown(value: Any) -> str:
    numeric = isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit()
    text = repr(value) if isinstance(value, str) and not numeric else str(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _reason(exc: BadParameter) -> tuple[str, bool]:
    """Why a value was refused, in plain words, and whether the words start with the value (`'abc': ...`).
    typer's checks raise with a pydantic error as the cause, worded for programmers."""
    errors = getattr(exc.__cause__, "errors", None)
    try:
        first = errors()[0] if callable(errors) else None
    except Exception:  # noqa: BLE001 - any shape: fall back on the message
        first = None
    if isinstance(first, dict):
        kind, limits = first.get("type", ""), first.get("ctx") or {}
        shown = _shown(first.get("input"))
        words = {
            "int_parsing": "not a whole number",
            "int_from_float": "not a whole number",
            "float_parsing": "not a number",
            "bool_parsing": "not true or false",
            "greater_than_equal": f"less than {limits.get('ge')}, the least accepted",
            "greater_than": f"must be more than {limits.get('gt')}",
            "less_than_equal": f"more than {limits.get('le')}, the most accepted",
            "less_than": f"must be less than {limits.get('lt')}",
            "enum": f"not one of {limits.get('expected')}",
            "literal_error": f"not one of {limits.get('expected')}",
        }
        if kind in words:
            return f"{shown}: {words[kind]}", True
        msg = _one_line(str(first.get("msg", ""))).removeprefix("Value error, ").rstrip(".")
        if kind == "value_error" and shown in msg:  # a check's own words, naming the value already
            return msg, False
        msg = msg.replace("Input should be", "must be")
        return f"{shown}: {msg[:1].lower()}{msg[1:] or 'not accepted'}", True
    msg = _one_line(exc.message).rstrip(".")
    worded = _click_reason(msg, getattr(exc.param, "type", None))
    if worded:
        return worded, True
    return (msg[:1].lower() + msg[1:] if msg else "not accepted"), False


_NOT_VALID = re.compile(r"(?P<value>.+?) is not a valid (?P<kind>int|integer|float)(?: range)?")
_OUT_OF_RANGE = re.compile(r"(?P<value>\S+) is not in the range \S+")


def _click_reason(msg: str, kind: Any) -> str | None:
    """click's own checks (typer < 0.29), in the same words as pydantic's above: `'abc' is not a valid int
    range` -> `'abc': not a whole number`, `100 is not in the range 1<=x<=64` -> `100: more than 64, the most
    accepted`.  None for any other message."""
    m = _NOT_VALID.fullmatch(msg)
    if m:
        return f"{m['value']}: {'not a number' if m['kind'] == 'float' else 'not a whole number'}"
    m = _OUT_OF_RANGE.fullmatch(msg)
    if not m:
        return None
    try:
        value = float(m["value"])
    except ValueError:
        return None
    shown = f"{value:g}"
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if low is not None and value < low:
        return f"{shown}: less than {low}, the least accepted"
    if high is not None and value > high:
        return f"{shown}: more than {high}, the most accepted"
    return None


def _near(option: str, candidates: Any) -> list[str]:
    """The candidates close to `option` by their names, leading dashes aside (click's own suggestions count
    the dashes: `--bogus` would be near `--jobs`)."""
    import difflib

    bare = {c.lstrip("-"): c for c in candidates}
    return [bare[n] for n in difflib.get_close_matches(option.lstrip("-"), list(bare), n=2, cutoff=0.6)]


def usage_message(exc: UsageError) -> str:
    """One line for a usage error, ending with where the help is."""
    ctx = exc.ctx
    where = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    if isinstance(exc, MissingParameter):
        param = exc.param
        if param is not None and param.param_type_name == "option":
            metavar = f" {param.metavar}" if getattr(param, "metavar", None) else ""
            msg = f"missing option {_param_name(param)}{metavar}"
        else:
            msg = f"missing argument {_param_name(param)}"
    elif isinstance(exc, BadParameter):
        name = _param_name(exc.param) if exc.param is not None else (exc.param_hint or "a value")
        reason, names_value = _reason(exc)
        msg = f"{name} {reason}" if names_value else f"{name}: {reason}"
    elif isinstance(exc, NoSuchOption):
        msg = f"no such option {exc.option_name}"
        near = _near(exc.option_name, exc.possibilities or ())
        if near:
            msg += f" (did you mean {' or '.join(near)}?)"
    else:
        text = _one_line(exc.format_message()).rstrip(".")
        msg = text[:1].lower() + text[1:]
    return _one_line(msg) + where
