"""A fault-injecting HTTP/1.1 reverse proxy for tests, in front of a real registry (source or target).

It reuses :class:`~rke2_mirror_testkit.tokenserver.FrontServer`'s server plumbing (threaded, loopback
only, connections tracked and shut down on ``stop()``) with its own handler: every request is relayed
to the backend in ``CHUNK``-sized pieces (never a whole blob in memory), and a deterministic plan
decides which requests get a fault instead.

    plan = Plan([
        Fault("reset", target="blob", nth=(1,), after_bytes=1000),    # 1st GET of each blob: RST after 1000 bytes
        Fault("status", status=503, target="any", method="*", every=5, per="all"),   # every 5th request
        Fault("status", status=429, target="manifest", per="repo", headers={"Retry-After": "1"}),
        Fault("corrupt", target="blob", match=DIGEST, always=True, transient=False),  # wrong bytes, same length
        Fault("status", status=500, method="PUT", target="upload"),  # 1st final PUT of each blob
        Fault("reset", method="PATCH", target="upload", after_bytes=100_000),       # RST in the request body
    ], seed=7)
    proxy = start_fault_proxy(registry.url, plan)
    ... point a client at proxy.url ...
    proxy.injected        # Counter({"reset": 5, "http-503": 12, ...}) of what was actually injected
    proxy.stop()

Fault kinds (``Fault.kind``):

- ``status``: answer ``status`` (with ``headers``, e.g. ``Retry-After``) instead of the backend's answer.
  ``forward=True`` sends the request to the backend first (its effect stays: a blob committed, a tag
  set) and then answers ``status``: the client sees a failure for something that happened.
- ``reset``: TCP RST (``SO_LINGER`` 0).  On the response: after the status line, headers and
  ``after_bytes`` bytes of the body (never the whole body; before the headers when there is no body).
  On a request with a body (``phase="request"``, the default for PATCH/PUT/POST with a body): after
  ``after_bytes`` bytes of that body were read (and passed on), before any answer.
- ``truncate``: like ``reset`` but a clean close (FIN): the body ends early while ``Content-Length``
  promised more.
- ``stall``: after the headers and ``after_bytes`` bytes of the body (or before the headers when there
  is no body), wait ``seconds`` (interrupted by ``stop()``), then carry on: a client with a shorter read
  timeout gives up, a patient one gets the whole answer.
- ``corrupt``: the body keeps its length but one byte (at ``after_bytes``, default the middle) is
  inverted: different bytes under the same digest.

When a fault fires (each fault counts the requests it matches *per key*, so plans stay deterministic
under concurrency): ``nth=(1, 2)`` occurrences, ``every=k``, ``probability=p`` (seeded by
``Plan.seed``, the key and the occurrence number, not by timing), ``always=True``; default ``nth=(1,)``.
``per``: ``"object"`` (a blob ``repo@digest``, a manifest ``repo:ref``, an upload by its ``digest``
parameter, a PATCH by its ``Content-Range``), ``"repo"`` or ``"all"``.  ``limit`` caps the firings.

Bounded by design: a *transient* fault (the default) is not injected when the same object already
got ``Plan.max_streak`` faulted requests in a row, so a client retrying more than ``max_streak`` times
always gets through.  ``transient=False`` faults (permanent: ``always=True`` on one blob) ignore that.

Only the first fault that fires is applied to a request.  Request matching: ``method`` ("GET", a tuple,
or "*"), ``target`` ("blob", "manifest", "upload", "tags", "ping", "other", "any" or a tuple) and
``match`` (a regex searched in the decoded path and query).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from rke2_mirror_testkit.registry_proc import ssl_context
from rke2_mirror_testkit.tokenserver import _HOP_BY_HOP, CHUNK, FrontServer, _Handler

__all__ = ["Fault", "Plan", "Injected", "FaultProxy", "start_fault_proxy", "classify"]

KINDS = ("status", "reset", "truncate", "stall", "corrupt")
TARGETS = ("blob", "manifest", "upload", "tags", "ping", "other", "any")
_BODY_METHODS = ("PATCH", "PUT", "POST")

_UPLOAD_RE = re.compile(r"^/v2/(?P<repo>.+?)/blobs/uploads/?(?P<uuid>[^/]*)$")
_BLOB_RE = re.compile(r"^/v2/(?P<repo>.+?)/blobs/(?P<digest>[a-z0-9]+:[a-fA-F0-9]+)$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<repo>.+?)/manifests/(?P<ref>[^/]+)$")
_TAGS_RE = re.compile(r"^/v2/(?P<repo>.+?)/tags/list$")


@dataclass(frozen=True)
class Fault:
    kind: str
    method: str | tuple[str, ...] = "GET"
    target: str | tuple[str, ...] = "blob"
    match: str | None = None
    nth: tuple[int, ...] | None = None
    every: int | None = None
    probability: float | None = None
    always: bool = False
    per: str = "object"
    limit: int | None = None
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    after_bytes: int | None = None
    seconds: float = 0.0
    forward: bool = False
    phase: str | None = None  # "request" | "response"; default: request for PATCH/PUT/POST with a body
    transient: bool = True
    name: str | None = None  # label in FaultProxy.injected

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(KINDS)})")
        targets = (self.target,) if isinstance(self.target, str) else self.target
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target {bad[0]!r} (known: {', '.join(TARGETS)})")
        if self.per not in ("object", "repo", "all"):
            raise ValueError(f"per must be object, repo or all, not {self.per!r}")
        if sum(x is not None and x is not False for x in (self.nth, self.every, self.probability, self.always)) > 1:
            raise ValueError("give at most one of nth, every, probability, always")
        if self.phase not in (None, "request", "response"):
            raise ValueError(f"phase must be request or response, not {self.phase!r}")
        if self.kind == "stall" and not 0 < self.seconds <= 120:
            raise ValueError("a stall needs 0 < seconds <= 120")
        if self.forward and self.kind != "status":
            raise ValueError("forward=True is for status faults")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "status":
            return f"http-{self.status}" + ("-after-forward" if self.forward else "")
        return self.kind

    def matches(self, method: str, target: str, text: str) -> bool:
        methods = (self.method,) if isinstance(self.method, str) else self.method
        if "*" not in methods and method not in methods:
            return False
        targets = (self.target,) if isinstance(self.target, str) else self.target
        if "any" not in targets and target not in targets:
            return False
        return self.match is None or re.search(self.match, text) is not None

    def fires(self, n: int, seed: int, index: int, key: str) -> bool:
        if self.always:
            return True
        if self.every is not None:
            return n % self.every == 0
        if self.probability is not None:
            h = hashlib.sha256(f"{seed}|{index}|{key}|{n}".encode()).digest()
            return int.from_bytes(h[:8], "big") / 2.0**64 < self.probability
        return n in (self.nth if self.nth is not None else (1,))


@dataclass(frozen=True)
class Plan:
    faults: tuple[Fault, ...] = ()
    seed: int = 0
    max_streak: int = 2  # transient faults: at most this many faulted requests in a row per object

    def __init__(self, faults: Iterable[Fault] = (), seed: int = 0, max_streak: int = 2):
        object.__setattr__(self, "faults", tuple(faults))
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "max_streak", max_streak)


@dataclass(frozen=True)
class Injected:
    """One fault applied: what, to which request, and the occurrence number that triggered it."""

    label: str
    kind: str
    method: str
    path: str
    key: str
    n: int


@dataclass(frozen=True)
class _Request:
    target: str
    repo: str | None
    key: str  # the object
    text: str  # decoded path + query, what `match` searches


def classify(method: str, raw_path: str, headers: Mapping[str, str] | None = None) -> _Request:
    """What a request is about: (target, repo, object key, decoded text)."""
    parts = urlsplit(raw_path)
    path = unquote(parts.path)
    query = parse_qs(parts.query)
    text = path + ("?" + unquote(parts.query) if parts.query else "")
    if path in ("/v2", "/v2/"):
        return _Request("ping", None, "/v2/", text)
    m = _UPLOAD_RE.match(path)
    if m:
        repo = m.group("repo")
        if "digest" in query:
            key = f"{repo}@{query['digest'][0]}"
        elif "mount" in query:
            key = f"{repo}<-{query['mount'][0]}"
        elif method == "PATCH":
            key = f"{repo} bytes {(headers or {}).get('Content-Range', '')}"
        else:
            key = f"{repo} upload"
        return _Request("upload", repo, key, text)
    m = _BLOB_RE.match(path)
    if m:
        return _Request("blob", m.group("repo"), f"{m.group('repo')}@{m.group('digest')}", text)
    m = _MANIFEST_RE.match(path)
    if m:
        return _Request("manifest", m.group("repo"), f"{m.group('repo')}:{m.group('ref')}", text)
    m = _TAGS_RE.match(path)
    if m:
        return _Request("tags", m.group("repo"), f"{m.group('repo')} tags", text)
    return _Request("other", None, path, text)


class FaultProxy:
    """A running fault proxy: ``url``, ``injected`` (Counter by label), ``events``, ``requests``."""

    def __init__(self, backend_url: str, plan: Plan | Sequence[Fault], *,
                 backend_verify: ssl.SSLContext | str | Path | bool | None = None,
                 ssl_ctx: ssl.SSLContext | None = None):
        parts = urlsplit(backend_url)
        self.backend_url = f"{parts.scheme}://{parts.netloc}"
        self._backend_tls = parts.scheme == "https"
        if isinstance(backend_verify, (str, Path)):
            backend_verify = ssl_context(backend_verify)
        if backend_verify is None or backend_verify is True:
            backend_verify = ssl.create_default_context()
        elif backend_verify is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            backend_verify = ctx
        self._backend_ctx: ssl.SSLContext = backend_verify
        self._lock = threading.Lock()
        self.plan = plan if isinstance(plan, Plan) else Plan(plan)
        self.injected: Counter[str] = Counter()
        self.events: list[Injected] = []
        self.requests: Counter[str] = Counter()  # by method
        self.request_log: list[tuple[str, str, str]] = []  # (method, target, decoded path and query)
        self.suppressed = 0  # transient faults not injected because of max_streak
        self._counts: Counter[tuple[int, str]] = Counter()
        self._fired: Counter[int] = Counter()
        self._streak: Counter[tuple[str, str]] = Counter()
        self.stopping = threading.Event()
        self._server = _FaultServer(self, ssl_ctx)
        self._server.set_backend(backend_url)
        self.url = self._server.url
        self.host = self._server.host
        self._server.start()

    # -- control
    def set_plan(self, plan: Plan | Sequence[Fault]) -> None:
        """Replace the plan; occurrence counters restart (what was injected so far is kept)."""
        with self._lock:
            self.plan = plan if isinstance(plan, Plan) else Plan(plan)
            self._counts.clear()
            self._fired.clear()
            self._streak.clear()

    def total(self, *labels: str) -> int:
        with self._lock:
            return sum(self.injected[l] for l in labels) if labels else sum(self.injected.values())

    def seen(self, method: str | None = None, target: str | None = None, match: str | None = None) -> int:
        """Requests received so far (faulted or not); only those of a method, target and/or whose
        decoded path and query ``match`` (a regex, searched) when given."""
        with self._lock:
            log = list(self.request_log)
        return sum(1 for m, t, text in log if (method is None or m == method) and (target is None or t == target)
                   and (match is None or re.search(match, text)))

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.injected)

    def stop(self) -> None:
        self.stopping.set()
        self._server.stop()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler
    def decide(self, method: str, raw_path: str, headers: Mapping[str, str]) -> tuple[Fault, _Request, int] | None:
        req = classify(method, raw_path, headers)
        with self._lock:
            self.requests[method] += 1
            self.request_log.append((method, req.target, req.text))
            plan = self.plan
            streak_key = (method, req.key)
            chosen = None
            for i, f in enumerate(plan.faults):
                if not f.matches(method, req.target, req.text):
                    continue
                key = req.key if f.per == "object" else (req.repo or "") if f.per == "repo" else ""
                self._counts[(i, key)] += 1
                n = self._counts[(i, key)]
                if chosen is not None or not f.fires(n, plan.seed, i, key):
                    continue
                if f.limit is not None and self._fired[i] >= f.limit:
                    continue
                if f.transient and self._streak[streak_key] >= plan.max_streak:
                    self.suppressed += 1
                    continue
                self._fired[i] += 1
                chosen = (f, req, n)
            if chosen is not None and chosen[0].transient:
                self._streak[streak_key] += 1
            else:
                self._streak.pop(streak_key, None)
            return chosen

    def record(self, fault: Fault, method: str, raw_path: str, req: _Request, n: int) -> None:
        with self._lock:
            self.injected[fault.label] += 1
            self.events.append(Injected(fault.label, fault.kind, method, raw_path, req.key, n))

    def backend_connection(self) -> http.client.HTTPConnection:
        host, port = self._server.backend  # type: ignore[misc]
        if self._backend_tls:
            return http.client.HTTPSConnection(host, port, timeout=120, context=self._backend_ctx)
        return http.client.HTTPConnection(host, port, timeout=120)  # sets TCP_NODELAY itself


class _FaultServer(FrontServer):
    def __init__(self, proxy: FaultProxy, ssl_ctx: ssl.SSLContext | None):
        super().__init__(None, ssl_ctx=ssl_ctx, harbor_api=False, log=None)  # type: ignore[arg-type]
        self.RequestHandlerClass = _FaultHandler
        self.fault_proxy = proxy

    def set_backend(self, url: str) -> None:
        super().set_backend(url)
        parts = urlsplit(url)
        if parts.scheme == "https" and not parts.port:
            self.backend = (self.backend[0], 443)  # type: ignore[index]


class _Abort(Exception):
    """The connection was torn down on purpose: stop handling it."""


class _ClosedWriter:
    closed = True

    def write(self, data: bytes) -> int:
        raise ConnectionError("connection aborted by the fault proxy")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _FaultHandler(_Handler):
    server: _FaultServer  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        try:  # headers and body go out in separate writes: no Nagle/delayed-ACK pause between them
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _route(self) -> None:  # every path is proxied (a Harbor front behind works too)
        fp = self.server.fault_proxy
        decision = fp.decide(self.command, self.path, self.headers)
        fault, req, n = decision if decision else (None, None, 0)
        try:
            if fault is not None and fault.kind == "status" and not fault.forward:
                self._drain_body()
                fp.record(fault, self.command, self.path, req, n)
                return self._answer(fault)
            self._forward(fault, req, n)
        except _Abort:
            return

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _route

    # -- pieces
    def _answer(self, fault: Fault) -> None:
        body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": f"injected fault {fault.label}"}]}).encode()
        self._send(fault.status, body, dict(fault.headers), content_type="application/json")

    def _abort(self, rst: bool) -> None:
        """Tear the client connection down now: RST (``SO_LINGER`` 0) or a clean FIN."""
        self.close_connection = True
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for f in (self.wfile, self.rfile):
            try:
                f.close()
            except OSError:
                pass
        self.wfile = _ClosedWriter()  # the request loop flushes wfile after every request
        try:
            sock.close()  # the makefiles are closed: this is the real close (RST with linger 0)
        except OSError:
            pass
        raise _Abort()

    def _wait(self, seconds: float) -> None:
        self.server.fault_proxy.stopping.wait(seconds)

    def _body_chunks(self) -> Iterator[bytes]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            yield from self._iter_chunked()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise ConnectionError("client closed during body")
            remaining -= len(data)
            yield data

    def _has_body(self) -> bool:
        return ("chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                or int(self.headers.get("Content-Length") or 0) > 0)

    def _phase(self, fault: Fault | None) -> str | None:
        if fault is None:
            return None
        if fault.phase:
            return fault.phase
        if fault.kind in ("reset", "truncate") and self.command in _BODY_METHODS and self._has_body():
            return "request"
        return "response"

    def _forward(self, fault: Fault | None, req, n: int) -> None:
        srv = self.server
        fp = srv.fault_proxy
        phase = self._phase(fault)
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        conn = fp.backend_connection()
        try:
            try:
                conn.connect()
            except OSError as e:
                self._drain_body()
                self.close_connection = True
                return self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",") if t.strip()}
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in _HOP_BY_HOP or lk in tokens or lk in ("host", "expect"):
                    continue
                conn.putheader(k, v)
            conn.putheader("Host", f"{srv.backend[0]}:{srv.backend[1]}")  # type: ignore[index]
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            send_failed = False
            passed = 0
            cut = (fault.after_bytes or 0) if phase == "request" else None
            try:
                for data in self._body_chunks():
                    if cut is not None and passed + len(data) >= cut:
                        data = data[: cut - passed]
                        if data and not send_failed:
                            try:
                                conn.send(b"%x\r\n" % len(data) + data + b"\r\n" if chunked else data)
                            except OSError:
                                pass
                        fp.record(fault, self.command, self.path, req, n)
                        self._abort(rst=fault.kind == "reset")
                    passed += len(data)
                    if send_failed:
                        continue  # the backend answered early: keep draining the client
                    try:
                        conn.send(b"%x\r\n" % len(data) + data + b"\r\n" if chunked else data)
                    except OSError:
                        send_failed = True
                if chunked and not send_failed:
                    conn.send(b"0\r\n\r\n")
            except (ConnectionError, TimeoutError):
                self.close_connection = True
                return
            if cut is not None:  # the body was shorter than the cut: fault before any answer
                fp.record(fault, self.command, self.path, req, n)
                self._abort(rst=fault.kind == "reset")
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close_connection = True
                return self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            self._relay_faulty(resp, fault if phase == "response" else None, req, n)
        finally:
            conn.close()

    def _relay_faulty(self, resp: http.client.HTTPResponse, fault: Fault | None, req, n: int) -> None:
        srv = self.server
        fp = srv.fault_proxy
        headers: list[tuple[str, str]] = []
        length: int | None = None
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in _HOP_BY_HOP:
                continue
            if lk == "content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
            if lk == "location" and srv.backend_url and v.startswith(srv.backend_url):
                v = srv.url + v[len(srv.backend_url):]
            headers.append((k, v))
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200 or length == 0
        kind = fault.kind if fault else None

        if kind == "status":  # forwarded: the backend did it; the client hears otherwise
            while resp.read(CHUNK):
                pass
            fp.record(fault, self.command, self.path, req, n)
            return self._answer(fault)
        if kind in ("reset", "truncate") and no_body:
            fp.record(fault, self.command, self.path, req, n)
            self._abort(rst=kind == "reset")
        if kind == "stall" and no_body:
            fp.record(fault, self.command, self.path, req, n)
            self._wait(fault.seconds)
            kind = None

        self.send_response_only(resp.status, resp.reason)
        use_chunked = not no_body and length is None
        for k, v in headers:
            self.send_header(k, v)
        if use_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return

        cut = stall_at = flip_at = None
        if kind in ("reset", "truncate"):
            cut = fault.after_bytes or 0
            if length is not None:
                cut = min(cut, length - 1)  # never the whole body
        elif kind == "stall":
            stall_at = fault.after_bytes or 0
        elif kind == "corrupt":
            flip_at = fault.after_bytes if fault.after_bytes is not None else (length or 0) // 2
            if length is not None:
                flip_at = min(flip_at, length - 1)

        def write(data: bytes) -> None:
            if not data:
                return
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n" if use_chunked else data)

        pos = 0
        while True:
            data = resp.read(CHUNK)
            if not data:
                break
            end = pos + len(data)
            if cut is not None and end > cut:
                write(data[: cut - pos])
                fp.record(fault, self.command, self.path, req, n)
                self._abort(rst=kind == "reset")
            if stall_at is not None and end >= stall_at:
                write(data[: stall_at - pos])
                self.wfile.flush()
                fp.record(fault, self.command, self.path, req, n)
                self._wait(fault.seconds)
                data, pos, stall_at = data[stall_at - pos:], stall_at, None
                end = pos + len(data)
            if flip_at is not None and pos <= flip_at < end:
                b = bytearray(data)
                b[flip_at - pos] ^= 0xFF
                data = bytes(b)
                fp.record(fault, self.command, self.path, req, n)
                flip_at = None
            write(data)
            pos = end
        if cut is not None:  # unknown length and a body shorter than the cut: end without the last chunk
            fp.record(fault, self.command, self.path, req, n)
            self._abort(rst=kind == "reset")
        if use_chunked:
            self.wfile.write(b"0\r\n\r\n")


def start_fault_proxy(backend_url: str, plan: Plan | Sequence[Fault] = (), *,
                      backend_verify: ssl.SSLContext | str | Path | bool | None = None,
                      ssl_ctx: ssl.SSLContext | None = None) -> FaultProxy:
    """Start a fault proxy on a free 127.0.0.1 port in front of ``backend_url`` (http, or https checked
    with ``backend_verify``: a context, a CA file, True for the system store, False for none).
    ``ssl_ctx`` makes the proxy itself serve HTTPS.  Stop it with ``.stop()`` (or use ``with``)."""
    return FaultProxy(backend_url, plan, backend_verify=backend_verify, ssl_ctx=ssl_ctx)
