"""The sync config: typed and versioned (``version: 1``), parsed at the edge into frozen dataclasses, with
every default in the dataclasses below and every error naming ``file:line`` and the key's path.
Credentials never appear in it: it names environment variables or a docker-config style file.

The loader is generic: it builds any of these dataclasses from a YAML node, field by field, from the
type hints and the field metadata (`_opt`, `_req`).  The YAML is composed by `rke2_mirror.yamlsafe`
(size, depth and alias expansion bounded).  No error quotes a value given under a credentials key (or
any key named like a password, token, secret or auth): it names the key and the line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rke2_mirror.files import read_capped

from rke2_mirror import yamlsafe
from rke2_mirror.endpoints.routing import parse_source_endpoints
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.oci import Platform
from rke2_mirror.model.reference import RegistryURL
from rke2_mirror.model.referrers import ReferrerFilter
from rke2_mirror.node.versions import RKE2Version
from rke2_mirror.releases.lists import parse_release
from rke2_mirror.releases.products import DEFAULT_ARCHES, DEFAULT_FLAVORS, PRODUCTS, check_arches, check_flavors

CONFIG_VERSION = 1


class ConfigError(InputError):
    """A config file problem: ``file:line: message`` (exit 2)."""


# =============================================================================================
# The config model.  Field metadata: check (value -> value, raise ValueError/InputError with a
# message), path (resolve relative to the config file's directory), help (one line, for docs).


def _meta(*, check: Callable[[Any], Any] | None = None, path: bool = False) -> dict:
    return {"check": check, "path": path}


def _opt(default: Any = None, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=_meta(**kw))
    return field(default=default, metadata=_meta(**kw))


def _req(**kw: Any) -> Any:
    return field(metadata=_meta(**kw))


def _check_env_name(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):  # the message never holds the value: it may be the secret
        raise ValueError("not an environment variable name (the config names the variable, never the secret "
                         "itself; the value is not shown)")
    return v


def _no_blanks(v: str) -> None:
    # urlsplit drops tabs and newlines silently ("https://h\nx" is host "hx"): refuse them instead
    if re.search(r"[\s\x00-\x1f\x7f]", v):
        raise ValueError("a URL must not contain whitespace or control characters")


def _check_url(v: str) -> str:
    _no_blanks(v)
    RegistryURL.parse(v, what="url")
    return v


def _check_http_url(v: str) -> str:
    _no_blanks(v)
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"{v!r}: an http:// or https:// URL is needed")
    return v.rstrip("/")


def _check_endpoints(v: dict[str, str]) -> dict[str, str]:
    parse_source_endpoints([f"{k}={u}" for k, u in v.items()])
    return v


def _check_product(v: str) -> str:
    if v not in PRODUCTS:
        raise ValueError(f"unknown product {v!r} (known: {', '.join(PRODUCTS)})")
    return v


def referrer_filter(spec: "CopySpec") -> ReferrerFilter | None:
    types = list(spec.referrer_types) + (["signature"] if spec.signatures else [])
    if not spec.referrers:
        if types:
            raise InputError("copy.referrers: false does not go with copy.referrer_types or copy.signatures")
        return None
    return ReferrerFilter.parse(types)


def _check_charts(v: tuple[str, ...]) -> tuple[str, ...]:
    from rke2_mirror.model.artifacts import parse_chart_spec
    for i, text in enumerate(v):
        try:
            parse_chart_spec(text)
        except InputError as exc:
            raise ValueError(f"[{i}]: {str(exc).removeprefix('--chart ')}") from None
    return v


def _check_install_script(v: str) -> str:
    _no_blanks(v)
    return v


def _check_platforms(v: tuple[str, ...]) -> tuple[str, ...]:
    for p in v:
        Platform.parse(p)
    return v


def _range(lo: float, hi: float | None = None) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is not None and (v < lo or (hi is not None and v > hi)):
            raise ValueError(f"{v} is out of range ({lo}..{hi})" if hi is not None else f"{v} must be >= {lo}")
        return v
    return check


def _positive(v: float | None) -> float | None:
    if v is not None and v <= 0:
        raise ValueError(f"{v} must be > 0 (leave it out for no cap)")
    return v


def _check_prom(v: str) -> str:
    if not v.endswith(".prom"):
        raise ValueError(f"{v!r}: the node-exporter textfile collector reads only files ending in .prom")
    return v


def _check_rke2_version(v: str | None) -> str | None:
    if v is not None:
        RKE2Version.parse(v)
    return v


@dataclass(frozen=True)
class EnvCredentials:
    """Names of the environment variables holding the secret (never the secret)."""

    username: str = _req(check=_check_env_name)
    password: str = _req(check=_check_env_name)


@dataclass(frozen=True)
class TargetCredentials:
    """Exactly one of `env` or `file` (a docker config.json / containers auth.json)."""

    env: EnvCredentials | None = _opt()
    file: str | None = _opt(path=True)

    def validate(self) -> str | None:
        if (self.env is None) == (self.file is None):
            return "give exactly one of 'env' (variable names) or 'file' (a docker config.json)"
        return None


@dataclass(frozen=True)
class SourceCredentials:
    """A docker config.json / containers auth.json with an `auths` entry per source registry."""

    file: str = _req(path=True)


@dataclass(frozen=True)
class TargetSpec:
    url: str = _req(check=_check_url)
    ca_file: str | None = _opt(path=True)
    insecure_skip_verify: bool = _opt(False)
    credentials: TargetCredentials | None = _opt()
    public_projects: bool = _opt(False)   # Harbor: create missing projects public (default private)
    strict_auth_realm: bool = _opt(False)  # credentials only to a token service on the target's own host, no http


@dataclass(frozen=True)
class SourcesSpec:
    endpoints: dict[str, str] = _opt({}, check=_check_endpoints)
    ca_file: str | None = _opt(path=True)
    insecure_skip_verify: bool = _opt(False)
    credentials: SourceCredentials | None = _opt()


@dataclass(frozen=True)
class ReleaseSpec:
    product: str = _opt("rke2", check=_check_product)
    channels: tuple[str, ...] = _opt(())
    versions: tuple[str, ...] = _opt(())
    arches: tuple[str, ...] = _opt(DEFAULT_ARCHES, check=lambda v: check_arches(v))
    flavors: tuple[str, ...] = _opt(DEFAULT_FLAVORS, check=lambda v: check_flavors(v))
    release_url: str | None = _opt(check=lambda v: v and _check_http_url(v))
    channel_url: str | None = _opt(check=lambda v: v and _check_http_url(v))
    offline: bool = _opt(False)
    install_files: bool = _opt(False)  # rke2: the release's install files for each arch, as OCI artifacts
    install_script: str | None = _opt(check=_check_install_script)  # FILE (from the config's dir) or URL

    def validate(self) -> str | None:
        if not self.channels and not self.versions:
            return "name at least one of 'channels' (stable, latest, v1.30) or 'versions' (v1.30.14+rke2r1)"
        if self.install_files and self.product != "rke2":
            return "install_files: true is for product rke2 (its rke2.linux-<arch>.tar.gz, sha256sum, install.sh)"
        if self.install_script and not self.install_files:
            return "install_script goes with install_files: true"
        if self.offline and self.channels:
            return "'offline: true' reads only the lists cache: channels cannot be resolved there, pin 'versions'"
        spec = PRODUCTS[self.product]
        if self.channels and not spec.channel_url and not self.channel_url:
            return (f"{self.product} has no channel server: pin 'versions' (e.g. {spec.version_example}), "
                    "or give 'channel_url'")
        for f in self.flavors:  # a typo ('al') would otherwise surface only at the release server
            problem = PRODUCTS[self.product].unknown_flavor(f)
            if problem:
                return f"flavors: {problem}"
        for key, names in (("channels", self.channels), ("versions", self.versions)):
            for name in names:  # a version with a part missing ('1.30.14') is refused by the run too
                try:
                    parse_release(name, self.product)
                except InputError as exc:
                    return f"{key}: {exc}"
        return None

    @property
    def pinned(self) -> tuple[str, ...] | None:
        """The versions followed, when every one is known without the network (no channel), else None."""
        out = []
        for name in self.followed:
            value, is_channel = parse_release(name, self.product)
            if is_channel:
                return None
            out.append(value)
        return tuple(out)

    @property
    def followed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.channels + self.versions))


@dataclass(frozen=True)
class CopySpec:
    jobs: int = _opt(4, check=_range(1, 64))
    retries: int = _opt(5, check=_range(1, 20))
    timeout: float = _opt(60.0, check=_range(1, 3600))    # seconds to wait for a registry's next bytes
    platforms: tuple[str, ...] = _opt((), check=_check_platforms)
    referrers: bool = _opt(True)                          # signatures, attestations, SBOMs travel with images
    referrer_types: tuple[str, ...] = _opt((), check=lambda v: ReferrerFilter.parse(v) and v)
    signatures: bool = _opt(False)                        # = referrer_types: [signature]
    max_rps: float | None = _opt(check=_positive)       # requests/s per registry, all workers together
    pull_floor: int | None = _opt(check=_range(0))      # stop when ratelimit-remaining reaches this


@dataclass(frozen=True)
class OutputsSpec:
    report: str | None = _opt(path=True)
    textfile: str | None = _opt(path=True, check=lambda v: v and _check_prom(v))
    registries_yaml: str | None = _opt(path=True)
    config_yaml: str | None = _opt(path=True)


@dataclass(frozen=True)
class NodeSpec:
    """How registries.yaml / config.yaml are written (paths as the NODES see them)."""

    ca_file: str | None = _opt()
    insecure_skip_verify: bool = _opt(False)
    with_auth: bool = _opt(False)
    merge: bool = _opt(False)
    system_default_registry: bool = _opt(True)
    rke2_version: str | None = _opt(check=_check_rke2_version)

    def validate(self) -> str | None:
        if self.ca_file and self.insecure_skip_verify:
            return "give either 'ca_file' or 'insecure_skip_verify', not both"
        return None


@dataclass(frozen=True)
class SyncConfig:
    version: int = _req()
    target: TargetSpec = _req()
    releases: tuple[ReleaseSpec, ...] = _opt(())
    images: tuple[str, ...] = _opt((), path=True)
    charts: tuple[str, ...] = _opt((), check=_check_charts)  # as --chart: https://REPO/NAME@VERSION, oci://...
    chart_images: bool = _opt(True)  # the images the charts declare (artifacthub.io/images) join the image set
    sources: SourcesSpec = _opt(SourcesSpec())
    copy: CopySpec = _opt(CopySpec())
    lists_dir: str | None = _opt(path=True)
    outputs: OutputsSpec = _opt(OutputsSpec())
    node: NodeSpec = _opt(NodeSpec())
    lock: str | None = _opt(path=True)

    def validate(self) -> str | None:
        if not self.releases and not self.images and not self.charts:
            return ("nothing to mirror: add 'releases' (channels / versions to follow), 'images' (list files) "
                    "and/or 'charts'")
        return None


@dataclass(frozen=True)
class LoadedConfig:
    """A parsed config and where it came from."""

    path: Path
    config: SyncConfig

    @property
    def target(self) -> RegistryURL:
        return RegistryURL.parse(self.config.target.url, what="target.url")

    def lock_path(self, shard: tuple[int, int] | None = None, override: Path | None = None) -> Path:
        base = override or (Path(self.config.lock) if self.config.lock else self.path.with_name(self.path.name + ".lock"))
        return shard_path(base, shard)


def shard_path(path: Path, shard: tuple[int, int] | None) -> Path:
    """`report.json` -> `report.shard-1-of-4.json`, so shards sharing a directory never clash."""
    if shard is None:
        return path
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


# -- the loader -------------------------------------------------------------------------------

MAX_CONFIG_BYTES = yamlsafe.MAX_BYTES  # a sync config is a few KiB
MAX_MESSAGE = 2000  # characters of one error line

_USERINFO = re.compile(r"://[^/@\s'\"]*@")
_SECRET_KEY = re.compile(r"passw|token|secret|auth|credential", re.IGNORECASE)


def is_secret(path: str) -> bool:
    """Is `path` (``target.credentials.env.password``, ``releases[0].x``) a key whose value must never be
    printed: anything under `credentials`, or named like a password, token, secret or auth?"""
    return any(_SECRET_KEY.search(part) for part in re.split(r"[.\[\]]", path))


def _redacted(message: str, value: Any) -> str:
    """A check's message about a secret value, with the value taken out; if it cannot be, a message without it."""
    text = str(value)
    message = message.replace(repr(value), "(the value, not shown)").replace(repr(text), "(the value, not shown)")
    if len(text) >= 3 and text in message:
        return "invalid value (not shown: it is under a credentials key)"
    return message


