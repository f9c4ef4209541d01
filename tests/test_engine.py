"""The copy engine through its Python API: retries, redirects, chunked uploads, schema1, faults.

Faults a real registry won't produce come from a transport wrapped around the real one.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from rke2_mirror.engine.copy import CopyEngine, CopyOptions, CopyTask
from rke2_mirror.model.errors import UnsupportedManifest
from rke2_mirror.model.oci import DOCKER_SCHEMA1_SIGNED
from rke2_mirror.model.reference import ImageRef, RegistryURL, target_ref
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.endpoints.routing import SourceRouter, TargetLocator
from rke2_mirror_testkit.images import ImagePusher, blob_exists, list_tags, push_image, read_manifest

FAST = RetryPolicy(attempts=4, initial_wait=0.01, max_wait=0.2)


class FaultTransport(httpx.BaseTransport):
    """Delegates to a real transport; `rule(request) -> httpx.Response | Exception | None` injects faults."""

    def __init__(self, rule):
        self.inner = httpx.HTTPTransport()
        self.rule = rule
        self.seen: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.seen.append((request.method, str(request.url), dict(request.headers)))
            fault = self.rule(request)
        if isinstance(fault, Exception):
            raise fault
        if fault is not None:
            return fault
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def engine_copy(src_url: str, dst_url: str, refs: list[str], *, src_transport=None, dst_transport=None,
                options: CopyOptions | None = None, **dst_kw):
    target = RegistryURL.parse(dst_url)
    router = SourceRouter(lambda base: Registry(base, retry=FAST, transport=src_transport),
                          {"docker.io": RegistryURL.parse(src_url)})
    dst = Registry(target.base_url, retry=FAST, actions="pull,push", transport=dst_transport, **dst_kw)
    tasks = [CopyTask(r, target_ref(r, target)) for r in map(ImageRef.parse, refs)]
    try:
        return CopyEngine(router, TargetLocator(dst), options or CopyOptions(retry=FAST)).run(tasks)
    finally:
        router.close()
        dst.close()


@pytest.fixture
def pair(registry_factory):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, "rancher/app", "v1", seed="app", layer_sizes=(200_000,))
    return src, dst, img


def test_transient_faults_are_retried(pair):
    src, dst, img = pair
    counts: dict[str, int] = {}

    def rule(req: httpx.Request):
        path = req.url.path
        key = None
        if "/blobs/sha256" in path and req.method == "GET":
            key = "blob-get"
        elif "/manifests/" in path and req.method == "GET":
            key = "manifest-get"
        if key is None:
            return None
        n = counts[key] = counts.get(key, 0) + 1
        if key == "blob-get" and n == 1:
            return httpx.Response(503, text="busy")
        if key == "blob-get" and n == 2:
            return httpx.Response(429, headers={"Retry-After": "0"})
        if key == "blob-get" and n == 3:
            return httpx.ConnectError("connection reset by peer")
        if key == "manifest-get" and n == 1:
            return httpx.Response(502)
        return None

    t = FaultTransport(rule)
    rep = engine_copy(src.url, dst.url, ["rancher/app:v1"], src_transport=t)
    assert [r.status for r in rep.images] == ["copied"], rep.images[0].error
    assert read_manifest(dst.url, "rancher/app", "v1")[2] == img.digest
    assert counts["blob-get"] > 3


def test_retry_after_is_honoured(pair):
    src, dst, img = pair
    policy = RetryPolicy(attempts=3, initial_wait=5.0, max_wait=10.0)
    # A 429 with Retry-After: 0 must wait ~0 s, not the 5 s exponential base.
    assert policy.wait(1, type("E", (), {"retry_after": 0.0})()) == 0.0
    assert policy.wait(2, None) == 10.0
    from rke2_mirror.endpoints.registry import status_error
    err = status_error(httpx.Response(429, headers={"Retry-After": "7"}, request=httpx.Request("GET", "http://x")), "x")
    assert err.temporary and err.retry_after == 7.0


def test_permanent_fault_fails_the_image_and_tags_nothing(pair):
    src, dst, img = pair

    def rule(req):
        if "/blobs/sha256" in req.url.path and req.method == "GET":
            return httpx.Response(500)
        return None

    rep = engine_copy(src.url, dst.url, ["rancher/app:v1"], src_transport=FaultTransport(rule))
    r = rep.images[0]
    assert r.status == "failed" and "HTTP 500" in r.error
    assert list_tags(dst.url, "rancher/app") == []


def test_truncated_blob_body_is_not_committed(pair):
    src, dst, img = pair
    from rke2_mirror.model.oci import parse_manifest
    layer = parse_manifest(None, img.child_manifests[img.child("linux/amd64")]).layers[-1]

    def rule(req):
        if req.method == "GET" and req.url.path.endswith(layer.digest):
            real = httpx.HTTPTransport().handle_request(req)
            body = real.read()[: layer.size // 2]
            return httpx.Response(200, content=body, headers={"Content-Type": "application/octet-stream"})
        return None

    rep = engine_copy(src.url, dst.url, ["rancher/app:v1"], src_transport=FaultTransport(rule))
    assert rep.images[0].status == "failed" and "bytes" in rep.images[0].error
    with ImagePusher(dst.url) as p:
        assert not blob_exists(p, "rancher/app", layer.digest)
    assert list_tags(dst.url, "rancher/app") == []


def test_blob_redirect_followed_without_leaking_credentials(pair, registry_factory):
    src, dst, img = pair
    storage = src.url.replace("127.0.0.1", "localhost")  # another origin, same content

    def rule(req):
        if req.method == "GET" and "/blobs/sha256" in req.url.path and req.url.host == "127.0.0.1":
            return httpx.Response(307, headers={"Location": storage + req.url.path})
        return None

    t = FaultTransport(rule)
    target = RegistryURL.parse(dst.url)
    router = SourceRouter(lambda base: Registry(base, retry=FAST, transport=t), {"docker.io": RegistryURL.parse(src.url)})
    # Pretend the source challenged us for basic auth, so it would send credentials if it leaked them.
    from rke2_mirror.endpoints.auth import Challenge, Credentials
    reg, _ = router.locate(ImageRef.parse("rancher/app:v1"))
    reg.auth.credentials = Credentials("u", "secret")
    reg.auth.challenge = Challenge("basic", {})
    dst_reg = Registry(target.base_url, retry=FAST, actions="pull,push")
    rep = CopyEngine(router, TargetLocator(dst_reg), CopyOptions(retry=FAST)).run(
        [CopyTask(ImageRef.parse("rancher/app:v1"), target_ref(ImageRef.parse("rancher/app:v1"), target))])
    assert rep.images[0].status == "copied", rep.images[0].error
    redirected = [h for m, u, h in t.seen if u.startswith(storage)]
    assert redirected and all("authorization" not in h for h in redirected)
    assert any("authorization" in h for m, u, h in t.seen if u.startswith(src.url))


def test_large_blob_goes_up_in_chunks(registry_factory):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, "rancher/big", "v1", seed="big", platforms=None, layer_sizes=(3_000_000,))
    patches = []

    def rule(req):
        if req.method == "PATCH":
            patches.append(req.headers.get("content-range"))
        return None

    rep = engine_copy(src.url, dst.url, ["rancher/big:v1"], dst_transport=FaultTransport(rule),
                      chunk_size=1_000_000, monolithic_limit=100_000)
    assert rep.images[0].status == "copied", rep.images[0].error
    assert read_manifest(dst.url, "rancher/big", "v1")[2] == img.digest
    # the ~3 MB layer in 1 MB PATCHes with contiguous ranges
    big = [r for r in patches if r]
    assert len(big) >= 3 and big[0].startswith("0-999999") and big[1].startswith("1000000-")


def test_schema1_is_refused_with_a_clear_error(registry):
    raw = json.dumps({"schemaVersion": 1, "name": "rancher/old", "tag": "v0", "fsLayers": []}).encode()

    def rule(req):
        if "/manifests/" in req.url.path:
            headers = {"Content-Type": DOCKER_SCHEMA1_SIGNED, "Docker-Content-Digest": "sha256:" + "0" * 64}
            return httpx.Response(200, content=b"" if req.method == "HEAD" else raw, headers=headers)
        return None

    rep = engine_copy(registry.url, registry.url + "/copy", ["rancher/old:v0"], src_transport=FaultTransport(rule))
    assert rep.images[0].status == "failed" and "schema1" in rep.images[0].error
    with pytest.raises(UnsupportedManifest):
        from rke2_mirror.model.oci import parse_manifest
        parse_manifest(DOCKER_SCHEMA1_SIGNED, raw)


def test_dry_run_reports_without_writing(pair):
    src, dst, img = pair
    rep = engine_copy(src.url, dst.url, ["rancher/app:v1", "rancher/absent:v9"],
                      options=CopyOptions(retry=FAST, dry_run=True))
    by = {r.source: r for r in rep.images}
    assert by["docker.io/rancher/app:v1"].status == "would-copy" and by["docker.io/rancher/app:v1"].bytes > 200_000
    assert by["docker.io/rancher/absent:v9"].status == "missing"
    assert dst.access_log() == [] or all('"PUT ' not in l and '"POST ' not in l for l in dst.access_log())
    assert list_tags(dst.url, "rancher/app") == []


def test_connection_reset_mid_blob_and_read_stall_are_retried(pair):
    src, dst, img = pair
    from rke2_mirror.model.oci import parse_manifest
    layer = parse_manifest(None, img.child_manifests[img.child("linux/amd64")]).layers[-1]
    faults = {"reset": 0, "stall": 0}

    def rule(req):
        if req.method != "GET" or not req.url.path.endswith(layer.digest):
            return None
        if faults["reset"] == 0:
            faults["reset"] += 1
            real = httpx.HTTPTransport().handle_request(req)
            body = real.read()

            def broken():
                yield body[:1000]
                raise httpx.ReadError("connection reset by peer")
            return httpx.Response(200, content=broken(), headers={"Content-Length": str(len(body))})
        if faults["stall"] == 0:
            faults["stall"] += 1
            return httpx.ReadTimeout("timed out")
        return None

    rep = engine_copy(src.url, dst.url, ["rancher/app:v1"], src_transport=FaultTransport(rule))
    assert rep.images[0].status == "copied", rep.images[0].error
    assert faults == {"reset": 1, "stall": 1}
    assert read_manifest(dst.url, "rancher/app", "v1")[2] == img.digest
