import base64
import json

import httpx
import pytest

from rke2_mirror.endpoints.auth import Challenge, Credentials, lookup_credentials, request_scopes
from rke2_mirror.model.errors import InputError


def _auth(u, p):
    return base64.b64encode(f"{u}:{p}".encode()).decode()


def test_lookup_order_and_docker_hub_keys(tmp_path):
    dc = tmp_path / "docker"
    dc.mkdir()
    (dc / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hubpw")},
        "harbor.example:8443": {"auth": _auth("dock", "dockpw")},
        "token.example": {"identitytoken": "refresh-me"},
    }}))
    af = tmp_path / "auth.json"
    af.write_text(json.dumps({"auths": {"harbor.example:8443": {"auth": _auth("podman", "podpw")}}}))
    env = {"DOCKER_CONFIG": str(dc)}
    assert lookup_credentials("docker.io", env=env) == Credentials("hubuser", "hubpw")
    assert lookup_credentials("registry-1.docker.io", env=env).username == "hubuser"
    assert lookup_credentials("harbor.example:8443", env=env).username == "dock"
    assert lookup_credentials("harbor.example", env=env) is None  # port matters
    assert lookup_credentials("token.example", env=env).identity_token == "refresh-me"
    env2 = {**env, "REGISTRY_AUTH_FILE": str(af)}
    assert lookup_credentials("harbor.example:8443", env=env2).username == "podman"
    env3 = {**env2, "RKE2_MIRROR_USERNAME": "envuser", "RKE2_MIRROR_PASSWORD": "envpw"}
    assert lookup_credentials("harbor.example:8443", env=env3, target=True) == Credentials("envuser", "envpw")
    assert lookup_credentials("harbor.example:8443", env=env3).username == "podman"  # env is for the target only


def test_bad_auth_entry_is_an_input_error_without_the_secret(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"h": {"auth": "!!!not-base64"}}}))
    with pytest.raises(InputError) as e:
        lookup_credentials("h", env={"DOCKER_CONFIG": str(tmp_path)})
    assert "not-base64" not in str(e.value)


def test_credentials_never_show_the_password():
    c = Credentials("u", "s3cret", "tok3n")
    assert "s3cret" not in repr(c) and "s3cret" not in str(c) and "tok3n" not in repr(c)


def test_challenge_parse():
    ch = Challenge.parse('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                         'scope="repository:library/nginx:pull"')
    assert ch.scheme == "bearer" and ch.params["realm"] == "https://auth.docker.io/token"
    assert ch.params["scope"] == "repository:library/nginx:pull"
    assert Challenge.parse('Basic realm="Registry Realm"').scheme == "basic"
    assert Challenge.parse(None) is None


def test_scopes_for_requests():
    r = httpx.Request("POST", "https://h/v2/rancher/a/blobs/uploads/?mount=sha256:1&from=rancher/b")
    assert request_scopes(r, "pull,push") == ("repository:rancher/a:pull,push", "repository:rancher/b:pull")
    assert request_scopes(httpx.Request("GET", "https://h/v2/"), "pull") == ()


# --------------------------------------------------------------------------- credentials only where they belong

from rke2_mirror.endpoints.auth import AuthRealmRefused, realm_concern  # noqa: E402
from rke2_mirror.engine.retry import RetryPolicy  # noqa: E402
from rke2_mirror.model.errors import AuthError  # noqa: E402

_FAST = RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.01)


def test_realm_concern():
    assert realm_concern("https", "reg.example:5000", "https://reg.example/service/token") is None  # own host
    assert realm_concern("https", "REG.example", "https://reg.example:5001/auth") is None
    assert realm_concern("http", "reg.example:5000", "http://reg.example:5001/auth") is None
    assert realm_concern("http", "reg.example", "https://auth.example/token") == "another host"
    assert realm_concern("https", "reg.example", "http://reg.example/token") == \
        "plain http while the registry is https"
    assert realm_concern("https", "reg.example", "http://evil.example/token") == \
        "another host and plain http while the registry is https"
    assert realm_concern("https", "registry-1.docker.io", "https://auth.docker.io/token") is None  # known
    assert realm_concern("https", "127.0.0.1:5000", "https://127.0.0.2:5000/token") == "another host"


def _realm_registry(realm: str, credentials: Credentials | None, **kw):
    """A registry (https://reg.test) whose challenge names `realm`; every request is recorded."""
    from rke2_mirror.endpoints.registry import Registry

    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.path == "/token":
            return httpx.Response(200, json={"token": "t"})
        if req.headers.get("authorization") != "Bearer t":
            return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="reg.test"'})
        return httpx.Response(200, headers={"Docker-Content-Digest": "sha256:1"})
    return Registry("https://reg.test", credentials=credentials, retry=_FAST,
                    transport=httpx.MockTransport(handler), **kw), seen


