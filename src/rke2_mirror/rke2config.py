"""The node side of RKE2: writing `registries.yaml` / `config.yaml`, and resolving an image the way
an RKE2 node would.  Pure: no I/O (the CLI reads and writes files, `nodecheck` talks to registries).

The model (sources in brackets; see /work/shared/RKE2-REGISTRIES.md):

Names
  `system-default-registry` (SDR) replaces the registry of every `docker.io/...` image of a release
  list: RKE2 renders its static pods, the runtime image and its charts as `SDR/rancher/x:t`
  (rke2 `pkg/images`: `override(docker.io, SDR) + "/rancher/..."`; charts prefix
  `global.systemDefaultRegistry`).  Images already named with another registry are left alone; the
  release lists contain only docker.io images in practice.  SDR takes `host[:port]` only
  (rancher/rke2#768); a path there is disputed (rancher/rke2#9404 merged against the maintainers'
  objection; rancher/rke2#10822) and no release is known to accept it, so the writer never puts one
  there and `verify`, given one, prefixes it and says so.

Two pullers
  * `rke2-runtime` (`rancher/rke2-runtime`, the first image) is pulled by RKE2 itself through
    rancher/wharfie + go-containerregistry before containerd runs.  Current wharfie (since
    2021-11, "Refactor registries package to support multiple endpoints") tries every endpoint of
    the mirror entry in order, then the registry's default endpoint (the seed's v1.22.8 log shows
    exactly mirror-then-default); rancher/rke2#1246 described the older first-endpoint-only code.
    TLS and auth come from `configs` keyed by the endpoint's host (wharfie `getTLSConfig`).  Before
    the fix of rancher/rke2#4308 (v1.24.15, v1.25.11, v1.26.6, v1.27.3; never on <= 1.23) a
    token-auth registry behind an `http://` endpoint has its token fetched over https: the pull
    fails (the seed: v1.22.8 + Harbor over http).
  * `containerd` pulls everything else, with the hosts configuration RKE2 renders: the mirror's
    endpoints in order, then the default endpoint (`https://index.docker.io/v2` for docker.io,
    `https://HOST/v2` otherwise).  Since the move to containerd `hosts.toml` (February 2024:
    v1.26.13, v1.27.10, v1.28.6, v1.29.1; k3s-io/k3s#5568) a *last* mirror endpoint equal to the
    default endpoint *is* the default endpoint (k3s `getHostConfigs`), rewrites never apply to the
    default endpoint (rancher/rke2#6889, k3s-io/k3s#11191), and its TLS `configs` were ignored
    until v1.27.13 / v1.28.9 / v1.29.4 (rancher/rke2#5658; never fixed on 1.26).  Before that
    (legacy CRI registry config) `configs` applied by host to every endpoint: the seed's second
    experiment (https + `insecure_skip_verify`, v1.22.8) worked.  The documented way to keep the
    registry's own host as a *mirror* endpoint is an explicit port (`https://HOST:443`).

Entries
  A `"*"` mirror entry is used only where no specific one exists, from v1.26.15 / v1.27.12 /
  v1.28.8 / v1.29.3 (k3s-io/k3s#9341, #9556), which also added `configs."*"`.  An endpoint without a
  scheme means https (this model ignores the "localhost with a port means http" special case of
  containerd, wharfie and go-containerregistry: a registry on a node's own loopback is not a
  deployment; an attempt on a loopback host carries a note instead).  Bare-host endpoints were
  broken before the February 2024 releases (k3s-io/k3s#9322, rancher/rke2#5516).  `rewrite` rules
  are RE2 regular expressions on the repository (never the tag), first matching rule wins (order
  undefined in RKE2: rancher/rke2#3227), available since v1.20.6 (rancher/rke2#741, #865).  A mirror
  endpoint on another host gets the original registry as the `ns` query parameter.

Version gates
  A version is `vMAJOR.MINOR.PATCH[-rcN][+rke2rN]`; a gate lists the first patch of each release
  line that has the behaviour; later lines have it, earlier lines do not.  When the version is
  unknown the model follows the current releases (every line still supported behaves that way)
  and says, in a note, where older releases differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

from .auth import Credentials
from .errors import InputError
from .reference import DOCKER_HUB, ImageRef, RegistryURL

RUNTIME_REPOSITORY = "rancher/rke2-runtime"
DOCKER_HUB_DEFAULT_HOST = "index.docker.io"  # RKE2 docs: the default endpoint for docker.io
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
WILDCARD = "*"

# --------------------------------------------------------------------------------------------
# Versions and gates


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-(rc\d+|alpha\d+|beta\d+))?(?:[+-]rke2r(\d+))?$")


@dataclass(frozen=True, order=True)
class RKE2Version:
    """`v1.28.9+rke2r1` (or the image-tag form `v1.28.9-rke2r1`, or `1.28.9`)."""

    major: int
    minor: int
    patch: int
    pre: str = ""
    rke2r: int = 0

    @classmethod
    def parse(cls, text: str) -> "RKE2Version":
        m = _VERSION_RE.match(text.strip())
        if not m:
            raise InputError(f"invalid RKE2 version {text!r}: expected vMAJOR.MINOR.PATCH[+rke2rN], e.g. v1.28.9+rke2r1")
        major, minor, patch, pre, rke2r = m.groups()
        return cls(int(major), int(minor), int(patch), pre or "", int(rke2r or 0))

    @classmethod
    def try_parse(cls, text: str | None) -> "RKE2Version | None":
        if not text:
            return None
        try:
            return cls.parse(text)
        except InputError:
            return None

    @property
    def line(self) -> tuple[int, int]:
        return (self.major, self.minor)

    def __str__(self) -> str:
        out = f"v{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            out += f"-{self.pre}"
        if self.rke2r:
            out += f"+rke2r{self.rke2r}"
        return out


@dataclass(frozen=True)
class Gate:
    """A behaviour introduced in the given patch releases (`{minor: first patch}` of 1.x lines).

    Lines newer than the newest listed have it; lines older than that and not listed never got it.
    A release candidate counts as its release (the fixes were validated on the RCs).
    """

    name: str
    since: Mapping[int, int]

    def holds(self, v: RKE2Version) -> bool:
        if v.major != 1:
            return v.major > 1
        if v.minor in self.since:
            return v.patch >= self.since[v.minor]
        return v.minor > max(self.since)

    def describe(self) -> str:
        return " / ".join(f"v1.{m}.{p}" for m, p in sorted(self.since.items()))


RUNTIME_HTTP_TOKEN_FIX = Gate("rke2#4308: runtime-image token fetched over http for http endpoints",
                              {24: 15, 25: 11, 26: 6, 27: 3})
WILDCARD_MIRRORS = Gate('"*" mirror and configs entries', {26: 15, 27: 12, 28: 8, 29: 3})
HOSTS_TOML = Gate("containerd hosts.toml registry configuration", {26: 13, 27: 10, 28: 6, 29: 1})
DEFAULT_ENDPOINT_TLS_FIX = Gate("rke2#5658: TLS configs honoured for the default endpoint", {27: 13, 28: 9, 29: 4})


def has_runtime_token_fix(v: RKE2Version | None) -> bool:
    return v is None or RUNTIME_HTTP_TOKEN_FIX.holds(v)


def honours_wildcard(v: RKE2Version | None) -> bool:
    return v is None or WILDCARD_MIRRORS.holds(v)


def uses_hosts_toml(v: RKE2Version | None) -> bool:
    return v is None or HOSTS_TOML.holds(v)


def honours_default_endpoint_tls(v: RKE2Version | None) -> bool:
    """containerd: are `configs.HOST.tls` applied to the registry's own default endpoint?"""
    return v is None or not HOSTS_TOML.holds(v) or DEFAULT_ENDPOINT_TLS_FIX.holds(v)


