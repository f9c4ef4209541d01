"""`rke2-mirror sync CONFIG.yaml`: the scheduled job.

The config is typed and versioned (``version: 1``): parsed at the edge into frozen dataclasses, with
every default in the dataclasses below and every error naming ``file:line`` and the key's path.
Credentials never appear in it: it names environment variables or a docker-config style file.

A run: take the lock (``fcntl.flock``: the kernel drops it when the holder dies), resolve each
followed release (channel -> version), merge the image sets, keep this shard's part, run the copy
engine once, split its report per release, then write the outputs atomically (JSON report,
node-exporter textfile, registries.yaml / config.yaml).  Nothing is ever deleted from the target.

No typer and no printing here: the CLI (`cli_sync.py`) passes a log callback and a Progress.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import fcntl
import json
import os
import re
import socket
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from . import files, jobs
from .auth import Credentials, credentials_from_file
from .copy import CopyOptions, ImageResult, Progress, Report
from .errors import InputError, MirrorError
from .oci import Platform
from .reference import ImageRef, RegistryURL, merge_refs, parse_image_lines, shard as shard_refs
from .registry import RetryPolicy
from .releases import DEFAULT_ARCHES, DEFAULT_FLAVORS, PRODUCTS, ReleaseSource, check_arches, check_flavors, release_images
from .rke2config import (NodeConfig, RKE2Version, build_registries, dump_registries, load_yaml_mapping,
                         registries_have_auth, set_system_default_registry)
from .routing import parse_source_endpoints

Log = Callable[[str], None]

CONFIG_VERSION = 1
REPORT_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1      # some images failed or were deferred (rate-limit budget)
EXIT_CONFIG = 2      # bad config (InputError)
EXIT_LOCKED = 3      # another run holds the lock


class ConfigError(InputError):
    """A config file problem: ``file:line: message`` (exit 2)."""


class LockHeld(MirrorError):
    """Another run of the same config holds the lock (exit 3)."""

    exit_code = EXIT_LOCKED


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
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(f"{v!r} is not an environment variable name (the config names the variable, "
                         "never the secret itself)")
    return v


def _check_url(v: str) -> str:
    RegistryURL.parse(v, what="url")
    return v


def _check_http_url(v: str) -> str:
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

    def validate(self) -> str | None:
        if not self.channels and not self.versions:
            return "name at least one of 'channels' (stable, latest, v1.30) or 'versions' (v1.30.14+rke2r1)"
        if self.offline and self.channels:
            return "'offline: true' reads only the lists cache: channels cannot be resolved there, pin 'versions'"
        return None

    @property
    def followed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.channels + self.versions))


@dataclass(frozen=True)
class CopySpec:
    jobs: int = _opt(4, check=_range(1, 64))
    retries: int = _opt(5, check=_range(1, 20))
    timeout: float = _opt(60.0, check=_range(1, 3600))    # seconds to wait for a registry's next bytes
    platforms: tuple[str, ...] = _opt((), check=_check_platforms)
    signatures: bool = _opt(False)
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
    sources: SourcesSpec = _opt(SourcesSpec())
    copy: CopySpec = _opt(CopySpec())
    lists_dir: str | None = _opt(path=True)
    outputs: OutputsSpec = _opt(OutputsSpec())
    node: NodeSpec = _opt(NodeSpec())
    lock: str | None = _opt(path=True)

    def validate(self) -> str | None:
        if not self.releases and not self.images:
            return "nothing to mirror: add 'releases' (channels / versions to follow) and/or 'images' (list files)"
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

class _Ctx:
    def __init__(self, origin: str, base: Path):
        self.origin = origin
        self.base = base
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, message: str) -> ConfigError:
        if node is None:
            return ConfigError(f"{self.origin}: {message}")
        return ConfigError(f"{self.origin}:{node.start_mark.line + 1}: {message}")

    def scalar(self, node: yaml.Node) -> Any:
        return self.constructor.construct_object(node, deep=True)


def _describe(node: yaml.Node, ctx: _Ctx) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    v = ctx.scalar(node)
    if v is None:
        return "nothing (null)"
    return f"{type(v).__name__} {v!r}"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _mapping_items(node: yaml.Node, path: str, ctx: _Ctx) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, f"{path or 'the config'}: expected a mapping, got {_describe(node, ctx)}")
    out: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for k, v in node.value:
        key = ctx.scalar(k) if isinstance(k, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise ctx.error(k, f"{path or 'the config'}: keys must be strings")
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
            raise ctx.error(node, f"{path}: expected a list, got {_describe(node, ctx)}")
        return tuple(_convert(item, n, f"{path}[{i}]", ctx, is_path) for i, n in enumerate(node.value))
    if origin is dict:
        return {k: _convert(args[1], v, f"{path}.{k}", ctx, is_path) for k, _, v in _mapping_items(node, path, ctx)}
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.error(node, f"{path}: expected {_type_word(tp)}, got {_describe(node, ctx)}")
    value = ctx.scalar(node)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(node, f"{path}: expected true or false, got {_describe(node, ctx)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(node, f"{path}: expected an integer, got {_describe(node, ctx)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(node, f"{path}: expected a number, got {_describe(node, ctx)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            hint = " (quote it)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ctx.error(node, f"{path}: expected a string, got {_describe(node, ctx)}{hint}")
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
                raise ctx.error(vnode, f"{full}: {exc}") from None
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


def parse_config(text: str, origin: str = "config.yaml", base: Path | None = None) -> SyncConfig:
    """Parse a sync config; relative paths in it are taken from `base` (the config file's directory)."""
    ctx = _Ctx(origin, base or Path("."))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
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
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: cannot read ({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
    absolute = path.absolute()
    return LoadedConfig(absolute, parse_config(text, str(path), absolute.parent))


# =============================================================================================
# The lock


class SyncLock:
    """`fcntl.flock` on a lock file holding ``pid=… host=… started=…`` for the message.

    The kernel drops a flock when its process dies, so a lock file left behind by a dead process
    never blocks: the next run takes it over (and says so)."""

    def __init__(self, path: Path, what: str = "sync"):
        self.path = path
        self.what = what
        self._fd: int | None = None
        self.previous: dict[str, str] = {}

    @staticmethod
    def _parse(text: str) -> dict[str, str]:
        return dict(p.split("=", 1) for p in text.split() if "=" in p)

    def acquire(self, log: Log = lambda s: None) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(f"cannot create the lock file {self.path}: {exc.strerror or exc} "
                             "(set 'lock: PATH' in the config or --lock PATH to a writable place)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started") if k in holder) or "unknown holder"
            raise LockHeld(f"another {self.what} is running ({who}; lock {self.path}): exiting") from None
        self._fd = fd
        self.previous = self._parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if self.previous.get("pid"):
            alive = _pid_alive(self.previous["pid"]) and self.previous.get("host") == socket.gethostname()
            state = "no longer running" if not alive else "not holding it"
            log(f"taking over the lock {self.path} left by pid {self.previous['pid']}"
                + (f" (started {self.previous['started']})" if "started" in self.previous else "") + f", {state}")
        info = (f"pid={os.getpid()} host={socket.gethostname()} "
                f"started={_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the file stays (unlinking a lock file races with the next opener)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "SyncLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# =============================================================================================
# Credentials: resolved at run time, scoped to the run, never logged


def target_credentials(cfg: LoadedConfig, env: Mapping[str, str] | None = None) -> Credentials | None:
    spec = cfg.config.target.credentials
    if spec is None:
        return None
    env = os.environ if env is None else env
    if spec.env is not None:
        missing = [v for v in (spec.env.username, spec.env.password) if not env.get(v)]
        if missing:
            raise InputError(f"target.credentials.env: environment variable(s) {', '.join(missing)} not set "
                             f"(config {cfg.path})")
        return Credentials(env[spec.env.username], env[spec.env.password])
    path = Path(spec.file or "")
    if not path.is_file():
        raise InputError(f"target.credentials.file {path}: no such file (config {cfg.path})")
    creds = credentials_from_file(path, cfg.target.host)
    if creds is None:
        raise InputError(f"target.credentials.file {path}: no 'auths' entry for {cfg.target.host}")
    if not creds.username or not creds.password:
        raise InputError(f"target.credentials.file {path}: the entry for {cfg.target.host} needs a username and "
                         "password (or 'auth'); identity tokens are not supported for the target")
    return creds


def source_auth_file(cfg: LoadedConfig) -> str | None:
    """The sources' credentials file named by the config (checked to exist)."""
    src = cfg.config.sources.credentials
    if src is None:
        return None
    if not Path(src.file).is_file():
        raise InputError(f"sources.credentials.file {src.file}: no such file (config {cfg.path})")
    return src.file


# =============================================================================================
# Resolving what to mirror


@dataclass(frozen=True)
class ImageSet:
    """One followed release (or one extra list file) and its images."""

    name: str                      # "rke2 stable", "rke2 v1.28.9+rke2r1", "images /etc/…/extra.txt"
    images: tuple[ImageRef, ...]
    product: str | None = None
    release: str | None = None     # as followed: a channel or a version
    version: str | None = None     # what it resolved to
    lists: tuple[str, ...] = ()    # the verified list assets
    file: str | None = None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name}
        if self.product:
            d.update(product=self.product, release=self.release, version=self.version, lists=list(self.lists))
        if self.file:
            d["file"] = self.file
        return d


def _release_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=15.0), follow_redirects=True,
                        headers={"User-Agent": "rke2-mirror"})


