"""JSON from outside (registries, archives, release servers, files), parsed with bounds.

Every document we did not write ourselves goes through `loads`: a size cap checked before parsing, and
every failure -- not JSON, not UTF-8, nested deeper than the parser's recursion allows, the wrong
top-level type -- becomes one line in the caller's error class, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from rke2_mirror.model.errors import MirrorError


def loads(data: bytes | str, what: str, *, limit: int | None = None, error: type[MirrorError] = MirrorError,
          expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse `data` (named `what` in messages).  `limit`: refuse more than that many bytes unparsed;
    `expect`: the type(s) the top level must have (dict for an object)."""
    if limit is not None and len(data) > limit:
        raise error(f"{what}: {len(data)} bytes, more than the {limit} accepted")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what}: not valid JSON ({_short(exc)})") from None
    if expect is not None and not isinstance(doc, expect):
        raise error(f"{what}: expected a JSON {_kind(expect)}, got {_kind(type(doc))}")
    return doc


def _kind(tp: type | tuple[type, ...]) -> str:
    if isinstance(tp, tuple):
        return " or ".join(_kind(t) for t in tp)
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(tp, tp.__name__)


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [exc.__class__.__name__])[0][:160]
