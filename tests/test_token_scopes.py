"""Token requests against a token-auth target: one per batch of repositories, not one per repository and
mount source (issue #18: a Harbor whose users live in LDAP binds for every token request).

A token is reused wherever the scopes it was asked for cover a request, and never where they do not; a
token request names its request's scopes plus, within a bound (auth.MAX_ACCESS_BYTES), the repositories the
run planned with it and the mount sources seen so far."""

from __future__ import annotations

import re
from urllib.parse import parse_qs

import httpx
import pytest

from rke2_mirror.endpoints import auth
from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.model.errors import AuthError, RegistryError
from rke2_mirror.model.oci import Descriptor
from rke2_mirror_testkit.images import ImagePusher, make_layer_blob, push_image

from .test_archive import cli

_FAST = RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.01)
_DIGEST = "sha256:" + "ab" * 32
_BLOB = Descriptor("application/octet-stream", _DIGEST, 100_000)


def _access_bytes(scopes) -> int:
    """What a token request's scopes cost against auth.MAX_ACCESS_BYTES (one entry per repository)."""
    names = {s.split(":")[1] for s in scopes if s.startswith("repository:")}
    return sum(auth.ACCESS_ENTRY_BYTES + len(n) for n in names)


# --------------------------------------------------------------------------- a registry that checks every token


class _Fake:
    """https://reg.test with its token service at https://reg.test/token (the registry's own host).

    A token grants exactly the scopes it was asked for (`deny`: repositories it never grants); every
    registry request is answered only when its token covers what it needs (else 401, as distribution does:
    `insufficient_scope`, or `invalid_token` for a token in `revoked`)."""

    def __init__(self, *, pad: int = 0, token_status: int = 200, deny: frozenset[str] = frozenset(),
                 first_only: bool = False):
        self.pad, self.token_status, self.deny, self.first_only = pad, token_status, deny, first_only
        self.grants: dict[str, frozenset[tuple[str, str]]] = {}
        self.token_asks: list[tuple[str, ...]] = []
        self.token_auth: list[str] = []  # the Authorization each token request came with
        self.denied: list[tuple[str, str]] = []  # (path, token) answered 401 despite a token
        self.revoked: set[str] = set()
        self.used: list[tuple[str, str]] = []  # (path, token) of every registry request
        self.hosts: set[str] = set()

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.hosts.add(req.url.host)
        if req.url.path == "/token":
            scopes = tuple(req.url.params.get_list("scope"))
            self.token_asks.append(scopes)
            self.token_auth.append(req.headers.get("authorization", ""))
            if self.token_status != 200:
                return httpx.Response(self.token_status, json={"errors": [{"code": "BAD", "message": "no"}]})
            granted = set()
            for s in scopes[:1] if self.first_only else scopes:
                _typ, name, actions = s.split(":")
                if name not in self.deny:
                    granted |= {(name, a) for a in actions.split(",")}
            tok = f"t{len(self.grants)}"
            self.grants[tok] = frozenset(granted)
            return httpx.Response(200, json={"token": tok + "." + "x" * self.pad, "expires_in": 300})
        need: set[tuple[str, str]] = set()
        m = re.match(r"^/v2/(.+?)/(?:manifests|blobs|tags)/", req.url.path)
        if m:
            need |= {(m.group(1), "pull"), (m.group(1), "push")}
            src = parse_qs(req.url.query.decode()).get("from")
            if src:
                need.add((src[0], "pull"))
        tok = req.headers.get("authorization", "").removeprefix("Bearer ").split(".")[0]
        self.used.append((req.url.path, tok))
        if tok not in self.grants or tok in self.revoked or not need <= self.grants[tok]:
            if tok:
                self.denied.append((req.url.path, tok))
            error = "invalid_token" if tok in self.revoked else "insufficient_scope"
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://reg.test/token",'
                                                f'service="reg.test",error="{error}"'})
        if "/blobs/uploads/" in req.url.path:
            return httpx.Response(201, headers={"Location": "/v2/x/blobs/" + _DIGEST})
        if "/tags/list" in req.url.path:
            return httpx.Response(404)
        return httpx.Response(200, headers={"Docker-Content-Digest": _DIGEST, "Content-Type": "x"})


def _registry(fake: _Fake) -> Registry:
    return Registry("https://reg.test", credentials=Credentials("u", "p"), actions="pull,push", retry=_FAST,
                    transport=httpx.MockTransport(fake))