def resolve_image_sets(cfg: LoadedConfig, log: Log = lambda s: None,
                       client: httpx.Client | None = None) -> list[ImageSet]:
    """Each followed release (channel -> version, lists verified against their checksums) and each extra list."""
    c = cfg.config
    sets: list[ImageSet] = []
    own = None
    if client is None and any(not r.offline for r in c.releases):
        client = own = _release_client()
    try:
        for spec in c.releases:
            source = ReleaseSource.default(spec.product, spec.release_url, spec.channel_url, c.lists_dir, spec.offline)
            for rel in spec.followed:
                r = release_images(rel, source, None if spec.offline else client, spec.arches, spec.flavors, log)
                name = f"{spec.product} {rel}"
                log(f"{name}: {r.version} ({len(r.images)} images)" if rel != r.version
                    else f"{name}: {len(r.images)} images")
                sets.append(ImageSet(name, r.images, spec.product, rel, r.version, tuple(f.name for f in r.files)))
    finally:
        if own is not None:
            own.close()
    for f in c.images:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"images: {f}: cannot read ({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
        refs = parse_image_lines(text, origin=f)
        sets.append(ImageSet(f"images {f}", tuple(refs), file=f))
    return sets


# =============================================================================================
# The report


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize(results: Sequence[ImageResult]) -> dict[str, Any]:
    count = lambda *s: sum(1 for r in results if r.status in s)  # noqa: E731
    return {"total": len(results), "copied": count("copied"), "skipped": count("skipped"),
            "failed": count("failed", "missing"), "deferred": count("deferred"),
            **({"would_copy": count("would-copy")} if count("would-copy") else {}),
            "bytes": sum(r.bytes for r in results)}


