"""The registry client's transport stack, in the manner of go-containerregistry's transport wrappers.

    RetryTransport( ThrottleTransport( GuardTransport( ObservingTransport( Http11Transport ) ) ) )

(`http11.Http11Transport`: HTTP/1.1 on http.client; httpx.HTTPTransport where the environment names a proxy.)

Every single HTTP exchange a registry client makes (manifests, blobs, uploads, token fetches, redirects to
storage, Harbor's API) goes through it, so each attempt waits for the request-rate cap and stops at once
when the run is cancelled, and the pull budget sees every response, retried ones included.  Retries happen
here, one exchange at a time, never around a method: a token fetch inside a retried request is not retried
once more per attempt.  What cannot be replayed (a streamed upload body, a step of an upload session) goes
out once; a failure there is the engine's to retry (it restarts the whole blob copy).

Request extensions the Registry sets:
- `READ_BODY`: read the whole response body inside the retry loop, so a body that breaks or stalls
  half-way is retried like a failed status (used for everything but blob streams);
- `MAX_BODY`: with READ_BODY, the most bytes such an answer may have (default `DEFAULT_BODY_CAP`): a
  Content-Length above it is refused before reading, a longer body once the cap is passed
  (`ResponseTooLarge`, not retried), so nothing larger is ever buffered;
- `NO_RETRY`: send once even though the body could be replayed (an upload session's PATCH/PUT: once the
  registry got it, a replay answers 404 BLOB_UPLOAD_UNKNOWN; the engine starts a new session instead).

Whatever a server sends, an exchange costs bounded memory and time (`GuardTransport`, innermost but for
the observer): an answer with a status of 300 or more keeps at most `ERROR_BODY_LIMIT` bytes of its body
(enough for the error message; then the connection is closed), and every body, request or response, moves
at least `SPEED_FLOOR` bytes per second averaged over `window` seconds (the `--timeout`) of waiting on the
other side, like curl's --speed-limit/--speed-time; a slower one is abandoned with `TransferTooSlow` (a
timeout: retried like one).  Waiting for the headers is bounded by the read timeout itself.

A retryable failure that used up its attempts is marked so the error built from it is `exhausted`
(engine.retry.retryable is then False): on the response `EXHAUSTED in response.extensions`
(`was_exhausted(resp)`), on a transport error its `exhausted` attribute.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

import httpx

from rke2_mirror.endpoints.http11 import Http11Transport
from rke2_mirror.engine.cancel import NEVER, Cancel
from rke2_mirror.engine.retry import RetryPolicy, mark_exhausted

READ_BODY = "rke2_mirror.read_body"
MAX_BODY = "rke2_mirror.max_body"
NO_RETRY = "rke2_mirror.no_retry"
EXHAUSTED = "rke2_mirror.exhausted"

RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
_DRAIN_LIMIT = 64 * 1024  # a failing response's body read (so its connection is reused) up to this much
DEFAULT_BODY_CAP = 1024 * 1024  # a READ_BODY answer without MAX_BODY: /v2/, upload steps, tokens, Harbor's API
ERROR_BODY_LIMIT = 4 * 1024  # what is kept of a 3xx/4xx/5xx answer's body: its error message is in there
SPEED_FLOOR = 1024  # bytes per second: a slower transfer, over the stall window, is abandoned
DEFAULT_STALL_WINDOW = 60.0  # seconds (the RetryPolicy's default timeout)


class ResponseTooLarge(httpx.HTTPError):
    """An answer larger than its request's cap (`MAX_BODY`), or compressed (so of unknown size): refused,
    never retried."""

    def __init__(self, cap: int, size: int | None = None, encoding: str | None = None):
        limit = f"{cap} bytes ({human_size(cap)})"
        if encoding:
            text = (f"{encoding}-compressed answer refused (identity was asked for): decoded, its size is not "
                    f"bounded by the {limit} accepted")
        elif size is not None:
            text = f"answer of {size} bytes refused: more than the {limit} accepted"
        else:
            text = f"answer refused: longer than the {limit} accepted"
        super().__init__(text)
        self.cap, self.size, self.encoding = cap, size, encoding


class TransferTooSlow(httpx.TimeoutException):
    """A body moving slower than SPEED_FLOOR over the stall window: abandoned, retried like a timeout."""


def human_size(n: int) -> str:
    """1048576 -> '1 MiB' (for messages about caps)."""
    for unit in ("GiB", "MiB", "KiB"):
        size = 1 << {"GiB": 30, "MiB": 20, "KiB": 10}[unit]
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def retry_after(resp: httpx.Response) -> float | None:
    """A `Retry-After` header in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
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


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong with TLS, when that is why `exc` happened (None: not a TLS problem)."""
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


def replayable(request: httpx.Request) -> bool:
    """Can this request be sent again as it is: no body or a bytes body, and not marked `NO_RETRY`."""
    return isinstance(request.stream, httpx.ByteStream) and not request.extensions.get(NO_RETRY)


def retryable_status(request: httpx.Request, resp: httpx.Response) -> bool:
    """408, 429, 5xx; and 400 DIGEST_INVALID on a manifest PUT (distribution's filesystem store answers
    that while another client writes the same manifest: worth another try after a pause)."""
    code = resp.status_code
    if code in RETRY_STATUSES or code >= 500:
        return True
    if code == 400 and request.method == "PUT" and "/manifests/" in request.url.path:
        try:
            return b"DIGEST_INVALID" in resp.read()
        except httpx.HTTPError:
            return False
    return False


def retryable_error(exc: httpx.HTTPError) -> bool:
    """Connection failures, timeouts, a connection closed mid-answer; not TLS or protocol misuse."""
    if not isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
        return False
    return tls_failure(exc) is None


def was_exhausted(resp: httpx.Response) -> bool:
    """Did the transport retry this failing response's request to the end already?"""
    return bool(resp.extensions.get(EXHAUSTED))


