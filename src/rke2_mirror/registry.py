"""One registry endpoint over the v2 API: manifests, blobs, mounts, chunked uploads, retries."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx
import tenacity

from .auth import Credentials, RegistryAuth
from .errors import (AuthError, TokenError, DigestMismatch, MirrorError, NotFound, RegistryError, TemporaryError,
                     TLSError, UnreachableError)
from .oci import ACCEPT, SCHEMA1_TYPES, Descriptor, DigestingReader, parse_manifest, sha256_digest

USER_AGENT = "rke2-mirror/0.1"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing request is treated: `attempts` per operation on transient errors, with
    exponential waits; `timeout` seconds to wait for a registry's next bytes (connecting: at most
    15 s) before the attempt counts as failed."""

    attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 30.0
    timeout: float = 60.0

    def wait(self, attempt: int, exc: BaseException | None) -> float:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        return min(self.initial_wait * (2 ** (attempt - 1)), self.max_wait)

    def call(self, fn: Callable[[], object]):
        """Run fn, retrying temporary errors; the last error is raised as it is.

        The first attempt runs bare: the retry machinery is built only once something failed,
        so the thousands of calls that succeed at once cost nothing extra.
        """
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - re-raised unless temporary
            if not getattr(exc, "temporary", False) or self.attempts <= 1:
                raise
            first = exc
        time.sleep(self.wait(1, first))
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: getattr(e, "temporary", False)),
            stop=tenacity.stop_after_attempt(self.attempts - 1),
            wait=lambda rs: self.wait(rs.attempt_number + 1, rs.outcome.exception() if rs.outcome else None),
            reraise=True,
        )
        return retrying(fn)


def ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    """`True` (system CAs), `False` (insecure_skip_verify) or a CA file added to the system CAs."""
    if verify is True or verify is False:
        return verify
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=str(verify))
    except (OSError, ssl.SSLError) as exc:
        from .errors import InputError
        raise InputError(f"cannot load CA file {verify}: {exc}") from None
    return ctx


def _error_message(resp: httpx.Response) -> str:
    try:
        errs = json.loads(resp.read() or b"{}").get("errors") or []
        if errs:
            e = errs[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, httpx.HTTPError):
        pass
    return resp.reason_phrase or ""


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def status_error(resp: httpx.Response, what: str) -> RegistryError:
    """Map an HTTP error response to the exception tree."""
    code = resp.status_code
    msg = _error_message(resp)
    detail = f"{what}: HTTP {code}" + (f" {msg}" if msg else "")
    if code == 404:
        return NotFound(detail, status=code)
    if code in (401, 403):
        return AuthError(detail, status=code)
    if code in (408, 429) or code >= 500:
        return TemporaryError(detail, status=code, retry_after=_retry_after(resp))
    return RegistryError(detail, status=code)


def _tls_failure(exc: BaseException) -> str | None:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 6:
        text = str(e)
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return "certificate verification failed"
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return "the server does not speak TLS (use http:// for a plain-http registry)"
        e = e.__cause__ or e.__context__
        seen += 1
    return None