def test_a_token_is_reused_only_where_its_scopes_cover_the_request():
    fake = _Fake()
    with _registry(fake) as reg:
        reg.head_manifest("p/a", "v1")
        reg.head_manifest("p/a", "v2")
        assert fake.token_asks == [("repository:p/a:pull,push",)]
        # p/a's token does not cover p/b: a token of its own, p/a's never sent there
        reg.head_manifest("p/b", "v1")
        assert fake.token_asks[-1] == ("repository:p/b:pull,push",)
        # a mount into p/a from p/b: neither token covers both; the new one names p/a's push, p/b's pull ...
        assert reg.reuse_blob("p/a", _BLOB, fresh=True, mount_from="p/b")
        assert set(fake.token_asks[-1]) == {"repository:p/a:pull,push", "repository:p/b:pull"}
        # ... and covers p/a's own requests from now on (a superset); p/b's push still needs p/b's token
        reg.head_manifest("p/a", "v3")
        reg.repository_is_new("p/b")
        assert len(fake.token_asks) == 3
        # a new repository: a token of its own; its first mount asks for a token naming that mount's source
        # and the sources seen so far (p/b), so a mount from p/b then needs no token request ...
        reg.head_manifest("p/c", "v1")
        assert fake.token_asks[-1] == ("repository:p/c:pull,push",)
        assert reg.reuse_blob("p/c", _BLOB, fresh=True, mount_from="p/d")
        assert set(fake.token_asks[-1]) == {"repository:p/c:pull,push", "repository:p/d:pull", "repository:p/b:pull"}
        assert reg.reuse_blob("p/c", _BLOB, fresh=True, mount_from="p/b")
        assert len(fake.token_asks) == 5
        # ... and the other requests keep sending the smallest token that covers them
        reg.head_manifest("p/c", "v2")
        assert fake.used[-1] == ("/v2/p/c/manifests/v2", "t3")
    assert fake.denied == []  # no request went out with a token that did not cover it
    assert fake.hosts == {"reg.test"} and all(a.startswith("Basic ") for a in fake.token_auth)