def _drain(resp: httpx.Response) -> None:
    """Close a response that is dropped for another attempt (reading a small body first keeps the
    connection for reuse)."""
    try:
        if not resp.is_stream_consumed:
            n = 0
            for chunk in resp.iter_raw():
                n += len(chunk)
                if n > _DRAIN_LIMIT:
                    break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()


class SpeedFloor:
    """curl's --speed-limit/--speed-time for one body.  The time spent waiting on the other side is summed
    with the bytes moved, window by window: once a window reaches `window` seconds, fewer than `rate` bytes
    per second over it abandons the transfer (`TransferTooSlow`).  Time the consumer of a response (or the
    producer of a request body) takes is not counted: a slow target does not make its source look slow."""

    def __init__(self, window: float, what: str, rate: float = SPEED_FLOOR):
        self.window = max(float(window), 0.001)
        self.rate = rate
        self.what = what
        self._waited = 0.0
        self._moved = 0

    def account(self, seconds: float, nbytes: int) -> None:
        self._waited += seconds
        self._moved += nbytes
        if self._waited >= self.window:
            if self._moved < self.rate * self._waited:
                raise TransferTooSlow(f"{self.what} slower than {human_size(int(self.rate))}/s over {self.window:g}s "
                                      f"({self._moved} bytes in {self._waited:.1f}s): abandoned")
            self._waited, self._moved = 0.0, 0

    def reading(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks of a body we receive: the wait inside next() is the sender's."""
        it = iter(chunks)
        while True:
            t0 = time.monotonic()
            try:
                chunk = next(it)
            except StopIteration:
                return
            self.account(time.monotonic() - t0, len(chunk))
            yield chunk

    def writing(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks of a body we send: until the next one is asked for, the receiver is taking this one."""
        for chunk in chunks:
            t0 = time.monotonic()
            yield chunk
            self.account(time.monotonic() - t0, len(chunk))


class _Upload(httpx.SyncByteStream):
    """A request body sent under a speed floor (the original stream is put back after the exchange)."""

    def __init__(self, inner: httpx.SyncByteStream, floor: SpeedFloor):
        self.inner, self.floor = inner, floor

    def __iter__(self) -> Iterator[bytes]:
        return self.floor.writing(self.inner)

    def close(self) -> None:
        self.inner.close()


class _Body(httpx.SyncByteStream):
    """A response body read under a speed floor and, when `limit` is set, a size limit: past it the body is
    cut there (`truncate`: an error answer, whose message is at its start) or refused (`ResponseTooLarge`)."""

    def __init__(self, inner: httpx.SyncByteStream, floor: SpeedFloor, *, limit: int | None = None,
                 truncate: bool = False):
        self.inner, self.floor, self.limit, self.truncate = inner, floor, limit, truncate

    def __iter__(self) -> Iterator[bytes]:
        n = 0
        for chunk in self.floor.reading(self.inner):
            if self.limit is not None and n + len(chunk) > self.limit:
                if not self.truncate:
                    raise ResponseTooLarge(self.limit)
                if self.limit > n:
                    yield chunk[:self.limit - n]
                self.inner.close()  # the rest is never read: the connection goes, not back to the pool
                return
            n += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _content_length(resp: httpx.Response) -> int | None:
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None


class GuardTransport(httpx.BaseTransport):
    """Bounds what one exchange can cost, whatever the server does: both bodies under the speed floor
    (`SPEED_FLOOR` over `window` seconds), an answer with a status of 300 or more cut at `ERROR_BODY_LIMIT`,
    and a READ_BODY answer refused past its `MAX_BODY` cap (by its Content-Length before anything is read;
    a compressed one too, since its size once decoded is not bounded by what arrives: registries are asked
    for identity)."""

    def __init__(self, inner: httpx.BaseTransport, window: float = DEFAULT_STALL_WINDOW):
        self.inner = inner
        self.window = window

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        peer = request.url.netloc.decode("ascii", "replace")
        body = request.stream
        if isinstance(body, httpx.SyncByteStream):
            request.stream = _Upload(body, SpeedFloor(self.window, f"sending to {peer}"))
        try:
            resp = self.inner.handle_request(request)
        finally:
            request.stream = body  # a replay (retry, auth, redirect) starts from the original
        floor = SpeedFloor(self.window, f"transfer from {peer}")
        if resp.status_code >= 300:
            # an error answer's encoded body is kept as it came: decoded, a few KiB could be gigabytes
            resp.headers.pop("content-encoding", None)
            resp.stream = _Body(resp.stream, floor, limit=ERROR_BODY_LIMIT, truncate=True)
            return resp
        limit: int | None = None
        if request.extensions.get(READ_BODY) and request.method != "HEAD":
            limit = int(request.extensions.get(MAX_BODY) or DEFAULT_BODY_CAP)
            size = _content_length(resp)
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if (size is not None and size > limit) or encoding not in ("", "identity"):
                resp.close()
                if size is not None and size > limit:
                    raise ResponseTooLarge(limit, size)
                raise ResponseTooLarge(limit, encoding=encoding)
        resp.stream = _Body(resp.stream, floor, limit=limit)
        return resp

    def close(self) -> None:
        self.inner.close()


class ObservingTransport(httpx.BaseTransport):
    """Hands every response (status and headers; the body unread) to `observe`, e.g. PullBudget.observe."""

    def __init__(self, inner: httpx.BaseTransport, observe: Callable[[httpx.Response], None]):
        self.inner = inner
        self.observe = observe

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        resp.request = request
        self.observe(resp)
        return resp

    def close(self) -> None:
        self.inner.close()


class ThrottleTransport(httpx.BaseTransport):
    """Before each exchange: stop if the run was cancelled (`Cancelled`), wait for the `limiter`'s slot
    (e.g. a RequestRateLimiter), and check once more (the wait may have been long)."""

    def __init__(self, inner: httpx.BaseTransport, *, limiter: Callable[[], None] | None = None,
                 cancel: Cancel = NEVER):
        self.inner = inner
        self.limiter = limiter
        self.cancel = cancel

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.cancel.check()
        if self.limiter is not None:
            self.limiter()
            self.cancel.check()
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class RetryTransport(httpx.BaseTransport):
    """Sends a replayable request up to `retry.attempts` times while it fails with a connection error, a
    timeout, 408, 429 or 5xx; waits `retry.wait` in between (a server's Retry-After wins), waking at once
    when `cancel` is set.  The last failing response is returned (the caller maps it to an error), the last
    transport error re-raised, both marked exhausted.  A request that cannot be replayed goes out once."""

    def __init__(self, inner: httpx.BaseTransport, retry: RetryPolicy | None = None, *, cancel: Cancel = NEVER):
        self.inner = inner
        self.retry = retry or RetryPolicy()
        self.cancel = cancel

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not replayable(request):
            return self.inner.handle_request(request)
        attempts = max(1, self.retry.attempts)
        read_body = bool(request.extensions.get(READ_BODY))
        attempt = 1
        while True:
            resp: httpx.Response | None = None
            try:
                resp = self.inner.handle_request(request)
                if read_body:
                    resp.read()
            except httpx.HTTPError as exc:
                if resp is not None:
                    resp.close()
                if not retryable_error(exc):
                    raise
                if attempt >= attempts:
                    mark_exhausted(exc)
                    raise
                wait = self.retry.wait(attempt, None)
            else:
                if not retryable_status(request, resp):
                    return resp
                if attempt >= attempts:
                    resp.extensions[EXHAUSTED] = True
                    return resp
                wait = self.retry.wait(attempt, SimpleNamespace(retry_after=retry_after(resp)))
                _drain(resp)
            self.cancel.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self.inner.close()


def wrap(inner: httpx.BaseTransport, *, retry: RetryPolicy | None = None, cancel: Cancel | None = None,
         limiter: Callable[[], None] | None = None,
         observe: Callable[[httpx.Response], None] | None = None, window: float | None = None) -> RetryTransport:
    """The stack around `inner`: retries outermost, so every attempt is throttled, guarded and observed.
    `window`: the speed floor's window in seconds (default: the retry policy's timeout)."""
    cancel = cancel or NEVER
    retry = retry or RetryPolicy()
    t: httpx.BaseTransport = inner
    if observe is not None:
        t = ObservingTransport(t, observe)
    t = GuardTransport(t, retry.timeout if window is None else window)
    t = ThrottleTransport(t, limiter=limiter, cancel=cancel)
    return RetryTransport(t, retry, cancel=cancel)


def environment_proxies() -> dict[str, str | None]:
    """URL pattern -> proxy URL (None: no proxy) from HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, as httpx reads
    them for a client that builds its own transport (one given a transport reads none of it)."""
    info = urllib.request.getproxies()
    out: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if info.get(scheme):
            url = info[scheme]
            out[f"{scheme}://"] = url if "://" in url else f"http://{url}"
    for host in (h.strip() for h in info.get("no", "").split(",")):
        if host == "*":
            return {}
        if not host:
            continue
        if "://" in host:
            out[host] = None
        elif _is_ip(host, ipaddress.IPv4Address):
            out[f"all://{host}"] = None
        elif _is_ip(host, ipaddress.IPv6Address):
            out[f"all://[{host}]"] = None
        elif host.lower() == "localhost":
            out[f"all://{host}"] = None
        else:  # NO_PROXY=example.com: the domain and its subdomains
            out[f"all://*{host}"] = None
    return out


def _is_ip(host: str, kind: type) -> bool:
    try:
        kind(host.split("/")[0])
    except ValueError:
        return False
    return True


def http_transports(*, verify: ssl.SSLContext | bool, limits: httpx.Limits, retry: RetryPolicy | None = None,
                    cancel: Cancel | None = None, limiter: Callable[[], None] | None = None,
                    observe: Callable[[httpx.Response], None] | None = None, window: float | None = None,
                    ) -> tuple[RetryTransport, dict[str, httpx.BaseTransport | None]]:
    """The stack over a real connection pool, and `mounts` for httpx.Client: the same stack over each
    proxy the environment names (None where NO_PROXY says direct)."""
    def stack(proxy: str | None) -> RetryTransport:
        inner: httpx.BaseTransport
        if proxy is None:
            inner = Http11Transport(verify=verify, max_idle=limits.max_keepalive_connections or 1)
        else:
            inner = httpx.HTTPTransport(verify=verify, limits=limits, proxy=proxy)
        return wrap(inner, retry=retry, cancel=cancel, limiter=limiter, observe=observe, window=window)
    mounts = {pattern: None if proxy is None else stack(proxy) for pattern, proxy in environment_proxies().items()}
    return stack(None), mounts
