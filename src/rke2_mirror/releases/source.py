"""Where a product's release lists come from, and the one way they are fetched.

`ReleaseSource`: the release and channel URLs (option, else $RKE2_MIRROR_RELEASE_URL /
$RKE2_MIRROR_CHANNEL_URL, else the product's public URLs), the lists cache directory, offline or not.
`http_get`: GET with retries of temporary failures, every other failure one `InputError` line; the body
is streamed and refused past a cap suited to what is fetched (`LIST_MAX_BYTES`, `CHECKSUMS_MAX_BYTES`,
`CHANNELS_MAX_BYTES`), compressed or not, and past `DOWNLOAD_DEADLINE` seconds; redirects are followed
without reading their bodies.  The cache: verified lists
and checksum files under ``<lists-dir>/<product>/<version>/``, written atomically, read back with the same
caps (`read_cached`).

No typer, no tqdm. Notes go through a ``log`` callback, and HTTP goes through an injected ``httpx.Client``.
"""

from __future__ import annotations

import os
import ssl
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from rke2_mirror.files import write_atomic
from rke2_mirror.model.errors import InputError
from rke2_mirror.releases.products import Product, get_product

Log = Callable[[str], None]

ENV_RELEASE_URL = "RKE2_MIRROR_RELEASE_URL"
ENV_CHANNEL_URL = "RKE2_MIRROR_CHANNEL_URL"

# Caps on what a release server may send (a hostile or broken one must not fill the memory of a root cron
# job): real image lists are under 10 KiB, sha256sum-<arch>.txt files under 5 KiB, a channel answer ~20 KiB.
LIST_MAX_BYTES = 4 * 1024 * 1024
CHECKSUMS_MAX_BYTES = 1024 * 1024
CHANNELS_MAX_BYTES = 1024 * 1024
MAX_DOWNLOAD_BYTES = LIST_MAX_BYTES  # the default cap of `http_get`
DOWNLOAD_DEADLINE = 300.0  # seconds for one download, however slowly the bytes trickle in
MAX_REDIRECTS = 10  # GitHub release assets: one (to objects.githubusercontent.com)
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_RETRY_DELAYS = (0.5, 1.5)  # after a 5xx/429/408, a timeout or a dropped connection
_TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def default_lists_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/rke2-mirror/lists``, else ``~/.cache/rke2-mirror/lists``."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "rke2-mirror" / "lists"