class _Ctx:
    def __init__(self, origin: str, base: Path):
        self.origin = origin
        self.base = base
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, message: str) -> ConfigError:
        message = " ".join(message.splitlines())  # one line, whatever a check put in it
        message = _USERINFO.sub("://(user:password not shown)@", message)  # https://user:secret@host
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        if node is None:
            return ConfigError(f"{self.origin}: {message}")
        return ConfigError(f"{self.origin}:{node.start_mark.line + 1}: {message}")

    def scalar(self, node: yaml.Node) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # an unknown tag, a tag on the wrong kind of node
            problem = " ".join(str(getattr(exc, "problem", None) or exc.__class__.__name__).split())[:200]
            raise self.error(node, f"invalid YAML: {problem}") from None
        except (ValueError, TypeError, OverflowError, ArithmeticError, RecursionError) as exc:
            # a value its tag rejects: `!!int zz`, `!!timestamp 2001-13-45`, an int of 5,000 digits
            raise self.error(node, f"invalid YAML: a value YAML cannot read ({exc.__class__.__name__})") from None


def _describe(node: yaml.Node, ctx: _Ctx, path: str = "") -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    v = ctx.scalar(node)
    if v is None:
        return "nothing (null)"
    if is_secret(path):
        if isinstance(v, str) and not v.strip():
            return "an empty string"
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(type(v), "a value")
        return f"{kind} (the value is not shown: it is under a credentials key)"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 100 else text[:100] + '...'}"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _mapping_items(node: yaml.Node, path: str, ctx: _Ctx) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, f"{path or 'the config'}: expected a mapping, got {_describe(node, ctx, path)}")
    out: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for k, v in node.value:
        key = ctx.scalar(k) if isinstance(k, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise ctx.error(k, f"{path or 'the config'}: keys must be strings")
        key = yamlsafe.shown(key)  # as messages show it: short, one line (a real key is both already)
        full = f"{path}.{key}" if path else key
        if key in seen:
            raise ctx.error(k, f"duplicate key '{full}'")
        seen.add(key)
        out.append((key, k, v))
    return out


def _convert(tp: Any, node: yaml.Node, path: str, ctx: _Ctx, is_path: bool, key: yaml.Node | None = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if _is_null(node):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, node, path, ctx, is_path, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, node, path, ctx, key)
    if origin is tuple:
        item = args[0]
        if isinstance(node, yaml.ScalarNode) and item is str and not _is_null(node):
            return (_convert(str, node, path, ctx, is_path),)  # `arches: amd64` means [amd64]
        if not isinstance(node, yaml.SequenceNode):
            raise ctx.error(node, f"{path}: expected a list, got {_describe(node, ctx, path)}")
        return tuple(_convert(item, n, f"{path}[{i}]", ctx, is_path) for i, n in enumerate(node.value))
    if origin is dict:
        return {k: _convert(args[1], v, f"{path}.{k}", ctx, is_path) for k, _, v in _mapping_items(node, path, ctx)}
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.error(node, f"{path}: expected {_type_word(tp)}, got {_describe(node, ctx, path)}")
    value = ctx.scalar(node)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(node, f"{path}: expected true or false, got {_describe(node, ctx, path)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(node, f"{path}: expected an integer, got {_describe(node, ctx, path)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(node, f"{path}: expected a number, got {_describe(node, ctx, path)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            hint = " (quote it)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ctx.error(node, f"{path}: expected a string, got {_describe(node, ctx, path)}{hint}")
        value = value.strip()
        if is_path:
            value = str(ctx.base / os.path.expanduser(value))
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - a bug in the model


def _type_word(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "a value")


def _build(cls: type, node: yaml.Node, path: str, ctx: _Ctx, key: yaml.Node | None = None) -> Any:
    """A dataclass from a mapping node; `key` is the node naming it (where "missing key" errors point)."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    items = _mapping_items(node, path, ctx)
    kwargs: dict[str, Any] = {}
    for name, knode, vnode in items:
        full = f"{path}.{name}" if path else name
        f = fields_.get(name)
        if f is None:
            raise ctx.error(knode, f"unknown key '{full}' (known: {', '.join(fields_)})")
        value = _convert(hints[name], vnode, full, ctx, f.metadata.get("path", False), knode)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            try:
                checked = check(value)
            except (ValueError, InputError) as exc:
                message = _redacted(str(exc), value) if is_secret(full) else str(exc)
                raise ctx.error(vnode, f"{full}: {message}") from None
            if checked is not None:
                value = checked
        kwargs[name] = value
    for name, f in fields_.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            full = f"{path}.{name}" if path else name
            raise ctx.error(key or node, f"missing required key '{full}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            raise ctx.error(key or node, f"{path}: {problem}" if path else problem)
    return obj


def parse_config(text: str | bytes, origin: str = "config.yaml", base: Path | None = None) -> SyncConfig:
    """Parse a sync config (text, or bytes that must be UTF-8); relative paths in it are taken from `base`
    (the config file's directory).  Every problem is one ConfigError, ``origin:line: message``."""
    ctx = _Ctx(origin, base or Path("."))
    try:
        root = yamlsafe.compose(text, limit=MAX_CONFIG_BYTES)
    except yamlsafe.YAMLRefused as exc:
        where = f":{exc.line}" if exc.line else ""
        raise ConfigError(f"{origin}{where}: invalid YAML: {exc.reason}" if exc.syntax
                          else f"{origin}{where}: {exc.reason}") from None
    except RecursionError:  # pragma: no cover - yamlsafe turns these into YAMLRefused
        raise ConfigError(f"{origin}: nested too deeply") from None
    if root is None:
        raise ConfigError(f"{origin}: empty config: it needs at least 'version: {CONFIG_VERSION}' and 'target'")
    items = _mapping_items(root, "", ctx)
    version = next(((k, v) for key, k, v in items if key == "version"), None)
    if version is None:
        raise ctx.error(root, f"missing 'version: {CONFIG_VERSION}' (the config format version)")
    value = ctx.scalar(version[1]) if isinstance(version[1], yaml.ScalarNode) else None
    if value != CONFIG_VERSION or isinstance(value, bool):
        raise ctx.error(version[1], f"unsupported config version {value!r}: this rke2-mirror reads version "
                                    f"{CONFIG_VERSION}")
    return _build(SyncConfig, root, "", ctx)


def load_config(path: Path | str) -> LoadedConfig:
    """Read (no more than MAX_CONFIG_BYTES + 1 bytes of) and parse the config at `path`."""
    path = Path(path)
    data = read_capped(path, MAX_CONFIG_BYTES, "config", ConfigError)
    absolute = path.absolute()
    return LoadedConfig(absolute, parse_config(data, str(path), absolute.parent))
