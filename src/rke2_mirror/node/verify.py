"""The network half of `verify`: try, for each image, the endpoints a node would try (from
`resolver.resolve_endpoints`), with that node's TLS and credentials, and report the first
success or the first failure the node would hit.

Per attempt: GET /v2/ (the auth challenge tells whether rancher/rke2#4308 bites), then the manifest
(with the `ns` parameter a mirror gets), then, for an index, the child for the node's platform.
Results of GET /v2/ are cached per endpoint+TLS+credentials, so a dead endpoint costs one probe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.model.errors import AuthError, InputError, MirrorError, NotFound, TemporaryError, TLSError, UnreachableError
from rke2_mirror.model.oci import Platform, parse_manifest
from rke2_mirror.model.reference import ImageRef
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.node.registries import WILDCARD, Registries
from rke2_mirror.node.resolver import _DOCKER_HUB_HOSTS, Attempt, Endpoint, node_image, puller_for, resolve_endpoints
from rke2_mirror.node.versions import (DEFAULT_ENDPOINT_TLS_FIX, RUNTIME_HTTP_TOKEN_FIX, RKE2Version,
                                       has_embedded_registry, honours_wildcard)

if TYPE_CHECKING:
    from rke2_mirror.node.imagesdir import ImagesDir

FOUND = "found"
# failure reasons, in the words of the report
UNREACHABLE = "unreachable"
TLS_UNKNOWN_AUTHORITY = "tls-unknown-authority"
TLS_PLAIN_HTTP = "https-to-http-server"
TLS_OTHER = "tls-error"
TOKEN_OVER_HTTPS = "token-over-https"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not-found"
PLATFORM_MISSING = "platform-missing"
UNSUPPORTED = "unchecked"
UPSTREAM = "upstream-not-checked"
ERROR = "error"

# what the embedded registry mirror (Spegel, config.yaml `embedded-registry: true`) does with an image: a
# registry is shared only when registries.yaml has a `mirrors` entry for it (k3s docs, registry-mirror), and
# images tagged `latest` are never shared (same docs); the peers are tried before the mirror's endpoints
PEER_SHARED = "shared"
PEER_LATEST = "latest"
PEER_UNMIRRORED = "not-mirrored"
PEER_NOTES = {
    PEER_SHARED: "peers can serve it once any node has it (embedded registry, tried before the mirror endpoints)",
    PEER_LATEST: "tagged latest: peers never share it (embedded registry), every node pulls it from the endpoints",
    PEER_UNMIRRORED: "not shared by peers: registries.yaml has no mirrors entry for {registry}",
}


@dataclass(frozen=True)
class AttemptResult:
    attempt: Attempt
    status: str  # FOUND or a failure reason
    message: str = ""
    fix: str | None = None
    digest: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == FOUND


@dataclass(frozen=True)
class ImageCheck:
    """One image: `name` is what the node asks for; `attempts` in the order the node tries them."""

    image: ImageRef
    name: ImageRef
    puller: str
    attempts: tuple[AttemptResult, ...]
    peer: str | None = None  # embedded registry: PEER_SHARED / PEER_LATEST / PEER_UNMIRRORED; None: not enabled
    images_file: str | None = None  # --images-dir: the agent/images file that serves it (no registry asked)
    local_notes: tuple[str, ...] = ()  # --images-dir: e.g. the runtime image in an OCI-only archive

    @property
    def found(self) -> AttemptResult | None:
        return next((a for a in self.attempts if a.ok), None)

    @property
    def ok(self) -> bool:
        return self.images_file is not None or self.found is not None

    @property
    def failure(self) -> AttemptResult | None:
        """The first failure a node would hit (None when found at the first attempt or in agent/images)."""
        if self.images_file is not None:
            return None
        return None if self.ok and self.attempts[0].ok else next((a for a in self.attempts if not a.ok), None)

    @property
    def notes(self) -> tuple[str, ...]:
        peer = (f"{self.name}: {PEER_NOTES[self.peer].format(registry=self.name.registry)}",) if self.peer else ()
        return tuple(dict.fromkeys([*self.local_notes, *(n for a in self.attempts for n in a.attempt.notes), *peer]))

    def to_json(self) -> dict:
        found, fail = self.found, self.failure
        return {
            "image": str(self.image),
            "name": str(self.name),
            "puller": self.puller,
            "status": "found" if self.ok else "failed",
            "images_file": self.images_file,
            "endpoint": found.attempt.endpoint.url if found else None,
            "digest": found.digest if found else None,
            "reason": None if self.ok else (fail.status if fail else None),
            "error": None if self.ok else (fail.message if fail else None),
            "fix": None if self.ok else (fail.fix if fail else None),
            "attempts": [{"url": r.attempt.manifest_url, "default": r.attempt.default, "status": r.status,
                          "error": r.message or None, "fix": r.fix} for r in self.attempts],
            "notes": list(self.notes),
            "embedded_registry": self.peer,
        }


@dataclass(frozen=True)
class VerifyReport:
    images: tuple[ImageCheck, ...]
    system_default_registry: str | None = None
    rke2_version: RKE2Version | None = None
    platform: Platform = Platform("linux", "amd64")
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.images)

    def peer_summary(self) -> str | None:
        """One line on what the embedded registry's peers can serve (None: not enabled)."""
        peers = [c.peer for c in self.images if c.peer]
        if not peers:
            return None
        latest = peers.count(PEER_LATEST)
        unmirrored = peers.count(PEER_UNMIRRORED)
        return (f"embedded registry: {peers.count(PEER_SHARED)} of {len(self.images)} images can be served by peers "
                f"once one node has them; {latest} tagged latest (never shared), {unmirrored} of registries "
                f"without a mirrors entry (not shared)")

    def to_json(self) -> dict:
        found = sum(1 for c in self.images if c.ok)
        peers = [c.peer for c in self.images if c.peer]
        return {
            "summary": {"total": len(self.images), "found": found, "failed": len(self.images) - found},
            "rke2_version": str(self.rke2_version) if self.rke2_version else None,
            "system_default_registry": self.system_default_registry,
            "platform": str(self.platform),
            "warnings": list(self.warnings),
            "embedded_registry": ({"shared": peers.count(PEER_SHARED), "latest": peers.count(PEER_LATEST),
                                   "not_mirrored": peers.count(PEER_UNMIRRORED)} if peers else None),
            "images": [c.to_json() for c in self.images],
        }