def split_report(report: Report, sets: Sequence[ImageSet]) -> list[dict]:
    """Per image set: its results (an image listed by two releases counts for both); signature tags go
    with the image they sign."""
    by_source = {r.source: r for r in report.images if r.note != "signature"}
    sigs = {r.source: r for r in report.images if r.note == "signature"}
    out = []
    for s in sets:
        mine: list[ImageResult] = []
        for ref in s.images:
            res = by_source.get(str(ref))
            if res is None:
                continue  # another shard's
            mine.append(res)
            if sigs and res.source_digest:
                sig = sigs.get(str(ref.with_tag(res.source_digest.replace(":", "-") + ".sig")))
                if sig is not None:
                    mine.append(sig)
        entry = s.to_json()
        entry["summary"] = {**summarize(mine), "seconds": round(sum(r.seconds for r in mine), 3),
                            "in_release": len(s.images)}
        for status in ("copied", "skipped", "would-copy", "deferred"):
            lst = [r.source for r in mine if r.status == status]
            if lst or status != "would-copy":
                entry[status.replace("-", "_")] = lst
        entry["failed"] = [{"source": r.source, "error": r.error} for r in mine if r.status in ("failed", "missing")]
        out.append(entry)
    return out


@dataclass
class SyncResult:
    report: dict
    exit_code: int
    messages: list[str] = field(default_factory=list)   # summary lines for the log

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


