"""Writing the node's files: `registries.yaml` for a TARGET (mirror entries, rewrite rules for a
TARGET with a path prefix, TLS and auth configs; merged into an existing file on request) and the
`system-default-registry` of `config.yaml`.  Pure: the CLI and the sync job write the files.

Why the entries look the way they do (explicit :443, rewrites, no path in system-default-registry) is
the resolution model in `node.resolver`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml

from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import DOCKER_HUB, ImageRef, RegistryURL
from rke2_mirror.node.registries import Registries, load_yaml_mapping
from rke2_mirror.node.resolver import Endpoint
from rke2_mirror.node.versions import (
    DISABLE_DEFAULT_ENDPOINT,
    EMBEDDED_REGISTRY,
    HOSTS_TOML,
    RUNTIME_HTTP_TOKEN_FIX,
    SDR_PATH,
    RKE2Version,
    accepts_sdr_path,
    has_runtime_token_fix,
    honours_default_endpoint_tls,
    uses_hosts_toml,
)


@dataclass(frozen=True)
class NodeConfig:
    """What `registries-yaml` writes for one TARGET.

    `source_registries`: the registries the images come from (docker.io always);
    `namespaces`: per source registry, the first path components of its repositories (rewrite
    rules are written for those only; default `rancher` for docker.io).
    """

    target: RegistryURL
    source_registries: tuple[str, ...] = (DOCKER_HUB,)
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    node_ca_file: str | None = None
    insecure_skip_verify: bool = False
    auth: Credentials | None = None
    system_default_registry: bool = True
    rke2_version: RKE2Version | None = None
    disable_default_endpoint: bool = False  # config.yaml disable-default-registry-endpoint: true
    embedded_registry: bool = False  # config.yaml embedded-registry: true (Spegel)

    @classmethod
    def for_images(cls, target: RegistryURL, images: Iterable[ImageRef], **kw) -> "NodeConfig":
        regs: dict[str, set[str]] = {DOCKER_HUB: set()}
        for ref in images:
            regs.setdefault(ref.registry, set()).add(_namespace(ref.repository))
        return cls(target, tuple(regs), {r: tuple(sorted(ns)) for r, ns in regs.items() if ns}, **kw)

    @property
    def sdr_path(self) -> bool:
        """Is system-default-registry written as HOST/PREFIX (a prefix, and a version known to accept it)?"""
        return bool(self.system_default_registry and self.target.prefix and accepts_sdr_path(self.rke2_version))

    @property
    def system_default_registry_value(self) -> str | None:
        """What config.yaml's `system-default-registry` is set to (None: removed)."""
        if not self.system_default_registry:
            return None
        return f"{self.target.host}/{self.target.prefix}" if self.sdr_path else self.target.host

    def config_updates(self) -> dict:
        """The config.yaml keys to set (None: remove); keys of options not given are left alone."""
        out: dict = {SDR_KEY: self.system_default_registry_value}
        if self.disable_default_endpoint:
            out[DISABLE_DEFAULT_ENDPOINT_KEY] = True
        if self.embedded_registry:
            out[EMBEDDED_REGISTRY_KEY] = True
        return out

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint written for TARGET: its scheme and host[:port], with an explicit :443 when
        the registry's own mirror entry must not be mistaken for its default endpoint."""
        host = self.target.host
        if self.target.scheme == "https" and ":" not in host.rsplit("]", 1)[-1] and self._needs_port_443():
            host += ":443"
        return Endpoint(self.target.scheme, host)

    def _needs_port_443(self) -> bool:
        v = self.rke2_version
        if self.target.prefix and self.system_default_registry and not self.sdr_path:
            return True  # rewrites never reach the default endpoint on hosts.toml releases
        tls_needed = bool(self.node_ca_file or self.insecure_skip_verify)
        return tls_needed and v is not None and not honours_default_endpoint_tls(v)

    def namespaces_of(self, registry: str) -> tuple[str, ...]:
        return self.namespaces.get(registry) or (("rancher",) if registry == DOCKER_HUB else ())


def _namespace(repository: str) -> str:
    first, sep, _ = repository.partition("/")
    return first if sep else repository + "$"


def _go_quote(text: str) -> str:
    return re.sub(r"([.\\+*?()|\[\]{}^$])", r"\\\1", text)


