"""An OCI distribution-spec 1.1 *referrers API* in front of a real docker-registry (2.8, which has none).

CNCF distribution 2.8 answers ``GET /v2/<name>/referrers/<digest>`` with ``404`` and a plain-text
``404 page not found`` (its router has no such route: no JSON error, and no auth challenge even on an
htpasswd registry), and never sets ``OCI-Subject`` on a manifest PUT.  Clients must then use the
referrers *tag schema* (an image index tagged ``sha256-<hex>``).  This front makes the same registry
look like a 1.1 registry, so tests can exercise both paths against one real storage backend::

    with start_referrers_front(registry.url, verify=registry.verify) as front:
        pusher = ImagePusher(front.url)
        ...  # push and pull as usual; PUT a manifest with ``subject`` -> ``OCI-Subject`` header
        httpx.get(f"{front.url}/v2/{repo}/referrers/{digest}")   # 200, an OCI image index

What it does (spec: distribution-spec ``spec.md``, "Pushing Manifests with Subject", "Listing
Referrers", "Enabling the Referrers API"):

- Every request is relayed to the upstream in ``CHUNK``-sized pieces in both directions (never a
  whole blob in memory), Content-Length and chunked uploads alike, HEAD included.  Request headers
  pass through (``Authorization`` too) except hop-by-hop ones and ``Host``/``Expect``; response
  headers pass through (``WWW-Authenticate`` too); redirects are not followed, they reach the client
  as the upstream gives them.  ``Location`` (and ``Link``) values pointing at the upstream are
  rewritten to point at the front (distribution builds absolute upload/manifest URLs from ``Host``).
- ``PUT /v2/<name>/manifests/<ref>`` (the body is buffered up to :data:`MANIFEST_LIMIT`, larger ones
  stream through unparsed): when the upstream answers 201 and the JSON body has a ``subject`` with
  a digest, a descriptor ``{mediaType, digest, size, artifactType, annotations}`` is recorded under
  ``(name, subject digest)`` -- ``artifactType`` is the manifest's ``artifactType``, else (image
  manifests only) its ``config.mediaType``; an index without one gets none -- and the answer
  carries ``OCI-Subject: <subject digest>``.  The same digest pushed twice is listed once.
- ``DELETE /v2/<name>/manifests/<digest>`` answered 202: the digest leaves every list of ``name``.
- ``GET|HEAD /v2/<name>/referrers/<digest>[?artifactType=X]``: 200,
  ``Content-Type: application/vnd.oci.image.index.v1+json``, ``{"schemaVersion": 2, "mediaType":
  ..., "manifests": [...]}`` (empty list when none, also for a repository the upstream does not
  know); ``400`` (``DIGEST_INVALID``) for a malformed digest or one of an algorithm other than
  sha256/sha512, ``400`` (``NAME_INVALID``) for a malformed name.  ``artifactType`` filters and sets
  ``OCI-Filters-Applied: artifactType``.  With ``page_size`` set, at most that many descriptors per
  answer and ``Link: </v2/<name>/referrers/<digest>?...&last=<digest>>; rel="next"`` while more
  remain (``last`` = the last descriptor already returned; an unknown ``last`` gives an empty page).
  Authorisation: the front asks the upstream ``GET /v2/<name>/tags/list?n=1`` with the client's
  ``Authorization``; a 401/403 from it is relayed (status, ``WWW-Authenticate``, body) instead of
  the list, so an auth-enabled upstream protects the referrers API like its other endpoints.

State is in memory and only knows what went **through the front**: a manifest pushed to the
upstream directly, or before the front started, is not listed -- and since the front answers 200, a
spec client will not look at the tag schema either.  ``include_tag_schema=True`` implements the spec's
"Enabling the Referrers API" rule instead (registries MUST include preexisting manifests listed in a
referrers tag schema index): every referrers answer then also reads the upstream's ``sha256-<hex>``
index (with the client's ``Authorization``) and lists those of its manifests that exist and whose
``subject`` is the digest (descriptor rebuilt from the manifest itself).  Or call
:meth:`ReferrersFront.add_referrer`.  Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import re
import ssl
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

from rke2_mirror_testkit.registry_proc import ssl_context
from rke2_mirror_testkit.tokenserver import _HOP_BY_HOP, CHUNK, FrontServer, _Handler

__all__ = [
    "OCI_INDEX",
    "MANIFEST_LIMIT",
    "ReferrersFront",
    "start_referrers_front",
    "valid_digest",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_LIMIT = 8 * 1024 * 1024  # PUT manifest bodies buffered (and indexed) up to this size

_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_REFERRERS_RE = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]*)$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_DIGEST_SYNTAX = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_HEX_LEN = {"sha256": 64, "sha512": 128}


def valid_digest(digest: str) -> bool:
    """OCI image-spec digest grammar, and a registered algorithm (sha256/sha512) with lowercase hex
    of the right length."""
    if not _DIGEST_SYNTAX.fullmatch(digest):
        return False
    algo, _, hexpart = digest.partition(":")
    n = _HEX_LEN.get(algo)
    return n is not None and len(hexpart) == n and re.fullmatch(r"[a-f0-9]+", hexpart) is not None


def _descriptor_of(body: bytes, content_type: str, digest: str) -> tuple[str, dict] | None:
    """``(subject digest, descriptor)`` for a manifest body with a ``subject``, else None."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    subject = doc.get("subject")
    if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
        return None
    media_type = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else content_type
    desc: dict = {"mediaType": media_type, "digest": digest, "size": len(body)}
    artifact_type = doc.get("artifactType")
    if not (isinstance(artifact_type, str) and artifact_type):
        artifact_type = None
        config = doc.get("config")
        is_index = media_type == OCI_INDEX or "manifests" in doc
        if not is_index and isinstance(config, dict) and isinstance(config.get("mediaType"), str):
            artifact_type = config["mediaType"] or None
    if artifact_type:
        desc["artifactType"] = artifact_type
    annotations = doc.get("annotations")
    if isinstance(annotations, dict) and annotations:
        desc["annotations"] = dict(annotations)
    return subject["digest"], desc


