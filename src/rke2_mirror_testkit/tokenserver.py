"""A small Harbor-like service: docker token auth (RS256 JWT), a slice of the Harbor v2.0
project API and a streaming reverse proxy in front of a real docker-registry.

Pure stdlib HTTP (``http.server.ThreadingHTTPServer`` + ``ssl``); ``cryptography`` signs tokens.
As in Harbor, registry (``/v2/``), token service (``/service/token``) and API (``/api/v2.0``)
share one host:port.  Only listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import http.client
import json
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from rke2_mirror_testkit.pki import CA, make_token_signer
from rke2_mirror_testkit.registry_proc import RunningRegistry, ssl_context, start_registry

__all__ = [
    "User",
    "Project",
    "TokenRequest",
    "TokenService",
    "FrontServer",
    "Harbor",
    "TokenRegistry",
    "default_users",
    "start_harbor",
    "start_token_registry",
    "start_front",
    "HARBOR_VERSION",
    "decode_jwt",
    "parse_scope",
]

HARBOR_VERSION = "v2.10.0-test"
CHUNK = 64 * 1024
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
_PROJECT_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


# --------------------------------------------------------------------------- model


@dataclass
class User:
    password: str
    admin: bool = False
    can_create_projects: bool = False
    member_of: set[str] = field(default_factory=set)


@dataclass
class Project:
    name: str
    public: bool = False
    project_id: int = 0
    owner: str | None = None

    def to_json(self) -> dict:
        return {
            "project_id": self.project_id,
            "name": self.name,
            "owner_name": self.owner or "admin",
            "metadata": {"public": "true" if self.public else "false"},
            "repo_count": 0,
        }


@dataclass(frozen=True)
class TokenRequest:
    """One call to the token endpoint (recorded in ``token_requests``)."""

    user: str | None  # None = anonymous
    scopes: tuple[str, ...]
    service: str | None
    status: int
    granted: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    method: str = "GET"
    time: float = 0.0

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


def default_users() -> dict[str, User]:
    """admin/Harbor12345 (system admin, can create projects); dev/dev-pw (member of ``rancher``)."""
    return {
        "admin": User("Harbor12345", admin=True, can_create_projects=True),
        "dev": User("dev-pw", member_of={"rancher"}),
    }


def _coerce_users(users: Mapping[str, Any] | None) -> dict[str, User]:
    if users is None:
        return default_users()
    out: dict[str, User] = {}
    for name, u in users.items():
        if isinstance(u, User):
            out[name] = u
        elif isinstance(u, str):
            out[name] = User(u)
        elif isinstance(u, Mapping):
            d = dict(u)
            d["member_of"] = set(d.get("member_of", ()))
            out[name] = User(**d)
        else:
            raise TypeError(f"bad user spec for {name!r}: {u!r}")
    return out


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def libtrust_key_id(public_key) -> str:
    """docker/libtrust's key ID, as distribution matches a JWT `kid` against its rootcertbundle: base32 of the
    first 240 bits of sha256(DER SubjectPublicKeyInfo), in groups of four joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Users, projects, grants and RS256 token issuing (thread-safe)."""

    def __init__(
        self,
        signing_key,
        cert_der: bytes,
        *,
        service: str,
        issuer: str,
        users: Mapping[str, Any] | None = None,
        projects: Mapping[str, Any] | Iterable[str] | None = None,
        strict_projects: bool = True,
        token_ttl: int = 300,
        allow_post: bool = False,
    ):
        self.signing_key = signing_key
        self.cert_der = cert_der
        self.service = service
        self.issuer = issuer
        self.users = _coerce_users(users)
        self.projects: dict[str, Project] = {}
        self.strict_projects = strict_projects
        self.token_ttl = token_ttl
        self.allow_post = allow_post
        self.token_requests: list[TokenRequest] = []
        self.lock = threading.RLock()
        self._next_id = 1
        if projects is not None:
            items = projects.items() if isinstance(projects, Mapping) else ((p, {}) for p in projects)
            for name, spec in items:
                if isinstance(spec, Project):
                    self.add_project(name, public=spec.public, owner=spec.owner)
                elif isinstance(spec, bool):
                    self.add_project(name, public=spec)
                else:
                    spec = dict(spec or {})
                    public = spec.get("public", spec.get("metadata", {}).get("public", False))
                    self.add_project(name, public=_truthy(public), owner=spec.get("owner"))

    # -- projects
    def add_project(self, name: str, *, public: bool = False, owner: str | None = None) -> Project:
        with self.lock:
            p = Project(name=name, public=public, project_id=self._next_id, owner=owner)
            self._next_id += 1
            self.projects[name] = p
            if owner and owner in self.users:
                self.users[owner].member_of.add(name)
            return p

    # -- authentication
    def check_basic(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, username).  No header -> (True, None) (anonymous); bad credentials -> (False, None)."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        u = self.users.get(user)
        if u is None or not secrets.compare_digest(u.password, password):
            return False, None
        return True, user

    def is_member(self, user: str | None, project: str) -> bool:
        if user is None:
            return False
        u = self.users.get(user)
        return bool(u and (u.admin or project in u.member_of))

    # -- grants (Harbor's model)
    def allowed_actions(self, user: str | None, typ: str, name: str) -> set[str]:
        u = self.users.get(user) if user else None
        if typ == "registry":
            return {"*"} if (u and u.admin and name == "catalog") else set()
        if typ != "repository":
            return set()
        project_name = name.split("/", 1)[0]
        with self.lock:
            project = self.projects.get(project_name)
        if u and u.admin:
            if project is None and self.strict_projects:
                return set()
            return {"pull", "push", "delete", "*"}
        if project is None:
            return set()
        allowed: set[str] = set()
        if project.public:
            allowed.add("pull")
        if u and project_name in u.member_of:
            allowed |= {"pull", "push", "delete", "*"}
        return allowed

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict]:
        access: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            for one in scope.split(" "):
                parsed = parse_scope(one)
                if parsed is None:
                    continue
                typ, name, actions = parsed
                allowed = self.allowed_actions(user, typ, name)
                got = access.setdefault((typ, name), [])
                for a in actions:
                    if a in allowed and a not in got:
                        got.append(a)
        return [{"type": t, "name": n, "actions": a} for (t, n), a in access.items()]

    def make_token(self, user: str | None, access: list[dict], audience: str | None = None) -> tuple[str, int, str]:
        now = int(time.time())
        # Harbor's core names its signing key by `kid` (libtrust's key ID of a key in the registry's
        # rootcertbundle): the registry checks one signature per request, not a certificate chain (`x5c`)
        header = {"typ": "JWT", "alg": "RS256", "kid": libtrust_key_id(self.signing_key.public_key())}
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": audience or self.service,
            "exp": now + self.token_ttl,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self.signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        issued_at = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return signing_input + "." + _b64url(sig), self.token_ttl, issued_at

    def record(self, req: TokenRequest) -> None:
        with self.lock:
            self.token_requests.append(req)


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/busybox:pull,push`` -> ("repository", "library/busybox", ["pull", "push"])."""
    typ, sep, rest = scope.partition(":")
    if not sep:
        return None
    name, sep, actions = rest.rpartition(":")
    if not sep or not name:
        return None
    typ = typ.split("(", 1)[0]  # "repository(plugin)" -> "repository"
    return typ, name, [a for a in actions.split(",") if a]


