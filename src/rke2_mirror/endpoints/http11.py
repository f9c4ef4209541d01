"""A lean HTTP/1.1 connection pool for the registry client: `httpx.BaseTransport` over `http.client`.

httpx keeps its API here (requests, responses, auth flows, redirects, the wrappers in `transport.py`); only
the exchange on the wire is done by the standard library instead of httpcore + h11.  Measured on a cold copy
(issue #18, benchmarks/RESULTS.md) the client's CPU went mostly to per-request Python in httpcore and h11;
`http.client` parses a status line and headers, frames a body and reads one in far fewer Python steps, and its
body reads go straight to the socket (one `recv` per chunk, no event objects, no extra copies).

What it does, and what it leaves to the layers around it:
- one pool per transport: idle keep-alive connections per (scheme, host, port), last used first; an idle
  connection the server has closed (readable while idle: EOF or stray bytes), or idle for more than
  KEEPALIVE_EXPIRY seconds, is dropped, never reused;
- a response's connection goes back to the pool only once its body was read to the end and neither side
  asked to close; a response closed early closes its connection (nothing unread is left in a reused socket);
- a body shorter than its Content-Length, or a chunked body cut before its last chunk, is an error
  (`httpx.RemoteProtocolError`), never a short body taken as whole;
- errors are httpx's (`ConnectError`, `ConnectTimeout`, `ReadTimeout`, `WriteTimeout`, `ReadError`,
  `WriteError`, `RemoteProtocolError`, `LocalProtocolError`), so retries and messages work as with httpx's
  own transport; TLS failures keep the `ssl` error as their cause (`transport.tls_failure` reads it); an
  error raised by a request body's producer (a source blob whose digest does not match) comes through
  unchanged, and a body shorter or longer than its Content-Length is refused (`LocalProtocolError`);
- timeouts are the request's (`extensions["timeout"]`: connect, read, write), set on the socket per phase;
- no proxies: a proxied origin keeps httpx's transport (`transport.http_transports` mounts it);
- no HTTP/2, no compression (registries are asked for identity; httpx decodes what the guard lets through).
"""

from __future__ import annotations

import functools
import http.client
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx

CHUNK = 256 * 1024  # most bytes one body read returns (one recv: a slow sender is seen by the speed floor)
MAX_IDLE_PER_ORIGIN = 32
KEEPALIVE_EXPIRY = 5.0  # seconds a connection may sit idle before it is closed rather than reused (httpx's)


@functools.lru_cache(maxsize=8)
def _default_context(verify: bool, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The context httpx's own transport builds for verify=True/False (certifi's CAs, or SSL_CERT_FILE /
    SSL_CERT_DIR), built once per process: loading a CA bundle costs ~25 ms."""
    return httpx.create_ssl_context(verify=verify)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


def _idle_alive(conn: http.client.HTTPConnection) -> bool:
    """A kept connection is reusable while nothing can be read from it (no EOF, no unasked bytes)."""
    sock = conn.sock
    if sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    t = request.extensions.get("timeout") or {}
    return t.get("connect"), t.get("read"), t.get("write")


def _map_error(exc: BaseException, phase: str) -> httpx.TransportError:
    """An exception of the socket, ssl or http.client, as the httpx error of the same meaning."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (socket.timeout, TimeoutError)):
        kind = {"connect": httpx.ConnectTimeout, "write": httpx.WriteTimeout}.get(phase, httpx.ReadTimeout)
        return kind(f"timed out ({phase})")
    if isinstance(exc, http.client.IncompleteRead):
        return httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    if isinstance(exc, http.client.RemoteDisconnected):
        return httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if isinstance(exc, http.client.HTTPException):
        return httpx.RemoteProtocolError(f"malformed answer: {text}"[:300])
    if not isinstance(exc, OSError):  # e.g. a host name that cannot be encoded, an answer http.client chokes on
        if phase == "connect":
            return httpx.ConnectError(text[:300])
        return httpx.RemoteProtocolError(f"malformed answer: {text}"[:300])
    if phase == "connect":
        return httpx.ConnectError(text)
    if phase == "write":
        return httpx.WriteError(text)
    return httpx.ReadError(text)


class _Connection:
    """One pooled connection and the origin it belongs to."""

    __slots__ = ("conn", "origin")

    def __init__(self, conn: http.client.HTTPConnection, origin: tuple[str, str, int]):
        self.conn, self.origin = conn, origin


class _ResponseStream(httpx.SyncByteStream):
    """The body of one answer, read from its connection; at its end the connection goes back to the pool."""

    def __init__(self, pool: Http11Transport, held: _Connection, resp: http.client.HTTPResponse):
        self.pool, self.held, self.resp = pool, held, resp
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        resp = self.resp
        if self._done:
            return
        try:
            while True:
                try:
                    chunk = resp.read1(CHUNK)
                except BaseException as exc:  # mapped below; the connection is dropped
                    self._drop()
                    if isinstance(exc, Exception):
                        raise _map_error(exc, "read") from exc
                    raise
                if not chunk:
                    break
                yield chunk
        except GeneratorExit:
            self._drop()
            raise
        if resp.length:  # Content-Length not reached: the peer closed early
            self._drop()
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        resp, held = self.resp, self.held
        if resp.will_close or not resp.isclosed() and resp.length not in (None, 0):
            self._close_conn()
            return
        resp.close()
        self.pool._release(held)

    def _drop(self) -> None:
        if not self._done:
            self._done = True
            self._close_conn()

    def _close_conn(self) -> None:
        try:
            self.resp.close()
        finally:
            self.held.conn.close()

    def close(self) -> None:
        if self._done:
            return
        resp = self.resp
        if resp.isclosed() or resp.length == 0 and not resp.chunked:
            self._finish()
        else:
            self._drop()