def version_from_images(images: Iterable[ImageRef]) -> RKE2Version | None:
    """The release an image list belongs to, read from its `rancher/rke2-runtime` tag."""
    for ref in images:
        if ref.repository == RUNTIME_REPOSITORY and ref.tag:
            v = RKE2Version.try_parse(ref.tag.split("-windows")[0])
            if v:
                return v
    return None


# --------------------------------------------------------------------------------------------
# registries.yaml, parsed


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)  # base64 user:password
    identity_token: str = field(default="", repr=False)

    def credentials(self) -> Credentials:
        user, pw = self.username, self.password
        if self.auth and not (user or pw):
            import base64
            try:
                user, _, pw = base64.b64decode(self.auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InputError("registries.yaml: an auth.auth value is not base64 user:password") from None
        return Credentials(user, pw, self.identity_token)


@dataclass(frozen=True)
class RegistryConfig:
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None


@dataclass(frozen=True)
class Mirror:
    endpoints: tuple[str, ...] = ()
    rewrites: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Registries:
    mirrors: Mapping[str, Mirror] = field(default_factory=dict)
    configs: Mapping[str, RegistryConfig] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Mapping | None, origin: str = "registries.yaml") -> "Registries":
        """Validate the document as RKE2 reads it (unknown keys are ignored, as RKE2 does)."""
        doc = doc or {}
        if not isinstance(doc, Mapping):
            raise InputError(f"{origin}: expected a mapping with `mirrors` and `configs`")
        mirrors = {str(k): _parse_mirror(v, f"{origin}: mirrors.{k}") for k, v in _mapping(doc.get("mirrors"), origin, "mirrors").items()}
        configs = {str(k): _parse_config(v, f"{origin}: configs.{k}") for k, v in _mapping(doc.get("configs"), origin, "configs").items()}
        return cls(mirrors, configs)

    @classmethod
    def parse(cls, text: str, origin: str = "registries.yaml") -> "Registries":
        return cls.from_dict(load_yaml_mapping(text, origin), origin)


