"""The registry client's transport stack (endpoints/transport.py) and the Registry on top of it, with
httpx.MockTransport in place of the network: per-exchange retries, what is never replayed, Retry-After,
token fetches asked at most `attempts` times, the rate cap, the pull-budget observer and cancellation."""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import pytest

from rke2_mirror.endpoints import transport as tx
from rke2_mirror.endpoints.registry import SMALL_BLOB, Registry
from rke2_mirror.engine.cancel import Cancel, Cancelled
from rke2_mirror.engine.retry import RetryPolicy, retryable
from rke2_mirror.model.errors import (
    NotFound,
    RegistryError,
    TemporaryError,
    TLSError,
    UnreachableError,
)
from rke2_mirror.model.oci import Descriptor

FAST = RetryPolicy(attempts=3, initial_wait=0.001, max_wait=0.01)
BLOB = Descriptor("application/octet-stream", "sha256:" + "ab" * 32, 10)
BIG = Descriptor("application/octet-stream", "sha256:" + "cd" * 32, SMALL_BLOB)


class Script:
    """A MockTransport handler: `answers` (responses, exceptions or callables) are given out in turn,
    the last one again and again; every request is recorded."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        a = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if callable(a) and not isinstance(a, httpx.Response):
            a = a(request)
        if isinstance(a, Exception):
            raise a
        return a

    @property
    def count(self) -> int:
        return len(self.seen)


def client(handler, **kw) -> httpx.Client:
    return httpx.Client(transport=tx.wrap(httpx.MockTransport(handler), retry=kw.pop("retry", FAST), **kw),
                        base_url="http://reg.test")


class RecordingCancel(Cancel):
    def __init__(self):
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


# --------------------------------------------------------------------------- the transport


def test_a_503_then_200_is_retried():
    s = Script(httpx.Response(503), httpx.Response(200, text="ok"))
    with client(s) as c:
        r = c.get("/v2/")
    assert r.status_code == 200 and r.text == "ok" and s.count == 2


def test_connection_errors_are_retried_and_the_last_one_is_raised_exhausted():
    s = Script(httpx.ConnectError("refused"), httpx.Response(200))
    with client(s) as c:
        assert c.get("/v2/").status_code == 200 and s.count == 2
    s = Script(httpx.ConnectError("refused"))
    with client(s) as c, pytest.raises(httpx.ConnectError) as e:
        c.get("/v2/")
    assert s.count == FAST.attempts and e.value.exhausted


def test_the_last_failing_response_is_returned_and_marked():
    s = Script(httpx.Response(500))
    with client(s) as c:
        r = c.get("/v2/")
    assert r.status_code == 500 and s.count == FAST.attempts and tx.was_exhausted(r)
    with client(Script(httpx.Response(404))) as c:
        assert not tx.was_exhausted(c.get("/v2/"))  # not retryable: nothing to mark


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retried_statuses(status):
    s = Script(httpx.Response(status), httpx.Response(200))
    with client(s) as c:
        assert c.get("/v2/").status_code == 200 and s.count == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_other_statuses_go_out_once(status):
    s = Script(httpx.Response(status))
    with client(s) as c:
        assert c.get("/v2/").status_code == status and s.count == 1


def test_a_streaming_body_is_not_retried():
    s = Script(httpx.Response(503), httpx.Response(202))
    with client(s) as c:
        r = c.patch("/v2/a/blobs/uploads/x", content=iter([b"chunk"]))
    assert r.status_code == 503 and s.count == 1 and not tx.was_exhausted(r)
    s = Script(httpx.ConnectError("reset"), httpx.Response(202))
    with client(s) as c, pytest.raises(httpx.ConnectError) as e:
        c.patch("/v2/a/blobs/uploads/x", content=iter([b"chunk"]))
    assert s.count == 1 and not getattr(e.value, "exhausted", False)


def test_a_bytes_body_is_replayed_unless_marked_no_retry():
    s = Script(httpx.Response(503), lambda req: httpx.Response(201, content=req.read()))
    with client(s) as c:
        r = c.put("/v2/a/manifests/v1", content=b"{}")
    assert r.status_code == 201 and r.content == b"{}" and s.count == 2
    s = Script(httpx.Response(503), httpx.Response(201))
    with client(s) as c:
        r = c.put("/v2/a/blobs/uploads/x?digest=d", content=b"data", extensions={tx.NO_RETRY: True})
    assert r.status_code == 503 and s.count == 1


def test_retry_after_is_honoured():
    cancel = RecordingCancel()
    slow = RetryPolicy(attempts=3, initial_wait=5.0, max_wait=10.0)
    s = Script(httpx.Response(429, headers={"Retry-After": "0.05"}), httpx.Response(200))
    t0 = time.monotonic()
    with client(s, retry=slow, cancel=cancel) as c:
        assert c.get("/v2/").status_code == 200
    assert cancel.sleeps == [0.05] and 0.04 < time.monotonic() - t0 < 2
    s = Script(httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200))
    with client(s, retry=RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.02), cancel=cancel) as c:
        assert c.get("/v2/").status_code == 200
    assert cancel.sleeps[-1] == 0.02  # capped by max_wait


def test_a_body_that_breaks_is_retried_when_the_caller_reads_it_whole():
    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield b'{"par'
            raise httpx.ReadError("connection reset")

    s = Script(lambda req: httpx.Response(200, stream=Broken()), httpx.Response(200, text='{"ok": 1}'))
    with client(s) as c:
        r = c.get("/v2/a/manifests/v1", extensions={tx.READ_BODY: True})
    assert r.json() == {"ok": 1} and s.count == 2
    s = Script(lambda req: httpx.Response(200, stream=Broken()), httpx.Response(200, text="x"))
    with client(s) as c, c.stream("GET", "/v2/a/blobs/sha256:1") as r, pytest.raises(httpx.ReadError):
        r.read()  # a stream is the caller's: the engine restarts the copy
    assert s.count == 1


def test_limiter_and_observer_see_every_exchange():
    calls = []
    seen: list[tuple[int, str]] = []
    s = Script(httpx.Response(503), httpx.ConnectError("reset"), httpx.Response(200))
    with client(s, limiter=lambda: calls.append(1), observe=lambda r: seen.append((r.status_code, r.request.url.path))) as c:
        c.get("/v2/x/manifests/1")
    assert len(calls) == 3 == s.count  # every attempt waits for its slot
    assert seen == [(503, "/v2/x/manifests/1"), (200, "/v2/x/manifests/1")]  # every response, retried ones too


def test_a_set_cancel_token_stops_the_next_request():
    cancel = Cancel()
    s = Script(httpx.Response(200))
    with client(s, cancel=cancel) as c:
        c.get("/v2/")
        cancel.set()
        with pytest.raises(Cancelled):
            c.get("/v2/")
    assert s.count == 1


def test_cancel_wakes_a_retry_wait_at_once():
    cancel = Cancel()
    s = Script(httpx.Response(503, headers={"Retry-After": "30"}))
    threading.Timer(0.1, cancel.set).start()
    t0 = time.monotonic()
    with client(s, cancel=cancel, retry=RetryPolicy(attempts=3, max_wait=30)) as c, pytest.raises(Cancelled):
        c.get("/v2/")
    assert time.monotonic() - t0 < 5 and s.count == 1


def test_the_limiter_wait_is_followed_by_a_cancel_check():
    cancel = Cancel()
    s = Script(httpx.Response(200))
    with client(s, cancel=cancel, limiter=lambda: cancel.set()) as c, pytest.raises(Cancelled):
        c.get("/v2/")
    assert s.count == 0


# --------------------------------------------------------------------------- the registry on top


def registry(handler, **kw) -> Registry:
    return Registry("http://reg.test", retry=kw.pop("retry", FAST), transport=httpx.MockTransport(handler), **kw)


BEARER = {"WWW-Authenticate": 'Bearer realm="http://auth.test/token",service="reg.test"'}


def token_flow(token_answers: list, then=lambda req: httpx.Response(200)):
    """A registry behind a token service answering `token_answers` in turn (the last one repeated)."""
    counts = {"token": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "auth.test":
            counts["token"] += 1
            a = token_answers[min(counts["token"], len(token_answers)) - 1]
            return a if isinstance(a, httpx.Response) else httpx.Response(200, json={"token": "t"})
        if req.headers.get("authorization") != "Bearer t":
            return httpx.Response(401, headers=BEARER)
        return then(req)
    return handler, counts


def test_a_failing_token_service_is_asked_at_most_attempts_times_in_total():
    handler, counts = token_flow([httpx.Response(503)])
    with registry(handler) as reg, pytest.raises(TemporaryError) as e:
        reg.head_manifest("a", "v1")
    assert counts["token"] == FAST.attempts  # not attempts² (the request around it is not retried for it)
    assert e.value.exhausted and not retryable(e.value)  # so the engine does not multiply it either
    with registry(handler) as reg, pytest.raises(TemporaryError):
        FAST.call(lambda: reg.head_manifest("a", "v1"))
    assert counts["token"] == 2 * FAST.attempts


def test_a_token_service_failing_twice_then_answering():
    handler, counts = token_flow([httpx.Response(503), httpx.Response(502), "ok"],
                                 then=lambda req: httpx.Response(200, headers={"Docker-Content-Digest": "sha256:1"}))
    with registry(handler) as reg:
        assert reg.head_manifest("a", "v1").digest == "sha256:1"
    assert counts["token"] == 3


def test_ping_turns_a_temporary_failure_into_unreachable():
    s = Script(httpx.ConnectError("connection refused"))
    with registry(s) as reg, pytest.raises(UnreachableError) as e:
        reg.ping()
    assert s.count == FAST.attempts and "cannot connect to http://reg.test" in str(e.value)
    s = Script(httpx.Response(503), httpx.Response(200))
    with registry(s) as reg:
        assert reg.ping() is None and s.count == 2


def test_tls_failures_are_not_retried_and_name_the_flags():
    import ssl
    exc = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    s = Script(exc)
    with registry(s, tls_flags=("--src-ca-file", "--src-insecure-skip-verify")) as reg, pytest.raises(TLSError) as e:
        reg.ping()
    assert s.count == 1 and "--src-ca-file" in str(e.value) and "--src-insecure-skip-verify" in str(e.value)


def test_registry_errors_after_the_transport_retried_are_exhausted():
    s = Script(httpx.Response(500, json={"errors": [{"code": "UNKNOWN", "message": "boom"}]}))
    with registry(s) as reg, pytest.raises(TemporaryError) as e:
        reg.get_manifest("a", "v1")
    assert s.count == FAST.attempts and "HTTP 500 UNKNOWN: boom" in str(e.value) and e.value.exhausted


def test_digest_invalid_on_a_manifest_put_is_retried_within_the_attempts():
    bad = httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID", "message": "provided digest did not match"}]})
    s = Script(bad, httpx.Response(201))
    with registry(s) as reg:
        reg.put_manifest("a", "v1", "application/vnd.oci.image.manifest.v1+json", b"{}")
    assert s.count == 2
    s = Script(bad)
    with registry(s) as reg, pytest.raises(TemporaryError) as e:
        reg.put_manifest("a", "v1", "application/vnd.oci.image.manifest.v1+json", b"{}")
    assert s.count == FAST.attempts and e.value.status == 400 and e.value.exhausted
    s = Script(httpx.Response(400, json={"errors": [{"code": "MANIFEST_INVALID"}]}))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        reg.put_manifest("a", "v1", "application/vnd.oci.image.manifest.v1+json", b"{}")
    assert s.count == 1 and not e.value.temporary


def test_upload_session_steps_go_out_once_and_stay_retryable_for_the_engine():
    def handler(req):
        if req.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/a/blobs/uploads/u1?_state=s"})
        return httpx.Response(500)
    s = Script(handler)
    with registry(s) as reg, pytest.raises(TemporaryError) as e:
        reg.push_blob("a", BLOB, [b"0123456789"])
    assert [r.method for r in s.seen] == ["POST", "PUT"]
    assert retryable(e.value)  # the engine restarts the copy with a new session
    put = s.seen[-1]
    assert put.url.params["digest"] == BLOB.digest and put.url.params["_state"] == "s"


def test_chunked_upload_patches_are_not_replayed():
    def handler(req):
        if req.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/a/blobs/uploads/u1"})
        return httpx.Response(503)
    s = Script(handler)
    desc = Descriptor("application/octet-stream", BLOB.digest, 10)
    with Registry("http://reg.test", retry=FAST, transport=httpx.MockTransport(s), monolithic_limit=4,
                  chunk_size=4) as reg, pytest.raises(TemporaryError):
        reg.push_blob("a", desc, [b"0123456789"])
    assert [r.method for r in s.seen] == ["POST", "PATCH"]


def test_open_blob_yields_the_raw_bytes_and_follows_redirects_without_credentials():
    def handler(req):
        if req.url.host == "auth.test":
            return httpx.Response(200, json={"token": "t"})
        if req.url.host == "cdn.test":
            assert "authorization" not in req.headers
            return httpx.Response(200, content=b"not what the digest names")
        if req.headers.get("authorization") != "Bearer t":
            return httpx.Response(401, headers=BEARER)
        return httpx.Response(307, headers={"Location": "http://cdn.test/blob?sig=1"})
    s = Script(handler)
    with registry(s) as reg, reg.open_blob("a", BLOB) as chunks:
        assert b"".join(chunks) == b"not what the digest names"  # unchecked: the engine checks
    assert [r.url.host for r in s.seen] == ["reg.test", "auth.test", "reg.test", "cdn.test"]


def test_open_blob_maps_errors():
    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield b"abc"
            raise httpx.ReadError("connection reset")

    with registry(Script(httpx.Response(404))) as reg, pytest.raises(NotFound), reg.open_blob("a", BLOB):
        pass
    s = Script(lambda req: httpx.Response(200, stream=Broken()))
    with registry(s) as reg, pytest.raises(TemporaryError) as e, reg.open_blob("a", BLOB) as chunks:
        b"".join(chunks)
    assert s.count == 1 and retryable(e.value)


def test_reuse_blob_mounts_heads_or_says_upload():
    def handler(req):
        if req.method == "POST" and req.url.params.get("from") == "ok":
            return httpx.Response(201)
        if req.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/a/blobs/uploads/u9"})
        if req.method == "HEAD":
            return httpx.Response(200 if BIG.digest in req.url.path else 404)
        return httpx.Response(204)
    s = Script(handler)
    with registry(s, actions="pull,push") as reg:
        assert reg.reuse_blob("a", BIG, fresh=True, mount_from="ok")
        assert [(r.method, r.url.params.get("mount")) for r in s.seen] == [("POST", BIG.digest)]
        s.seen.clear()
        assert not reg.reuse_blob("a", BIG, fresh=True, mount_from=None) and s.seen == []  # new repo: no HEAD
        assert not reg.reuse_blob("a", BLOB, fresh=False, mount_from=None) and s.seen == []  # small: no HEAD
        assert reg.reuse_blob("a", BIG, fresh=False, mount_from=None)
        assert [r.method for r in s.seen] == ["HEAD"]
        s.seen.clear()
        assert reg.reuse_blob("a", BIG, fresh=False, mount_from="refused")  # mount refused, HEAD finds it
        assert [r.method for r in s.seen] == ["POST", "DELETE", "HEAD"]  # the refused mount's session dropped
        assert reg.has_blob("a", BIG) and not reg.has_blob("a", BLOB)


def test_manifest_gets_are_pulls_only_at_docker_hub():
    from rke2_mirror.engine.protocols import Destination, Source, counts_pulls
    hub = Registry("https://registry-1.docker.io", transport=httpx.MockTransport(Script(httpx.Response(200))))
    other = registry(Script(httpx.Response(200)))
    assert counts_pulls(hub) and not counts_pulls(other)
    assert isinstance(other, Source) and isinstance(other, Destination)
    hub.close()
    other.close()


def test_environment_proxies_are_still_used(monkeypatch):
    """A client given a transport ignores HTTP(S)_PROXY; the Registry builds the proxy mounts itself."""
    got: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            got.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{srv.server_port}")
        monkeypatch.setenv("NO_PROXY", "direct.test")
        monkeypatch.delenv("no_proxy", raising=False)
        assert tx.environment_proxies() == {"http://": f"http://127.0.0.1:{srv.server_port}",
                                            "all://*direct.test": None}
        with Registry("http://registry.example.invalid", retry=FAST) as reg:
            assert reg.ping() is None
        assert got == ["http://registry.example.invalid/v2/"]
        monkeypatch.setenv("NO_PROXY", "*")
        assert tx.environment_proxies() == {}
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- bounded cost, whatever a server sends


class Endless(httpx.SyncByteStream):
    """A body of `chunk`-sized pieces, `limit` of them at most (so a test that fails still ends); counts
    how many were taken."""

    def __init__(self, chunk: int = 64 * 1024, limit: int = 5000, pause: float = 0.0, first: bytes = b""):
        self.piece = b" " * chunk
        self.limit, self.pause, self.first = limit, pause, first
        self.taken = 0

    def __iter__(self):
        if self.first:
            yield self.first
        for _ in range(self.limit):
            if self.pause:
                time.sleep(self.pause)
            self.taken += 1
            yield self.piece


def test_a_manifest_announced_over_the_cap_is_refused_before_anything_is_read():
    from rke2_mirror.endpoints.registry import MAX_MANIFEST_BYTES
    body = Endless()
    s = Script(lambda req: httpx.Response(200, headers={"Content-Length": str(300 * 1024 * 1024)}, stream=body))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        reg.get_manifest("a", "v1")
    assert MAX_MANIFEST_BYTES == 4 * 1024 * 1024
    assert body.taken == 0 and s.count == 1 and not e.value.temporary
    msg = str(e.value)
    assert "http://reg.test/a:v1" in msg and "4194304 bytes (4 MiB)" in msg and "\n" not in msg


def test_a_manifest_without_a_length_is_refused_once_past_the_cap():
    body = Endless()
    s = Script(lambda req: httpx.Response(200, stream=body))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        reg.get_manifest("a", "v1")
    assert body.taken <= 4 * 16 + 1 and s.count == 1  # 64 KiB pieces: the cap and one more, never retried
    assert "longer than the 4194304 bytes" in str(e.value)


def test_error_and_redirect_bodies_are_cut_at_a_few_kib():
    body = Endless(first=b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "' + b"x" * 10000)
    s = Script(lambda req: httpx.Response(404, stream=body))
    with registry(s) as reg, pytest.raises(NotFound) as e:
        reg.get_manifest("a", "v1")
    assert body.taken == 0 and len(str(e.value)) < 400  # the message: the reason phrase, on one line
    body = Endless()
    s = Script(lambda req: httpx.Response(404, stream=body))
    with registry(s) as reg, pytest.raises(NotFound), reg.open_blob("a", BLOB):
        pass
    assert body.taken == 1
    body = Endless()
    s = Script(lambda req: httpx.Response(307, headers={"Location": "http://cdn.test/x"}, stream=body)
               if req.url.host == "reg.test" else httpx.Response(200, content=b"blob"))
    with registry(s) as reg, reg.open_blob("a", BLOB) as chunks:  # httpx reads a redirect's body whole
        assert b"".join(chunks) == b"blob"
    assert body.taken == 1


def test_an_error_message_is_one_short_line():
    s = Script(httpx.Response(400, json={"errors": [{"code": "DENIED", "message": "a\nb\n" + "y" * 5000}]}))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        reg.put_manifest("a", "v1", "application/vnd.oci.image.manifest.v1+json", b"{}")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and "DENIED: a b yyy" in str(e.value)


def test_a_compressed_answer_read_whole_is_refused_and_registries_are_asked_for_identity():
    s = Script(httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"\x1f\x8b"))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        reg.get_manifest("a", "v1")
    assert "gzip-compressed answer refused" in str(e.value)
    assert s.seen[0].headers["accept-encoding"] == "identity"


def test_token_answers_are_capped():
    handler, counts = token_flow([httpx.Response(200, headers={"Content-Length": str(2 * 1024 * 1024)},
                                                 stream=Endless())])
    with registry(handler) as reg, pytest.raises(RegistryError) as e:
        reg.head_manifest("a", "v1")
    assert counts["token"] == 1 and "token service http://auth.test/token" in str(e.value)
    assert "1048576 bytes (1 MiB)" in str(e.value) and not e.value.temporary


def test_harbor_answers_are_capped():
    from rke2_mirror.endpoints.harbor import Harbor
    s = Script(httpx.Response(200, headers={"Content-Length": str(50 * 1024 * 1024)}, stream=Endless()))
    with registry(s) as reg, pytest.raises(RegistryError) as e:
        Harbor(reg, None).create_project("rancher", False)
    assert "Harbor API http://reg.test/api/v2.0/projects" in str(e.value) and "1 MiB" in str(e.value)
    assert s.count == 1


def test_a_trickling_body_is_abandoned_as_a_timeout_and_retried():
    bodies: list[Endless] = []

    def trickle(req):
        bodies.append(Endless(chunk=1, limit=200, pause=0.05))  # 20 bytes/s, for 10 s at most
        return httpx.Response(200, stream=bodies[-1])
    s = Script(trickle)
    t0 = time.monotonic()
    with registry(s, timeout=0.5) as reg, pytest.raises(TemporaryError) as e:
        reg.get_manifest("a", "v1")
    assert time.monotonic() - t0 < 3 and s.count == FAST.attempts and e.value.exhausted
    assert "slower than 1 KiB/s over 0.5s" in str(e.value) and all(b.taken < 20 for b in bodies)
    s = Script(trickle)
    with registry(s, timeout=0.5) as reg, pytest.raises(TemporaryError) as e, reg.open_blob("a", BLOB) as chunks:
        b"".join(chunks)
    assert s.count == 1 and retryable(e.value)  # a stream is the engine's to retry


def test_the_speed_floor_counts_only_the_wait_on_the_other_side():
    floor = tx.SpeedFloor(3.0, "transfer from x")
    floor.account(1.0, 100)
    floor.account(1.0, 100)
    with pytest.raises(tx.TransferTooSlow) as e:
        floor.account(1.0, 100)  # 300 bytes in 3 s
    assert "300 bytes in 3.0s" in str(e.value)
    floor = tx.SpeedFloor(3.0, "x")
    for _ in range(10):
        floor.account(1.0, 1500)  # above 1 KiB/s: never
    # a slow consumer (writing to a slow target) does not make a fast source look slow
    floor = tx.SpeedFloor(0.1, "x")
    t0 = time.monotonic()
    for _ in floor.reading([b"a"] * 5):
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.25


def test_an_upload_to_a_receiver_slower_than_the_floor_is_abandoned():
    class SlowReader(httpx.BaseTransport):
        def handle_request(self, request):
            for _ in request.stream:
                time.sleep(0.05)  # takes one chunk (1 byte) per 50 ms
            return httpx.Response(202)

    chunks = (b"x" for _ in range(400))
    t0 = time.monotonic()
    with httpx.Client(transport=tx.wrap(SlowReader(), retry=FAST, window=0.3), base_url="http://reg.test") as c, \
            pytest.raises(tx.TransferTooSlow) as e:
        c.patch("/v2/a/blobs/uploads/u1", content=chunks)
    assert time.monotonic() - t0 < 3 and "sending to reg.test slower than 1 KiB/s" in str(e.value)


def test_the_stall_window_is_the_registry_timeout():
    def window(reg: Registry) -> float:
        t = reg.transport
        while not isinstance(t, tx.GuardTransport):
            t = t.inner
        return t.window

    mock = httpx.MockTransport(lambda req: httpx.Response(200))
    with Registry("http://reg.test", retry=RetryPolicy(timeout=7.0), transport=mock) as reg:
        assert window(reg) == 7.0
    with Registry("http://reg.test", retry=RetryPolicy(timeout=7.0), timeout=20.0, transport=mock) as reg:
        assert window(reg) == 20.0
