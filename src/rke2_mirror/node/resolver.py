"""How an RKE2 node resolves an image: the endpoints it tries, in order, with the TLS and credentials
of each.  Pure: no I/O (`node.verify` talks to registries; `node.writer` writes registries.yaml).

The model (sources in brackets; see /work/shared/RKE2-REGISTRIES.md):

Names
  `system-default-registry` (SDR) replaces the registry of every `docker.io/...` image of a release
  list: RKE2 renders its static pods, the runtime image and its charts as `SDR/rancher/x:t`
  (rke2 `pkg/images`: `override(docker.io, SDR) + "/rancher/..."`; charts prefix
  `global.systemDefaultRegistry`).  Images already named with another registry are left alone; the
  release lists contain only docker.io images in practice.  SDR takes `host[:port]` only
  (rancher/rke2#768) before rancher/rke2#9404, which accepts `host[:port]/path` (a node then asks for
  `SDR/rancher/x:t` with the path; merged against the maintainers' objection; rancher/rke2#10822: the
  path prepended again on restart).  The releases: `node.versions.SDR_PATH`.  The writer puts a path
  there only for a version known to accept it; `verify` prefixes it and, on older or unknown
  versions, says that RKE2 refuses to start with it.

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
  `node.versions`: `RKE2Version`, and a `Gate` per behaviour above, with the releases that have it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import DOCKER_HUB, ImageRef
from rke2_mirror.node.registries import (
    WILDCARD,
    AuthConfig,
    Mirror,
    Registries,
    RegistryConfig,
    TLSConfig,
)
from rke2_mirror.node.versions import (
    DEFAULT_ENDPOINT_TLS_FIX,
    DISABLE_DEFAULT_ENDPOINT,
    RUNTIME_HTTP_TOKEN_FIX,
    RUNTIME_REPOSITORY,
    SDR_PATH,
    WILDCARD_MIRRORS,
    RKE2Version,
    accepts_sdr_path,
    has_runtime_token_fix,
    honours_default_endpoint_tls,
    honours_wildcard,
    uses_hosts_toml,
)

DOCKER_HUB_DEFAULT_HOST = "index.docker.io"  # RKE2 docs: the default endpoint for docker.io
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


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
        shown = repr(text) if len(text) <= 200 else repr(text[:200]) + "..."
        try:
            parts = urlsplit(raw if given else "//" + raw)
            parts.port  # noqa: B018 - a port that is not a number in range raises here
        except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
            raise InputError(f"invalid endpoint {shown}: {exc}") from None
        if not parts.netloc:
            raise InputError(f"invalid endpoint {shown}: no host")
        scheme = (parts.scheme or "https").lower()
        if scheme not in ("http", "https"):
            raise InputError(f"invalid endpoint {shown}: scheme must be http or https")
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
    path_note = sdr_path_note(system_default_registry, rke2_version)
    if path_note:
        notes.append(path_note)
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
    disabled = disable_default_endpoint and (rke2_version is None or DISABLE_DEFAULT_ENDPOINT.holds(rke2_version))
    no_default = disabled and puller == "containerd" and mirror is not None and default_from_mirror is None
    if no_default:
        return attempts
    if disabled and puller == "rke2-runtime":
        notes.append("disable-default-registry-endpoint does not apply to the runtime image: RKE2's own pull "
                     "(rancher/wharfie) still tries the default endpoint last")
    if not any(a.endpoint == default and a.repository == name.repository for a in attempts):
        attempts.append(_attempt(puller, name, default, regs, rke2_version, None, key, True, notes,
                                 merged=default_from_mirror is not None))
    return attempts


def sdr_path_note(system_default_registry: str | None, version: RKE2Version | None) -> str | None:
    """What to say about a path in system-default-registry on `version` (None: nothing to say)."""
    if not system_default_registry or "/" not in system_default_registry.strip().strip("/"):
        return None
    if accepts_sdr_path(version):
        return None
    if version is None:
        return (f"system-default-registry has a path: accepted only from RKE2 {SDR_PATH.describe()} (rancher/rke2#9404); "
                "older releases refuse to start with it (rancher/rke2#768)")
    return (f"system-default-registry has a path: RKE2 {version} refuses to start with it (rancher/rke2#768; a path is "
            f"accepted from {SDR_PATH.describe()}, rancher/rke2#9404)")


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
        notes.append(f"the last mirror endpoint is the registry's own default endpoint {ep.url}: a node tries it "
                     "as the default endpoint, where rewrite rules do not apply")
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
        shown = repr(pattern) if len(pattern) <= 200 else repr(pattern[:200]) + "..."
        if _UNSUPPORTED_RE2.search(pattern):
            notes.append(f"rewrite {shown} ignored: RE2 (Go) has no look-around or back-references")
            continue
        if len(pattern) > MAX_REWRITE_PATTERN:
            notes.append(f"rewrite {shown} not evaluated: longer than {MAX_REWRITE_PATTERN} characters")
            continue
        try:
            rx = re.compile(pattern)
        except (re.error, RecursionError, OverflowError, ValueError):
            notes.append(f"rewrite {shown} ignored: invalid regular expression")
            continue
        if _backtracks(pattern):
            notes.append(f"rewrite {shown} not evaluated: a repetition of a repetition or of alternatives can take "
                         "exponential time in Python's regular expressions (RE2, on the node, is linear); the "
                         "repository is taken as not rewritten by it")
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


MAX_REWRITE_PATTERN = 1000


def _backtracks(pattern: str) -> bool:
    """Could matching `pattern` backtrack exponentially in Python's engine: an unbounded repetition whose
    body holds another repetition or alternatives (`(a+)+`, `(\\w|-)*`)?  A pattern the parser cannot read
    again counts as one."""
    try:
        from re import _constants as c, _parser as p  # the parser of `re` itself (Python 3.11+)

        parsed = p.parse(pattern)
    except Exception:  # noqa: BLE001 - a private module that changed: be careful, not wrong
        return True
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))

    def items(seq):
        for op, av in seq:
            yield op, av
            if op in repeats:
                yield from items(av[2])
            elif op is c.SUBPATTERN:
                yield from items(av[3])
            elif op is c.BRANCH:
                for alt in av[1]:
                    yield from items(alt)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                yield from items(av[1])

    def ambiguous(body) -> bool:
        return any((op in repeats and av[1] > 1) or op is c.BRANCH for op, av in items(body))

    try:
        return any(op in repeats and av[1] > 16 and ambiguous(av[2]) for op, av in items(parsed))
    except RecursionError:
        return True


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

