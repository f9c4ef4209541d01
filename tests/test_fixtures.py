"""Tests of the test infrastructure itself, with plain httpx (never rke2_mirror's client)."""

from __future__ import annotations

import gzip
import io
import json
import os
import ssl
import tarfile

import httpx
import pytest

from rke2_mirror_testkit.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    WINDOWS_OS_VERSION,
    Blob,
    ImagePusher,
    list_tags,
    make_layer,
    make_layer_blob,
    push_blob,
    push_image,
    push_signature,
    read_blob,
    read_manifest,
    sha256_digest,
)
from rke2_mirror_testkit.registry_proc import free_port
from rke2_mirror_testkit.tokenserver import decode_jwt

ADMIN = ("admin", "Harbor12345")
DEV = ("dev", "dev-pw")


def _ctx(ca_file) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


# --------------------------------------------------------------------------- units


def test_make_layer_is_deterministic_real_tar_gz():
    a = make_layer("s", 3000)
    assert a == make_layer("s", 3000)
    assert a != make_layer("t", 3000)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a))) as tf:
        (member,) = tf.getmembers()
        assert member.size == 3000
    b = make_layer_blob("s", 3000)
    assert b.data == a and b.digest == sha256_digest(a)
    assert b.diff_id == sha256_digest(gzip.decompress(a))


def test_free_port_is_loopback_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_env_is_isolated(rke2_mirror_env):
    assert os.environ["DOCKER_CONFIG"] == str(rke2_mirror_env.docker_config)
    assert not any(rke2_mirror_env.docker_config.iterdir())
    for name in ("REGISTRY_AUTH_FILE", "RKE2_MIRROR_USERNAME", "RKE2_MIRROR_PASSWORD"):
        assert name not in os.environ
    path = rke2_mirror_env.write_docker_auth("127.0.0.1:5000", "u", "p")
    assert json.loads(path.read_text())["auths"]["127.0.0.1:5000"]["auth"] == "dTpw"


# --------------------------------------------------------------------------- anonymous


def test_anonymous_registry_multiarch_push_pull(registry):
    assert registry.url.startswith("http://127.0.0.1:")
    with ImagePusher(registry.url) as p:
        base = make_layer_blob("base", 4096)
        img = push_image(p, "library/demo", "v1", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")],
                         base=base, windows=True, seed="demo")
        again = push_image(p, "library/demo", "v1", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")],
                           base=base, windows=True, seed="demo")
        assert again.digest == img.digest  # deterministic
        oci = push_image(p, "library/demo", "oci", kind="oci", platforms=None, seed="demo-oci",
                         annotations={"org.opencontainers.image.source": "test"})
        sig = push_signature(p, "library/demo", img.digest)

    assert img.media_type == DOCKER_LIST
    assert [c[0] for c in img.children] == ["linux/amd64", "linux/arm64/v8", "windows/amd64"]
    assert base.digest in img.blobs

    # pull with plain httpx
    with httpx.Client(base_url=registry.url) as c:
        r = c.get("/v2/library/demo/manifests/v1", headers={"Accept": DOCKER_LIST})
        assert r.status_code == 200
        assert r.headers["Content-Type"] == DOCKER_LIST
        assert r.headers["Docker-Content-Digest"] == img.digest
        index = r.json()
        win = [m for m in index["manifests"] if m["platform"]["os"] == "windows"][0]
        assert win["platform"]["os.version"] == WINDOWS_OS_VERSION
        arm = [m for m in index["manifests"] if m["platform"]["architecture"] == "arm64"][0]
        assert arm["platform"]["variant"] == "v8"
        child = c.get(f"/v2/library/demo/manifests/{arm['digest']}", headers={"Accept": DOCKER_MANIFEST}).json()
        assert child["layers"][0]["digest"] == base.digest
        config = c.get(f"/v2/library/demo/blobs/{child['config']['digest']}").json()
        assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")
        layer = c.get(f"/v2/library/demo/blobs/{child['layers'][1]['digest']}").content
        assert sha256_digest(gzip.decompress(layer)) == config["rootfs"]["diff_ids"][1]
        assert c.get("/v2/_catalog").json()["repositories"] == ["library/demo"]

    mt, data, digest = read_manifest(registry.url, "library/demo", "oci")
    assert (mt, digest) == (OCI_MANIFEST, oci.digest)
    assert json.loads(data)["annotations"] == {"org.opencontainers.image.source": "test"}
    sig_tag = img.digest.replace(":", "-") + ".sig"
    assert list_tags(registry.url, "library/demo") == sorted(["v1", "oci", sig_tag])
    mt, data, digest = read_manifest(registry.url, "library/demo", sig_tag)
    assert digest == sig and json.loads(data)["layers"][0]["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert read_blob(registry.url, "library/demo", base.digest) == base.data
    assert list_tags(registry.url, "nothing/here") == []
    assert any("PUT /v2/library/demo/manifests/v1" in l for l in registry.access_log())


def test_oci_index(tls_registry):
    with ImagePusher(tls_registry.url, verify=tls_registry.ca_file) as p:
        img = push_image(p, "x/y", "1", kind="oci", platforms=[("linux", "amd64"), ("linux", "s390x")],
                         annotations={"a": "b"})
        mt, data, _ = read_manifest(p, "x/y", "1")
    assert mt == OCI_INDEX == img.media_type
    doc = json.loads(data)
    assert doc["mediaType"] == OCI_INDEX and doc["annotations"] == {"a": "b"}
    assert {m["mediaType"] for m in doc["manifests"]} == {OCI_MANIFEST}
    # TLS really is verified: an untrusted client fails
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_registry.url + "/v2/", verify=True)


