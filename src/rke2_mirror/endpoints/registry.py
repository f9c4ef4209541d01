"""One registry endpoint over the v2 API: manifests, blobs, mounts, chunked uploads.

Retries, the request-rate cap, the pull-budget observer and cancellation live in the client's transport
(endpoints/transport.py), one exchange at a time: every method here makes one request.

Every answer read whole has a cap (manifests `MAX_MANIFEST_BYTES`, token answers `MAX_TOKEN_BYTES`, the rest
the transport's `DEFAULT_BODY_CAP`; error bodies a few KiB), enforced before it is buffered, and every body
moves at least `transport.SPEED_FLOOR` bytes/s over `timeout` seconds: a server cannot make a run hold
more memory or wait longer than that, whatever it sends.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit

import httpx

from rke2_mirror.endpoints import transport as tx
from rke2_mirror.endpoints.auth import Credentials, RegistryAuth
from rke2_mirror.endpoints.referrers import RegistryReferrers
from rke2_mirror.engine.cancel import NEVER, Cancel
from rke2_mirror.engine.retry import RetryPolicy, mark_exhausted
from rke2_mirror.model.errors import (AuthError, TokenError, DigestMismatch, MirrorError, NotFound, RegistryError, TemporaryError,
                     TLSError, UnreachableError)
from rke2_mirror.model.oci import ACCEPT, SCHEMA1_TYPES, Descriptor, parse_manifest, sha256_digest
from rke2_mirror.model.reference import DOCKER_HUB_API
from rke2_mirror.model.referrers import ReferrerFilter

USER_AGENT = "rke2-mirror/0.1"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what distribution and Harbor accept for a manifest or index
MAX_TOKEN_BYTES = 1024 * 1024  # a token service's answer
SMALL_BLOB = 64 * 1024  # blobs below this are uploaded without a HEAD first (configs mostly): asking costs more

_READ = {tx.READ_BODY: True}  # whole answer read inside the transport's retry loop (at most DEFAULT_BODY_CAP)
_ONCE = {tx.READ_BODY: True, tx.NO_RETRY: True}  # an upload session's step: never replayed
_TOKEN = {tx.READ_BODY: True, tx.MAX_BODY: MAX_TOKEN_BYTES}
_ERROR_TEXT = 200  # characters of a registry's error message kept in ours


def ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    """`True` (system CAs), `False` (insecure_skip_verify) or a CA file added to the system CAs."""
    if verify is True or verify is False:
        return verify
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=str(verify))
    except (OSError, ssl.SSLError) as exc:
        from rke2_mirror.model.errors import InputError
        raise InputError(f"cannot load CA file {verify}: {exc}") from None
    return ctx


def _error_message(resp: httpx.Response) -> str:
    """The registry's own words for an error, on one line (the body read is cut at a few KiB by the
    transport), else the reason phrase."""
    try:
        errs = json.loads(resp.read() or b"{}").get("errors") or []
        if errs:
            e = errs[0]
            return _one_line(f"{e.get('code', '')}: {e.get('message', '')}".strip(": "))
    except (ValueError, AttributeError, TypeError, httpx.HTTPError):
        pass
    return _one_line(resp.reason_phrase or "")


def _one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= _ERROR_TEXT else text[:_ERROR_TEXT] + "…"


def status_error(resp: httpx.Response, what: str) -> RegistryError:
    """Map an HTTP error response to the exception tree (`exhausted` when the transport retried it)."""
    code = resp.status_code
    msg = _error_message(resp)
    detail = f"{what}: HTTP {code}" + (f" {msg}" if msg else "")
    if code == 404:
        return NotFound(detail, status=code)
    if code in (401, 403):
        return AuthError(detail, status=code)
    if code in (408, 429) or code >= 500:
        err: RegistryError = TemporaryError(detail, status=code, retry_after=tx.retry_after(resp))
    else:
        err = RegistryError(detail, status=code)
    if tx.was_exhausted(resp):
        mark_exhausted(err)
    return err


class Registry:
    """A v2 registry endpoint.  Thread-safe; one connection pool; a token reused wherever its scopes cover a request.

    `tls_flags` name the command-line flags that fix a TLS failure (CA file, skip verify), so errors
    can say which flag to use.  `transport` replaces the connection pool (tests inject faults there); it
    is wrapped like the real one.  `limiter` is called before every exchange (a RequestRateLimiter),
    `on_response` sees every response (PullBudget.observe), `cancel` stops the next request and wakes
    retry waits.  `strict_auth_realm` refuses to send credentials to a token service on another host (or
    over http for an https registry); without it that is allowed with one warning per realm, given to `log`
    (the `logging` module's "rke2_mirror" logger when None).  `timeout` (default the retry policy's) is
    also the speed floor's window.
    """

    def __init__(self, base_url: str, *, verify: bool | str = True, credentials: Credentials | None = None,
                 actions: str = "pull", jobs: int = 8, retry: RetryPolicy | None = None,
                 timeout: float | None = None, chunk_size: int = 64 * 1024 * 1024,
                 monolithic_limit: int = 4 * 1024 * 1024, tls_flags: tuple[str, str] = ("--ca-file", "--insecure-skip-verify"),
                 transport: httpx.BaseTransport | None = None, limiter: "Callable[[], None] | None" = None,
                 on_response: "Callable[[httpx.Response], None] | None" = None, cancel: Cancel | None = None,
                 strict_auth_realm: bool = False, log: "Callable[[str], None] | None" = None):
        parts = urlsplit(base_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        self.retry = retry or RetryPolicy()
        self.cancel = cancel or NEVER
        timeout = self.retry.timeout if timeout is None else timeout
        self.chunk_size = chunk_size
        self.monolithic_limit = monolithic_limit
        self.tls_flags = tls_flags
        # Docker Hub counts every manifest GET as a pull (engine.protocols.counts_pulls)
        self.manifest_gets_are_pulls = (parts.hostname or "") == DOCKER_HUB_API
        self.max_manifest_bytes = MAX_MANIFEST_BYTES
        self._referrers = RegistryReferrers(self)
        self.auth = RegistryAuth(credentials, actions, self._fetch_token, self.host, scheme=parts.scheme,
                                 strict_realm=strict_auth_realm, log=log)
        stack = {"retry": self.retry, "cancel": self.cancel, "limiter": limiter, "observe": on_response,
                 "window": timeout}
        mounts: dict[str, httpx.BaseTransport | None] | None = None
        if transport is None:
            limits = httpx.Limits(max_connections=max(4, jobs * 2), max_keepalive_connections=max(4, jobs * 2))
            self.transport, mounts = tx.http_transports(verify=ssl_context(verify), limits=limits, **stack)
        else:
            self.transport = tx.wrap(transport, **stack)
        self.client = httpx.Client(
            base_url=self.base_url,
            auth=self.auth,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            # identity: a compressed answer's size is not bounded by what arrives (the transport refuses one)
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            transport=self.transport,
            mounts=mounts,
            follow_redirects=False,
        )

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fetch_token(self, url: str, params, basic, data=None) -> httpx.Response:
        """One token request (the transport retries it; nothing around it does)."""
        try:
            if data is not None:
                return self.client.post(url, data=data, auth=None, extensions=_TOKEN)
            return self.client.get(url, params=params, auth=httpx.BasicAuth(*basic) if basic else None,
                                   extensions=_TOKEN)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, f"token service {url}") from None

    def _transport_error(self, exc: Exception, what: str) -> MirrorError:
        tls = tx.tls_failure(exc)
        if tls:
            ca, insecure = self.tls_flags
            return TLSError(f"{what}: TLS error talking to {self.host}: {tls}; "
                            f"give the registry's CA with {ca} PATH, or {insecure} (not recommended)")
        if isinstance(exc, tx.ResponseTooLarge):
            return RegistryError(f"{what}: {exc}")
        if isinstance(exc, tx.TransferTooSlow):
            err = TemporaryError(f"{what}: {exc}")
        elif isinstance(exc, httpx.TimeoutException):
            err = TemporaryError(f"{what}: timed out talking to {self.host}")
        elif isinstance(exc, httpx.ConnectError):
            err = TemporaryError(f"{what}: cannot connect to {self.base_url} ({_short(exc)})")
        else:
            err = TemporaryError(f"{what}: connection to {self.host} failed ({_short(exc)})")
        if getattr(exc, "exhausted", False):
            mark_exhausted(err)
        return err

    def _request(self, method: str, url: str, what: str, ok: tuple[int, ...], *,
                 once: bool = False, cap: int | None = None, **kw) -> httpx.Response:
        """One request (retried by the transport unless `once`); errors mapped.  The response body is read,
        refused past `cap` bytes (default: the transport's DEFAULT_BODY_CAP)."""
        extensions = dict(_ONCE if once else _READ)
        if cap is not None:
            extensions[tx.MAX_BODY] = cap
        try:
            resp = self.client.request(method, url, extensions=extensions, **kw)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        if resp.status_code not in ok:
            raise status_error(resp, what)
        return resp

    # -- endpoint ---------------------------------------------------------------------------
    def location(self, repo: str, reference: str) -> str:
        sep = "@" if reference.startswith("sha256:") else ":"
        return f"{self.base_url}/{repo}{sep}{reference}"

    def plan_repositories(self, repos: Iterable[str]) -> None:
        """The repositories a run will use here, in order: tokens are then asked for batches of them
        (auth.RegistryAuth.plan), not one per repository."""
        self.auth.plan(repos)

    def ping(self) -> str | None:
        """GET /v2/ (authenticating if challenged).  Returns the auth scheme seen, if any."""
        try:
            self._request("GET", "/v2/", f"{self.base_url}/v2/", (200,))
        except TokenError:
            raise
        except AuthError as exc:
            c = self.auth.credentials
            hint = ("the credentials were rejected" if c else
                    "it requires credentials (RKE2_MIRROR_USERNAME/RKE2_MIRROR_PASSWORD for the target, "
                    "or a docker config / REGISTRY_AUTH_FILE entry)")
            raise AuthError(f"{self.base_url}: {hint} (HTTP {exc.status})", status=exc.status) from None
        except NotFound:
            raise RegistryError(f"{self.base_url} does not serve the registry v2 API (/v2/ answers 404)") from None
        except TemporaryError as exc:
            raise UnreachableError(str(exc)) from None
        return self.auth.scheme

    def head_manifest(self, repo: str, reference: str, params: dict | None = None) -> Descriptor | None:
        resp = self._request("HEAD", f"/v2/{repo}/manifests/{reference}", self.location(repo, reference), (200, 404),
                             headers={"Accept": ACCEPT}, params=params)
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("docker-content-digest", "")
        size = int(resp.headers.get("content-length") or 0)
        return Descriptor(resp.headers.get("content-type", "").split(";")[0], digest, size)

    def get_manifest(self, repo: str, reference: str, params: dict | None = None) -> tuple[Descriptor, bytes]:
        what = self.location(repo, reference)
        resp = self._request("GET", f"/v2/{repo}/manifests/{reference}", what, (200,),
                             headers={"Accept": ACCEPT}, params=params, cap=MAX_MANIFEST_BYTES)
        raw = resp.content  # at most MAX_MANIFEST_BYTES: the transport refused anything longer unread
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes "
                                f"({tx.human_size(MAX_MANIFEST_BYTES)})")
        desc = Descriptor.of_bytes(resp.headers.get("content-type", "").split(";")[0], raw)
        if desc.media_type in SCHEMA1_TYPES:
            parse_manifest(desc.media_type, raw)  # raises the clear schema1 error
        if reference.startswith("sha256:") and desc.digest != reference:
            raise DigestMismatch(f"{what}: manifest content hashes to {desc.digest}")
        return desc, raw

    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str:
        what = f"push manifest {self.host}/{repo}:{reference}"
        try:
            resp = self._request("PUT", f"/v2/{repo}/manifests/{reference}", what, (200, 201, 202),
                                 content=raw, headers={"Content-Type": media_type})
        except RegistryError as exc:
            # distribution's filesystem store answers 400 DIGEST_INVALID while another client writes the
            # same manifest (concurrent runs): temporary (the transport already tried it again).
            if exc.status == 400 and "DIGEST_INVALID" in str(exc):
                err = TemporaryError(str(exc), status=400)
                if getattr(exc, "exhausted", False):
                    mark_exhausted(err)
                raise err from None
            raise
        got = resp.headers.get("docker-content-digest", "")
        want = sha256_digest(raw)
        if got and got != want:
            raise DigestMismatch(f"{what}: registry stored digest {got}, expected {want}")
        self._referrers.after_put(repo, media_type, raw, want, resp)
        return want

    # -- referrers (endpoints/referrers.py) --------------------------------------------------
    def referrers(self, repo: str, subject: str, filt: ReferrerFilter | None = None) -> list[Descriptor]:
        return self._referrers.referrers(repo, subject, filt)

    def tagged_artifacts(self, repo: str, subject: str) -> list[tuple[str, str]]:
        return self._referrers.tagged(repo, subject)

    def referrers_possible(self, repo: str) -> bool:
        return self._referrers.possible(repo)

    def has_blob(self, repo: str, desc: Descriptor) -> bool:
        """A blob HEAD: is it in `repo`?"""
        resp = self._request("HEAD", f"/v2/{repo}/blobs/{desc.digest}", f"{self.host}/{repo}@{desc.digest}",
                             (200, 404))
        return resp.status_code == 200

    def reuse_blob(self, repo: str, desc: Descriptor, *, fresh: bool, mount_from: str | None) -> bool:
        """Mount from `mount_from` when given; else a HEAD, unless `repo` is new or the blob small
        (below SMALL_BLOB uploading costs about what asking does)."""
        if mount_from and self._mount(repo, desc, mount_from):
            return True
        if fresh or desc.size < SMALL_BLOB:
            return False
        return self.has_blob(repo, desc)

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        """Stream a blob as stored (redirects followed, credentials kept from other hosts); unchecked: the
        engine hashes it.  Transport errors while streaming (a break, or a transfer under the transport's
        speed floor) become TemporaryError."""
        what = f"{self.host}/{repo}@{desc.digest}"
        try:
            with self.client.stream("GET", f"/v2/{repo}/blobs/{desc.digest}", follow_redirects=True,
                                    headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise status_error(resp, what)
                yield self._guard(resp.iter_bytes(), what)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None

    def _guard(self, chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
        try:
            yield from chunks
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None

    def _mount(self, repo: str, desc: Descriptor, from_repo: str) -> bool:
        """Cross-repository mount (POST ?mount=&from=); False when the registry refuses (its upload
        session, if it opened one, is dropped)."""
        try:
            resp = self._request("POST", f"/v2/{repo}/blobs/uploads/", f"mount {desc.digest} into {self.host}/{repo}",
                                 (201, 202), params={"mount": desc.digest, "from": from_repo})
        except (AuthError, NotFound):
            return False
        if resp.status_code == 202:
            self._cancel(resp)
            return False
        return True

    def _cancel(self, resp: httpx.Response) -> None:
        loc = resp.headers.get("location")
        if loc:
            try:
                self.client.delete(loc, extensions=_READ)
            except (httpx.HTTPError, RegistryError):
                pass

    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        """Upload a blob.  `chunks` come checked (engine.blobs.checked): they raise before they end when
        size or digest is wrong, and nothing is committed (the final PUT ?digest=) before all of them were
        read.  The session's steps go out once: the caller retries the whole operation, source included."""
        what = f"push {desc.digest} to {self.host}/{repo}"
        start = self._request("POST", f"/v2/{repo}/blobs/uploads/", what, (202,))
        loc = self._location(start, what)
        if desc.size <= self.monolithic_limit:
            # streamed with its length, never joined in memory: up to ~24 uploads at once, each holding a whole
            # blob (twice during a join), were most of peak RSS (issue #18).  The chunks raise before their end
            # when the source's bytes are not what the digest says; the registry checks the digest too.
            self._request("PUT", _with_digest(loc, desc.digest), what, (201, 204), once=True, content=chunks,
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
            return
        it = iter(chunks)
        pending = b""
        offset = 0
        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            window = _Window(it, n, pending)
            resp = self._request("PATCH", loc, what, (202, 204), once=True, content=window,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(n),
                                          "Content-Range": f"{offset}-{offset + n - 1}"})
            pending = window.leftover
            offset += n
            loc = self._location(resp, what)
        if pending or next(it, None):  # exhausting the chunks runs their digest check
            raise DigestMismatch(f"blob {desc.digest}: more than the {desc.size} bytes its descriptor names")
        self._request("PUT", _with_digest(loc, desc.digest), what, (201, 204), once=True)

    def _location(self, resp: httpx.Response, what: str) -> httpx.URL:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{what}: the registry sent no upload Location")
        if loc.startswith("/") and not loc.startswith("//") and "/." not in loc:
            # the usual answer, a plain path on this registry: parsed once.  httpx parses a URL one character
            # at a time in Python and an upload Location carries a long state string: join() parsed it three
            # times and each request made from the string parsed it again (~0.4 ms of CPU per blob uploaded)
            return httpx.URL(self.base_url + loc)
        return httpx.URL(self.base_url).join(loc)

    def repository_is_new(self, repo: str) -> bool:
        """True when the registry knows nothing of `repo` (tags/list answers 404 NAME_UNKNOWN):
        then no blob or manifest of it can be there, and asking for each one is wasted."""
        try:
            resp = self._request("GET", f"/v2/{repo}/tags/list", f"{self.host}/{repo} tags", (200, 404),
                                 params={"n": 1})
        except (AuthError, RegistryError):
            return False  # can't tell: ask per blob as usual
        return resp.status_code == 404


class _Window:
    """An iterable over exactly `n` bytes of a chunk iterator; remembers what is left over."""

    def __init__(self, it: Iterator[bytes], n: int, pending: bytes):
        self._it, self._n, self._pending = it, n, pending
        self.leftover = b""

    def __iter__(self) -> Iterator[bytes]:
        need = self._n
        buf = self._pending
        while need > 0:
            if not buf:
                buf = next(self._it, b"")
                if not buf:
                    raise DigestMismatch(f"blob ended {need} bytes early")
            take, buf = buf[:need], buf[need:]
            need -= len(take)
            yield take
        self.leftover = buf


def _with_digest(location: httpx.URL, digest: str) -> httpx.URL:
    """The upload URL with ?digest= added (keeping the registry's own state parameters as it wrote them:
    appended, not re-encoded, which would parse the long state string twice more)."""
    if location.fragment or b"digest=" in location.query:
        return location.copy_merge_params({"digest": digest})
    return httpx.URL(f"{location}{'&' if location.query else '?'}digest={quote(digest, safe='')}")


def _short(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    return text.splitlines()[0][:200]
