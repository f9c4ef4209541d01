"""Release image lists: channels, release assets, checksum verification, the lists/ cache.

An RKE2 (or k3s) release publishes its image lists as release assets, e.g.
``<release-url>/v1.28.9+rke2r1/rke2-images-all.linux-amd64.txt``, next to ``sha256sum-<arch>.txt``.
Every list is checked against that checksum file. A mismatch, or a list the file does not name,
is an ``InputError`` (exit 2). Nothing can switch that check off.

Verified lists are kept, with their checksum file, under ``<lists-dir>/<product>/<version>/``.
``offline`` reads only that cache and verifies each list against the cached checksum file again.

No typer, no tqdm. Notes go through a ``log`` callback, and HTTP goes through an injected ``httpx.Client``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from .errors import InputError
from .reference import ImageRef, merge_refs, parse_image_lines

Log = Callable[[str], None]

ENV_RELEASE_URL = "RKE2_MIRROR_RELEASE_URL"
ENV_CHANNEL_URL = "RKE2_MIRROR_CHANNEL_URL"

KNOWN_ARCHES = ("amd64", "arm64", "s390x")
DEFAULT_ARCHES = ("amd64",)
DEFAULT_FLAVORS = ("all",)

MAX_DOWNLOAD_BYTES = 16 * 1024 * 1024  # image lists and checksum files are a few KiB
_RETRY_DELAYS = (0.5, 1.5)  # after a 5xx/429/408, a timeout or a dropped connection
_TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?\+[0-9A-Za-z.]+$")
# The docker-tag spelling of a version (`+` is not allowed in tags): v1.28.9-rke2r1.
_DOCKERIZED_RE = re.compile(r"^(v\d+\.\d+\.\d+(?:-rc\d+)?)-((?:rke2r|k3s)\d+)$")
_BARE_VERSION_RE = re.compile(r"^v?\d+\.\d+\.\d+$")
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FLAVOR_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_ARCH_RE = re.compile(r"^[a-z0-9]{1,16}$")
_CHECKSUM_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(?:\./)?(\S+)$")


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- products


def _rke2_asset(flavor: str, arch: str) -> str:
    if flavor == "windows":
        return f"rke2-images.windows-{arch}.txt"
    if flavor == "default":
        return f"rke2-images.linux-{arch}.txt"
    return f"rke2-images-{flavor}.linux-{arch}.txt"


_RKE2_LIST_RE = re.compile(r"^rke2-images(?:-(?P<flavor>[a-z0-9-]+))?\.(?P<os>linux|windows)-(?P<arch>[a-z0-9]+)\.txt$")


def _rke2_flavor_of(asset: str, arch: str) -> str | None:
    m = _RKE2_LIST_RE.match(asset)
    if not m or m["arch"] != arch:
        return None
    if m["os"] == "windows":
        return "windows" if m["flavor"] is None else None
    return m["flavor"] or "default"


def _k3s_asset(flavor: str, arch: str) -> str:
    if flavor not in ("all", "default"):
        raise InputError(
            f"k3s publishes a single image list (k3s-images.txt); --flavor {flavor} applies to rke2 only"
        )
    return "k3s-images.txt"


def _k3s_flavor_of(asset: str, arch: str) -> str | None:
    return "all" if asset == "k3s-images.txt" else None


@dataclass(frozen=True)
class Product:
    """Where a product publishes, and how its image list assets are named."""

    name: str
    release_url: str
    channel_url: str
    list_asset: Callable[[str, str], str]  # (flavor, arch) -> asset name
    flavor_of: Callable[[str, str], str | None]  # (asset name, arch) -> flavor, None if not a list

    @staticmethod
    def checksum_asset(arch: str) -> str:
        return f"sha256sum-{arch}.txt"

    def published_flavors(self, asset_names: Iterable[str], arch: str) -> list[str]:
        found = {f for name in asset_names if (f := self.flavor_of(name, arch)) is not None}
        return sorted(found, key=lambda f: (f not in ("all", "default"), f))


PRODUCTS: Mapping[str, Product] = {
    "rke2": Product(
        "rke2",
        "https://github.com/rancher/rke2/releases/download",
        "https://update.rke2.io/v1-release/channels",
        _rke2_asset,
        _rke2_flavor_of,
    ),
    "k3s": Product(
        "k3s",
        "https://github.com/k3s-io/k3s/releases/download",
        "https://update.k3s.io/v1-release/channels",
        _k3s_asset,
        _k3s_flavor_of,
    ),
}


def get_product(name: str) -> Product:
    try:
        return PRODUCTS[name]
    except KeyError:
        raise InputError(f"unknown product {name!r} (one of: {', '.join(PRODUCTS)})") from None


# --------------------------------------------------------------------------- where lists come from


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
        return cls(
            product=spec.name,
            release_url=_check_url(release_url or env.get(ENV_RELEASE_URL) or spec.release_url, "--release-url"),
            channel_url=_check_url(channel_url or env.get(ENV_CHANNEL_URL) or spec.channel_url, "--channel-url"),
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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ListFile:
    """One verified image list."""

    name: str  # asset name, e.g. rke2-images-all.linux-amd64.txt
    arch: str
    flavor: str
    sha256: str
    origin: str  # the URL it was downloaded from, or the cache path it was read from
    count: int  # references in it


@dataclass(frozen=True)
class ReleaseImages:
    """A release's images: what was asked, what it resolved to, what was read."""

    product: str
    release: str  # as given: a version or a channel
    version: str  # the version it resolved to
    images: tuple[ImageRef, ...]
    files: tuple[ListFile, ...]