# --------------------------------------------------------------------------- htpasswd


@pytest.mark.parametrize("fixture", ["basic_registry", "basic_tls_registry"])
def test_htpasswd_registry(request, fixture):
    reg = request.getfixturevalue(fixture)
    verify = _ctx(reg.ca_file) if reg.ca_file else True
    assert (reg.scheme == "https") == (fixture == "basic_tls_registry")
    r = httpx.get(reg.url + "/v2/", verify=verify)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic ")
    assert httpx.get(reg.url + "/v2/", verify=verify, auth=("alice", "nope")).status_code == 401
    assert httpx.get(reg.url + "/v2/", verify=verify, auth=("alice", "wonderland-pw")).status_code == 200
    with ImagePusher(reg.url, auth=("alice", "wonderland-pw"), verify=verify) as p:
        img = push_image(p, "team/app", "latest", platforms=None)
    assert read_manifest(reg.url, "team/app", "latest", auth=("alice", "wonderland-pw"), verify=verify)[2] == img.digest


def test_registry_factory_many(registry_factory):
    a = registry_factory()
    b = registry_factory()
    assert a.port != b.port
    assert httpx.get(a.url + "/v2/").status_code == 200
    b.stop()
    assert b.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(b.url + "/v2/")


# --------------------------------------------------------------------------- token registry


def test_token_registry(token_registry):
    tr = token_registry
    verify = _ctx(tr.ca_file)
    assert tr.url.startswith("https://127.0.0.1:")
    r = httpx.get(tr.url + "/v2/nothing/here/manifests/latest", verify=verify)
    assert r.status_code == 401
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{tr.realm}"' in challenge and 'service="rke2-mirror-test"' in challenge

    # wrong password -> 401 from the token service
    r = httpx.get(tr.realm, params={"service": "rke2-mirror-test", "scope": "repository:rancher/x:pull"},
                  auth=("admin", "wrong"), verify=verify)
    assert r.status_code == 401
    # anonymous: pull on public project only
    r = httpx.get(tr.realm, params={"service": "rke2-mirror-test",
                                    "scope": ["repository:library/a:pull,push", "repository:rancher/a:pull"]},
                  verify=verify)
    _, claims = decode_jwt(r.json()["token"])
    assert claims["access"] == [{"type": "repository", "name": "library/a", "actions": ["pull"]},
                                {"type": "repository", "name": "rancher/a", "actions": []}]

    n0 = len(tr.token_requests)
    with ImagePusher(tr.url, auth=ADMIN, verify=verify) as p:
        img = push_image(p, "rancher/rke2-runtime", "v1.30.0", platforms=[("linux", "amd64")])
    assert len(tr.token_requests) > n0
    assert all(t.user == "admin" for t in tr.token_requests[n0:])
    assert read_manifest(tr.url, "rancher/rke2-runtime", "v1.30.0", auth=DEV, verify=verify)[2] == img.digest

    # dev is not a member of "other": token is granted without push and the registry refuses
    with ImagePusher(tr.url, auth=DEV, verify=verify) as p:
        with pytest.raises(RuntimeError, match="401"):
            push_blob(p, "other/app", Blob.of(b"nope"))
        push_blob(p, "rancher/app", Blob.of(b"yes"))  # member of rancher
    last_other = [t for t in tr.token_requests if t.user == "dev" and "other/app" in t.scope][-1]
    assert all("push" not in g[2] for g in last_other.granted)