# =============================================================================================
# Outputs: atomic writes, the textfile, the node files


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """A sync output: directories made as needed, on disk before the rename; the temp file
    (`.NAME.tmpPID`) never matches *.prom, so node-exporter never reads half a textfile."""
    files.write_atomic(path, text, mode, parents=True, fsync=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None


_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def read_textfile(path: Path) -> dict[str, float]:
    """The first sample of each metric in a previous textfile (missing or garbled: empty)."""
    out: dict[str, float] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        m = _PROM_LINE.match(line)
        if m and m.group(1) not in out:
            try:
                out[m.group(1)] = float(m.group(3))
            except ValueError:
                continue
    return out


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2 ** 53 else repr(float(v))


METRICS = {  # name: (type, help)
    "rke2_mirror_last_run_timestamp_seconds": ("gauge", "Unix time the last sync run finished."),
    "rke2_mirror_last_success_timestamp_seconds": ("gauge", "Unix time of the last sync run that mirrored every image (kept from earlier runs when this one failed)."),
    "rke2_mirror_last_run_success": ("gauge", "1 if the last sync run mirrored every image, else 0."),
    "rke2_mirror_images_total": ("gauge", "Images in the last run (this shard's part)."),
    "rke2_mirror_images_copied": ("gauge", "Images copied by the last run."),
    "rke2_mirror_images_skipped": ("gauge", "Images already present at the target in the last run."),
    "rke2_mirror_images_failed": ("gauge", "Images that failed in the last run."),
    "rke2_mirror_images_deferred": ("gauge", "Images not started in the last run because the source's rate-limit budget reached its floor."),
    "rke2_mirror_bytes_copied_last_run": ("gauge", "Bytes copied by the last run."),
    "rke2_mirror_bytes_copied_total": ("counter", "Bytes copied by all runs that wrote this file."),
    "rke2_mirror_duration_seconds": ("gauge", "Wall time of the last run."),
    "rke2_mirror_ratelimit_remaining": ("gauge", "Pulls left at the source (Docker Hub ratelimit-remaining) at the end of the last run."),
    "rke2_mirror_ratelimit_limit": ("gauge", "The source's pull limit per window (Docker Hub ratelimit-limit)."),
    "rke2_mirror_release_info": ("gauge", "A release the last run followed, and the version it resolved to."),
}


def render_textfile(values: Mapping[str, float | None], labels: Mapping[str, str],
                    releases: Sequence[Mapping[str, str]] = ()) -> str:
    lines: list[str] = []
    for name, (kind, help_) in METRICS.items():
        if name == "rke2_mirror_release_info":
            samples = [(_labels({**labels, **r}), 1.0) for r in releases]
        else:
            v = values.get(name)
            samples = [] if v is None else [(_labels(labels), v)]
        if not samples:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{lbl} {_num(v)}" for lbl, v in samples]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, *, labels: Mapping[str, str], finished: float, success: bool,
                   summary: Mapping[str, Any] | None, seconds: float, rate_limit: Mapping | None,
                   releases: Sequence[ImageSet] = ()) -> None:
    prev = read_textfile(path)
    copied = float((summary or {}).get("bytes", 0)) if summary else 0.0
    values: dict[str, float | None] = {
        "rke2_mirror_last_run_timestamp_seconds": round(finished, 3),
        "rke2_mirror_last_success_timestamp_seconds": round(finished, 3) if success else
        prev.get("rke2_mirror_last_success_timestamp_seconds"),
        "rke2_mirror_last_run_success": 1.0 if success else 0.0,
        "rke2_mirror_duration_seconds": round(seconds, 3),
        "rke2_mirror_bytes_copied_total": prev.get("rke2_mirror_bytes_copied_total", 0.0) + copied,
    }
    if summary is not None:
        values.update({
            "rke2_mirror_images_total": summary["total"],
            "rke2_mirror_images_copied": summary["copied"],
            "rke2_mirror_images_skipped": summary["skipped"],
            "rke2_mirror_images_failed": summary["failed"],
            "rke2_mirror_images_deferred": summary["deferred"],
            "rke2_mirror_bytes_copied_last_run": copied,
        })
    if rate_limit:
        values["rke2_mirror_ratelimit_remaining"] = rate_limit.get("remaining")
        values["rke2_mirror_ratelimit_limit"] = rate_limit.get("limit")
    info = [{"product": s.product, "release": s.release or "", "version": s.version or ""}
            for s in releases if s.product]
    write_atomic(path, render_textfile(values, labels, info), 0o644)