@dataclass(frozen=True)
class Change:
    """The same repository with another tag (or digest)."""

    old: ImageRef
    new: ImageRef

    @property
    def name(self) -> str:
        return self.new.name


@dataclass(frozen=True)
class ImageDiff:
    added: tuple[ImageRef, ...]
    removed: tuple[ImageRef, ...]
    changed: tuple[Change, ...]
    unchanged: tuple[ImageRef, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def as_dict(self) -> dict:
        return {
            "added": [str(r) for r in self.added],
            "removed": [str(r) for r in self.removed],
            "changed": [
                {
                    "name": c.name,
                    "old": str(c.old),
                    "new": str(c.new),
                    "old_tag": c.old.tag,
                    "new_tag": c.new.tag,
                    "old_digest": c.old.digest,
                    "new_digest": c.new.digest,
                }
                for c in self.changed
            ],
            "unchanged": [str(r) for r in self.unchanged],
        }


# --------------------------------------------------------------------------- parsing (pure)


def parse_release(text: str) -> tuple[str, bool]:
    """``(value, is_channel)``. ``v1.28.9+rke2r1`` is a version, and so is ``v1.28.9-rke2r1``, written
    back with its ``+``. ``stable``, ``latest`` and ``v1.28`` are channels."""
    s = text.strip()
    if _VERSION_RE.match(s):
        return s, False
    m = _DOCKERIZED_RE.match(s)
    if m:
        return f"{m[1]}+{m[2]}", False
    if _CHANNEL_RE.match(s):
        return s, True
    raise InputError(f"invalid release {text!r}: give a version like v1.28.9+rke2r1 or a channel like stable")


def parse_checksums(text: str, origin: str) -> dict[str, str]:
    """Parse ``sha256sum`` output: ``<hex>  <name>`` per line. Returns name -> lower-case hex."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _CHECKSUM_LINE_RE.match(line.strip())
        if not m:
            raise InputError(f"{origin}:{lineno}: not a sha256sum line: {line.strip()[:80]!r}")
        out[m[2]] = m[1].lower()
    return out


def parse_channels(raw: bytes, url: str) -> dict[str, str]:
    """A rancher/apiserver channel collection -> ``{id: latest}``, in the server's order."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"channel server {url}: not JSON ({exc})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise InputError(f"channel server {url}: no 'data' list in its answer")
    channels: dict[str, str] = {}
    for entry in data:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            latest = entry.get("latest")
            channels[entry["id"]] = latest if isinstance(latest, str) else ""
    return channels


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def diff_refs(old: Sequence[ImageRef], new: Sequence[ImageRef]) -> ImageDiff:
    """Added, removed and changed images (a changed one keeps its repository and gets a new tag or digest).

    When a repository has several references on one side, they are paired in list order, and what is
    left over counts as added or removed."""
    old_u, new_u = merge_refs(list(old)), merge_refs(list(new))
    old_set, new_set = set(old_u), set(new_u)
    gone = [r for r in old_u if r not in new_set]
    came = [r for r in new_u if r not in old_set]
    waiting: dict[str, list[ImageRef]] = {}
    for r in came:
        waiting.setdefault(r.name, []).append(r)
    changed: list[Change] = []
    removed: list[ImageRef] = []
    paired: set[ImageRef] = set()
    for r in gone:
        bucket = waiting.get(r.name)
        if bucket:
            n = bucket.pop(0)
            paired.add(n)
            changed.append(Change(r, n))
        else:
            removed.append(r)
    return ImageDiff(
        added=tuple(r for r in came if r not in paired),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(r for r in old_u if r in new_set),
    )


def check_arches(arches: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(a.strip().lower() for a in arches)) or DEFAULT_ARCHES
    for a in out:
        if not _ARCH_RE.match(a) or a not in KNOWN_ARCHES:
            raise InputError(f"unknown arch {a!r} (one of: {', '.join(KNOWN_ARCHES)})")
    return out


def check_flavors(flavors: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(f.strip().lower() for f in flavors)) or DEFAULT_FLAVORS
    for f in out:
        if not _FLAVOR_RE.match(f):
            raise InputError(f"invalid flavor {f!r}")
    return out


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


def _download_once(client: httpx.Client, url: str) -> tuple[int, bytes]:
    with client.stream("GET", url, follow_redirects=True) as resp:
        if resp.status_code != 200:
            return resp.status_code, b""
        body = bytearray()
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) > MAX_DOWNLOAD_BYTES:
                raise InputError(f"{url}: more than {MAX_DOWNLOAD_BYTES} bytes; not an image list")
        return 200, bytes(body)


