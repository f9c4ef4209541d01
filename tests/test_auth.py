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