def write_node_files(cfg: LoadedConfig, refs: Sequence[ImageRef], sets: Sequence[ImageSet],
                     creds: Credentials | None, log: Log,
                     paths: tuple[Path | None, Path | None] | None = None) -> list[str]:
    """(Re)write registries.yaml / config.yaml from the config: at the config's outputs, or at
    `paths` = (registries.yaml, config.yaml), either None to skip it.  A file is left untouched when its
    content would not change.  Returns the files written."""
    c, out = cfg.config, cfg.config.outputs
    target = cfg.target
    changed: list[str] = []
    if paths is None:
        paths = (Path(out.registries_yaml) if out.registries_yaml else None,
                 Path(out.config_yaml) if out.config_yaml else None)
    registries_yaml, config_yaml = paths
    if registries_yaml:
        path = registries_yaml
        version = RKE2Version.parse(c.node.rke2_version) if c.node.rke2_version else None
        if version is None:
            found = [v for s in sets if s.product == "rke2" and (v := RKE2Version.try_parse(s.version))]
            version = min(found) if found else None
            if len(set(found)) > 1:
                log(f"registries.yaml: several RKE2 versions followed; written for the oldest, {version}")
        if c.node.with_auth and creds is None:
            raise InputError("node.with_auth: true needs target.credentials in the config")
        old = _read(path)
        existing = load_yaml_mapping(old, str(path)) if c.node.merge and old else None
        node_cfg = NodeConfig.for_images(target, refs, node_ca_file=c.node.ca_file,
                                         insecure_skip_verify=c.node.insecure_skip_verify,
                                         auth=creds if c.node.with_auth else None,
                                         system_default_registry=c.node.system_default_registry, rke2_version=version)
        doc, warnings = build_registries(node_cfg, existing)
        text = dump_registries(doc, node_cfg)
        secret = registries_have_auth(doc)
        mode = 0o600 if secret else files.existing_mode(path, 0o644)
        for w in warnings:
            log(f"registries.yaml: warning: {w}")
        if text != old or files.existing_mode(path, mode) != mode:
            write_atomic(path, text, mode)
            changed.append(str(path))
            log(f"wrote {path}" + (" (mode 0600: it holds credentials)" if secret else ""))
    if config_yaml:
        path = config_yaml
        old = _read(path)
        new = set_system_default_registry(old, target.host if c.node.system_default_registry else None, str(path))
        if new != old:
            write_atomic(path, new, files.existing_mode(path, 0o600))
            changed.append(str(path))
            log(f"wrote {path} (system-default-registry: "
                f"{target.host if c.node.system_default_registry else 'removed'})")
    return changed


