"""A hostile registry for tests: a ThreadingHTTPServer on a loopback address that answers the registry
v2 API with one chosen misbehaviour, and a plain sink that records what a client pushes.

    src = start_hostile("huge-manifest")                 # http://127.0.0.1:PORT
    sink = start_hostile("sink")                          # a target that accepts everything and counts it
    ... rke2-mirror mirror --source-endpoint docker.io=<src.url> --to <sink.url> ...
    sink.pushed                                           # PUT/PATCH requests received whole (content pushed)
    src.stop(); sink.stop()

Modes (`MODES`):

- ``huge-manifest``: a manifest GET answers 200 with ``Content-Length: huge`` and then that many bytes;
  ``huge-manifest-chunked``: the same without a length (the body ends when the connection closes);
- ``huge-error``: a manifest GET answers 404 with a ``huge`` body (JSON that never ends);
- ``huge-ping``: ``/v2/`` answers 200 with a ``huge`` body;
- ``trickle-manifest``: a manifest GET answers 200 and then one byte a second (``trickle_interval``);
- ``trickle-blob``: a valid small manifest, then each blob answers 200 and one byte a second;
- ``bearer``: every request needs ``Bearer t``; the challenge names ``realm`` (another server: another
  loopback host or port, http or https); without a token manifests answer 401, with one 404;
- ``token``: a token service answering ``{"token": "t"}`` to anyone; every request is recorded with its
  Authorization header (``token_requests``/``authorized``);
- ``huge-token``: ``/v2/`` challenges for a token at this same server's ``/token``, which answers 200 with a
  ``huge`` JSON body;
- ``sink``: a registry that has nothing and accepts every push (``pushed``: PUT/PATCH requests whose body came whole).

Bounded by design: huge bodies are generated on the fly from one small chunk (never held in memory), a
writer stops when the client goes away, and every slow or huge answer stops by itself after ``deadline``
seconds (or at ``stop()``), so a test whose client never gives up still ends.  TLS with ``tls=(cert, key)``.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["MODES", "HostileRegistry", "Seen", "start_hostile"]

MODES = ("huge-manifest", "huge-manifest-chunked", "huge-error", "huge-ping", "trickle-manifest", "trickle-blob",
         "bearer", "token", "huge-token", "sink")
HUGE = 300 * 1024 * 1024
CHUNK = 64 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# trickle-blob's image: a config and one layer, both small (the client never gets them anyway)
_CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
_LAYER = b"L" * 4096


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(_CONFIG),
               "size": len(_CONFIG)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _digest(_LAYER),
                "size": len(_LAYER)}],
}).encode()


@dataclass(frozen=True)
class Seen:
    """One request as the server got it."""

    method: str
    path: str
    authorization: str | None
    whole: bool = True  # the request's body arrived whole (a push cut mid-body is not content pushed)


@dataclass(eq=False)
class HostileRegistry:
    mode: str
    host: str
    port: int
    scheme: str
    realm: str | None
    deadline: float
    huge: int
    trickle_interval: float
    server: ThreadingHTTPServer = field(repr=False)
    requests: list[Seen] = field(default_factory=list)
    sent: int = 0  # body bytes written, all answers together
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pushed(self) -> list[Seen]:
        """PUT and PATCH requests whose body arrived whole: content a client pushed (a blob, a chunk, a
        manifest).  A streamed upload the client abandoned mid-body is not in it (`requests` has it)."""
        with self._lock:
            return [r for r in self.requests if r.method in ("PUT", "PATCH") and r.whole]

    @property
    def token_requests(self) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/token")]

    @property
    def authorized(self) -> list[Seen]:
        """Requests that carried an Authorization header."""
        with self._lock:
            return [r for r in self.requests if r.authorization]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def count_sent(self, n: int) -> None:
        with self._lock:
            self.sent += n

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "HostileRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    hostile: HostileRegistry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def h(self) -> HostileRegistry:
        return self.server.hostile

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self.h.count_sent(len(body))

    def _huge(self, status: int, prefix: bytes, *, length: bool = True, content_type: str = "application/json") -> None:
        """`prefix` and then filler up to `huge` bytes, written until done, the client leaves, the deadline
        passes or the server stops; never more than one chunk in memory."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(self.h.huge))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        filler = b" " * CHUNK
        end = time.monotonic() + self.h.deadline
        left = self.h.huge
        first = prefix[:left]
        try:
            self.wfile.write(first)
            self.h.count_sent(len(first))
            left -= len(first)
            while left > 0 and time.monotonic() < end and not self.h._stop.is_set():
                piece = filler if left >= CHUNK else filler[:left]
                self.wfile.write(piece)
                self.h.count_sent(len(piece))
                left -= len(piece)
        except OSError:
            pass  # the client gave up: that is the point
        self.close_connection = True

    def _trickle(self, status: int, size: int, content_type: str) -> None:
        """A body of `size` bytes (announced) sent one byte per `trickle_interval`, until the deadline."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        end = time.monotonic() + self.h.deadline
        try:
            for _ in range(size):
                if time.monotonic() >= end or self.h._stop.wait(self.h.trickle_interval):
                    return
                self.wfile.write(b" ")
                self.wfile.flush()
                self.h.count_sent(1)
        except OSError:
            pass

    def _read_body(self) -> bool:
        """Read (and drop) the request's body; False when it ended before its end (the client went away)."""
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            got = self.rfile.read(min(n, CHUNK))
            if not got:
                return False
            n -= len(got)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    return False
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline(1024)
                    break
                if len(self.rfile.read(size + 2)) < size + 2:
                    return False
        return True

    def _not_found(self) -> None:
        self._answer(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}')

    # -- the API --------------------------------------------------------------------------------
    def _handle(self) -> None:
        h = self.h
        path = self.path.split("?", 1)[0]
        seen = Seen(self.command, self.path, self.headers.get("Authorization"))
        if self.command in ("POST", "PUT", "PATCH"):
            whole = self._read_body()
            if not whole:
                h.record(replace(seen, whole=False))
                return
        h.record(seen)
        mode = h.mode
        is_manifest = "/manifests/" in path
        is_blob = "/blobs/" in path and "/uploads" not in path

        if mode == "token" or (mode == "huge-token" and path.startswith("/token")):
            if mode == "huge-token":
                return self._huge(200, b'{"token": "')
            return self._answer(200, b'{"token": "t", "expires_in": 300}')
        if mode in ("bearer", "huge-token"):
            if self.headers.get("Authorization") != "Bearer t":
                realm = h.realm if mode == "bearer" else f"{h.url}/token"
                challenge = f'Bearer realm="{realm}",service="hostile"'
                return self._answer(401, b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication"}]}',
                                    {"WWW-Authenticate": challenge})
            if path == "/v2/":
                return self._answer(200, b"{}")
            return self._not_found()
        if mode == "sink":
            return self._sink(path)
        if path == "/v2/":
            if mode == "huge-ping":
                return self._huge(200, b"{")
            return self._answer(200, b"{}")
        if is_manifest:
            if mode in ("huge-manifest", "huge-manifest-chunked"):
                prefix = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "annotations": {"x": "'
                return self._huge(200, prefix, length=mode == "huge-manifest", content_type=OCI_MANIFEST)
            if mode == "huge-error":
                return self._huge(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "')
            if mode == "trickle-manifest":
                return self._trickle(200, 1000, OCI_MANIFEST)
            if mode == "trickle-blob":
                return self._answer(200, _MANIFEST, {"Docker-Content-Digest": _digest(_MANIFEST)}, OCI_MANIFEST)
        if is_blob and mode == "trickle-blob":
            size = len(_CONFIG) if path.endswith(_digest(_CONFIG)) else len(_LAYER)
            return self._trickle(200, size, "application/octet-stream")
        if "/tags/list" in path:
            return self._answer(404, b'{"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]}')
        return self._not_found()

    def _sink(self, path: str) -> None:
        """An empty registry that accepts every push."""
        if path == "/v2/":
            return self._answer(200, b"{}")
        if "/blobs/uploads" in path:
            if self.command == "POST":
                return self._answer(202, headers={"Location": f"{path.rstrip('/')}/u1", "Range": "0-0"})
            if self.command == "PATCH":
                return self._answer(202, headers={"Location": path, "Range": "0-0"})
            if self.command == "PUT":
                return self._answer(201)
        if "/manifests/" in path and self.command == "PUT":
            return self._answer(201)
        if "/tags/list" in path:
            return self._answer(404, b'{"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]}')
        return self._not_found()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


def start_hostile(mode: str, *, host: str = "127.0.0.1", realm: str | None = None, deadline: float = 20.0,
                  huge: int = HUGE, trickle_interval: float = 1.0,
                  tls: tuple[Path | str, Path | str] | None = None) -> HostileRegistry:
    """Start a hostile registry (`mode`, see the module docstring) on `host` (a loopback address), port
    chosen by the kernel; `realm` is the token service a ``bearer`` server names; `tls` = (cert, key) serves
    https."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if mode == "bearer" and not realm:
        raise ValueError("mode 'bearer' needs a realm (the token service's URL)")
    srv = _Server((host, 0), _Handler)
    scheme = "http"
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        # the handshake happens in the handler's thread, at its first read
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    hostile = HostileRegistry(mode=mode, host=host, port=srv.server_address[1], scheme=scheme, realm=realm,
                              deadline=deadline, huge=huge, trickle_interval=trickle_interval, server=srv)
    srv.hostile = hostile
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, name=f"hostile-{mode}",
                     daemon=True).start()
    return hostile