def test_a_plan_asks_one_token_per_batch_within_the_bound(monkeypatch):
    monkeypatch.setattr(auth, "MAX_ACCESS_BYTES", 1000)
    repos = [f"proj/repository-{i:02d}" for i in range(20)]
    fake = _Fake()
    with _registry(fake) as reg:
        reg.plan_repositories(repos + repos[:3])  # repeated names count once
        for r in repos:
            assert reg.head_manifest(r, "v1") is not None
            assert reg.repository_is_new(r)
        per_batch = int(1000 * auth.BATCH_SHARE) // (auth.ACCESS_ENTRY_BYTES + len(repos[0]))
        assert len(fake.token_asks) == -(-len(repos) // per_batch)  # ceil: one per batch
        assert all(_access_bytes(s) <= 1000 for s in fake.token_asks)
        # a mount source joins the batch's next token; the batch-mates then mount without asking again
        asks = len(fake.token_asks)
        for r in repos[2 * per_batch:3 * per_batch]:  # the third batch
            assert reg.reuse_blob(r, _BLOB, fresh=True, mount_from="other/origin")
        assert len(fake.token_asks) == asks + 1 and "repository:other/origin:pull" in fake.token_asks[-1]
        assert _access_bytes(fake.token_asks[-1]) <= 1000
    assert fake.denied == []


def test_a_refused_grant_is_asked_for_exactly_and_the_401_stands():
    fake = _Fake(deny=frozenset({"p/b"}))
    with _registry(fake) as reg:
        reg.plan_repositories(["p/a", "p/b"])
        reg.head_manifest("p/a", "v1")
        assert set(fake.token_asks[-1]) == {"repository:p/a:pull,push", "repository:p/b:pull,push"}
        with pytest.raises(AuthError):
            reg.head_manifest("p/b", "v1")  # the batch token "covers" it, the registry says no
        assert fake.token_asks[-1] == ("repository:p/b:pull,push",)  # asked again for exactly that
        reg.head_manifest("p/a", "v2")
        assert len(fake.token_asks) == 2  # p/a keeps its token


def test_a_token_service_granting_the_first_scope_only_ends_the_batches():
    fake = _Fake(first_only=True)
    with _registry(fake) as reg:
        reg.plan_repositories(["p/a", "p/b", "p/c"])
        reg.head_manifest("p/a", "v1")
        reg.head_manifest("p/b", "v1")  # the batch token "covers" it: 401, then p/b's own token works
        assert reg.auth.max_access_bytes == 0
        reg.head_manifest("p/c", "v1")
        assert fake.token_asks[1:] == [("repository:p/b:pull,push",), ("repository:p/c:pull,push",)]
        assert [d[0] for d in fake.denied] == ["/v2/p/b/manifests/v1"]


def test_an_invalid_token_is_dropped_not_sent_again():
    fake = _Fake()
    with _registry(fake) as reg:
        reg.plan_repositories(["p/a", "p/b"])
        reg.head_manifest("p/a", "v1")
        fake.revoked.add("t0")
        reg.head_manifest("p/a", "v2")  # 401 invalid_token: a new token, the request sent again
        reg.head_manifest("p/b", "v1")
        assert len(fake.token_asks) == 3 and [d[1] for d in fake.denied] == ["t0"]


def test_a_token_too_large_to_send_or_a_refused_batch_falls_back_to_the_request_scopes():
    fake = _Fake(pad=auth.MAX_TOKEN_HEADER)
    with _registry(fake) as reg:
        reg.plan_repositories(["p/a", "p/b", "p/c"])
        reg.head_manifest("p/a", "v1")
        assert fake.token_asks[-1] == ("repository:p/a:pull,push",) and len(fake.token_asks) == 2
        assert reg.auth.max_access_bytes == auth.MAX_ACCESS_BYTES // 2
    fake = _Fake(token_status=400)
    with _registry(fake) as reg:
        reg.plan_repositories(["p/a", "p/b", "p/c"])
        with pytest.raises(RegistryError):
            reg.head_manifest("p/a", "v1")
        assert [len(s) for s in fake.token_asks] == [3, 1] and reg.auth.max_access_bytes == 0


# --------------------------------------------------------------------------- the real token service and registry


_MOUNT = re.compile(r'"POST (/v2/(\S+?)/blobs/uploads/\?(\S*)) HTTP/[\d.]+" (\d{3})')


@pytest.fixture
def shared_layers(registry_factory, tmp_path):
    """Nine repositories in two families, each sharing a base layer (multi-platform and single images)."""
    src = registry_factory(name="src")
    bases = [make_layer_blob("family-a", 90_000), make_layer_blob("family-b", 80_000)]
    refs = []
    with ImagePusher(src.url) as p:
        for i in range(9):
            repo = f"rancher/app-{i}"
            push_image(p, repo, "v1", kind="oci" if i % 2 else "docker", base=bases[i % 2], seed=repo,
                       platforms=None if i % 3 == 0 else (("linux", "amd64"), ("linux", "arm64")))
            refs.append(f"docker.io/{repo}:v1")
    lst = tmp_path / "images.txt"
    lst.write_text("\n".join(refs) + "\n")
    return src, lst, [r.split("/", 1)[1].split(":")[0] for r in refs]


@pytest.mark.parametrize("budget", [None, 600], ids=["default-bound", "three-per-batch"])
def test_mirror_into_a_token_registry_asks_at_most_one_token_per_repository(
        shared_layers, token_registry, rke2_mirror_env, monkeypatch, budget):
    src, lst, repos = shared_layers
    if budget:  # several batches, and mount sources in other batches than the repositories mounting from them
        monkeypatch.setattr(auth, "MAX_ACCESS_BYTES", budget)
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    args = ("mirror", "--images", lst, "--to", token_registry.url, "--ca-file", token_registry.ca_file,
            "--source-endpoint", f"docker.io={src.url}", "--json")
    log = token_registry.registry

    for run, status in (("cold", "copied"), ("no-op", "skipped")):
        before, lines = len(token_registry.token_requests), len(log.access_log())
        code, out, err = cli(*args)
        assert code == 0, err
        assert out.count(f'"status": "{status}"') == len(repos), out
        reqs = token_registry.token_requests[before:]
        assert all(r.user == "admin" and r.status == 200 for r in reqs)
        assert len(reqs) <= len(repos), (run, [r.scopes for r in reqs])  # the ping's included
        if not budget:  # all nine fit one token request (after the ping's): the old way asked 1 + 9 + mounts
            assert len(reqs) <= 2, [r.scopes for r in reqs]
        assert all(_access_bytes(r.scopes) <= (budget or auth.MAX_ACCESS_BYTES) for r in reqs)
        access = log.access_log()[lines:]
        # the registry checked every token: none was sent where its scopes fall short (the only 401 is
        # the ping's challenge, before any token)
        assert sum(1 for line in access if '" 401 ' in line) <= 1, [l for l in access if '" 401 ' in l]
        if run == "cold":
            mounts = [m for m in map(_MOUNT.search, access) if m and "mount=" in m.group(3)]
            landed = [m for m in mounts if m.group(4) == "201"]
            # each family's base goes up once and is mounted into the family's other repositories
            assert len(landed) >= len(repos) - 2, mounts
            assert {parse_qs(m.group(3))["from"][0] for m in landed} <= set(repos)
            if budget:
                assert len(reqs) >= 4  # really several batches (+ the ping)