class Registry:
    """A v2 registry endpoint.  Thread-safe; one connection pool; tokens cached per scope.

    `ca_hint` / `insecure_hint` name the command-line flags that fix a TLS failure, so errors
    can say which flag to use.
    """

    def __init__(self, base_url: str, *, verify: bool | str = True, credentials: Credentials | None = None,
                 actions: str = "pull", jobs: int = 8, retry: RetryPolicy | None = None,
                 timeout: float | None = None, chunk_size: int = 64 * 1024 * 1024,
                 monolithic_limit: int = 4 * 1024 * 1024, tls_flags: tuple[str, str] = ("--ca-file", "--insecure-skip-verify"),
                 transport: httpx.BaseTransport | None = None, limiter: "Callable[[], None] | None" = None,
                 on_response: "Callable[[httpx.Response], None] | None" = None):
        parts = urlsplit(base_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        self.retry = retry or RetryPolicy()
        timeout = self.retry.timeout if timeout is None else timeout
        self.chunk_size = chunk_size
        self.monolithic_limit = monolithic_limit
        self.tls_flags = tls_flags
        self._limiter = limiter
        self.auth = RegistryAuth(credentials, actions, self._fetch_token, self.host)
        self.client = httpx.Client(
            base_url=self.base_url,
            verify=ssl_context(verify),
            auth=self.auth,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=httpx.Limits(max_connections=max(4, jobs * 2), max_keepalive_connections=max(4, jobs * 2)),
            headers={"User-Agent": USER_AGENT},
            transport=transport,
            follow_redirects=False,
            event_hooks={"response": [on_response]} if on_response else None,
        )
        self._supports_mount = True
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fetch_token(self, url: str, params, basic, data=None) -> httpx.Response:
        def go() -> httpx.Response:
            try:
                if data is not None:
                    return self.client.post(url, data=data, auth=None)
                return self.client.get(url, params=params, auth=httpx.BasicAuth(*basic) if basic else None)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, f"token service {url}") from None
        return self.retry.call(go)

    def _transport_error(self, exc: Exception, what: str) -> MirrorError:
        tls = _tls_failure(exc)
        if tls:
            ca, insecure = self.tls_flags
            return TLSError(f"{what}: TLS error talking to {self.host}: {tls}; "
                            f"give the registry's CA with {ca} PATH, or {insecure} (not recommended)")
        if isinstance(exc, httpx.TimeoutException):
            return TemporaryError(f"{what}: timed out talking to {self.host}")
        if isinstance(exc, httpx.ConnectError):
            return TemporaryError(f"{what}: cannot connect to {self.base_url} ({_short(exc)})")
        return TemporaryError(f"{what}: connection to {self.host} failed ({_short(exc)})")

    def _request(self, method: str, url: str, what: str, ok: tuple[int, ...], **kw) -> httpx.Response:
        """One request, no retry; errors mapped.  The response body is read."""
        if self._limiter:
            self._limiter()
        try:
            resp = self.client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        if resp.status_code not in ok:
            raise status_error(resp, what)
        return resp

    def _retrying(self, fn: Callable[[], object]):
        return self.retry.call(fn)

    # -- endpoint ---------------------------------------------------------------------------
    def location(self, repo: str, reference: str) -> str:
        sep = "@" if reference.startswith("sha256:") else ":"
        return f"{self.base_url}/{repo}{sep}{reference}"

    def ping(self) -> str | None:
        """GET /v2/ (authenticating if challenged).  Returns the auth scheme seen, if any."""
        def go():
            try:
                return self._request("GET", "/v2/", f"{self.base_url}/v2/", (200,))
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
        try:
            self._retrying(go)
        except TemporaryError as exc:
            raise UnreachableError(str(exc)) from None
        return self.auth.scheme

    def head_manifest(self, repo: str, reference: str, params: dict | None = None) -> Descriptor | None:
        what = self.location(repo, reference)

        def go():
            resp = self._request("HEAD", f"/v2/{repo}/manifests/{reference}", what, (200, 404),
                                 headers={"Accept": ACCEPT}, params=params)
            if resp.status_code == 404:
                return None
            digest = resp.headers.get("docker-content-digest", "")
            size = int(resp.headers.get("content-length") or 0)
            return Descriptor(resp.headers.get("content-type", "").split(";")[0], digest, size)
        return self._retrying(go)

    def get_manifest(self, repo: str, reference: str, params: dict | None = None) -> tuple[Descriptor, bytes]:
        what = self.location(repo, reference)

        def go():
            resp = self._request("GET", f"/v2/{repo}/manifests/{reference}", what, (200,),
                                 headers={"Accept": ACCEPT}, params=params)
            raw = resp.content
            if len(raw) > MAX_MANIFEST_BYTES:
                raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            desc = Descriptor.of_bytes(resp.headers.get("content-type", "").split(";")[0], raw)
            if desc.media_type in SCHEMA1_TYPES:
                parse_manifest(desc.media_type, raw)  # raises the clear schema1 error
            if reference.startswith("sha256:") and desc.digest != reference:
                raise DigestMismatch(f"{what}: manifest content hashes to {desc.digest}")
            return desc, raw
        return self._retrying(go)

    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str:
        what = f"push manifest {self.host}/{repo}:{reference}"

        def go():
            try:
                resp = self._request("PUT", f"/v2/{repo}/manifests/{reference}", what, (200, 201, 202),
                                     content=raw, headers={"Content-Type": media_type})
            except RegistryError as exc:
                # distribution's filesystem store answers 400 DIGEST_INVALID while another client
                # writes the same manifest (concurrent runs): worth another try after a pause.
                if exc.status == 400 and "DIGEST_INVALID" in str(exc):
                    raise TemporaryError(str(exc), status=400) from None
                raise
            return resp.headers.get("docker-content-digest", "")
        got = self._retrying(go)
        want = sha256_digest(raw)
        if got and got != want:
            raise DigestMismatch(f"{what}: registry stored digest {got}, expected {want}")
        return want

    def blob_exists(self, repo: str, desc: Descriptor) -> bool:
        def go():
            resp = self._request("HEAD", f"/v2/{repo}/blobs/{desc.digest}", f"{self.host}/{repo}@{desc.digest}",
                                 (200, 404))
            return resp.status_code == 200
        return self._retrying(go)

    @contextmanager
    def open_blob(self, repo: str, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        """Stream a blob (redirects followed); the iterator checks size and digest as it ends."""
        what = f"{self.host}/{repo}@{desc.digest}"
        if self._limiter:
            self._limiter()
        try:
            with self.client.stream("GET", f"/v2/{repo}/blobs/{desc.digest}", follow_redirects=True,
                                    headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise status_error(resp, what)
                yield DigestingReader(self._guard(resp.iter_bytes(), what), desc)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None

    def _guard(self, chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
        try:
            yield from chunks
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None

    def mount_blob(self, repo: str, desc: Descriptor, from_repo: str) -> bool:
        """Cross-repository mount; False when the registry refuses (the caller uploads)."""
        if not self._supports_mount:
            return False

        def go():
            return self._request("POST", f"/v2/{repo}/blobs/uploads/", f"mount {desc.digest} into {self.host}/{repo}",
                                 (201, 202), params={"mount": desc.digest, "from": from_repo})
        try:
            resp = self._retrying(go)
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
                self.client.delete(loc)
            except httpx.HTTPError:
                pass

    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        """Upload a blob.  `chunks` should be a DigestingReader: nothing is committed (the final
        PUT ?digest=) before all of it was read and checked.  Not retried here: the caller
        retries the whole operation, source included."""
        what = f"push {desc.digest} to {self.host}/{repo}"
        start = self._request("POST", f"/v2/{repo}/blobs/uploads/", what, (202,))
        loc = self._location(start, what)
        if desc.size <= self.monolithic_limit:
            data = b"".join(chunks)
            self._request("PUT", _with_digest(loc, desc.digest), what, (201, 204), content=data,
                          headers={"Content-Type": "application/octet-stream"})
            return
        it = iter(chunks)
        pending = b""
        offset = 0
        while offset < desc.size:
            n = min(self.chunk_size, desc.size - offset)
            window = _Window(it, n, pending)
            resp = self._request("PATCH", loc, what, (202, 204), content=window,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(n),
                                          "Content-Range": f"{offset}-{offset + n - 1}"})
            pending = window.leftover
            offset += n
            loc = self._location(resp, what)
        if pending or next(it, None):  # exhausting the reader runs its digest check
            raise DigestMismatch(f"blob {desc.digest}: more than the {desc.size} bytes its descriptor names")
        self._request("PUT", _with_digest(loc, desc.digest), what, (201, 204))

    def _location(self, resp: httpx.Response, what: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{what}: the registry sent no upload Location")
        return str(httpx.URL(self.base_url).join(loc))

    def repository_is_new(self, repo: str) -> bool:
        """True when the registry knows nothing of `repo` (tags/list answers 404 NAME_UNKNOWN):
        then no blob or manifest of it can be there, and asking for each one is wasted."""
        def go():
            resp = self._request("GET", f"/v2/{repo}/tags/list", f"{self.host}/{repo} tags", (200, 404),
                                 params={"n": 1})
            return resp.status_code == 404
        try:
            return self._retrying(go)
        except (AuthError, RegistryError):
            return False  # can't tell: ask per blob as usual

    def tags(self, repo: str) -> list[str]:
        resp = self._retrying(lambda: self._request("GET", f"/v2/{repo}/tags/list", f"{self.host}/{repo} tags", (200,)))
        return list(resp.json().get("tags") or [])


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


def _with_digest(location: str, digest: str) -> str:
    """The upload URL with ?digest= added (keeping the registry's own state parameters)."""
    return str(httpx.URL(location).copy_merge_params({"digest": digest}))


def _short(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    return text.splitlines()[0][:200]