# =============================================================================================
# The job


def _tls(ca: str | None, insecure: bool, section: str) -> jobs.TLSOptions:
    if ca is not None and not Path(ca).is_file():
        raise InputError(f"{section}.ca_file {ca}: no such file")
    return jobs.TLSOptions(ca, insecure, (f"{section}.ca_file:", f"{section}.insecure_skip_verify: true"))


def copy_options(cfg: SyncConfig, dry_run: bool = False, jobs_override: int | None = None) -> CopyOptions:
    n = jobs_override or cfg.copy.jobs
    return CopyOptions(platforms=tuple(Platform.parse(p) for p in cfg.copy.platforms),
                       signatures=cfg.copy.signatures, jobs=n, blob_jobs=max(4, n * 2), dry_run=dry_run,
                       retry=RetryPolicy(attempts=cfg.copy.retries, timeout=cfg.copy.timeout))


def check_outputs_writable(cfg: LoadedConfig, shard: tuple[int, int] | None = None) -> None:
    """Fail before copying anything, not after, when an output cannot be written."""
    out = cfg.config.outputs
    for key, value in (("report", out.report), ("textfile", out.textfile), ("registries_yaml", out.registries_yaml),
                       ("config_yaml", out.config_yaml)):
        if not value:
            continue
        path = shard_path(Path(value), shard) if key in ("report", "textfile") else Path(value)
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"outputs.{key}: cannot write {path} ({parent} is not a writable directory)")


def mirror_refs(cfg: LoadedConfig, refs: Sequence[ImageRef], *, creds: Credentials | None = None,
                max_rps: float | None = None, pull_floor: int | None = None, jobs_override: int | None = None,
                dry_run: bool = False, progress: Progress | None = None, log: Log = lambda s: None) -> Report:
    """One engine run of `refs` into the config's target, with its TLS, sources, credentials and limits
    (the arguments given here override the config's)."""
    c = cfg.config
    creds = creds if creds is not None else target_credentials(cfg)
    target_tls = _tls(c.target.ca_file, c.target.insecure_skip_verify, "target")
    source = jobs.SourceOptions(_tls(c.sources.ca_file, c.sources.insecure_skip_verify, "sources"),
                                parse_source_endpoints(f"{k}={u}" for k, u in c.sources.endpoints.items()),
                                source_auth_file(cfg))
    options = copy_options(c, dry_run, jobs_override)
    return jobs.mirror(refs, cfg.target, target_tls=target_tls, source=source, options=options,
                       public_projects=c.target.public_projects, progress=progress, log=log,
                       max_rps=max_rps if max_rps is not None else c.copy.max_rps,
                       pull_floor=pull_floor if pull_floor is not None else c.copy.pull_floor,
                       target_credentials=creds)