def _mapping(value, origin: str, what: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{origin}: `{what}` must be a mapping")
    return value


def _parse_mirror(value, where: str) -> Mirror:
    value = value or {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: must be a mapping with `endpoint`")
    eps = value.get("endpoint") or []
    if isinstance(eps, str) or not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
        raise InputError(f"{where}.endpoint: must be a list of URLs")
    rw = value.get("rewrite") or {}
    if not isinstance(rw, Mapping):
        raise InputError(f"{where}.rewrite: must be a mapping of pattern: replacement")
    return Mirror(tuple(eps), tuple((str(k), str(v)) for k, v in rw.items()))


def _parse_config(value, where: str) -> RegistryConfig:
    value = value or {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: must be a mapping with `auth` and/or `tls`")
    tls = auth = None
    if value.get("tls") is not None:
        t = value["tls"]
        if not isinstance(t, Mapping):
            raise InputError(f"{where}.tls: must be a mapping")
        insecure = t.get("insecure_skip_verify", False)
        if not isinstance(insecure, bool):
            raise InputError(f"{where}.tls.insecure_skip_verify: must be true or false")
        tls = TLSConfig(t.get("ca_file") or None, insecure, t.get("cert_file") or None, t.get("key_file") or None)
    if value.get("auth") is not None:
        a = value["auth"]
        if not isinstance(a, Mapping):
            raise InputError(f"{where}.auth: must be a mapping")
        auth = AuthConfig(str(a.get("username") or ""), str(a.get("password") or ""), str(a.get("auth") or ""),
                          str(a.get("identity_token") or a.get("identitytoken") or ""))
    return RegistryConfig(tls, auth)


def load_yaml_mapping(text: str, origin: str) -> dict:
    """A YAML document that must be a mapping (empty -> {}); errors never echo the content."""
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise InputError(f"{origin}: not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{origin}: expected a YAML mapping at the top level")
    return doc


# --------------------------------------------------------------------------------------------
# Endpoint resolution (the node's view)


@dataclass(frozen=True)
class Endpoint:
    """A normalized endpoint URL: scheme, host[:port], API path (`/v2` unless overridden)."""

    scheme: str
    host: str
    path: str = "/v2"
    scheme_given: bool = True

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        raw = text.strip()
        given = "://" in raw
        parts = urlsplit(raw if given else "//" + raw)
        if not parts.netloc:
            raise InputError(f"invalid endpoint {text!r}: no host")
        scheme = (parts.scheme or "https").lower()
        if scheme not in ("http", "https"):
            raise InputError(f"invalid endpoint {text!r}: scheme must be http or https")
        path = parts.path
        path = "/v2" if path in ("", "/", "/v2", "/v2/") else path.rstrip("/")
        return cls(scheme, parts.netloc.lower(), path, given)

    @classmethod
    def default_for(cls, registry: str) -> "Endpoint":
        return cls("https", DOCKER_HUB_DEFAULT_HOST if registry == DOCKER_HUB else registry)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Attempt:
    """One place a node tries, in order.

    `config_key` names the `configs` entry applied (None: system trust, anonymous); `tls` / `auth`
    are what the node uses; `token_over_https` marks rancher/rke2#4308 (the pull fails if the
    registry answers with a Bearer challenge); `ns` is the query parameter a mirror gets.
    """

    puller: str
    registry: str  # the registry of the name the node asks for
    endpoint: Endpoint
    repository: str
    reference: str
    default: bool = False
    mirror_key: str | None = None
    config_key: str | None = None
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    ns: str | None = None
    token_over_https: bool = False
    notes: tuple[str, ...] = ()

    @property
    def manifest_url(self) -> str:
        """The manifest URL the node asks for."""
        return f"{self.endpoint.url}/{self.repository}/manifests/{self.reference}"


def node_image(image: ImageRef, system_default_registry: str | None) -> ImageRef:
    """The name a node asks for: `docker.io/X` becomes `SDR/X` (a path in SDR is prefixed too)."""
    if not system_default_registry or image.registry != DOCKER_HUB:
        return image
    host, _, path = system_default_registry.strip().strip("/").partition("/")
    repo = f"{path}/{image.repository}" if path else image.repository
    return ImageRef(host.lower(), repo, image.tag, image.digest)


def puller_for(image: ImageRef) -> str:
    """`rke2-runtime` for the runtime image (RKE2's own client), `containerd` for the rest."""
    return "rke2-runtime" if image.repository.endswith(RUNTIME_REPOSITORY) else "containerd"


def resolve_endpoints(image: ImageRef, registries_yaml: Mapping | Registries | None,
                      system_default_registry: str | None, rke2_version: RKE2Version | None,
                      puller: str | None = None, *, disable_default_endpoint: bool = False) -> list[Attempt]:
    """Where a node looks for `image` (a release-list name), in order, as RKE2 `rke2_version` does.

    `puller`: "containerd" or "rke2-runtime"; default: from the image (`puller_for`).
    `disable_default_endpoint`: config.yaml `disable-default-registry-endpoint` (containerd only, for
    registries with a mirror entry, from v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1).
    """
    regs = registries_yaml if isinstance(registries_yaml, Registries) else Registries.from_dict(registries_yaml)
    puller = puller or puller_for(image)
    if puller not in ("containerd", "rke2-runtime"):
        raise ValueError(f"unknown puller {puller!r}")
    name = node_image(image, system_default_registry)
    notes: list[str] = []
    if system_default_registry and "/" in system_default_registry.strip().strip("/"):
        notes.append("system-default-registry has a path: no RKE2 release is known to accept one "
                     "(rancher/rke2#768, #9404, #10822)")
    key, mirror = _find_mirror(regs, name.registry, rke2_version, notes)
    default = Endpoint.default_for(name.registry)
    mirror_eps: list[Endpoint] = []
    for raw in mirror.endpoints if mirror else ():
        try:
            mirror_eps.append(Endpoint.parse(raw))
        except InputError as exc:
            notes.append(f"endpoint ignored by RKE2: {exc}")
    merge_default = puller == "containerd" and uses_hosts_toml(rke2_version)
    attempts: list[Attempt] = []
    default_from_mirror: Endpoint | None = None
    for i, ep in enumerate(mirror_eps):
        if merge_default and i == len(mirror_eps) - 1 and ep == _same_as_default(ep, default):
            default_from_mirror = ep
            continue
        if any(a.endpoint == ep for a in attempts):
            continue
        attempts.append(_attempt(puller, name, ep, regs, rke2_version, mirror, key, False, notes))
    no_default = (disable_default_endpoint and puller == "containerd" and mirror is not None
                  and uses_hosts_toml(rke2_version) and default_from_mirror is None)
    if no_default:
        return attempts
    if not any(a.endpoint == default and a.repository == name.repository for a in attempts):
        attempts.append(_attempt(puller, name, default, regs, rke2_version, None, key, True, notes,
                                 merged=default_from_mirror is not None))
    return attempts


def _same_as_default(ep: Endpoint, default: Endpoint) -> Endpoint | None:
    return ep if (ep.scheme, ep.host, ep.path) == (default.scheme, default.host, default.path) else None


def _find_mirror(regs: Registries, registry: str, version: RKE2Version | None,
                 notes: list[str]) -> tuple[str | None, Mirror | None]:
    keys = [registry] + ([h for h in _DOCKER_HUB_HOSTS if h != registry] if registry == DOCKER_HUB else [])
    for k in keys:
        if k in regs.mirrors:
            return k, regs.mirrors[k]
    if WILDCARD in regs.mirrors:
        if not honours_wildcard(version):
            notes.append(f'mirrors."*" ignored: RKE2 {version} predates "*" entries ({WILDCARD_MIRRORS.describe()})')
            return None, None
        if version is None:
            notes.append(f'mirrors."*" used: honoured only from {WILDCARD_MIRRORS.describe()}')
        return WILDCARD, regs.mirrors[WILDCARD]
    return None, None


def _find_config(regs: Registries, host: str, version: RKE2Version | None) -> tuple[str | None, RegistryConfig | None]:
    keys = [host] + ([h for h in _DOCKER_HUB_HOSTS if h != host] if host in _DOCKER_HUB_HOSTS else [])
    for k in keys:
        if k in regs.configs:
            return k, regs.configs[k]
    if WILDCARD in regs.configs and honours_wildcard(version):
        return WILDCARD, regs.configs[WILDCARD]
    return None, None


def _attempt(puller: str, name: ImageRef, ep: Endpoint, regs: Registries, version: RKE2Version | None,
             mirror: Mirror | None, mirror_key: str | None, is_default: bool, shared_notes: list[str],
             merged: bool = False) -> Attempt:
    notes = list(shared_notes)
    repo = name.repository
    if mirror is not None:
        repo, rw_notes = apply_rewrites(repo, mirror.rewrites)
        notes += rw_notes
    cfg_key, cfg = _find_config(regs, ep.host, version)
    tls = cfg.tls if cfg else None
    auth = cfg.auth if cfg else None
    if merged:
        notes.append(f"the last mirror endpoint equals the default endpoint {ep.url}: containerd uses it as the "
                     "default endpoint, without rewrites (hosts.toml, k3s getHostConfigs)")
    if is_default and puller == "containerd" and tls is not None and ep.scheme == "https":
        if not honours_default_endpoint_tls(version):
            notes.append(f"configs.{cfg_key!r}.tls ignored on the default endpoint by RKE2 {version} (rancher/rke2#5658); "
                         f"use a mirror endpoint with an explicit port, e.g. https://{ep.host}:443")
            tls = None
        elif version is None:
            notes.append(f"TLS configs reach the default endpoint only outside the hosts.toml releases before "
                         f"{DEFAULT_ENDPOINT_TLS_FIX.describe()} (rancher/rke2#5658)")
    if not ep.scheme_given:
        notes.append("endpoint without a scheme: https assumed; bare-host endpoints were broken before the "
                     "February 2024 releases (k3s-io/k3s#9322): write the scheme")
    if _is_loopback(ep.host):
        notes.append("loopback registry: on a node, containerd and recent RKE2 treat localhost with a port as http")
    token_over_https = puller == "rke2-runtime" and ep.scheme == "http" and not has_runtime_token_fix(version)
    if puller == "rke2-runtime" and ep.scheme == "http" and version is None:
        notes.append(f"before {RUNTIME_HTTP_TOKEN_FIX.describe()} RKE2 fetches a token-auth registry's token over "
                     "https for this http endpoint (rancher/rke2#4308)")
    ns = name.registry if (not is_default and ep.host != name.registry) else None
    return Attempt(puller, name.registry, ep, repo, name.reference, is_default, mirror_key, cfg_key, tls, auth, ns,
                   token_over_https, tuple(dict.fromkeys(notes)))


def _is_loopback(host: str) -> bool:
    h = urlsplit("//" + host).hostname or host
    return h == "localhost" or h.startswith("127.") or h == "::1"


_UNSUPPORTED_RE2 = re.compile(r"\(\?[=!<]|\\[1-9]")
_GO_TEMPLATE = re.compile(r"\$(?:\$|\{(\w+)\}|(\w+))")


def apply_rewrites(repository: str, rewrites: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    """The repository after the first rewrite rule that changes it (Go `ReplaceAllString`)."""
    notes: list[str] = []
    result = repository
    matched: list[str] = []
    for pattern, template in rewrites:
        if _UNSUPPORTED_RE2.search(pattern):
            notes.append(f"rewrite {pattern!r} ignored: RE2 (Go) has no look-around or back-references")
            continue
        try:
            rx = re.compile(pattern)
        except re.error:
            notes.append(f"rewrite {pattern!r} ignored: invalid regular expression")
            continue
        new = rx.sub(lambda m: _go_expand(template, m), repository)
        if new != repository:
            matched.append(pattern)
            if result == repository:
                result = new
    if len(matched) > 1:
        notes.append(f"several rewrite rules match {repository!r} ({', '.join(matched)}): RKE2 applies one of them, "
                     "in no defined order (rancher/rke2#3227)")
    return result, notes


def _go_expand(template: str, m: re.Match) -> str:
    def one(t: re.Match) -> str:
        if t.group(0) == "$$":
            return "$"
        ref = t.group(1) or t.group(2)
        try:
            value = m.group(int(ref)) if ref.isdigit() else m.group(ref)
        except IndexError:  # Go expands an unknown group to ""
            value = ""
        return value or ""
    return _GO_TEMPLATE.sub(one, template)


# --------------------------------------------------------------------------------------------
# Writing registries.yaml


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

    @classmethod
    def for_images(cls, target: RegistryURL, images: Iterable[ImageRef], **kw) -> "NodeConfig":
        regs: dict[str, set[str]] = {DOCKER_HUB: set()}
        for ref in images:
            regs.setdefault(ref.registry, set()).add(_namespace(ref.repository))
        return cls(target, tuple(regs), {r: tuple(sorted(ns)) for r, ns in regs.items() if ns}, **kw)

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
        if self.target.prefix and self.system_default_registry:
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


def build_registries(cfg: NodeConfig, existing: Mapping | None = None) -> tuple[dict, list[str]]:
    """The registries.yaml document (a plain dict) for `cfg`, merged into `existing` if given."""
    warnings = check_node_config(cfg)
    ep = cfg.endpoint
    mirrors: dict[str, dict] = {}
    for reg in cfg.source_registries:
        mirrors[reg] = _mirror_entry(ep, cfg, cfg.namespaces_of(reg))
    own = cfg.target.host
    mirrors[own] = _mirror_entry(ep, cfg, cfg.namespaces_of(DOCKER_HUB) if cfg.system_default_registry else
                                 _all_namespaces(cfg))
    entry = _config_entry(cfg)
    hosts = dict.fromkeys([ep.host, own])  # both, when the endpoint carries an explicit :443
    configs = {h: dict(entry) for h in hosts} if entry else {}
    if existing is None:
        return {"mirrors": mirrors, **({"configs": configs} if configs else {})}, warnings
    doc, merge_warnings = merge_registries(existing, mirrors, configs)
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
    if cfg.system_default_registry and t.prefix:
        warnings.append(
            f"system-default-registry is set to {t.host} without the path {t.prefix!r}: RKE2 accepts host[:port] only "
            f"(rancher/rke2#768; a path is accepted by no known release, rancher/rke2#9404, #10822); the prefix is "
            f"applied by the rewrite rules (RKE2 v1.20.6 and later, rancher/rke2#741)")
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


def merge_registries(existing: Mapping, mirrors: Mapping[str, dict], configs: Mapping[str, dict]) -> tuple[dict, list[str]]:
    """`existing` with our mirrors (replacing same-named entries) and configs (our `auth` and trust
    setting replace theirs; a client certificate and other keys are kept); every other entry is kept."""
    Registries.from_dict(existing, "existing registries.yaml")  # validate before touching it
    warnings: list[str] = []
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


def set_system_default_registry(config_text: str, host: str | None, origin: str = "config.yaml") -> str:
    """config.yaml with `system-default-registry: host` (None: the key removed); every other key and
    the order of keys kept.  Comments are not kept (PyYAML round trip)."""
    doc = load_yaml_mapping(config_text, origin)
    if host is None:
        doc.pop(SDR_KEY, None)
    else:
        doc[SDR_KEY] = _Quoted(host)  # replaced in place, or appended
    return _dump(doc) if doc else ""


def default_endpoint_disabled(config_text: str, origin: str = "config.yaml") -> bool:
    """config.yaml `disable-default-registry-endpoint: true` (k3s/RKE2 February 2024 releases on)."""
    return load_yaml_mapping(config_text, origin).get("disable-default-registry-endpoint") is True


def system_default_registry_of(config_text: str, origin: str = "config.yaml") -> str | None:
    """The `system-default-registry` of a config.yaml, if set (RKE2 also reads `config.yaml.d/*.yaml`,
    later files winning; the CLI passes their concatenated view)."""
    value = load_yaml_mapping(config_text, origin).get(SDR_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"{origin}: {SDR_KEY} must be a string host[:port]")
    return value.strip()