def http_get(client: httpx.Client, url: str) -> bytes | None:
    """GET following redirects. Returns the body, or ``None`` on 404. Any other failure is a one-line
    ``InputError``. Timeouts, dropped connections and 408/429/5xx answers are retried twice."""
    for attempt in range(len(_RETRY_DELAYS) + 1):
        last = attempt == len(_RETRY_DELAYS)
        try:
            status, body = _download_once(client, url)
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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _cache_write(path: Path, data: bytes, log: Log) -> None:
    try:
        _write_atomic(path, data)
    except OSError as exc:
        log(f"warning: could not cache {path}: {exc.strerror or exc}")


def cached_versions(source: ReleaseSource) -> list[str]:
    root = source.lists_dir / source.product
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


# --------------------------------------------------------------------------- resolving


def fetch_channels(source: ReleaseSource, client: httpx.Client) -> dict[str, str]:
    raw = http_get(client, source.channel_url)
    if raw is None:
        raise InputError(f"channel server {source.channel_url}: not found (HTTP 404)")
    return parse_channels(raw, source.channel_url)


def resolve_version(release: str, source: ReleaseSource, client: httpx.Client | None, log: Log = _quiet) -> str:
    """A version is returned as is. A channel is looked up at the channel server, which gives its latest version."""
    value, is_channel = parse_release(release)
    if not is_channel:
        return value
    if source.offline:
        have = cached_versions(source)
        hint = f" (cached {source.product} versions: {', '.join(have)})" if have else ""
        raise InputError(
            f"{value!r} is a channel, and channels can't be resolved offline: give a version instead{hint}"
        )
    if client is None:
        raise ValueError("resolve_version: an httpx.Client is needed online")
    channels = fetch_channels(source, client)
    if value not in channels:
        hint = ""
        if _BARE_VERSION_RE.match(value):
            suffix = "rke2r1" if source.product == "rke2" else "k3s1"
            hint = f"; a version needs its build suffix, e.g. {value}+{suffix}"
        known = ", ".join(channels) or "(none)"
        raise InputError(f"unknown {source.product} channel {value!r} at {source.channel_url}{hint}; channels: {known}")
    latest = channels[value]
    if not _VERSION_RE.match(latest):
        raise InputError(f"channel {value!r} at {source.channel_url} has no usable latest version ({latest!r})")
    log(f"{source.product} channel {value} -> {latest}")
    return latest


# --------------------------------------------------------------------------- reading one release


def _wrong_product_hint(version: str, product: str) -> str:
    for other in PRODUCTS:
        if other != product and f"+{other}" in version:
            return f" ({version} looks like a {other} version: add --product {other})"
    return ""