def test_credentials_sent_to_a_token_service_elsewhere_are_warned_about_once_per_realm():
    logged: list[str] = []
    reg, seen = _realm_registry("http://auth.test/token", Credentials("u", "p"), log=logged.append)
    with reg:
        reg.ping()
        reg.head_manifest("a", "v1")
        reg.head_manifest("b", "v1")
    token_asks = [r for r in seen if r.url.host == "auth.test"]
    assert len(token_asks) == 3 and all(r.headers["authorization"].startswith("Basic ") for r in token_asks)
    assert logged == ["warning: the registry reg.test names the token service http://auth.test "
                      "(another host and plain http while the registry is https): its credentials are sent there; "
                      "--strict-auth-realm refuses that"]


def test_the_warning_goes_to_logging_without_a_log_callback(caplog):
    reg, _ = _realm_registry("https://auth.test/token", Credentials("u", "p"))
    with reg, caplog.at_level("WARNING", logger="rke2_mirror"):
        reg.ping()
    assert [r.getMessage() for r in caplog.records] == [
        "warning: the registry reg.test names the token service https://auth.test (another host): its credentials "
        "are sent there; --strict-auth-realm refuses that"]


def test_strict_auth_realm_refuses_and_the_token_service_never_sees_the_credentials():
    for realm in ("https://auth.test/token", "http://reg.test:8080/token"):
        reg, seen = _realm_registry(realm, Credentials("u", "p"), strict_auth_realm=True)
        with reg, pytest.raises(AuthRealmRefused) as e:
            reg.ping()
        assert e.value.exit_code == 2 and "reg.test" in str(e.value) and realm.rsplit("/", 1)[0] in str(e.value)
        assert [r.url.host for r in seen] == ["reg.test"]  # the challenge only: no token request at all
        reg, seen = _realm_registry(realm, Credentials(identity_token="refresh"), strict_auth_realm=True)
        with reg, pytest.raises(AuthRealmRefused):
            reg.ping()
        assert len(seen) == 1


def test_strict_auth_realm_lets_anonymous_token_requests_and_the_own_host_through():
    logged: list[str] = []
    reg, seen = _realm_registry("https://auth.test/token", None, strict_auth_realm=True, log=logged.append)
    with reg:
        assert reg.head_manifest("a", "v1").digest == "sha256:1"
    assert "authorization" not in [r for r in seen if r.url.host == "auth.test"][0].headers and logged == []
    reg, seen = _realm_registry("https://reg.test:5001/token", Credentials("u", "p"), strict_auth_realm=True,
                                log=logged.append)
    with reg:
        assert reg.head_manifest("a", "v1").digest == "sha256:1"
    assert logged == []


def test_credentials_never_follow_a_redirect_to_another_host():
    from rke2_mirror.endpoints.registry import Registry
    from rke2_mirror.model.oci import Descriptor

    seen: list[tuple[str, bool]] = []  # (host, with credentials), as each request went out

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.host, "authorization" in req.headers))
        if req.url.host == "auth.test":  # the token service redirects elsewhere: not followed
            return httpx.Response(307, headers={"Location": "http://elsewhere.test/token"})
        if req.url.host == "cdn.test":
            return httpx.Response(200, content=b"blob")
        if not req.headers.get("authorization"):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg"'})
        return httpx.Response(307, headers={"Location": "http://cdn.test/blob"})

    blob = Descriptor("application/octet-stream", "sha256:" + "ab" * 32, 4)
    with Registry("http://reg.test", credentials=Credentials("u", "p"), retry=_FAST,
                  transport=httpx.MockTransport(handler)) as reg, reg.open_blob("a", blob) as chunks:
        assert b"".join(chunks) == b"blob"
    assert seen == [("reg.test", False), ("reg.test", True), ("cdn.test", False)]

    seen.clear()
    bearer = {"WWW-Authenticate": 'Bearer realm="http://auth.test/token",service="reg.test"'}
    with Registry("http://reg.test", credentials=Credentials("u", "p"), retry=_FAST,
                  transport=httpx.MockTransport(lambda req: handler(req) if req.url.host == "auth.test" else
                                                httpx.Response(401, headers=bearer)),
                  log=lambda s: None) as reg, pytest.raises(AuthError) as e:
        reg.ping()
    assert "redirects (HTTP 307) to http://elsewhere.test/token; not followed" in str(e.value)
    assert seen == [("auth.test", True)]  # asked once, with the credentials; elsewhere.test never


def test_the_sync_config_key_target_strict_auth_realm_reaches_the_target(monkeypatch, tmp_path):
    import rke2_mirror.jobs.sync.run as sync_run
    from rke2_mirror.jobs.sync.config import LoadedConfig, parse_config

    got = []
    monkeypatch.setattr(sync_run.mirror_job, "mirror", lambda refs, target, **kw: got.append(kw) or None)
    for text, want in (("", False), ("  strict_auth_realm: true\n", True)):
        cfg = parse_config(f"version: 1\ntarget:\n  url: http://127.0.0.1:5000\n{text}images: [rancher/x:v1]\n",
                           "sync.yaml", tmp_path)
        assert cfg.target.strict_auth_realm is want
        sync_run.mirror_refs(LoadedConfig(tmp_path / "sync.yaml", cfg), [], creds=Credentials("u", "p"))
        assert got[-1]["target_tls"].strict_auth_realm is want