# --------------------------------------------------------------------------- harbor


def test_harbor_api(harbor):
    verify = _ctx(harbor.ca_file)
    with httpx.Client(base_url=harbor.url, verify=verify) as c:
        r = c.get("/api/v2.0/systeminfo")
        assert r.status_code == 200 and r.json()["harbor_version"] == "v2.10.0-test"
        assert c.get("/api/v2.0/ping").text == "Pong"
        assert c.head("/api/v2.0/projects", params={"project_name": "rancher"}).status_code == 404
        body = {"project_name": "rancher", "metadata": {"public": "false"}}
        assert c.post("/api/v2.0/projects", json=body).status_code == 401
        assert c.post("/api/v2.0/projects", json=body, auth=("admin", "bad")).status_code == 401
        assert c.post("/api/v2.0/projects", json=body, auth=DEV).status_code == 403
        r = c.post("/api/v2.0/projects", json=body, auth=ADMIN)
        assert r.status_code == 201 and r.headers["Location"].startswith("/api/v2.0/projects/")
        assert c.post("/api/v2.0/projects", json=body, auth=ADMIN).status_code == 409
        assert c.head("/api/v2.0/projects", params={"project_name": "rancher"}).status_code == 200
        assert c.get("/api/v2.0/projects/rancher", auth=DEV).json()["name"] == "rancher"
        assert c.get("/api/v2.0/projects/nope", auth=ADMIN).status_code == 404
    assert harbor.projects["rancher"].public is False


def test_harbor_push_through_proxy(harbor_factory):
    harbor = harbor_factory(projects={"rancher": {"public": True}})
    verify = _ctx(harbor.ca_file)
    # the registry's realm is the front's own /service/token
    r = httpx.get(harbor.url + "/v2/", verify=verify)
    assert r.status_code == 401
    assert f'realm="{harbor.url}/service/token"' in r.headers["WWW-Authenticate"]

    big = make_layer_blob("big", 5 * 1024 * 1024)
    with ImagePusher(harbor.url, auth=DEV, verify=verify) as p:
        push_blob(p, "rancher/big", big)
        img = push_image(p, "rancher/big", "v1", platforms=None, base=big, layer_sizes=[100])
        # Location headers point at the front, not the backend registry
        r = p.request("POST", "/v2/rancher/big/blobs/uploads/", repo="rancher/big")
        assert r.status_code == 202 and r.headers["Location"].startswith(harbor.url)
        # streamed chunked upload through the proxy (PATCH with Transfer-Encoding: chunked)
        def gen():
            for i in range(0, len(big.data), 300_000):
                yield big.data[i:i + 300_000]
        r2 = p.request("PATCH", r.headers["Location"], repo="rancher/big", content=gen(),
                       headers={"Content-Type": "application/octet-stream"})
        assert r2.status_code == 202, r2.text
        assert r2.headers["Range"] == f"0-{big.size - 1}"
        r3 = p.request("PUT", r2.headers["Location"] + f"&digest={big.digest}", repo="rancher/big")
        assert r3.status_code == 201, r3.text
    # anonymous pull of a public project works; blob comes back intact over TLS
    assert read_blob(harbor.url, "rancher/big", big.digest, verify=verify) == big.data
    with httpx.Client(verify=verify) as c:
        r = c.head(harbor.url + f"/v2/rancher/big/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        assert r.status_code == 401  # no token yet: challenge passes through the proxy
    assert read_manifest(harbor.url, "rancher/big", "v1", verify=verify)[2] == img.digest
    assert any(t.user is None for t in harbor.token_requests)

    # dev cannot push to a project it is not a member of; admin cannot push into a missing project
    harbor.add_project("other")
    with ImagePusher(harbor.url, auth=DEV, verify=verify) as p:
        with pytest.raises(RuntimeError, match="401"):
            push_blob(p, "other/x", Blob.of(b"data"))
    with ImagePusher(harbor.url, auth=ADMIN, verify=verify) as p:
        with pytest.raises(RuntimeError, match="401"):
            push_blob(p, "missing/x", Blob.of(b"data"))
        push_blob(p, "other/x", Blob.of(b"data"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(harbor.url + "/api/v2.0/ping", verify=True)  # not trusted without the CA
