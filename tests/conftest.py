"""Shared fixtures: throw-away PKI, real docker-registry processes (anonymous, htpasswd, TLS,
token auth) and a Harbor look-alike.  Everything binds to 127.0.0.1 and is stopped at teardown."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from rke2_mirror_testkit.pki import CA, make_ca
from rke2_mirror_testkit.registry_proc import REGISTRY_BINARY, RunningRegistry, start_registry
from rke2_mirror_testkit.tokenserver import (
    default_users,
    Harbor,
    TokenRegistry,
    start_harbor,
    start_token_registry,
)

BASIC_USERS = {"alice": "wonderland-pw"}
HARBOR_ADMIN = ("admin", "Harbor12345")
HARBOR_DEV = ("dev", "dev-pw")

_ENV_UNSET = (
    "REGISTRY_AUTH_FILE",
    "RKE2_MIRROR_USERNAME",
    "RKE2_MIRROR_PASSWORD",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)


def _require_registry_binary() -> None:
    if not (os.path.exists(REGISTRY_BINARY) and os.access(REGISTRY_BINARY, os.X_OK)):
        pytest.skip(f"{REGISTRY_BINARY} not installed (apt-get install docker-registry)")


# --------------------------------------------------------------------------- environment


@dataclass
class MirrorEnv:
    """The isolated client-side environment every test runs in."""

    docker_config: Path  # $DOCKER_CONFIG (empty directory; config.json absent until written)
    home: Path  # scratch directory for anything else a test wants to put "at home"
    monkeypatch: pytest.MonkeyPatch

    @property
    def docker_config_file(self) -> Path:
        return self.docker_config / "config.json"

    def write_docker_auth(self, host: str, username: str, password: str, **extra: Any) -> Path:
        """Add ``auths[host]`` to $DOCKER_CONFIG/config.json (like ``docker login``)."""
        path = self.docker_config_file
        cfg = json.loads(path.read_text()) if path.exists() else {}
        cfg.setdefault("auths", {})[host] = {
            "auth": base64.b64encode(f"{username}:{password}".encode()).decode(),
            **extra,
        }
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def write_auth_file(self, host: str, username: str, password: str, name: str = "auth.json") -> Path:
        """Write a containers-auth.json style file and point $REGISTRY_AUTH_FILE at it."""
        path = self.home / name
        cfg = json.loads(path.read_text()) if path.exists() else {}
        cfg.setdefault("auths", {})[host] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
        path.write_text(json.dumps(cfg, indent=2))
        self.monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
        return path

    def set_credentials(self, username: str, password: str) -> None:
        self.monkeypatch.setenv("RKE2_MIRROR_USERNAME", username)
        self.monkeypatch.setenv("RKE2_MIRROR_PASSWORD", password)


@pytest.fixture(autouse=True)
def rke2_mirror_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MirrorEnv:
    """Autouse: a developer's own registry credentials / proxies never leak into tests.

    $DOCKER_CONFIG -> empty tmp dir; $XDG_RUNTIME_DIR / $XDG_CONFIG_HOME -> empty tmp dirs (so
    containers auth.json defaults are empty); REGISTRY_AUTH_FILE, RKE2_MIRROR_USERNAME/PASSWORD,
    proxy and CA-bundle variables unset; NO_PROXY covers loopback.
    """
    base = tmp_path / "_env"
    docker_config = base / "docker-config"
    home = base / "home"
    for d in (docker_config, home, base / "xdg-runtime", base / "xdg-config"):
        d.mkdir(parents=True)
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base / "xdg-runtime"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "xdg-config"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in _ENV_UNSET:
        monkeypatch.delenv(name, raising=False)
    return MirrorEnv(docker_config=docker_config, home=home, monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CA:
    """A session-wide test CA; ``pki.cert_path`` is the bundle clients should trust."""
    return make_ca(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------- registries


class _Stack:
    """Things to stop at teardown, in reverse order, even if a test or another stop fails."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def push(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def close(self) -> None:
        errors = []
        while self.items:
            try:
                self.items.pop().stop()
            except Exception as e:  # pragma: no cover
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory, pki: CA) -> Iterator[Callable[..., RunningRegistry]]:
    """``registry_factory(*, tls=False, auth=None, users=None, name="registry") -> RunningRegistry``.

    ``tls=True`` serves HTTPS with a certificate from ``pki`` (``.ca_file`` = the CA);
    ``auth="htpasswd"`` needs ``users={name: password}`` (default ``{"alice": "wonderland-pw"}``).
    Extra keyword arguments go to :func:`start_registry`.  All are stopped at teardown.
    """
    _require_registry_binary()
    stack = _Stack()

    def factory(*, tls: bool = False, auth: str | None = None, users: dict[str, str] | None = None,
                name: str = "registry", **kw: Any) -> RunningRegistry:
        workdir = tmp_path_factory.mktemp(name)
        if auth == "htpasswd" and users is None:
            users = dict(BASIC_USERS)
        tls_pair = pki.issue(workdir / "tls") if tls else None
        return stack.push(
            start_registry(workdir, tls=tls_pair, ca_file=pki.cert_path if tls else None, auth=auth,
                           users=users, **kw)
        )

    try:
        yield factory
    finally:
        stack.close()