def decode_jwt(token: str) -> tuple[dict, dict]:
    """(header, claims) of a JWT, without verification - for assertions."""

    def d(part: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    h, c, _ = token.split(".")
    return d(h), d(c)


# --------------------------------------------------------------------------- HTTP


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(
        self,
        service: TokenService,
        *,
        ssl_ctx: ssl.SSLContext | None = None,
        harbor_api: bool = True,
        log: Path | None = None,
    ):
        self.service = service
        self.ssl_ctx = ssl_ctx
        self.harbor_api = harbor_api
        self.backend: tuple[str, int] | None = None
        self.backend_url: str | None = None
        self.log_path = log
        self._log_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.proxied_requests: list[tuple[str, str, int]] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scheme = "https" if ssl_ctx else "http"
        self.host = f"127.0.0.1:{self.server_address[1]}"
        self.url = f"{self.scheme}://{self.host}"
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:  # no getfqdn() reverse lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def set_backend(self, url: str) -> None:
        parts = urlsplit(url)
        self.backend = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.backend_url = f"{parts.scheme}://{parts.netloc}"

    def start(self) -> "FrontServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                        name=f"front-{self.host}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:  # quiet on client disconnects / TLS errors
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)

    def write_log(self, line: str) -> None:
        if self.log_path is None:
            return
        with self._log_lock, open(self.log_path, "a") as f:
            f.write(line + "\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rke2-mirror-test-harbor"
    sys_version = ""
    timeout = 60
    server: FrontServer

    # -- plumbing
    def setup(self) -> None:
        self.request.settimeout(30)
        try:  # no Nagle delay on small responses (~40 ms each otherwise)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.server.ssl_ctx is not None:
            self.request = self.server.ssl_ctx.wrap_socket(self.request, server_side=True)
        with self.server._conns_lock:
            self.server._conns.add(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server._conns_lock:
                self.server._conns.discard(self.request)
            if isinstance(self.request, ssl.SSLSocket):  # socketserver only closes the unwrapped socket
                try:
                    self.request.close()
                except OSError:
                    pass

    def log_message(self, format: str, *args) -> None:
        self.server.write_log(f"{self.address_string()} - {format % args}")

    def _send(self, status: int, body: bytes | str | dict | list | None = None, headers: Mapping[str, str] | None = None,
              content_type: str | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            content_type = content_type or "application/json; charset=utf-8"
        elif isinstance(body, str):
            body = body.encode()
            content_type = content_type or "text/plain; charset=utf-8"
        body = body or b""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _harbor_error(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, {"errors": [{"code": code, "message": message}]}, headers)

    def _read_body(self, limit: int = 1 << 20) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > limit:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def _drain_body(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            for _ in self._iter_chunked():
                pass
        else:
            n = int(self.headers.get("Content-Length") or 0)
            while n > 0:
                got = self.rfile.read(min(CHUNK, n))
                if not got:
                    break
                n -= len(got)

    def _route(self) -> None:
        path = urlsplit(self.path).path
        if path == "/service/token":
            self._drain_if_get()
            return self._token()
        if path.startswith("/api/") and self.server.harbor_api:
            return self._api(path)
        if (path == "/v2" or path.startswith("/v2/")) and self.server.backend is not None:
            return self._proxy()
        self._drain_body()
        self._send(404, "404 page not found\n")

    def _drain_if_get(self) -> None:
        if self.command in ("GET", "HEAD"):
            self._drain_body()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _route

    # -- token endpoint
    def _token(self) -> None:
        svc = self.server.service
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        if self.command == "POST":
            if not svc.allow_post:
                self._drain_body()
                return self._send(405, "method not allowed\n", {"Allow": "GET"})
            try:
                form = parse_qs(self._read_body().decode())
            except (ValueError, UnicodeDecodeError):
                return self._send(400, {"error": "invalid_request"})
            query = {**query, **form}
            if form.get("grant_type", [""])[0] != "password":
                return self._send(400, {"error": "unsupported_grant_type"})
            user, password = form.get("username", [""])[0], form.get("password", [""])[0]
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif self.command == "GET":
            auth = self.headers.get("Authorization")
        else:
            return self._send(405, "method not allowed\n", {"Allow": "GET"})
        scopes = tuple(query.get("scope", []))
        service = query.get("service", [None])[0]
        ok, user = svc.check_basic(auth)
        if not ok:
            svc.record(TokenRequest(None, scopes, service, 401, method=self.command, time=time.time()))
            return self._harbor_error(401, "UNAUTHORIZED", "authentication failed: invalid credentials",
                                      {"WWW-Authenticate": 'Basic realm="harbor"'})
        access = svc.grant(user, scopes)
        token, ttl, issued_at = svc.make_token(user, access, service)
        svc.record(
            TokenRequest(
                user,
                scopes,
                service,
                200,
                tuple((a["type"], a["name"], tuple(a["actions"])) for a in access),
                self.command,
                time.time(),
            )
        )
        self._send(200, {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued_at})

    # -- Harbor API (tiny slice)
    def _api(self, path: str) -> None:
        svc = self.server.service
        body = b""
        if self.command in ("POST", "PUT"):
            try:
                body = self._read_body()
            except ValueError:
                return self._harbor_error(413, "BAD_REQUEST", "body too large")
        else:
            self._drain_body()
        ok, user = svc.check_basic(self.headers.get("Authorization"))
        if not ok:
            return self._harbor_error(401, "UNAUTHORIZED", "unauthorized")
        query = parse_qs(urlsplit(self.path).query)
        if path == "/api/v2.0/ping" and self.command in ("GET", "HEAD"):
            return self._send(200, "Pong")
        if path == "/api/v2.0/systeminfo" and self.command in ("GET", "HEAD"):
            return self._send(
                200,
                {
                    "harbor_version": HARBOR_VERSION,
                    "auth_mode": "db_auth",
                    "project_creation_restriction": "adminonly",
                    "self_registration": False,
                    "has_ca_root": False,
                    "registry_url": self.server.host,
                    "external_url": self.server.url,
                    "read_only": False,
                    "with_chartmuseum": False,
                    "notification_enable": True,
                },
            )
        if path.rstrip("/") == "/api/v2.0/projects":
            if self.command == "HEAD":
                name = (query.get("project_name") or [""])[0]
                with svc.lock:
                    exists = name in svc.projects
                return self._send(200 if exists else 404)
            if self.command == "GET":
                name = (query.get("name") or query.get("project_name") or [None])[0]
                with svc.lock:
                    visible = [
                        p.to_json()
                        for p in svc.projects.values()
                        if (p.public or svc.is_member(user, p.name)) and (name is None or name in p.name)
                    ]
                return self._send(200, visible, {"X-Total-Count": str(len(visible))})
            if self.command == "POST":
                return self._create_project(user, body)
            return self._harbor_error(405, "METHOD_NOT_ALLOWED", "method not allowed")
        m = re.fullmatch(r"/api/v2\.0/projects/([^/]+)", path)
        if m and self.command in ("GET", "HEAD"):
            with svc.lock:
                p = svc.projects.get(m.group(1))
                if p is None and m.group(1).isdigit():
                    p = next((x for x in svc.projects.values() if x.project_id == int(m.group(1))), None)
            if p is None:
                return self._harbor_error(404, "NOT_FOUND", f"project {m.group(1)} not found")
            if not p.public and not svc.is_member(user, p.name):
                if user is None:
                    return self._harbor_error(401, "UNAUTHORIZED", "unauthorized")
                return self._harbor_error(403, "FORBIDDEN", "forbidden")
            return self._send(200, p.to_json())
        return self._harbor_error(404, "NOT_FOUND", "not found")

    def _create_project(self, user: str | None, body: bytes) -> None:
        svc = self.server.service
        if user is None:
            return self._harbor_error(401, "UNAUTHORIZED", "unauthorized")
        u = svc.users[user]
        if not (u.admin or u.can_create_projects):
            return self._harbor_error(403, "FORBIDDEN", "Only system admin can create project")
        try:
            req = json.loads(body or b"{}")
            name = req["project_name"]
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._harbor_error(400, "BAD_REQUEST", "invalid project request")
        if not _PROJECT_RE.match(name) or len(name) > 255:
            return self._harbor_error(400, "BAD_REQUEST", f"project name {name!r} is not valid")
        public = _truthy((req.get("metadata") or {}).get("public", req.get("public", False)))
        with svc.lock:
            if name in svc.projects:
                return self._harbor_error(409, "CONFLICT", f"The project named {name} already exists")
            p = svc.add_project(name, public=public, owner=user)
        self._send(201, b"", {"Location": f"/api/v2.0/projects/{p.project_id}"})

    # -- reverse proxy
    def _iter_chunked(self):
        """Yield the data of a chunked request body piece by piece (never a whole chunk if large)."""
        rfile = self.rfile
        while True:
            line = rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed during chunked body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers
                    t = rfile.readline(65537)
                    if t in (b"\r\n", b"\n", b""):
                        return
            while size > 0:
                data = rfile.read(min(CHUNK, size))
                if not data:
                    raise ConnectionError("client closed during chunked body")
                size -= len(data)
                yield data
            rfile.readline(3)  # CRLF after the chunk

    def _proxy(self) -> None:
        srv = self.server
        assert srv.backend is not None
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length = self.headers.get("Content-Length")
        conn = http.client.HTTPConnection(*srv.backend, timeout=120)
        send_failed = False
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            connection_tokens = {
                t.strip().lower() for t in (self.headers.get("Connection") or "").split(",") if t.strip()
            }
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in _HOP_BY_HOP or lk in connection_tokens or lk in ("host", "expect"):
                    continue
                conn.putheader(k, v)
            conn.putheader("Host", f"{srv.backend[0]}:{srv.backend[1]}")
            conn.putheader("X-Forwarded-For", self.client_address[0])
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            try:
                if chunked:
                    for data in self._iter_chunked():
                        if not send_failed:
                            try:
                                conn.send(b"%x\r\n" % len(data) + data + b"\r\n")
                            except OSError:
                                send_failed = True
                    if not send_failed:
                        conn.send(b"0\r\n\r\n")
                elif length:
                    remaining = int(length)
                    while remaining > 0:
                        data = self.rfile.read(min(CHUNK, remaining))
                        if not data:
                            raise ConnectionError("client closed during body")
                        remaining -= len(data)
                        if not send_failed:
                            try:
                                conn.send(data)
                            except OSError:
                                send_failed = True  # backend answered early; keep draining the client
            except (ConnectionError, TimeoutError):
                self.close_connection = True
                return
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close_connection = True
                return self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            self._relay(resp)
        finally:
            conn.close()

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        srv = self.server
        self.send_response_only(resp.status, resp.reason)
        self.log_request(resp.status)
        srv.proxied_requests.append((self.command, self.path, resp.status))
        has_length = False
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in _HOP_BY_HOP:
                continue
            if lk == "content-length":
                has_length = True
            if lk == "location" and srv.backend_url and v.startswith(srv.backend_url):
                v = srv.url + v[len(srv.backend_url):]
            self.send_header(k, v)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        use_chunked = not no_body and not has_length
        if use_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        while True:
            data = resp.read(CHUNK)
            if not data:
                break
            if use_chunked:
                self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            else:
                self.wfile.write(data)
        if use_chunked:
            self.wfile.write(b"0\r\n\r\n")


# --------------------------------------------------------------------------- assemblies


def _server_ssl_context(ca: CA, directory: Path) -> ssl.SSLContext:
    cert, key = ca.issue(directory, name="front")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def start_front(
    workdir: Path,
    service: TokenService,
    *,
    ca: CA | None = None,
    harbor_api: bool = True,
) -> FrontServer:
    """Start a FrontServer (HTTPS when ``ca`` is given) on a free loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = _server_ssl_context(ca, workdir) if ca else None
    return FrontServer(service, ssl_ctx=ctx, harbor_api=harbor_api, log=workdir / "front.log").start()


@dataclass(eq=False)
class Harbor:
    url: str
    host: str
    ca_file: Path | None
    service: TokenService
    registry: RunningRegistry
    front: FrontServer

    @property
    def token_requests(self) -> list[TokenRequest]:
        return self.service.token_requests

    @property
    def projects(self) -> dict[str, Project]:
        return self.service.projects

    @property
    def users(self) -> dict[str, User]:
        return self.service.users

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl_context(self.ca_file)

    def add_project(self, name: str, *, public: bool = False, owner: str | None = None) -> Project:
        return self.service.add_project(name, public=public, owner=owner)

    def stop(self) -> None:
        try:
            self.front.stop()
        finally:
            self.registry.stop()

    def __enter__(self) -> "Harbor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_harbor(
    workdir: Path | str,
    *,
    ca: CA | None,
    users: Mapping[str, Any] | None = None,
    projects: Mapping[str, Any] | Iterable[str] | None = None,
    service: str = "harbor-registry",
    issuer: str = "harbor-token-issuer",
    token_ttl: int = 300,
    allow_post: bool = False,
) -> Harbor:
    """Harbor look-alike: front (HTTPS when ``ca``) with token service + API + proxy to a
    token-auth docker-registry on another loopback port.

    ``users``: ``{name: User | password | {"password":…, "admin":…, "can_create_projects":…,
    "member_of": [...]}}`` (default :func:`default_users`).  ``projects``: ``{name: {"public": bool}}``
    or an iterable of names (private).  Push needs an existing project and membership (or admin).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key, cert_path, cert_der = make_token_signer(workdir / "token")
    svc = TokenService(key, cert_der, service=service, issuer=issuer, users=users, projects=projects,
                       strict_projects=True, token_ttl=token_ttl, allow_post=allow_post)
    front = start_front(workdir / "front", svc, ca=ca, harbor_api=True)
    try:
        reg = start_registry(
            workdir / "registry",
            auth="token",
            token_realm=f"{front.url}/service/token",
            token_service=service,
            token_issuer=issuer,
            token_rootcertbundle=cert_path,
        )
    except BaseException:
        front.stop()
        raise
    front.set_backend(reg.url)
    return Harbor(url=front.url, host=front.host, ca_file=ca.cert_path if ca else None, service=svc,
                  registry=reg, front=front)


@dataclass(eq=False)
class TokenRegistry:
    """docker-registry with its own TLS and token auth; the realm is a standalone token server."""

    url: str
    host: str
    ca_file: Path | None
    service: TokenService
    registry: RunningRegistry
    token_server: FrontServer

    @property
    def token_requests(self) -> list[TokenRequest]:
        return self.service.token_requests

    @property
    def projects(self) -> dict[str, Project]:
        return self.service.projects

    @property
    def users(self) -> dict[str, User]:
        return self.service.users

    @property
    def realm(self) -> str:
        return f"{self.token_server.url}/service/token"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl_context(self.ca_file)

    def stop(self) -> None:
        try:
            self.registry.stop()
        finally:
            self.token_server.stop()

    def __enter__(self) -> "TokenRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_token_registry(
    workdir: Path | str,
    *,
    ca: CA | None,
    users: Mapping[str, Any] | None = None,
    projects: Mapping[str, Any] | Iterable[str] | None = None,
    service: str = "rke2-mirror-test",
    issuer: str = "rke2-mirror-test-issuer",
    strict_projects: bool = False,
    token_ttl: int = 300,
    allow_post: bool = False,
) -> TokenRegistry:
    """Token-auth docker-registry (HTTPS with a cert from ``ca`` when given) + standalone token server.

    Defaults: users :func:`default_users`; projects ``{"library": public, "rancher": private}``;
    ``strict_projects=False`` lets admin push anywhere (others still need project membership).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if projects is None:
        projects = {"library": {"public": True}, "rancher": {"public": False}}
    key, cert_path, cert_der = make_token_signer(workdir / "token")
    svc = TokenService(key, cert_der, service=service, issuer=issuer, users=users, projects=projects,
                       strict_projects=strict_projects, token_ttl=token_ttl, allow_post=allow_post)
    ts = start_front(workdir / "tokenserver", svc, ca=ca, harbor_api=False)
    try:
        tls = ca.issue(workdir / "registry-tls", name="registry") if ca else None
        reg = start_registry(
            workdir / "registry",
            tls=tls,
            ca_file=ca.cert_path if ca else None,
            auth="token",
            token_realm=f"{ts.url}/service/token",
            token_service=service,
            token_issuer=issuer,
            token_rootcertbundle=cert_path,
        )
    except BaseException:
        ts.stop()
        raise
    return TokenRegistry(url=reg.url, host=reg.host, ca_file=reg.ca_file, service=svc, registry=reg,
                         token_server=ts)