def rewrite_rules(prefix: str, namespaces: Iterable[str]) -> dict[str, str]:
    """`^rancher/(.*)` -> `PREFIX/rancher/$1` for each namespace (`name$`: a one-component repository)."""
    rules = {}
    for ns in sorted(set(namespaces)):
        if ns.endswith("$"):
            rules[f"^{_go_quote(ns[:-1])}$"] = f"{prefix}/{ns[:-1]}"
        else:
            rules[f"^{_go_quote(ns)}/(.*)$"] = f"{prefix}/{ns}/$1"
    return rules


def render_registries_yaml(target: RegistryURL, source_registries: Iterable[str] = (DOCKER_HUB,), *,
                           node_ca_file: str | None = None, insecure_skip_verify: bool = False,
                           auth: Credentials | None = None, system_default_registry: bool = True,
                           rke2_version: RKE2Version | None = None, existing: Mapping | None = None,
                           namespaces: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, list[str]]:
    """registries.yaml text for TARGET, and the warnings to show.  Raises InputError when the
    combination cannot work on `rke2_version` (a plain-http token-auth SDR before rke2#4308's fix)."""
    regs = tuple(dict.fromkeys([DOCKER_HUB, *source_registries]))
    cfg = NodeConfig(target, regs, dict(namespaces or {}), node_ca_file, insecure_skip_verify, auth,
                     system_default_registry, rke2_version)
    doc, warnings = build_registries(cfg, existing)
    return dump_registries(doc, cfg), warnings


def build_registries(cfg: NodeConfig, existing: Mapping | None = None,
                     origin: str = "existing registries.yaml") -> tuple[dict, list[str]]:
    """The registries.yaml document (a plain dict) for `cfg`, merged into `existing` (read from `origin`,
    the name its errors give) if given."""
    warnings = check_node_config(cfg)
    ep = cfg.endpoint
    mirrors: dict[str, dict] = {}
    for reg in cfg.source_registries:
        mirrors[reg] = _mirror_entry(ep, cfg, cfg.namespaces_of(reg))
    own = cfg.target.host
    # with a path in system-default-registry the node already asks for HOST/PREFIX/rancher/x: no rewrite there
    mirrors[own] = _mirror_entry(ep, cfg, () if cfg.sdr_path else
                                 cfg.namespaces_of(DOCKER_HUB) if cfg.system_default_registry else _all_namespaces(cfg))
    entry = _config_entry(cfg)
    hosts = dict.fromkeys([ep.host, own])  # both, when the endpoint carries an explicit :443
    configs = {h: dict(entry) for h in hosts} if entry else {}
    if existing is None:
        return {"mirrors": mirrors, **({"configs": configs} if configs else {})}, warnings
    doc, merge_warnings = merge_registries(existing, mirrors, configs, origin)
    return doc, warnings + merge_warnings


def _all_namespaces(cfg: NodeConfig) -> tuple[str, ...]:
    out: set[str] = set()
    for reg in cfg.source_registries:
        out.update(cfg.namespaces_of(reg))
    return tuple(sorted(out))


def _mirror_entry(ep: Endpoint, cfg: NodeConfig, namespaces: tuple[str, ...]) -> dict:
    entry: dict = {"endpoint": [ep.base_url]}
    if cfg.target.prefix and namespaces:
        entry["rewrite"] = rewrite_rules(cfg.target.prefix, namespaces)
    return entry


def _config_entry(cfg: NodeConfig) -> dict:
    entry: dict = {}
    if cfg.auth is not None:
        a = cfg.auth
        entry["auth"] = ({"identity_token": a.identity_token} if a.identity_token and not a.password
                         else {"username": a.username, "password": a.password})
    if cfg.target.scheme == "https":
        if cfg.node_ca_file:
            entry["tls"] = {"ca_file": cfg.node_ca_file}
        elif cfg.insecure_skip_verify:
            entry["tls"] = {"insecure_skip_verify": True}
    return entry


