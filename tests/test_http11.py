"""The lean HTTP/1.1 pool under the registry client (endpoints/http11.py), on the wire.

Against a real docker-registry (keep-alive, HEAD then GET on one connection, a chunked upload the registry
verifies, TLS with our CA) and against `Wire`, a socket server that answers each request with scripted raw
bytes, for what a real server won't send: a body cut short, a chunked body without its last chunk, an idle
connection closed, latin-1 header bytes, too many or too long headers, an answer that never comes."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from rke2_mirror.endpoints import http11
from rke2_mirror.endpoints import transport as tx
from rke2_mirror.endpoints.http11 import Http11Transport

Answer = Callable[[bytes, int], tuple[bytes, bool]]  # (request head + body, connection number) -> (raw, close?)


class Wire:
    """A loopback server: every request read whole (head; body by Content-Length or chunked), answered with
    `answer(request, connection_number)` -> (raw bytes, close after?).  Counts connections; bounded: each
    socket times out after 5 s and the server stops at `stop()`."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._conn, args=(conn, self.connections), daemon=True).start()

    def _conn(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(5)
        buf = b""
        with conn:
            try:
                while not self._stop.is_set():
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    body, buf = self._body(conn, head, buf)
                    request = head + b"\r\n\r\n" + body
                    self.requests.append(request)
                    raw, close = self.answer(request, number)
                    conn.sendall(raw)
                    if close:
                        return
            except (OSError, ValueError):  # the client went away, or sent a body cut short
                return

    @staticmethod
    def _body(conn: socket.socket, head: bytes, buf: bytes) -> tuple[bytes, bytes]:
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while not buf.endswith(b"0\r\n\r\n"):
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
            out, rest = b"", buf
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    return out, rest[2:]
                out, rest = out + rest[:size], rest[size + 2:]
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                n = int(line.split(b":")[1])
                while len(buf) < n:
                    data = conn.recv(65536)
                    if not data:
                        raise OSError("the client went away mid-body")
                    buf += data
                return buf[:n], buf[n:]
        return b"", buf

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
def wire():
    servers: list[Wire] = []

    def start(answer: Answer) -> Wire:
        servers.append(Wire(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def client(base: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=base, transport=Http11Transport(**kw), timeout=5)


def test_connections_are_kept_alive_and_reused(wire):
    w = wire(lambda req, n: (ok(b"x" * 100), False))
    with client(w.url) as c:
        for _ in range(20):
            assert c.get("/a").content == b"x" * 100
            assert c.head("/a").status_code == 200  # a HEAD's answer has no body even with a length
    assert w.connections == 1
    assert len(w.requests) == 40


def test_a_body_shorter_than_its_length_is_an_error_and_the_connection_is_dropped(wire):
    w = wire(lambda req, n: (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this", True)
             if n == 1 else (ok(), False))
    with client(w.url) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            c.get("/a")
        assert c.get("/b").content == b"hello"
    assert w.connections == 2


def test_a_chunked_body_without_its_last_chunk_is_an_error(wire):
    w = wire(lambda req, n: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", True))
    with client(w.url) as c, pytest.raises(httpx.RemoteProtocolError):
        c.get("/a")


def test_a_chunked_body_read_whole_keeps_the_connection(wire):
    w = wire(lambda req, n: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
                             False))
    with client(w.url) as c:
        assert [c.get("/a").content for _ in range(3)] == [b"hello!"] * 3
    assert w.connections == 1


def test_a_body_ended_by_closing_is_read_whole_and_its_connection_not_kept(wire):
    w = wire(lambda req, n: (b"HTTP/1.1 200 OK\r\n\r\nuntil-close", True))
    with client(w.url) as c:
        assert c.get("/a").content == b"until-close"
        assert c.get("/b").content == b"until-close"
    assert w.connections == 2


def test_an_idle_connection_the_server_closed_is_not_reused(wire):
    # the server closes after each answer without saying so (no Connection: close): the pool sees the EOF
    w = wire(lambda req, n: (ok(), True))
    with client(w.url) as c:
        for _ in range(5):
            assert c.get("/a").content == b"hello"
            time.sleep(0.05)
    assert w.connections == 5


def test_an_idle_connection_past_the_keepalive_expiry_is_closed(wire, monkeypatch):
    monkeypatch.setattr(http11, "KEEPALIVE_EXPIRY", 0.05)
    w = wire(lambda req, n: (ok(), False))
    with client(w.url) as c:
        c.get("/a")
        c.get("/a")
        time.sleep(0.1)
        c.get("/a")
    assert w.connections == 2


def test_a_response_closed_before_its_end_closes_its_connection(wire):
    w = wire(lambda req, n: (ok(b"y" * 500_000), False))
    with client(w.url) as c:
        with c.stream("GET", "/big") as r:
            next(r.iter_raw())
        assert c.get("/again").content == b"y" * 500_000
    assert w.connections == 2


def test_header_bytes_outside_ascii_come_through_as_latin1(wire):
    w = wire(lambda req, n: (ok(extra=b"X-Odd: caf\xe9\r\nWww-Authenticate: Bearer realm=\"r\xff\"\r\n"), False))
    with client(w.url) as c:
        r = c.get("/a")
    assert r.headers.raw[1] == (b"X-Odd", b"caf\xe9")
    assert r.headers["www-authenticate"].encode("latin-1").endswith(b'r\xff"')


@pytest.mark.parametrize("extra", [
    b"".join(b"X-H%d: v\r\n" % i for i in range(150)),  # http.client's limit: 100 headers
    b"X-Long: " + b"a" * 70_000 + b"\r\n",  # and 64 KiB a line
])
def test_too_many_or_too_long_headers_are_a_protocol_error(wire, extra):
    w = wire(lambda req, n: (ok(extra=extra), True))
    with client(w.url) as c, pytest.raises(httpx.RemoteProtocolError, match="malformed answer"):
        c.get("/a")


def test_garbage_instead_of_a_status_line_is_a_protocol_error(wire):
    w = wire(lambda req, n: (b"SSH-2.0-OpenSSH\r\n\r\n", True))
    with client(w.url) as c, pytest.raises(httpx.RemoteProtocolError):
        c.get("/a")


def test_an_answer_that_never_comes_is_a_read_timeout(wire):
    w = wire(lambda req, n: (time.sleep(1.0), (b"", True))[1])
    with httpx.Client(base_url=w.url, transport=Http11Transport(), timeout=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get("/a")
        assert time.monotonic() - t0 < 0.9


def test_nothing_listening_is_a_connect_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with client(f"http://127.0.0.1:{port}") as c, pytest.raises(httpx.ConnectError):
        c.get("/v2/")


def test_a_request_body_goes_out_as_given_with_length_or_chunked(wire):
    w = wire(lambda req, n: (ok(hashlib.sha256(req.partition(b"\r\n\r\n")[2]).hexdigest().encode()), False))
    data = bytes(range(256)) * 1000
    with client(w.url) as c:
        assert c.put("/bytes", content=data).text == hashlib.sha256(data).hexdigest()
        parts = (data[i:i + 7000] for i in range(0, len(data), 7000))
        assert c.put("/chunked", content=parts).text == hashlib.sha256(data).hexdigest()
    assert b"transfer-encoding: chunked" in w.requests[1].lower()


class SourceCorrupt(Exception):
    pass


def test_an_error_of_the_body_producer_comes_through_as_raised(wire):
    w = wire(lambda req, n: (ok(), False))

    def body():
        yield b"x" * 1000
        raise SourceCorrupt("the source blob is not what its digest says")

    with client(w.url) as c:
        with pytest.raises(SourceCorrupt):
            c.put("/up", content=body(), headers={"Content-Length": "5000"})
        assert c.get("/after").content == b"hello"  # the half-sent connection was not reused
    assert w.connections == 2


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_found_wrong_at_its_end_never_reaches_the_server_whole(wire, framing):
    """engine.blobs.checked raises at the end of a blob whose digest is wrong, after its last chunk: that chunk
    is held back until the body ended cleanly, so the server never has the whole body (nothing to commit)."""
    w = wire(lambda req, n: (ok(), False))

    def body():
        yield b"a" * 3000
        yield b"b" * 2000
        raise SourceCorrupt("content hashes to sha256:...")

    headers = {"Content-Length": "5000"} if framing == "length" else {}
    with client(w.url) as c, pytest.raises(SourceCorrupt):
        c.put("/v2/x/blobs/uploads/1?digest=sha256:abc", content=body(), headers=headers)
    time.sleep(0.2)
    assert w.requests == []  # the server saw a body cut short (3000 of 5000 bytes / no last chunk)


@pytest.mark.parametrize("declared", ["5000", "10"])
def test_a_body_shorter_or_longer_than_its_length_is_refused_at_once(wire, declared):
    w = wire(lambda req, n: (ok(), False))
    with client(w.url) as c:
        t0 = time.monotonic()
        with pytest.raises(httpx.LocalProtocolError, match="Content-Length"):
            c.put("/up", content=iter([b"y" * 1000]), headers={"Content-Length": declared})
        assert time.monotonic() - t0 < 2  # not a wait for the server's read timeout


def test_a_header_value_that_cannot_be_sent_is_a_local_error_not_a_retry(wire):
    w = wire(lambda req, n: (ok(), False))
    with client(w.url) as c:
        with pytest.raises(httpx.LocalProtocolError):
            c.get("/a", headers={"X-Bad": "a\r\nInjected: 1"})
    assert not tx.retryable_error(httpx.LocalProtocolError("x"))


# -- against a real registry ----------------------------------------------------------------------

def _upload(c: httpx.Client, repo: str, data: bytes, body) -> httpx.Response:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
    return c.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", content=body,
                 headers={"Content-Type": "application/octet-stream"})


def test_a_real_registry_takes_a_chunked_upload_and_serves_it_back(registry):
    data = b"layer-bytes " * 300_000
    with client(registry.url) as c:
        r = _upload(c, "t/chunked", data, (data[i:i + 65536] for i in range(0, len(data), 65536)))
        assert r.status_code == 201, r.text
        digest = r.headers["docker-content-digest"]
        assert c.head(f"/v2/t/chunked/blobs/{digest}").headers["content-length"] == str(len(data))
        h = hashlib.sha256()
        with c.stream("GET", f"/v2/t/chunked/blobs/{digest}") as resp:
            for chunk in resp.iter_bytes():
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == digest


def test_tls_with_our_ca_works_and_without_it_says_why(tls_registry):
    with client(tls_registry.url, verify=ssl.create_default_context(cafile=str(tls_registry.ca_file))) as c:
        assert c.get("/v2/").status_code == 200
    with client(tls_registry.url) as c, pytest.raises(httpx.ConnectError) as info:
        c.get("/v2/")
    assert tx.tls_failure(info.value) == "certificate verification failed"


def test_plain_http_never_builds_a_tls_context(registry, monkeypatch):
    built = []
    monkeypatch.setattr(http11, "_default_context", lambda *a: built.append(a))
    with client(registry.url) as c:
        assert c.get("/v2/").status_code == 200
    assert built == []