RegistryFactory = Callable[[str, "bool | str", "Credentials | None"], Registry]


def default_registry_factory(base_url: str, verify: bool | str, credentials: Credentials | None, *,
                             strict_auth_realm: bool = False, log: Callable[[str], None] | None = None) -> Registry:
    """A client as a node's: its TLS and credentials; `strict_auth_realm` (--strict-auth-realm) and `log`
    (its warnings) as for every Registry.  Bind them with functools.partial for `registry_factory`."""
    return Registry(base_url, verify=verify, credentials=credentials, actions="pull", jobs=4, timeout=20.0,
                    retry=RetryPolicy(attempts=2, initial_wait=0.2, max_wait=1.0),
                    tls_flags=("tls.ca_file", "tls.insecure_skip_verify"),
                    strict_auth_realm=strict_auth_realm, log=log)


@dataclass(frozen=True)
class _Probe:
    scheme: str | None = None
    failure: AttemptResult | None = None


@dataclass
class NodeChecker:
    """Checks images as a node configured with `registries` (and `system_default_registry`) would.

    `node_path(p)` maps a path named in registries.yaml (ca_file) to a readable local path
    (identity by default: verify runs where those files are).
    """

    registries: Registries
    system_default_registry: str | None = None
    rke2_version: RKE2Version | None = None
    platform: Platform = Platform("linux", "amd64")
    node_path: Callable[[str], str] = str
    registry_factory: RegistryFactory = default_registry_factory
    jobs: int = 4
    check_upstream: bool = False
    disable_default_endpoint: bool = False
    embedded_registry: bool = False
    images_dir: ImagesDir | None = None  # --images-dir: what the node's agent/images holds
    _clients: dict = field(default_factory=dict, init=False, repr=False)
    _probes: dict = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def close(self) -> None:
        for reg in self._clients.values():
            reg.close()
        self._clients.clear()

    def __enter__(self) -> "NodeChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_all(self, images: Sequence[ImageRef],
                  progress: Callable[[ImageCheck], None] | None = None) -> VerifyReport:
        def one(ref: ImageRef) -> ImageCheck:
            result = self.check(ref)
            if progress:
                progress(result)
            return result
        if self.jobs <= 1 or len(images) <= 1:
            results = [one(r) for r in images]
        else:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                results = list(pool.map(one, images))
        return VerifyReport(tuple(results), self.system_default_registry, self.rke2_version, self.platform,
                            tuple(self.images_dir.warnings) if self.images_dir else ())

    def check(self, image: ImageRef) -> ImageCheck:
        puller = puller_for(image)
        name = node_image(image, self.system_default_registry)
        notes: tuple[str, ...] = ()
        if self.images_dir is not None:
            local, notes = self._in_images_dir(image, name, puller)
            if local is not None:
                return ImageCheck(image, name, puller, (), self._peer(name), local, notes)
        attempts = resolve_endpoints(image, self.registries, self.system_default_registry, self.rke2_version, puller,
                                     disable_default_endpoint=self.disable_default_endpoint)
        results: list[AttemptResult] = []
        for attempt in attempts:
            r = _in_context(self._try(attempt, image))
            results.append(r)
            if r.ok:
                break
        return ImageCheck(image, name, puller, tuple(results), self._peer(name), None, notes)

    def _in_images_dir(self, image: ImageRef, name: ImageRef, puller: str) -> tuple[str | None, tuple[str, ...]]:
        """The agent/images file a node takes `image` from, and notes.  The runtime image only where RKE2's
        docker-tarball lookup finds it (the docker.io name first, then the system-default-registry one);
        every other image under the name containerd's import gives it."""
        d = self.images_dir
        if puller != "rke2-runtime":
            return d.containerd_file(name), ()
        names = list(dict.fromkeys([image, name]))
        found = d.runtime_file(names)
        if found is not None:
            return found, ()
        oci = d.runtime_oci_only(names)
        if oci is None:
            return None, ()
        return None, (f"{name}: in agent/images {oci}, but RKE2's runtime lookup will not find it there: an "
                      "OCI-only archive (no docker manifest.json); the node pulls it from a registry instead "
                      "(write node tarballs with `save --for-node`)",)

    def _peer(self, name: ImageRef) -> str | None:
        if not self.embedded_registry or not has_embedded_registry(self.rke2_version):
            return None
        if name.tag == "latest" and not name.digest:
            return PEER_LATEST
        keys = {name.registry} | (set(_DOCKER_HUB_HOSTS) if name.registry in _DOCKER_HUB_HOSTS else set())
        if keys & set(self.registries.mirrors) or (WILDCARD in self.registries.mirrors
                                                   and honours_wildcard(self.rke2_version)):
            return PEER_SHARED
        return PEER_UNMIRRORED

    # -- one attempt -------------------------------------------------------------------------
    def _try(self, a: Attempt, image: ImageRef) -> AttemptResult:
        if a.default and not self.check_upstream and not self._is_local(a.endpoint.host):
            return AttemptResult(a, UPSTREAM, "an upstream registry, not contacted (an air-gapped node fails here; "
                                              "--check-upstream contacts it)",
                                 f"copy the image to the mirror, or give {a.registry} a mirror entry that has it")
        if a.endpoint.path != "/v2":
            return AttemptResult(a, UNSUPPORTED, f"{a.endpoint.url}: verify cannot check an endpoint with an API "
                                                 "path other than /v2; check it by hand")
        try:
            reg, key = self._client(a)
        except InputError as exc:
            return AttemptResult(a, ERROR, str(exc), _ca_fix(a))
        probe = self._probe(a, reg, key)
        if probe.failure is not None:
            return AttemptResult(a, probe.failure.status, probe.failure.message, probe.failure.fix)
        if a.token_over_https and probe.scheme == "bearer":
            return AttemptResult(
                a, TOKEN_OVER_HTTPS,
                f"{a.endpoint.base_url} uses token auth: RKE2 {self.rke2_version} fetches the runtime image's token "
                f"over https although the endpoint is http (rancher/rke2#4308), and fails",
                f"upgrade to {RUNTIME_HTTP_TOKEN_FIX.describe()} or later, or serve the registry over https "
                f"(configs.\"{a.endpoint.host}\".tls.ca_file), or drop system-default-registry")
        return self._manifest(a, reg, image)

    def _is_local(self, host: str) -> bool:
        """A host the node configuration names: a mirror endpoint or the system-default-registry."""
        local = {self.system_default_registry.split("/")[0].lower()} if self.system_default_registry else set()
        for m in self.registries.mirrors.values():
            for raw in m.endpoints:
                try:
                    local.add(Endpoint.parse(raw).host)
                except InputError:
                    pass
        return host in local or host.removesuffix(":443") in local

    def _client(self, a: Attempt) -> tuple[Registry, tuple]:
        verify: bool | str = True
        if a.endpoint.scheme == "https" and a.tls is not None:
            if a.tls.insecure_skip_verify:
                verify = False
            elif a.tls.ca_file:
                verify = self.node_path(a.tls.ca_file)
        creds = a.auth.credentials() if a.auth is not None else None
        key = (a.endpoint.base_url, verify, creds)
        with self._lock:
            reg = self._clients.get(key)
            if reg is None:
                reg = self.registry_factory(a.endpoint.base_url, verify, creds)
                self._clients[key] = reg
        return reg, key

    def _probe(self, a: Attempt, reg: Registry, key: tuple) -> _Probe:
        with self._lock:
            cached = self._probes.get(key)
        if cached is not None:
            return cached
        try:
            probe = _Probe(scheme=reg.ping())
        except MirrorError as exc:
            probe = _Probe(failure=self._classify(a, exc))
        with self._lock:
            self._probes.setdefault(key, probe)
        return probe

    def _manifest(self, a: Attempt, reg: Registry, image: ImageRef) -> AttemptResult:
        params = {"ns": a.ns} if a.ns else None
        try:
            desc, raw = reg.get_manifest(a.repository, a.reference, params=params)
            manifest = parse_manifest(desc.media_type, raw)
            if manifest.is_index:
                want = self._platform_for(image)
                child = next((c for c in manifest.children if c.platform and c.platform.matches(want)), None)
                if child is None:
                    have = ", ".join(sorted({str(c.platform) for c in manifest.children if c.platform})) or "none"
                    return AttemptResult(a, PLATFORM_MISSING, f"{a.endpoint.base_url}/{a.repository}:{a.reference} has no "
                                                              f"{want} manifest (has: {have})",
                                         "copy the image with that platform (mirror --platform)", desc.digest)
                if reg.head_manifest(a.repository, child.digest, params=params) is None:
                    return AttemptResult(a, PLATFORM_MISSING, f"{a.endpoint.base_url}/{a.repository}@{child.digest} "
                                                              f"({want}) is named by the index but missing",
                                         "copy the image again", desc.digest)
            return AttemptResult(a, FOUND, "", None, desc.digest)
        except NotFound:
            return AttemptResult(a, NOT_FOUND, f"{a.repository}:{a.reference} not found there",
                                 _not_found_fix(a))
        except MirrorError as exc:
            return self._classify(a, exc)

    def _platform_for(self, image: ImageRef) -> Platform:
        """Windows images (tags `...-windows-...` in the Windows list) are checked for windows/ARCH."""
        if image.tag and "windows" in image.tag and self.platform.os == "linux":
            return Platform("windows", self.platform.architecture)
        return self.platform

    def _classify(self, a: Attempt, exc: MirrorError) -> AttemptResult:
        msg = str(exc)
        host = a.endpoint.host
        if isinstance(exc, TLSError):
            if "does not speak TLS" in msg:
                fix = (f"the registry serves plain http: give mirrors.\"{a.mirror_key or host}\" the endpoint "
                       f"\"http://{host}\"" if a.default else f"write the endpoint as \"http://{host}\"")
                return AttemptResult(a, TLS_PLAIN_HTTP, "https to a plain-http registry "
                                                        "(node: \"server gave HTTP response to HTTPS client\")", fix)
            if "certificate" in msg:
                return AttemptResult(a, TLS_UNKNOWN_AUTHORITY, "x509: certificate signed by unknown authority",
                                     _ca_fix(a))
            return AttemptResult(a, TLS_OTHER, msg, _ca_fix(a))
        if isinstance(exc, UnreachableError) or (isinstance(exc, TemporaryError) and exc.status is None):
            return AttemptResult(a, UNREACHABLE, msg, _unreachable_fix(a))
        if isinstance(exc, AuthError):
            which = f"configs.\"{a.config_key}\".auth" if a.auth is not None else f"configs.\"{host}\".auth"
            fix = (f"check the credentials in {which}" if a.auth is not None else
                   f"add {which} (registries-yaml --with-auth, RKE2_MIRROR_USERNAME/RKE2_MIRROR_PASSWORD)")
            return AttemptResult(a, UNAUTHORIZED, _first_line(msg), fix)
        return AttemptResult(a, ERROR, msg)