def check_node_config(cfg: NodeConfig) -> list[str]:
    """Warnings for `cfg`; InputError for a combination that fails on its known RKE2 version."""
    t, v = cfg.target, cfg.rke2_version
    warnings: list[str] = []
    if cfg.node_ca_file and cfg.insecure_skip_verify:
        raise InputError("give either --node-ca-file or --insecure-skip-verify, not both")
    if t.scheme == "http" and (cfg.node_ca_file or cfg.insecure_skip_verify):
        warnings.append(f"{t} is plain http: --node-ca-file / --insecure-skip-verify are ignored")
    if cfg.node_ca_file and not cfg.node_ca_file.startswith("/"):
        warnings.append(f"--node-ca-file {cfg.node_ca_file!r} is not absolute: it is read as a path on each node")
    if t.scheme == "http" and cfg.auth is not None:
        warnings.append(f"credentials for {t.host} travel in clear text over http")
    if cfg.system_default_registry and t.scheme == "http":
        if v is not None and not has_runtime_token_fix(v):
            raise InputError(
                f"RKE2 {v} cannot use the plain-http registry {t.host} as system-default-registry if it uses token "
                f"auth (Harbor does): RKE2 pulls its runtime image itself and fetches the token over https even for an "
                f"http:// mirror endpoint (rancher/rke2#4308, fixed in {RUNTIME_HTTP_TOKEN_FIX.describe()}). "
                f"Fix: serve the registry over https and pass --node-ca-file PATH (or --insecure-skip-verify), "
                f"or pass --no-system-default-registry to use {t.host} for workload images only")
        if v is None:
            warnings.append(
                f"{t.host} is plain http: system-default-registry works only through the mirror entry for {t.host} "
                f"written here, and not for token-auth registries on RKE2 before {RUNTIME_HTTP_TOKEN_FIX.describe()} "
                f"(rancher/rke2#4308); https (with --node-ca-file) is the robust choice")
    for flag, gate, key, wanted in (
            ("--disable-default-endpoint", DISABLE_DEFAULT_ENDPOINT, DISABLE_DEFAULT_ENDPOINT_KEY, cfg.disable_default_endpoint),
            ("--embedded-registry", EMBEDDED_REGISTRY, EMBEDDED_REGISTRY_KEY, cfg.embedded_registry)):
        if not wanted:
            continue
        if v is not None and not gate.holds(v):
            raise InputError(f"{flag}: RKE2 {v} has no `{key}` (from {gate.describe()}); upgrade or drop {flag}")
        if v is None:
            warnings.append(f"{flag}: `{key}` exists only from RKE2 {gate.describe()} (the version is unknown)")
    if cfg.embedded_registry:
        warnings.append(f"`{EMBEDDED_REGISTRY_KEY}: true` is a server option: put that config.yaml on the server nodes "
                        "only (an agent does not start with it, k3s-io/k3s discussion #9751); every node needs the "
                        "registries.yaml, whose mirrors entries choose what peers share")
    if cfg.sdr_path:
        warnings.append(
            f"system-default-registry written as {cfg.system_default_registry_value} (RKE2 {v} accepts a path: "
            f"rancher/rke2#9404, from {SDR_PATH.describe()}); rancher/rke2#10822: releases before the August 2026 "
            f"fixes prepend the path again on each restart (duplicate image tags)")
    elif cfg.system_default_registry and t.prefix:
        warnings.append(
            f"system-default-registry is set to {t.host} without the path {t.prefix!r}: RKE2 "
            + (f"{v} accepts host[:port] only" if v is not None else "accepts a path only from "
               f"{SDR_PATH.describe()} (rancher/rke2#9404; the version is unknown)")
            + " (rancher/rke2#768); the prefix is applied by the rewrite rules (RKE2 v1.20.6 and later, rancher/rke2#741)")
        if t.scheme == "https" and ":" in t.host.rsplit("]", 1)[-1] and not t.host.endswith(":443"):
            msg = (f"the mirror entry for {t.host} uses the same URL as its default endpoint https://{t.host}/v2, and from "
                   f"the February 2024 releases ({HOSTS_TOML.describe()}) containerd applies no rewrite there "
                   f"(rancher/rke2#6889): system images would be looked up without {t.prefix!r}. Copy them without a "
                   f"prefix, serve the registry on port 443, or pass --no-system-default-registry")
            if v is None:
                warnings.append(msg)
            elif uses_hosts_toml(v):
                raise InputError(f"RKE2 {v}: {msg}")
        if t.host.endswith(":443") or ":" not in t.host.rsplit("]", 1)[-1]:
            for ns in cfg.namespaces_of(DOCKER_HUB):
                if t.prefix == ns or t.prefix.startswith(ns + "/"):
                    warnings.append(f"the prefix {t.prefix!r} begins with the namespace {ns!r}: names that already "
                                    f"include the prefix would be rewritten twice on {t.host}")
    if cfg.endpoint.host != t.host:
        warnings.append(f"endpoint written as {cfg.endpoint.base_url} (explicit port) so that RKE2 treats it as a "
                        f"mirror endpoint, not as {t.host}'s default endpoint")
    return warnings