class ReferrersFront:
    """A running referrers front: ``url``, ``host``, ``upstream_url``, ``requests`` ((method, raw path)
    in arrival order), ``page_size``.  Stop with :meth:`stop` (or use ``with``)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        verify: ssl.SSLContext | str | Path | bool = True,
        page_size: int | None = None,
        ssl_ctx: ssl.SSLContext | None = None,
        include_tag_schema: bool = False,
        subject_header: bool = True,
    ):
        if page_size is not None and page_size < 1:
            raise ValueError("page_size must be >= 1")
        parts = urlsplit(upstream_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream_url must be http(s)://host[:port], not {upstream_url!r}")
        self.upstream_url = f"{parts.scheme}://{parts.netloc}"
        self._upstream_tls = parts.scheme == "https"
        self._upstream = (parts.hostname, parts.port or (443 if self._upstream_tls else 80))
        if isinstance(verify, (str, Path)):
            verify = ssl_context(verify)
        if verify is True:
            verify = ssl.create_default_context()
        elif verify is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            verify = ctx
        self._upstream_ctx: ssl.SSLContext = verify  # type: ignore[assignment]
        self.page_size = page_size
        self.include_tag_schema = include_tag_schema
        self.subject_header = subject_header  # False: as registries built on spec 1.1 release candidates
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._index: dict[tuple[str, str], dict[str, dict]] = {}  # (name, subject) -> digest -> descriptor
        self._server = _ReferrersServer(self, ssl_ctx)
        self._server.set_backend(self.upstream_url)
        self._server.backend = self._upstream
        self.url = self._server.url
        self.host = self._server.host
        self._server.start()

    # -- state
    def referrers(self, name: str, subject_digest: str) -> list[dict]:
        """A copy of the descriptors recorded for ``name`` / ``subject_digest`` (push order)."""
        with self._lock:
            return [json.loads(json.dumps(d)) for d in self._index.get((name, subject_digest), {}).values()]

    def add_referrer(self, name: str, subject_digest: str, descriptor: Mapping) -> None:
        """Record a descriptor by hand (e.g. for a manifest pushed to the upstream directly)."""
        with self._lock:
            self._index.setdefault((name, subject_digest), {})[descriptor["digest"]] = dict(descriptor)

    def clear(self) -> None:
        with self._lock:
            self._index.clear()
            self.requests.clear()

    def seen(self, method: str | None = None, match: str | None = None) -> int:
        """How many requests (of ``method``; whose raw path matches the regex ``match``) arrived."""
        with self._lock:
            log = list(self.requests)
        return sum(1 for m, p in log if (method is None or m == method) and (match is None or re.search(match, p)))

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "ReferrersFront":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler
    def _record(self, name: str, subject: str, desc: dict) -> None:
        with self._lock:
            self._index.setdefault((name, subject), {})[desc["digest"]] = desc

    def _forget(self, name: str, digest: str) -> None:
        with self._lock:
            for (n, _), entries in self._index.items():
                if n == name:
                    entries.pop(digest, None)

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._upstream
        if self._upstream_tls:
            return http.client.HTTPSConnection(host, port, timeout=120, context=self._upstream_ctx)
        return http.client.HTTPConnection(host, port, timeout=120)


class _ReferrersServer(FrontServer):
    def __init__(self, front: ReferrersFront, ssl_ctx: ssl.SSLContext | None):
        super().__init__(None, ssl_ctx=ssl_ctx, harbor_api=False, log=None)  # type: ignore[arg-type]
        self.RequestHandlerClass = _ReferrersHandler
        self.front = front


class _ReferrersHandler(_Handler):
    server: _ReferrersServer  # type: ignore[assignment]
    server_version = "rke2-mirror-test-referrers"

    def _route(self) -> None:
        front = self.server.front
        front._log(self.command, self.path)
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        m = _REFERRERS_RE.match(path)
        if m and self.command in ("GET", "HEAD"):
            self._drain_body()
            return self._referrers(m.group("name"), m.group("digest"), parse_qs(parts.query))
        m = _MANIFEST_RE.match(path)
        if m and self.command == "PUT":
            return self._put_manifest(m.group("name"))
        if m and self.command == "DELETE":
            name, ref = m.group("name"), m.group("ref")

            def forget(status: int, headers: list[tuple[str, str]]) -> dict[str, str]:
                if status == 202 and ":" in ref:
                    front._forget(name, ref)
                return {}

            return self._forward(self._request_body(), on_response=forget)
        return self._forward(self._request_body())

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _route

    # -- request bodies
    def _chunked_request(self) -> bool:
        return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def _request_body(self) -> Iterator[bytes] | None:
        if self._chunked_request():
            return self._iter_chunked()
        remaining = int(self.headers.get("Content-Length") or 0)
        if remaining <= 0:
            return None

        def gen() -> Iterator[bytes]:
            left = remaining
            while left > 0:
                data = self.rfile.read(min(CHUNK, left))
                if not data:
                    raise ConnectionError("client closed during body")
                left -= len(data)
                yield data

        return gen()

    # -- manifest PUT: the only body looked at
    def _put_manifest(self, name: str) -> None:
        front = self.server.front
        body = self._request_body()
        buf = bytearray()
        rest: Iterator[bytes] | None = None
        if body is not None:
            for data in body:
                buf += data
                if len(buf) > MANIFEST_LIMIT:
                    rest = body
                    break
        if rest is not None:  # too large to index: stream it through as it came
            return self._forward(itertools.chain([bytes(buf)], rest))
        data = bytes(buf)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()

        def record(status: int, headers: list[tuple[str, str]]) -> dict[str, str]:
            if status != 201:
                return {}
            digest = next((v for k, v in headers if k.lower() == "docker-content-digest"), None)
            digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
            found = _descriptor_of(data, content_type, digest)
            if found is None:
                return {}
            subject, desc = found
            front._record(name, subject, desc)
            return {"OCI-Subject": subject} if front.subject_header else {}

        self._forward([data] if data else None, length=len(data), on_response=record)

    # -- referrers API
    def _error(self, status: int, code: str, message: str, detail=None) -> None:
        err: dict = {"code": code, "message": message}
        if detail is not None:
            err["detail"] = detail
        self._send(status, {"errors": [err]})

    def _referrers(self, name: str, digest: str, query: dict[str, list[str]]) -> None:
        front = self.server.front
        if not _NAME_RE.fullmatch(name) or len(name) > 255:
            return self._error(400, "NAME_INVALID", "invalid repository name", {"name": name})
        if not valid_digest(digest):
            known = digest.partition(":")[0] in _HEX_LEN
            why = "unsupported digest algorithm" if _DIGEST_SYNTAX.fullmatch(digest) and not known else "invalid digest"
            return self._error(400, "DIGEST_INVALID", why, {"digest": digest})
        if self._relay_auth_failure(name):
            return
        entries = front.referrers(name, digest)
        if front.include_tag_schema:
            known = {d["digest"] for d in entries}
            entries += [d for d in self._tag_schema_referrers(name, digest) if d["digest"] not in known]
        headers: dict[str, str] = {}
        artifact_type = (query.get("artifactType") or [None])[0]
        if artifact_type:
            entries = [d for d in entries if d.get("artifactType") == artifact_type]
            headers["OCI-Filters-Applied"] = "artifactType"
        last = (query.get("last") or [None])[0]
        if last:
            pos = next((i for i, d in enumerate(entries) if d["digest"] == last), None)
            entries = [] if pos is None else entries[pos + 1:]
        size = front.page_size
        if size is not None and len(entries) > size:
            entries = entries[:size]
            q = ([f"artifactType={quote(artifact_type, safe='')}"] if artifact_type else []) + \
                [f"last={quote(entries[-1]['digest'], safe='')}"]
            headers["Link"] = f'</v2/{name}/referrers/{digest}?{"&".join(q)}>; rel="next"'
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        self._send(200, json.dumps(body).encode(), headers, content_type=OCI_INDEX)

    def _upstream_get(self, path: str, accept: str) -> tuple[int, str, bytes]:
        conn = self.server.front._connection()
        try:
            hdrs = {"Accept": accept}
            if self.headers.get("Authorization"):
                hdrs["Authorization"] = self.headers["Authorization"]
            conn.request("GET", path, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, (resp.getheader("Content-Type") or "").split(";")[0].strip(), \
                resp.read(MANIFEST_LIMIT + 1)
        finally:
            conn.close()

    def _tag_schema_referrers(self, name: str, digest: str) -> list[dict]:
        """Descriptors of the manifests the upstream's referrers tag schema index lists for ``digest``
        that exist there and have ``digest`` as their subject."""
        algo, _, encoded = digest.partition(":")
        tag = re.sub(r"[^a-zA-Z0-9._-]", "-", f"{algo[:32]}-{encoded[:64]}")
        accept = f"{OCI_INDEX}, {OCI_MANIFEST}"
        try:
            status, ctype, body = self._upstream_get(f"/v2/{name}/manifests/{tag}", accept)
            index = json.loads(body) if status == 200 and ctype == OCI_INDEX else None
        except (OSError, http.client.HTTPException, ValueError):
            return []
        out = []
        for d in (index.get("manifests") if isinstance(index, dict) else None) or []:
            ref = d.get("digest") if isinstance(d, dict) else None
            if not isinstance(ref, str) or not valid_digest(ref) or not ref.startswith("sha256:"):
                continue
            try:
                status, ctype, body = self._upstream_get(f"/v2/{name}/manifests/{ref}", accept)
            except (OSError, http.client.HTTPException):
                continue
            if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != ref:
                continue
            found = _descriptor_of(body, ctype, ref)
            if found is not None and found[0] == digest:
                out.append(found[1])
        return out

    def _relay_auth_failure(self, name: str) -> bool:
        """Ask the upstream whether this client may read ``name``; relay a 401/403.  True if relayed."""
        front = self.server.front
        conn = front._connection()
        try:
            hdrs = {"Accept": "application/json"}
            if self.headers.get("Authorization"):
                hdrs["Authorization"] = self.headers["Authorization"]
            conn.request("GET", f"/v2/{name}/tags/list?n=1", headers=hdrs)
            resp = conn.getresponse()
            body = resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            self.close_connection = True
            self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            return True
        finally:
            conn.close()
        if resp.status not in (401, 403):
            return False
        headers = {k: v for k, v in resp.getheaders()
                   if k.lower() in ("www-authenticate", "docker-distribution-api-version")}
        ctype = resp.getheader("Content-Type") or "application/json"
        self._send(resp.status, body, headers, content_type=ctype)
        return True

    # -- relay
    def _forward(
        self,
        body: Iterable[bytes] | None,
        *,
        length: int | None = None,
        on_response: Callable[[int, list[tuple[str, str]]], Mapping[str, str]] | None = None,
    ) -> None:
        """Send this request upstream with ``body`` (``length`` known: Content-Length, else the
        client's own framing) and relay the answer.  ``on_response(status, headers)`` runs before
        the answer goes out and returns headers to add."""
        front = self.server.front
        chunked = length is None and self._chunked_request()
        conn = front._connection()
        try:
            try:
                conn.connect()
            except OSError as e:
                self._drain(body)
                self.close_connection = True
                return self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",") if t.strip()}
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in _HOP_BY_HOP or lk in tokens or lk in ("host", "expect"):
                    continue
                if lk == "content-length" and (length is not None or chunked):
                    continue
                conn.putheader(k, v)
            host, port = front._upstream
            conn.putheader("Host", f"{host}:{port}")
            if length is not None:
                conn.putheader("Content-Length", str(length))
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            send_failed = False
            try:
                for data in body or ():
                    if send_failed or not data:
                        continue  # the upstream answered early: keep draining the client
                    try:
                        conn.send(b"%x\r\n" % len(data) + data + b"\r\n" if chunked else data)
                    except OSError:
                        send_failed = True
                if chunked and not send_failed:
                    conn.send(b"0\r\n\r\n")
            except (ConnectionError, TimeoutError, ValueError):
                self.close_connection = True
                return
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close_connection = True
                return self._send(502, f"bad gateway: {e}\n", {"Connection": "close"})
            extra = dict(on_response(resp.status, resp.getheaders())) if on_response else {}
            self._relay_response(resp, extra)
        finally:
            conn.close()

    def _drain(self, body: Iterable[bytes] | None) -> None:
        try:
            for _ in body or ():
                pass
        except (ConnectionError, TimeoutError, ValueError):
            self.close_connection = True

    def _rewrite(self, value: str) -> str:
        up, me = self.server.front.upstream_url, self.server.url
        return value.replace(up, me) if up in value else value

    def _relay_response(self, resp: http.client.HTTPResponse, extra: Mapping[str, str]) -> None:
        self.send_response_only(resp.status, resp.reason)
        has_length = False
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in _HOP_BY_HOP:
                continue
            if lk == "content-length":
                has_length = True
            if lk in ("location", "link", "content-location"):
                v = self._rewrite(v)
            self.send_header(k, v)
        for k, v in extra.items():
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
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n" if use_chunked else data)
        if use_chunked:
            self.wfile.write(b"0\r\n\r\n")


def start_referrers_front(
    upstream_url: str,
    *,
    verify: ssl.SSLContext | str | Path | bool = True,
    page_size: int | None = None,
    ssl_ctx: ssl.SSLContext | None = None,
    include_tag_schema: bool = False,
    subject_header: bool = True,
) -> ReferrersFront:
    """Start a referrers front on a free 127.0.0.1 port in front of ``upstream_url`` (a running
    docker-registry; https is checked with ``verify``: a context, a CA file, True for the system
    store, False for none).  ``page_size`` paginates referrers answers; ``ssl_ctx`` makes the front
    itself serve HTTPS; ``include_tag_schema`` also lists what the upstream's referrers tag schema
    indexes hold (see the module doc).  Use as a context manager or call ``.stop()``."""
    return ReferrersFront(upstream_url, verify=verify, page_size=page_size, ssl_ctx=ssl_ctx,
                          include_tag_schema=include_tag_schema, subject_header=subject_header)
