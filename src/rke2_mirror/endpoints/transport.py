"""The registry client's transport stack, in the manner of go-containerregistry's transport wrappers.

    RetryTransport( ThrottleTransport( ObservingTransport( httpx.HTTPTransport ) ) )

Every single HTTP exchange a registry client makes (manifests, blobs, uploads, token fetches, redirects to
storage, Harbor's API) goes through it, so each attempt waits for the request-rate cap and stops at once
when the run is cancelled, and the pull budget sees every response, retried ones included.  Retries happen
here, one exchange at a time, never around a method: a token fetch inside a retried request is not retried
once more per attempt.  What cannot be replayed (a streamed upload body, a step of an upload session) goes
out once; a failure there is the engine's to retry (it restarts the whole blob copy).

Request extensions the Registry sets:
- `READ_BODY`: read the whole response body inside the retry loop, so a body that breaks or stalls
  half-way is retried like a failed status (used for everything but blob streams);
- `NO_RETRY`: send once even though the body could be replayed (an upload session's PATCH/PUT: once the
  registry got it, a replay answers 404 BLOB_UPLOAD_UNKNOWN; the engine starts a new session instead).

A retryable failure that used up its attempts is marked so the error built from it is `exhausted`
(engine.retry.retryable is then False): on the response `EXHAUSTED in response.extensions`
(`was_exhausted(resp)`), on a transport error its `exhausted` attribute.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

import httpx

from rke2_mirror.engine.cancel import NEVER, Cancel
from rke2_mirror.engine.retry import RetryPolicy, mark_exhausted

READ_BODY = "rke2_mirror.read_body"
NO_RETRY = "rke2_mirror.no_retry"
EXHAUSTED = "rke2_mirror.exhausted"

RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
_DRAIN_LIMIT = 64 * 1024  # a failing response's body read (so its connection is reused) up to this much


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
         observe: Callable[[httpx.Response], None] | None = None) -> RetryTransport:
    """The stack around `inner`: retries outermost, so every attempt is throttled and observed."""
    cancel = cancel or NEVER
    t: httpx.BaseTransport = inner
    if observe is not None:
        t = ObservingTransport(t, observe)
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
                    observe: Callable[[httpx.Response], None] | None = None,
                    ) -> tuple[RetryTransport, dict[str, httpx.BaseTransport | None]]:
    """The stack over a real connection pool, and `mounts` for httpx.Client: the same stack over each
    proxy the environment names (None where NO_PROXY says direct)."""
    def stack(proxy: str | None) -> RetryTransport:
        return wrap(httpx.HTTPTransport(verify=verify, limits=limits, proxy=proxy),
                    retry=retry, cancel=cancel, limiter=limiter, observe=observe)
    mounts = {pattern: None if proxy is None else stack(proxy) for pattern, proxy in environment_proxies().items()}
    return stack(None), mounts