class Http11Transport(httpx.BaseTransport):
    """Connections to any origin, kept alive between exchanges (see the module's docstring)."""

    def __init__(self, *, verify: ssl.SSLContext | bool = True, max_idle: int = MAX_IDLE_PER_ORIGIN):
        self._verify = verify
        self._ssl: ssl.SSLContext | None = verify if isinstance(verify, ssl.SSLContext) else None
        self._max_idle = max(1, max_idle)
        self._idle: dict[tuple[str, str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- the pool ---------------------------------------------------------------------------
    def _acquire(self, origin: tuple[str, str, int], connect: float | None) -> _Connection:
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                conn, since = idle.pop() if idle else (None, 0.0)
            if conn is None:
                break
            if time.monotonic() - since < KEEPALIVE_EXPIRY and _idle_alive(conn):
                return _Connection(conn, origin)
            conn.close()
        scheme, host, port = origin
        if scheme == "https":
            new: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=connect,
                                                                          context=self._tls())
        elif scheme == "http":
            new = http.client.HTTPConnection(host, port, timeout=connect)
        else:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        try:
            new.connect()
        except Exception as exc:
            new.close()
            raise _map_error(exc, "connect") from exc
        return _Connection(new, origin)

    def _tls(self) -> ssl.SSLContext:
        """The TLS context, built at the first https connection (a plain-http run never loads a CA bundle)."""
        if self._ssl is None:
            ctx = _default_context(bool(self._verify), os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
            with self._lock:
                if self._ssl is None:
                    self._ssl = ctx
        return self._ssl

    def _release(self, held: _Connection) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(held.origin, [])
                if len(idle) < self._max_idle:
                    idle.append((held.conn, time.monotonic()))
                    return
        held.conn.close()

    # -- one exchange -----------------------------------------------------------------------
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        connect, read, write = _timeouts(request)
        held = self._acquire(_origin(request.url), connect)
        conn = held.conn
        try:
            self._send(conn, request, write)
        except BaseException:
            conn.close()  # half a request went out: the connection is not reusable
            raise
        try:
            conn.sock.settimeout(read)
            resp = conn.getresponse()
        except Exception as exc:
            conn.close()
            raise _map_error(exc, "read") from exc
        # as received, repeated names kept; http.client decoded them as latin-1, which round-trips any byte
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.msg._headers]
        return httpx.Response(
            status_code=resp.status,
            headers=headers,
            stream=_ResponseStream(self, held, resp),
            extensions={"http_version": b"HTTP/1.1" if resp.version == 11 else b"HTTP/1.0",
                        "reason_phrase": resp.reason.encode("latin-1", "replace")},
        )

    def _send(self, conn: http.client.HTTPConnection, request: httpx.Request, write: float | None) -> None:
        """The request line, headers and body.  A socket error is the httpx error of the same meaning; an error
        the body's producer raises (a source blob that is not what its digest says) comes through as raised."""
        chunked, declared = False, None
        try:
            conn.sock.settimeout(write)
            conn.putrequest(request.method, request.url.raw_path.decode("ascii"), skip_host=True,
                            skip_accept_encoding=True)
            for name, value in request.headers.raw:
                low = name.lower()
                if low == b"transfer-encoding":
                    chunked = value.strip().lower() == b"chunked"
                elif low == b"content-length":
                    declared = int(value)
                conn.putheader(name, value)
        except (ValueError, http.client.HTTPException) as exc:  # a header http.client refuses to send
            raise httpx.LocalProtocolError(f"cannot send the request: {exc}"[:300]) from exc
        stream = request.stream
        try:
            if isinstance(stream, httpx.ByteStream) and not chunked:
                conn.endheaders(b"".join(stream) or None)  # one write with the headers
                return
            conn.endheaders()
        except OSError as exc:
            raise _map_error(exc, "write") from exc
        # Each chunk goes out once the next one (or the body's end) has come: the last one only after its
        # producer ended without raising, so a blob found wrong at its end (engine.blobs.checked) never
        # reaches the server whole, and a registry cannot take it for complete.
        sent, held = 0, None
        for chunk in stream:
            if not chunk:
                continue
            sent += len(chunk)
            if declared is not None and sent > declared:
                raise httpx.LocalProtocolError(f"request body longer than its Content-Length ({declared})")
            if held is not None:
                self._write(conn, held, chunked)
            held = chunk
        if not chunked and declared is not None and sent != declared:
            raise httpx.LocalProtocolError(f"request body shorter than its Content-Length ({sent} of {declared})")
        if held is not None:
            self._write(conn, held, chunked)
        if chunked:
            self._write(conn, b"", chunked)

    @staticmethod
    def _write(conn: http.client.HTTPConnection, chunk: bytes, chunked: bool) -> None:
        """One piece of a body (chunked: framed; an empty one is the last chunk)."""
        try:
            conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        except OSError as exc:
            raise _map_error(exc, "write") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c, _ in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