def run_sync(cfg: LoadedConfig, *, shard: tuple[int, int] | None = None, max_rps: float | None = None,
             pull_floor: int | None = None, jobs_override: int | None = None, dry_run: bool = False,
             progress: Progress | None = None, log: Log = lambda s: None,
             release_client: httpx.Client | None = None, clock: Callable[[], float] = time.time) -> SyncResult:
    """One sync run (the caller holds the lock).  Bad config or an unusable target raises InputError;
    image failures are in the result (exit code 1)."""
    c = cfg.config
    started, t0 = clock(), time.monotonic()
    target = cfg.target
    labels = {"config": cfg.path.stem, **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {})}
    textfile = shard_path(Path(c.outputs.textfile), shard) if c.outputs.textfile and not dry_run else None
    sets: list[ImageSet] = []
    try:
        if not dry_run:
            check_outputs_writable(cfg, shard)
        creds = target_credentials(cfg)
        source_auth_file(cfg)  # checked before any download
        sets = resolve_image_sets(cfg, log, release_client)
        all_refs = merge_refs(*[list(s.images) for s in sets])
        refs = shard_refs(all_refs, *shard) if shard else all_refs
        if shard:
            log(f"shard {shard[0]}/{shard[1]}: {len(refs)} of {len(all_refs)} images")
        report = mirror_refs(cfg, refs, creds=creds, max_rps=max_rps, pull_floor=pull_floor,
                             jobs_override=jobs_override, dry_run=dry_run, progress=progress, log=log)
    except MirrorError as exc:
        if textfile is not None:  # monitoring sees the failed run; the last success is kept
            finished = clock()
            try:
                write_textfile(textfile, labels=labels, finished=finished, success=False, summary=None,
                               seconds=time.monotonic() - t0, rate_limit=None, releases=sets)
            except InputError as werr:
                log(f"warning: {werr}")
        raise exc
    finished, seconds = clock(), time.monotonic() - t0
    summary = summarize(report.images)
    success = summary["failed"] == 0 and summary["deferred"] == 0
    rate_limit = report.rate_limit
    doc: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "config": str(cfg.path),
        "target": str(target),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "dry_run": dry_run,
        "started_at": _utc(started),
        "finished_at": _utc(finished),
        "seconds": round(seconds, 3),
        "result": "ok" if success else ("stopped" if report.stopped and not summary["failed"] else "failed"),
        "exit_code": EXIT_OK if success else EXIT_FAILED,
        "stopped": report.stopped,
        "rate_limit": rate_limit,
        "summary": summary,
        "releases": split_report(report, sets),
        "images": [r.to_json() for r in report.images],
    }
    messages = []
    for rel in doc["releases"]:
        s = rel["summary"]
        label = rel["name"] + (f" ({rel['version']})" if rel.get("version") and rel["version"] != rel.get("release") else "")
        messages.append(f"{label}: {s['total']} images, {s['copied']} copied, {s['skipped']} already present, "
                        f"{s['failed']} failed" + (f", {s['deferred']} deferred" if s["deferred"] else ""))
    if report.stopped:
        left = ""
        if rate_limit and rate_limit.get("remaining") is not None:
            left = f"; pulls left for the next run: {rate_limit['remaining']}" + (
                f" of {rate_limit['limit']}" if rate_limit.get("limit") else "")
        messages.append(f"stopped early, {summary['deferred']} images deferred to the next run: {report.stopped}{left}")
    if not dry_run:
        if c.outputs.registries_yaml or c.outputs.config_yaml:
            doc["node_files_written"] = write_node_files(cfg, all_refs, sets, creds, log)
        if c.outputs.report:
            write_atomic(shard_path(Path(c.outputs.report), shard), json.dumps(doc, indent=2) + "\n", 0o644)
        if textfile is not None:
            write_textfile(textfile, labels=labels, finished=finished, success=success, summary=summary,
                           seconds=seconds, rate_limit=rate_limit, releases=sets)
    return SyncResult(doc, doc["exit_code"], messages)


def sync(config_path: Path | str, *, shard: tuple[int, int] | None = None, lock_path: Path | None = None,
         log: Log = lambda s: None, **kw: Any) -> SyncResult:
    """Load the config, take its lock (LockHeld, exit 3, if another run has it), run."""
    cfg = load_config(config_path)
    lock = SyncLock(cfg.lock_path(shard, lock_path), f"rke2-mirror sync of {cfg.path}")
    lock.acquire(log)
    try:
        return run_sync(cfg, shard=shard, log=log, **kw)
    finally:
        lock.release()


__all__ = ["CONFIG_VERSION", "ConfigError", "LockHeld", "SyncConfig", "LoadedConfig", "SyncLock", "SyncResult",
           "ImageSet", "parse_config", "load_config", "resolve_image_sets", "mirror_refs", "write_node_files", "run_sync", "sync", "split_report", "render_textfile",
           "read_textfile", "shard_path", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG", "EXIT_LOCKED"]
