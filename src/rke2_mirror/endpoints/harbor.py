"""Harbor: detect it, and make sure the projects the images go into exist."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx

from rke2_mirror.endpoints import transport as tx
from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.engine.retry import mark_exhausted
from rke2_mirror.model.errors import AuthError, InputError, MirrorError, RegistryError, TemporaryError
from rke2_mirror.endpoints.registry import Registry


def project_of(repository: str) -> str:
    """Harbor's project is the first path component of a repository (`rancher/x` -> `rancher`)."""
    return repository.split("/", 1)[0]


MAX_API_BYTES = 1024 * 1024  # a Harbor API answer (systeminfo, projects) is read whole, up to this much


class Harbor:
    """Harbor's REST API (v2.0) on the same host as the registry, with the registry's client and TLS (so its
    transport retries, throttles and cancels these requests too)."""

    def __init__(self, registry: Registry, credentials: Credentials | None):
        self._client = registry.client
        self._base = registry.base_url
        self._auth = (httpx.BasicAuth(credentials.username, credentials.password)
                      if credentials and credentials.username else None)
        self.credentials = credentials

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        """One request (the transport retries 5xx, 429, connection errors); what still fails is temporary,
        except an answer over MAX_API_BYTES."""
        try:
            resp = self._client.request(method, self._base + path, auth=self._auth,
                                        extensions={tx.READ_BODY: True, tx.MAX_BODY: MAX_API_BYTES}, **kw)
        except tx.ResponseTooLarge as exc:
            raise RegistryError(f"Harbor API {self._base}{path}: {exc}") from None
        except httpx.HTTPError as exc:
            detail = str(exc) if isinstance(exc, tx.TransferTooSlow) else exc.__class__.__name__
            err = TemporaryError(f"Harbor API {path}: {detail}")
            if getattr(exc, "exhausted", False):
                mark_exhausted(err)
            raise err from None
        if resp.status_code >= 500 or resp.status_code == 429:
            err = TemporaryError(f"Harbor API {path}: HTTP {resp.status_code}", status=resp.status_code)
            if tx.was_exhausted(resp):
                mark_exhausted(err)
            raise err
        return resp

    def detect(self) -> bool:
        for path in ("/api/v2.0/systeminfo", "/api/v2.0/ping"):
            try:
                resp = self._call("GET", path)
            except MirrorError:
                return False
            if resp.status_code == 200:
                return True
        return False

    def project_exists(self, name: str) -> bool:
        resp = self._call("HEAD", "/api/v2.0/projects", params={"project_name": name})
        if resp.status_code == 401 and self._auth:
            raise AuthError(f"Harbor at {self._base} rejected the credentials of {self.credentials.username!r}")
        return resp.status_code == 200

    def create_project(self, name: str, public: bool) -> bool:
        """Create a project; True if created, False if it existed (409)."""
        resp = self._call("POST", "/api/v2.0/projects",
                           json={"project_name": name, "metadata": {"public": "true" if public else "false"}})
        if resp.status_code in (200, 201):
            return True
        if resp.status_code == 409:
            return False
        who = f"user {self.credentials.username!r}" if self._auth else "anonymous access"
        if resp.status_code == 401:
            raise InputError(f"Harbor project {name!r} does not exist and {who} may not create it: "
                             "set RKE2_MIRROR_USERNAME/RKE2_MIRROR_PASSWORD to a user with the right to create projects")
        if resp.status_code == 403:
            raise InputError(f"Harbor project {name!r} does not exist and {who} may not create it "
                             "(needs Harbor's project-creation permission: a system admin, or 'Everyone' in "
                             "Configuration > Project Creation); create the project or use such an account")
        raise InputError(f"Harbor project {name!r}: creating it failed with HTTP {resp.status_code}")

    def ensure_projects(self, names: Iterable[str], public: bool = False,
                        log: Callable[[str], None] = lambda s: None) -> list[str]:
        created = []
        for name in sorted(set(names)):
            if self.project_exists(name):
                continue
            if self.create_project(name, public):
                created.append(name)
                log(f"created Harbor project {name!r} ({'public' if public else 'private'})")
        return created