def _check_url(url: str, option: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"{option} {url!r}: an http:// or https:// URL is needed")
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class ReleaseSource:
    """Where a product's release lists come from: URLs, the cache directory, offline or not."""

    product: str
    release_url: str
    channel_url: str
    lists_dir: Path
    offline: bool = False

    @classmethod
    def default(
        cls,
        product: str = "rke2",
        release_url: str | None = None,
        channel_url: str | None = None,
        lists_dir: Path | str | None = None,
        offline: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> "ReleaseSource":
        """Apply the defaults in one place: option, else $RKE2_MIRROR_RELEASE_URL / $RKE2_MIRROR_CHANNEL_URL,
        else the product's public URLs. The lists dir defaults to the per-user cache."""
        env = os.environ if env is None else env
        spec = get_product(product)
        channels = channel_url or env.get(ENV_CHANNEL_URL) or spec.channel_url  # rancher has none: ""
        return cls(
            product=spec.name,
            release_url=_check_url(release_url or env.get(ENV_RELEASE_URL) or spec.release_url, "--release-url"),
            channel_url=_check_url(channels, "--channel-url") if channels else "",
            lists_dir=Path(lists_dir) if lists_dir else default_lists_dir(env),
            offline=offline,
        )

    @property
    def spec(self) -> Product:
        return get_product(self.product)

    def cache_dir(self, version: str) -> Path:
        return self.lists_dir / self.product / version

    def release_dir_url(self, version: str) -> str:
        return f"{self.release_url}/{quote(version, safe='')}"

    def asset_url(self, version: str, asset: str) -> str:
        return f"{self.release_dir_url(version)}/{quote(asset)}"



# --------------------------------------------------------------------------- HTTP (the edge)


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "[SSL" in text


def _transport_error(url: str, exc: httpx.HTTPError) -> InputError:
    detail = str(exc) or type(exc).__name__
    if _is_tls_error(exc):
        return InputError(f"TLS verification failed for {url}: {detail}")
    if isinstance(exc, httpx.TimeoutException):
        return InputError(f"timed out fetching {url}")
    if isinstance(exc, httpx.TooManyRedirects):
        return InputError(f"too many redirects fetching {url}")
    if isinstance(exc, httpx.ConnectError):
        return InputError(f"cannot reach {url}: {detail}")
    return InputError(f"fetching {url} failed: {detail}")


def _temporary(exc: httpx.HTTPError) -> bool:
    if _is_tls_error(exc) or isinstance(exc, (httpx.ConnectError, httpx.TooManyRedirects)):
        return False  # wrong URL, no route, bad certificate: retrying will not help
    return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


def describe_size(n: int) -> str:
    """1048576 -> '1 MiB'; other sizes in bytes."""
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def _too_large(url: str, limit: int, what: str) -> InputError:
    return InputError(f"{url}: more than {describe_size(limit)}, the most accepted for {what}; refused")


class _BoundedBody:
    """A response body collected up to `limit` bytes, decompressed here (gzip, deflate) so that a small
    compressed answer cannot inflate past the cap in memory either."""

    def __init__(self, url: str, limit: int, what: str, encoding: str):
        self.url, self.limit, self.what = url, limit, what
        self.body = bytearray()
        enc = [e.strip() for e in encoding.lower().split(",") if e.strip() not in ("", "identity")]
        if not enc:
            self.inflater = None
        elif enc in (["gzip"], ["x-gzip"], ["deflate"]):
            self.encoding = enc[0]
            self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in enc[0] else 32 + zlib.MAX_WBITS)
        else:
            raise InputError(f"{url}: unsupported Content-Encoding {encoding[:40]!r}")

    def _add(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            raise _too_large(self.url, self.limit, self.what)

    def feed(self, raw: bytes) -> None:
        if self.inflater is None:
            self._add(raw)
            return
        try:
            while raw:
                self._add(self.inflater.decompress(raw, self.limit - len(self.body) + 1))
                raw = self.inflater.unconsumed_tail
        except zlib.error:
            raise InputError(f"{self.url}: not valid {self.encoding} data") from None

    def finish(self) -> bytes:
        if self.inflater is not None:
            try:
                self._add(self.inflater.flush())
            except zlib.error:
                raise InputError(f"{self.url}: not valid {self.encoding} data") from None
        return bytes(self.body)


@contextmanager
def open_following(client: httpx.Client, url: str, *, headers: Mapping[str, str] | None = None,
                   ) -> Iterator[httpx.Response]:
    """GET `url`: the first answer that is not a redirect, streaming.  Redirects are followed here (at most
    MAX_REDIRECTS), not by httpx: it reads a redirect's whole body, however large.  An https URL redirected
    to http is one InputError: what was asked for over TLS is never taken from plain http (a checksum file
    included: nothing else vouches for it)."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        with client.stream("GET", current, follow_redirects=False, headers=headers) as resp:
            location = resp.headers.get("location")
            if resp.status_code in _REDIRECT_STATUS and location:
                nxt = str(resp.url.join(location))  # leaving the block closes it unread
                if urlsplit(current).scheme == "https" and urlsplit(nxt).scheme != "https":
                    raise InputError(f"{url}: redirected from https to {nxt.split('?')[0]}; refused")
                current = nxt
                continue
            yield resp
            return
    raise InputError(f"too many redirects fetching {url}")


def _download_once(client: httpx.Client, url: str, limit: int, what: str) -> tuple[int, bytes]:
    started = time.monotonic()
    # Only the encodings decoded here, with the cap, are asked for (httpx inflates a whole network read at once).
    with open_following(client, url, headers={"Accept-Encoding": "gzip, deflate"}) as resp:
        return _read_body(resp, url, limit, what, started)


def _read_body(resp: httpx.Response, url: str, limit: int, what: str, started: float) -> tuple[int, bytes]:
    """A non-redirect answer: (status, body within the cap).  `url` is the one asked for (named in errors)."""
    if resp.status_code != 200:
        return resp.status_code, b""
    declared = resp.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(url, limit, what)
    if resp.is_stream_consumed:  # a response built in memory (httpx.MockTransport): already decoded
        body = _BoundedBody(url, limit, what, "")
        body.feed(resp.content)
        return 200, body.finish()
    body = _BoundedBody(url, limit, what, resp.headers.get("content-encoding", ""))
    for raw in resp.iter_raw(64 * 1024):
        body.feed(raw)
        if time.monotonic() - started > DOWNLOAD_DEADLINE:
            raise InputError(f"{url}: still downloading after {DOWNLOAD_DEADLINE:.0f}s; refused")
    return 200, body.finish()


def http_get(client: httpx.Client, url: str, limit: int = MAX_DOWNLOAD_BYTES, what: str = "an image list") -> bytes | None:
    """GET following redirects. Returns the body, or ``None`` on 404. Any other failure is a one-line
    ``InputError``: a body (decompressed) larger than `limit` bytes names the URL, the cap and `what` was
    expected. Timeouts, dropped connections and 408/429/5xx answers are retried twice."""
    for attempt in range(len(_RETRY_DELAYS) + 1):
        last = attempt == len(_RETRY_DELAYS)
        try:
            status, body = _download_once(client, url, limit, what)
        except httpx.HTTPError as exc:
            if last or not _temporary(exc):
                raise _transport_error(url, exc) from None
            time.sleep(_RETRY_DELAYS[attempt])
            continue
        if status == 200:
            return body
        if status == 404:
            return None
        if status in _TEMPORARY_STATUS and not last:
            time.sleep(_RETRY_DELAYS[attempt])
            continue
        raise InputError(f"HTTP {status} fetching {url}")
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- the cache


def read_cached(path: Path, limit: int, what: str) -> bytes:
    """A cached file's bytes, reading no more than `limit` + 1 of them: larger is an InputError naming the
    file and the cap.  OSError (FileNotFoundError: not cached) as `open` raises it, for the caller to fetch
    instead (`files.read_capped`, for files a user names, turns every OSError into one error line)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: more than {describe_size(limit)}, the most accepted for {what}; refused")
    return data


def cache_write(path: Path, data: bytes, log: Log) -> None:
    """Keep a verified file in the lists cache; a cache that cannot be written is only a warning."""
    try:
        write_atomic(path, data, 0o644, parents=True)
    except InputError as exc:  # "cannot write PATH: reason"
        log(f"warning: not cached: {exc}")


def cached_versions(source: ReleaseSource) -> list[str]:
    root = source.lists_dir / source.product
    if not root.is_dir():
        return []
    version_re = source.spec.version_re
    return sorted(p.name for p in root.iterdir() if p.is_dir() and version_re.match(p.name))