def merge_registries(existing: Mapping, mirrors: Mapping[str, dict], configs: Mapping[str, dict],
                     origin: str = "existing registries.yaml") -> tuple[dict, list[str]]:
    """`existing` (read from `origin`) with our mirrors (replacing same-named entries) and configs (our `auth`
    and trust setting replace theirs; a client certificate and other keys are kept); every other entry is kept."""
    parsed = Registries.from_dict(existing, origin)  # validate before touching it
    warnings: list[str] = []
    ignored = parsed.ignored_warning(origin)
    if ignored:
        warnings.append(ignored + " (kept as they are)")
    doc = dict(existing)
    old_m = dict(doc.get("mirrors") or {})
    for k, v in mirrors.items():
        if k in old_m and old_m[k] != v:
            warnings.append(f"--merge: replaced mirrors.{k!r}")
        old_m[k] = v
    doc["mirrors"] = old_m
    old_c = dict(doc.get("configs") or {})
    for k, v in configs.items():
        merged = dict(old_c.get(k) or {})
        if "tls" in v:  # keep a client certificate; our trust setting replaces theirs
            kept = {f: x for f, x in (merged.get("tls") or {}).items() if f not in ("ca_file", "insecure_skip_verify")}
            v = {**v, "tls": {**kept, **v["tls"]}}
        merged.update(v)
        old_c[k] = merged
    if old_c:
        doc["configs"] = old_c
    return doc, warnings


def registries_have_auth(doc: Mapping) -> bool:
    """Does a registries.yaml document hold credentials (the file must then be mode 0600)?"""
    return any(isinstance(c, Mapping) and c.get("auth") for c in (doc.get("configs") or {}).values())


