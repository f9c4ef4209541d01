"""YAML from outside (registries.yaml, RKE2's config.yaml, the sync config), parsed with bounds.

`rke2-mirror` runs as root from cron and Kubernetes and reads YAML files it does not control.  Every such
document goes through `compose` (the node graph, for the sync config's file:line errors) or `load` (plain
Python data), which refuse, in one `YAMLRefused` carrying a reason and the line where known:

- more than `MAX_BYTES` of text (checked before parsing; `read_text` reads no more than that from a file);
- text that is not UTF-8, or holds characters YAML forbids (NUL and other control characters);
- nesting deeper than `MAX_DEPTH` (checked while composing: the composer recurses, so a `[[[[...` a
  hundred thousand deep would otherwise end in a RecursionError);
- more than `MAX_NODES` nodes or `MAX_CHARS` characters of scalars *after alias expansion*: an alias
  counts as everything its anchor stands for, so a "billion laughs" document (`&a [*b, *b, ...]`) is
  refused while it is composed, before anything walks the expanded structure (our own code, PyYAML's
  dumper or the caller's validation);
- an alias inside the node its anchor names (a recursive structure: walking it would never end);
- any other YAML error (syntax, an unknown tag, a value its tag rejects such as `!!int zz`), and a
  RecursionError wherever it comes from.

The scanner and parser are libyaml's when PyYAML has it (they are not recursive and run ~100 times faster
than the pure-Python ones, which are used otherwise); composing is always the counting composer below.
Messages quote no value of the document (registries.yaml holds passwords): at most a tag, an anchor's
name or the one character the scanner stopped at, cut to 200 characters.  `shown` is how callers put a
key into a message (short, one line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_BYTES = 4 * 1024 * 1024  # a registries.yaml, config.yaml or sync config is a few KiB
MAX_DEPTH = 64  # theirs nest 5 levels deep
MAX_NODES = 50_000  # after alias expansion; a registries.yaml with 200 mirrors has ~4,000
MAX_CHARS = 4 * MAX_BYTES  # scalar characters after alias expansion

# What YAML 1.1 accepts in a stream (PyYAML's Reader.NON_PRINTABLE): refused up front, with its line.
_NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")

try:  # libyaml's scanner and parser, when PyYAML was built with it
    from yaml._yaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _CParser = None


class YAMLRefused(Exception):
    """Why a document was refused: `reason` (one line, never the document's content), `line` (1-based, or
    None when unknown), `syntax` (the YAML parser's own error, as opposed to a bound or an encoding)."""

    def __init__(self, reason: str, line: int | None = None, syntax: bool = False):
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line
        self.syntax = syntax

    def describe(self, origin: str) -> str:
        """``origin:line: reason`` (``origin: reason`` when the line is unknown)."""
        return f"{origin}:{self.line}: {self.reason}" if self.line else f"{origin}: {self.reason}"


# What a constructor raises for a value its tag rejects: `!!int zz`, `!!timestamp 2001-13-45`, an int of
# 5,000 digits (Python's int-from-string limit).
_BAD_VALUE = (ValueError, TypeError, OverflowError, ArithmeticError)


def _line(mark: Any) -> int | None:
    line = getattr(mark, "line", None)
    return line + 1 if isinstance(line, int) else None


class _BoundedComposer(Composer):
    """PyYAML's composer, counting as it goes: depth, nodes and scalar characters with aliases expanded."""

    def _init_bounds(self, max_depth: int, max_nodes: int, max_chars: int) -> None:
        self._max = (max_depth, max_nodes, max_chars)
        self._depth = 0
        self._nodes = 0
        self._chars = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (nodes, chars) it expands to

    def _add(self, nodes: int, chars: int, mark: Any) -> None:
        self._nodes += nodes
        self._chars += chars
        _, max_nodes, max_chars = self._max
        if self._nodes > max_nodes:
            raise YAMLRefused(f"more than {max_nodes} YAML nodes (aliases expanded): refused", _line(mark))
        if self._chars > max_chars:
            raise YAMLRefused(f"more than {max_chars} characters of values (aliases expanded): refused", _line(mark))

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is the composer's own error
                size = self._sizes.get(id(target))
                if size is None:
                    raise YAMLRefused("an alias inside the node its anchor names (a recursive structure): refused",
                                      _line(event.start_mark))
                self._add(*size, event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._max[0]:
            raise YAMLRefused(f"nested more than {self._max[0]} levels deep: refused", _line(event.start_mark))
        before = (self._nodes, self._chars)
        self._add(1, len(event.value) if isinstance(event, ScalarEvent) else 0, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if getattr(event, "anchor", None) is not None:
            self._sizes[id(node)] = (self._nodes - before[0], self._chars - before[1])
        return node


class _LineConstructor(SafeConstructor):
    """SafeConstructor, whose value errors name the node's line."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except _BAD_VALUE as exc:
            raise YAMLRefused(f"a value YAML cannot read ({exc.__class__.__name__})", _line(node.start_mark),
                              syntax=True) from None


class _PyLoader(Reader, Scanner, Parser, _BoundedComposer, _LineConstructor, Resolver):
    """The pure-Python scanner and parser (PyYAML without libyaml)."""

    def __init__(self, text: str, bounds: tuple[int, int, int]):
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _LineConstructor.__init__(self)
        Resolver.__init__(self)
        self._init_bounds(*bounds)


_Loader: type = _PyLoader
if _CParser is not None:

    class _CLoader(_BoundedComposer, _CParser, _LineConstructor, Resolver):  # type: ignore[misc, valid-type]
        """libyaml's scanner and parser; our composer (first in the MRO: CParser has its own)."""

        def __init__(self, text: str, bounds: tuple[int, int, int]):
            _CParser.__init__(self, text)
            _LineConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
            self._init_bounds(*bounds)

    _Loader = _CLoader


def shown(value: object, limit: int = 100) -> str:
    """A key (or other text) of a document as a message shows it: as written when it is short printable text,
    else quoted and cut -- a key may hold a newline, or a megabyte."""
    text = str(value)
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def _decode(data: str | bytes, limit: int) -> str:
    if len(data) > limit:
        raise YAMLRefused(f"more than {_size(limit)}: refused unparsed")
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YAMLRefused("not UTF-8 text", data.count(b"\n", 0, exc.start) + 1) from None
    else:
        text = data
        if len(text.encode("utf-8", "surrogatepass")) > limit:
            raise YAMLRefused(f"more than {_size(limit)}: refused unparsed")
    bad = _NON_PRINTABLE.search(text)
    if bad:
        what = "NUL" if bad.group() == "\0" else f"U+{ord(bad.group()):04X}"
        raise YAMLRefused(f"a {what} character, which YAML does not allow", text.count("\n", 0, bad.start()) + 1)
    return text


def _run(data: str | bytes, limit: int, bounds: tuple[int, int, int], construct: bool,
         loader_class: type | None = None) -> Any:
    text = _decode(data, limit)
    if not text.strip():
        return None
    loader = (loader_class or _Loader)(text, bounds)
    try:
        node = loader.get_single_node()
        if not construct or node is None:
            return node
        return loader.construct_document(node)
    except YAMLRefused:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own cap, above ours for block nesting
            raise YAMLRefused(f"nested more than {bounds[0]} levels deep: refused", _line(mark)) from None
        parts = [str(p) for p in (exc.context, exc.problem) if p]
        raise YAMLRefused(_one_line(": ".join(parts) or "not valid YAML"), _line(mark), syntax=True) from None
    except yaml.YAMLError as exc:
        raise YAMLRefused(_one_line(str(getattr(exc, "reason", None) or exc.__class__.__name__)), syntax=True) from None
    except RecursionError:
        raise YAMLRefused("nested too deeply: refused") from None
    except _BAD_VALUE as exc:
        raise YAMLRefused(f"a value YAML cannot read ({exc.__class__.__name__})", syntax=True) from None
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose is not None:
            dispose()


def compose(data: str | bytes, *, limit: int = MAX_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES,
            max_chars: int = MAX_CHARS) -> yaml.Node | None:
    """The node graph of the one YAML document in `data` (None when it is empty), within the bounds.
    Raises `YAMLRefused` (the caller names the file)."""
    return _run(data, limit, (max_depth, max_nodes, max_chars), construct=False)


def load(data: str | bytes, *, limit: int = MAX_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES,
         max_chars: int = MAX_CHARS) -> Any:
    """`yaml.safe_load` within the bounds: plain Python data (None when empty).  Raises `YAMLRefused`."""
    return _run(data, limit, (max_depth, max_nodes, max_chars), construct=True)


def read_text(path: Path | str, *, limit: int = MAX_BYTES) -> str:
    """A YAML file's text, reading no more than `limit` + 1 bytes of it.  `YAMLRefused` when it is larger or
    not UTF-8; OSError (FileNotFoundError, IsADirectoryError, ...) as `open` raises it."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return _decode(data, limit)