@pytest.fixture
def registry(registry_factory) -> RunningRegistry:
    """Anonymous, plain-http docker-registry."""
    return registry_factory(name="anon")


@pytest.fixture
def basic_registry(registry_factory) -> RunningRegistry:
    """htpasswd docker-registry over plain http; users ``{"alice": "wonderland-pw"}``."""
    return registry_factory(auth="htpasswd", users=dict(BASIC_USERS), name="basic")


@pytest.fixture
def basic_tls_registry(registry_factory) -> RunningRegistry:
    """htpasswd docker-registry over HTTPS (cert from ``pki``); users ``{"alice": "wonderland-pw"}``."""
    return registry_factory(tls=True, auth="htpasswd", users=dict(BASIC_USERS), name="basic-tls")


@pytest.fixture
def tls_registry(registry_factory) -> RunningRegistry:
    """Anonymous docker-registry over HTTPS (cert from ``pki``)."""
    return registry_factory(tls=True, name="anon-tls")


@pytest.fixture
def token_registry_factory(tmp_path_factory: pytest.TempPathFactory, pki: CA) -> Iterator[Callable[..., TokenRegistry]]:
    """``token_registry_factory(*, tls=True, users=None, projects=None, **kw) -> TokenRegistry``."""
    _require_registry_binary()
    stack = _Stack()

    def factory(*, tls: bool = True, name: str = "token", **kw: Any) -> TokenRegistry:
        return stack.push(start_token_registry(tmp_path_factory.mktemp(name), ca=pki if tls else None, **kw))

    try:
        yield factory
    finally:
        stack.close()


@pytest.fixture
def token_registry(token_registry_factory) -> TokenRegistry:
    """Token-auth docker-registry over HTTPS + standalone token server (HTTPS, same CA).

    Users: admin/Harbor12345 (may push anywhere), dev/dev-pw (member of ``rancher``).
    Projects: ``library`` (public), ``rancher`` (private).
    """
    return token_registry_factory()


@pytest.fixture
def harbor_factory(tmp_path_factory: pytest.TempPathFactory, pki: CA) -> Iterator[Callable[..., Harbor]]:
    """``harbor_factory(*, tls=True, users=None, projects=None, **kw) -> Harbor``.

    Default users: admin/Harbor12345 (system admin, can create projects), dev/dev-pw (member of
    ``rancher``, cannot create projects).  ``projects={"rancher": {"public": False}}`` pre-creates.
    """
    _require_registry_binary()
    stack = _Stack()

    def factory(*, tls: bool = True, users: Any = None, projects: Any = None, name: str = "harbor",
                **kw: Any) -> Harbor:
        return stack.push(
            start_harbor(tmp_path_factory.mktemp(name), ca=pki if tls else None,
                         users=users if users is not None else default_users(), projects=projects, **kw)
        )

    try:
        yield factory
    finally:
        stack.close()


@pytest.fixture
def harbor(harbor_factory) -> Harbor:
    """Harbor look-alike over HTTPS with no projects (create them through the API or ``add_project``)."""
    return harbor_factory()