@dataclass(frozen=True)
class ReleaseFetcher:
    """Reads one release's assets online (and caches them) or from the cache (offline)."""

    source: ReleaseSource
    version: str
    client: httpx.Client | None
    log: Log

    def _where(self) -> str:
        if self.source.offline:
            return str(self.source.cache_dir(self.version))
        return self.source.release_dir_url(self.version)

    def checksums(self, arch: str) -> tuple[str, dict[str, str]]:
        name = Product.checksum_asset(arch)
        if self.source.offline:
            path = self.source.cache_dir(self.version) / name
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise InputError(
                    f"no cached {name} for {self.source.product} {self.version} in {path.parent}: offline use needs the "
                    f"lists fetched on a connected machine (rke2-mirror list {self.version} --product "
                    f"{self.source.product} --arch {arch}) and that directory copied here (--lists-dir)"
                ) from None
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
            origin = str(path)
        else:
            assert self.client is not None
            url = self.source.asset_url(self.version, name)
            raw = http_get(self.client, url)
            if raw is None:
                for_arch = f" for {arch}" if arch != "amd64" else ""
                raise InputError(
                    f"release {self.version} not found at {self.source.release_url}{for_arch} (no {name})"
                    + _wrong_product_hint(self.version, self.source.product)
                )
            origin = url
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{origin}: not a text checksum file") from None
        sums = parse_checksums(text, origin)
        if not self.source.offline:
            _cache_write(self.source.cache_dir(self.version) / name, raw, self.log)
        return origin, sums

    def _flavor_error(self, asset: str, flavor: str, arch: str, sums: Mapping[str, str]) -> InputError:
        flavors = self.source.spec.published_flavors(sums, arch)
        return InputError(
            f"{self.source.product} {self.version} publishes no {flavor!r} image list for {arch} ({asset}); "
            f"flavors it publishes for {arch}: {', '.join(flavors) or '(none)'}"
        )

    def _unnamed_error(self, asset: str, arch: str, where: str) -> InputError:
        return InputError(
            f"{asset} of {self.source.product} {self.version} is not named in {Product.checksum_asset(arch)} "
            f"({where}): refusing an image list that cannot be verified"
        )

    def list_bytes(self, asset: str, flavor: str, arch: str, sums: Mapping[str, str]) -> tuple[str, bytes]:
        """The list's bytes and where they came from, not yet verified."""
        if self.source.offline:
            path = self.source.cache_dir(self.version) / asset
            if asset not in sums:
                if path.is_file():
                    raise self._unnamed_error(asset, arch, str(path.parent))
                raise self._flavor_error(asset, flavor, arch, sums)
            try:
                return str(path), path.read_bytes()
            except FileNotFoundError:
                raise InputError(
                    f"{asset} of {self.source.product} {self.version} is not in the cache ({path.parent}); "
                    f"fetch it on a connected machine first"
                ) from None
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        assert self.client is not None
        url = self.source.asset_url(self.version, asset)
        if asset not in sums:
            # Published but unnamed (refused), or not published at all (say which flavors are)?
            if http_get(self.client, url) is None:
                raise self._flavor_error(asset, flavor, arch, sums)
            raise self._unnamed_error(asset, arch, self._where())
        data = http_get(self.client, url)
        if data is None:
            raise InputError(
                f"{asset} of {self.source.product} {self.version} is named in {Product.checksum_asset(arch)} "
                f"but missing at {url} (HTTP 404)"
            )
        return url, data


def verify_list(asset: str, data: bytes, expected: str, checksum_name: str, origin: str, what: str) -> str:
    actual = sha256_hex(data)
    if actual != expected:
        raise InputError(
            f"{asset} of {what} does not match {checksum_name}: expected sha256 {expected}, "
            f"got sha256 {actual} (from {origin}); refusing it"
        )
    return actual


def release_images(
    release: str,
    source: ReleaseSource,
    client: httpx.Client | None,
    arches: Sequence[str] = DEFAULT_ARCHES,
    flavors: Sequence[str] = DEFAULT_FLAVORS,
    log: Log = _quiet,
) -> ReleaseImages:
    """The verified images of one release for the given arches × flavors, merged with duplicates removed,
    in stable order (arch by arch, flavor by flavor, each list in its own order)."""
    arches_t, flavors_t = check_arches(arches), check_flavors(flavors)
    spec = source.spec
    assets = [(arch, flavor, spec.list_asset(flavor, arch)) for arch in arches_t for flavor in flavors_t]
    version = resolve_version(release, source, client, log)
    if not source.offline and client is None:
        raise ValueError("release_images: an httpx.Client is needed online")
    fetcher = ReleaseFetcher(source, version, client, log)
    what = f"{source.product} {version}"
    checksums: dict[str, dict[str, str]] = {}
    files: list[ListFile] = []
    lists: list[list[ImageRef]] = []
    for arch, flavor, asset in assets:
        if arch not in checksums:
            checksums[arch] = fetcher.checksums(arch)[1]
        sums = checksums[arch]
        origin, data = fetcher.list_bytes(asset, flavor, arch, sums)
        digest = verify_list(asset, data, sums[asset], Product.checksum_asset(arch), origin, what)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{asset} of {what}: not UTF-8 text") from None
        refs = parse_image_lines(text, origin=f"{version}/{asset}")
        if not source.offline:
            _cache_write(source.cache_dir(version) / asset, data, log)
        log(f"{what}: {asset} verified ({len(refs)} images, sha256 {digest[:12]})")
        files.append(ListFile(asset, arch, flavor, digest, origin, len(refs)))
        lists.append(refs)
    if source.offline:
        log(f"{what}: read from the cache in {source.cache_dir(version)}")
    return ReleaseImages(source.product, release, version, tuple(merge_refs(*lists)), tuple(files))
