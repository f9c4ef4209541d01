"""Which endpoint serves an image: source registries (with --source-endpoint overrides) and the target."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import DOCKER_HUB, DOCKER_HUB_API, ImageRef, RegistryURL
from rke2_mirror.endpoints.registry import Registry

RegistryFactory = Callable[[str], Registry]  # base URL -> Registry


def default_endpoint(registry: str) -> RegistryURL:
    """Where a registry name is served when nothing overrides it."""
    return RegistryURL("https", DOCKER_HUB_API if registry == DOCKER_HUB else registry)


def parse_source_endpoints(values: Iterable[str]) -> dict[str, RegistryURL]:
    """`REGISTRY=URL` pairs, e.g. `docker.io=http://127.0.0.1:5000/dockerhub`."""
    out: dict[str, RegistryURL] = {}
    for v in values:
        name, sep, url = v.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise InputError(f"--source-endpoint {v!r}: expected REGISTRY=URL, e.g. docker.io=https://proxy.example/dockerhub")
        name = ImageRef.parse(f"{name.strip()}/x/y").registry  # normalizes index.docker.io etc.
        out[name] = RegistryURL.parse(url, what="--source-endpoint")
    return out


class SourceRouter:
    """Lazily builds one Registry per source endpoint; `locate` maps a reference to (endpoint, repo)."""

    def __init__(self, factory: RegistryFactory, overrides: dict[str, RegistryURL] | None = None):
        self._factory = factory
        self._overrides = dict(overrides or {})
        self._registries: dict[str, Registry] = {}
        self._lock = threading.Lock()

    def endpoint_url(self, ref: ImageRef) -> RegistryURL:
        return self._overrides.get(ref.registry) or default_endpoint(ref.registry)

    def registry(self, base_url: str) -> Registry:
        with self._lock:
            reg = self._registries.get(base_url)
            if reg is None:
                reg = self._registries[base_url] = self._factory(base_url)
            return reg

    def locate(self, ref: ImageRef) -> tuple[Registry, str]:
        url = self.endpoint_url(ref)
        return self.registry(url.base_url), url.repository(ref.repository)

    def close(self) -> None:
        for reg in self._registries.values():
            reg.close()


@dataclass
class TargetLocator:
    """The target is one registry; references are already mapped (reference.target_ref)."""

    registry: Registry

    def locate(self, ref: ImageRef) -> tuple[Registry, str]:
        return self.registry, ref.repository