def _in_context(r: AttemptResult) -> AttemptResult:
    """Say where the node was when it failed: which URL, and why it went there."""
    if r.ok:
        return r
    a = r.attempt
    if a.default:
        why = (f"no mirror entry for {a.registry}: " if a.mirror_key is None else "after the mirror endpoints, ")
        where = f"{why}the node fetches {a.manifest_url} (default endpoint)"
    else:
        where = f"mirror {a.mirror_key!r}: the node fetches {a.manifest_url}"
    return AttemptResult(a, r.status, f"{where}: {r.message}", r.fix, r.digest)


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def _ca_fix(a: Attempt) -> str:
    key = a.config_key if a.config_key not in (None, "*") else a.endpoint.host
    if a.default and a.tls is None and a.config_key is not None:
        way = ("add the CA to the nodes' system trust store" if ":" in a.endpoint.host else
               f"write the mirror endpoint as \"https://{a.endpoint.host}:443\" (configs.\"{a.endpoint.host}:443\")")
        return (f"configs.\"{key}\".tls is not applied to the default endpoint by this RKE2 version "
                f"(rancher/rke2#5658, fixed in {DEFAULT_ENDPOINT_TLS_FIX.describe()}): upgrade, or {way}")
    return (f"set configs.\"{key}\".tls.ca_file to the registry's CA on each node "
            f"(or configs.\"{key}\".tls.insecure_skip_verify: true)")