class _Quoted(str):
    """A string written in double quotes (hosts, URLs, patterns, secrets), as the RKE2 docs do."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Quoted, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", str(v), style='"'))

_STRUCTURAL_KEYS = frozenset({"mirrors", "configs", "endpoint", "rewrite", "auth", "tls", "username", "password",
                              "identity_token", "ca_file", "cert_file", "key_file", "insecure_skip_verify"})


def _dump(doc: Mapping) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096)


def dump_registries(doc: Mapping, cfg: NodeConfig | None = None) -> str:
    head = ["# registries.yaml for RKE2: copy to /etc/rancher/rke2/registries.yaml on every node, then restart rke2."]
    if cfg is not None:
        head.append(f"# Written by rke2-mirror for {cfg.target}"
                    + (f" (RKE2 {cfg.rke2_version})" if cfg.rke2_version else "") + ".")
    return "\n".join(head) + "\n" + _dump(_quoted(doc))


def merged_registries_text(existing_text: str, existing: Mapping, doc: Mapping, origin: str) -> str | None:
    """`existing_text` (the --merge file) with the entries of `doc` (merge_registries' result) that differ
    from `existing` set in place: its comments, its order and its other entries kept (a ruamel.yaml round
    trip; the text passed yamlsafe's bounds when `existing` was read).  None when the file has no document
    to keep (empty, or only comments): then it is written anew."""
    if not existing:
        return None
    import io

    from ruamel.yaml.error import YAMLError as RuamelError

    rt = _round_tripper(existing_text)
    try:
        out_doc = rt.load(existing_text)
        for section in ("mirrors", "configs"):
            new = doc.get(section) or {}
            old = existing.get(section) or {}
            changed = {k: v for k, v in new.items() if old.get(k) != v}
            if not changed:
                continue
            if not isinstance(out_doc.get(section), Mapping):
                out_doc[section] = {}
            for k, v in changed.items():
                out_doc[section][_rt_quoted(k, key=True)] = _rt_quoted(v)
        out = io.StringIO()
        rt.dump(out_doc, out)
    except (RuamelError, ValueError, TypeError, RecursionError, AttributeError) as exc:
        raise InputError(f"{origin}: cannot be merged keeping its comments ({exc.__class__.__name__})") from None
    text = out.getvalue()
    return text if text.endswith("\n") else text + "\n"


def _rt_quoted(value, key: bool = False):
    """`_quoted` for a ruamel.yaml round trip: hosts, URLs, patterns and secrets in double quotes."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, Mapping):
        return {_rt_quoted(k, key=True): _rt_quoted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rt_quoted(v) for v in value]
    if isinstance(value, str):
        return str(value) if key and value in _STRUCTURAL_KEYS else DoubleQuotedScalarString(value)
    return value


def _quoted(value):
    if isinstance(value, Mapping):
        return {(str(k) if k in _STRUCTURAL_KEYS else _Quoted(k)): _quoted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_quoted(v) for v in value]
    if isinstance(value, str):
        return _Quoted(value)
    return value


# --------------------------------------------------------------------------------------------
# config.yaml


SDR_KEY = "system-default-registry"
DISABLE_DEFAULT_ENDPOINT_KEY = "disable-default-registry-endpoint"
EMBEDDED_REGISTRY_KEY = "embedded-registry"


def set_system_default_registry(config_text: str, host: str | None, origin: str = "config.yaml") -> str:
    """config.yaml with `system-default-registry: host` (None: the key removed); every other key, the order
    of keys and the comments kept (a ruamel.yaml round trip).  The text is first parsed within `yamlsafe`'s
    bounds (size, depth, alias expansion), so only a document that passed them reaches ruamel.  Unchanged
    text when the key already says so."""
    return update_config_yaml(config_text, {SDR_KEY: host}, origin)


def update_config_yaml(config_text: str, updates: Mapping[str, object], origin: str = "config.yaml") -> str:
    """config.yaml with each key of `updates` set to its value (None: the key removed), every other key, the
    order of keys and the comments kept; unchanged text when the file already says so."""
    doc = load_yaml_mapping(config_text, origin)  # bounded; InputError naming `origin`
    todo = {k: val for k, val in updates.items()
            if (k in doc if val is None else not (k in doc and doc[k] == val and type(doc[k]) is type(val)))}
    if not todo:
        return config_text
    if not doc and all(val is not None for val in todo.values()):
        # empty, or only comments (ruamel gives no document to attach the key to): append the keys
        body = config_text if not config_text or config_text.endswith("\n") else config_text + "\n"
        return body + _dump({k: _Quoted(val) if isinstance(val, str) else val for k, val in todo.items()})
    return _round_trip_set(config_text, todo, origin)


def _round_trip_set(config_text: str, updates: Mapping[str, object], origin: str) -> str:
    import io

    from ruamel.yaml.error import YAMLError as RuamelError
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    rt = _round_tripper(config_text)
    try:
        doc = rt.load(config_text)
        for key, value in updates.items():
            if value is None:
                doc.pop(key, None)
            else:  # replaced in place, or appended
                doc[key] = DoubleQuotedScalarString(value) if isinstance(value, str) else value
        out = io.StringIO()
        rt.dump(doc, out)
    except (RuamelError, ValueError, TypeError, RecursionError) as exc:
        raise InputError(f"{origin}: cannot be rewritten keeping its comments ({exc.__class__.__name__})") from None
    text = out.getvalue()
    return "" if text.strip() in ("", "{}") else text


def _round_tripper(text: str):
    """A ruamel.yaml round trip for `text` (already read within yamlsafe's bounds): quotes, comments and
    the indentation of its lists kept."""
    from ruamel.yaml import YAML

    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.allow_duplicate_keys = True
    rt.width = 4096
    offset = _sequence_offset(text)
    rt.indent(mapping=2, sequence=offset + 2, offset=offset)
    return rt


_SEQ_UNDER_KEY = re.compile(r"^(?P<key>[ ]*)[^\s#-][^\n]*:[ \t]*(?:#[^\n]*)?\n(?:[ ]*#[^\n]*\n)*(?P<dash>[ ]*)- ", re.M)


def _sequence_offset(text: str) -> int:
    """How far the file indents a block list's dashes under their key (`tls-san:\n  - a` is 2), so that the
    lists of a rewritten file keep their look."""
    m = _SEQ_UNDER_KEY.search(text)
    if not m:
        return 0
    return max(0, min(8, len(m["dash"]) - len(m["key"])))


def default_endpoint_disabled(config_text: str, origin: str = "config.yaml") -> bool:
    """config.yaml `disable-default-registry-endpoint: true` (k3s/RKE2 February 2024 releases on)."""
    return load_yaml_mapping(config_text, origin).get(DISABLE_DEFAULT_ENDPOINT_KEY) is True


def embedded_registry_enabled(config_text: str, origin: str = "config.yaml") -> bool:
    """config.yaml `embedded-registry: true` (the embedded registry mirror, Spegel)."""
    return load_yaml_mapping(config_text, origin).get(EMBEDDED_REGISTRY_KEY) is True


def system_default_registry_of(config_text: str, origin: str = "config.yaml") -> str | None:
    """The `system-default-registry` of a config.yaml, if set (RKE2 also reads `config.yaml.d/*.yaml`,
    later files winning; the CLI passes their concatenated view)."""
    value = load_yaml_mapping(config_text, origin).get(SDR_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"{origin}: {SDR_KEY} must be a string host[:port][/path]")
    return value.strip()