def _unreachable_fix(a: Attempt) -> str:
    if a.default:
        return (f"the node falls back to {a.endpoint.url}; add a mirror entry for the registry with the endpoint "
                "that serves it (scheme and port included)")
    return "check the endpoint URL (scheme, host, port) and that the registry is running"


def _not_found_fix(a: Attempt) -> str:
    if a.default and a.mirror_key is None:
        return "copy the image there (rke2-mirror mirror), or add a mirror entry whose endpoint has it"
    return "copy the image (rke2-mirror mirror) or fix the rewrite rules"


def check_images(images: Iterable[ImageRef], registries: Registries, *, system_default_registry: str | None,
                 rke2_version: RKE2Version | None, platform: Platform = Platform("linux", "amd64"),
                 jobs: int = 4, progress: Callable[[ImageCheck], None] | None = None,
                 registry_factory: RegistryFactory = default_registry_factory,
                 node_path: Callable[[str], str] = str, check_upstream: bool = False,
                 disable_default_endpoint: bool = False, embedded_registry: bool = False,
                 images_dir: ImagesDir | None = None) -> VerifyReport:
    """Convenience: one NodeChecker, closed at the end.  `images_dir` (`read_images_dir`): images a node
    finds in its agent/images count as present before any registry is asked."""
    with NodeChecker(registries, system_default_registry, rke2_version, platform, node_path, registry_factory,
                     jobs, check_upstream, disable_default_endpoint, embedded_registry, images_dir) as checker:
        return checker.check_all(list(images), progress)
