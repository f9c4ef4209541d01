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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef, merge_refs, parse_image_lines
from rke2_mirror.releases.products import (
    DEFAULT_ARCHES,
    DEFAULT_FLAVORS,
    PRODUCTS,
    VERSION_RE,
    Product,
    check_arches,
    check_flavors,
    near_flavor,
)
from rke2_mirror.releases.source import (
    CHANNELS_MAX_BYTES,
    CHECKSUMS_MAX_BYTES,
    LIST_MAX_BYTES,
    Log,
    ReleaseSource,
    cache_write,
    cached_versions,
    http_get,
    read_capped,
)

# The docker-tag spelling of a version (`+` is not allowed in tags): v1.28.9-rke2r1.
_DOCKERIZED_RE = re.compile(r"^(v\d+\.\d+\.\d+(?:-rc\d+)?)-((?:rke2r|k3s)\d+)$")
# A version with a part missing: `1.28.9`, `v1.28.9`, `1.28.9+rke2r1`, `1.28.9-rke2r1` (never a channel name).
_VERSION_LOOKALIKE_RE = re.compile(r"^(?P<v>v?)(?P<core>\d+\.\d+\.\d+(?:-rc\d+)?)(?:[+-](?P<build>(?:rke2r|k3s)\d+))?$")
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_LISTED = 100  # channels named in an "unknown channel" message
_CHECKSUM_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(?:\./)?(\S+)$")


def _quiet(_: str) -> None:
    pass


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
    # per arch read, the flavors whose lists its checksum file names (`Product.published_flavors`)
    published: tuple[tuple[str, tuple[str, ...]], ...] = ()


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


def parse_release(text: str, product: str = "rke2") -> tuple[str, bool]:
    """``(value, is_channel)``. ``v1.28.9+rke2r1`` is a version, and so is ``v1.28.9-rke2r1``, written
    back with its ``+``. ``stable``, ``latest`` and ``v1.28`` are channels.  A version with a part missing
    (``1.28.9``, ``v1.28.9``, ``1.28.9+rke2r1``) is an InputError saying which part (`product` names the
    build suffix), not a channel."""
    s = text.strip()
    if VERSION_RE.match(s):
        return s, False
    m = _DOCKERIZED_RE.match(s)
    if m:
        return f"{m[1]}+{m[2]}", False
    _refuse_version_lookalike(s, product)
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
    """A rancher/apiserver channel collection -> ``{id: latest}``, in the server's order.  Parsed with
    `jsondoc.loads`: too large, not JSON, nested too deep, not an object: one InputError line."""
    doc = jsondoc.loads(raw, f"channel server {url}", limit=CHANNELS_MAX_BYTES, error=InputError, expect=dict)
    data = doc.get("data")
    if not isinstance(data, list):
        raise InputError(f"channel server {url}: no 'data' list in its answer")
    channels: dict[str, str] = {}
    for entry in data:
        # an id no `parse_release` can ask for (a newline, a megabyte) is left out: messages list the ids
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and _CHANNEL_RE.match(entry["id"]):
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


# --------------------------------------------------------------------------- resolving


def fetch_channels(source: ReleaseSource, client: httpx.Client) -> dict[str, str]:
    raw = http_get(client, source.channel_url, CHANNELS_MAX_BYTES, "a channel server's answer")
    if raw is None:
        raise InputError(f"channel server {source.channel_url}: not found (HTTP 404)")
    return parse_channels(raw, source.channel_url)


def resolve_version(release: str, source: ReleaseSource, client: httpx.Client | None, log: Log = _quiet) -> str:
    """A version is returned as is. A channel is looked up at the channel server, which gives its latest version."""
    value, is_channel = parse_release(release, source.product)
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
        known = ", ".join(list(channels)[:_MAX_LISTED]) or "(none)"
        if len(channels) > _MAX_LISTED:
            known += f", and {len(channels) - _MAX_LISTED} more"
        raise InputError(f"unknown {source.product} channel {value!r} at {source.channel_url}{hint}; channels: {known}")
    latest = channels[value]
    if not VERSION_RE.match(latest):
        shown = repr(latest) if len(latest) <= 100 else repr(latest[:100]) + "..."
        raise InputError(f"channel {value!r} at {source.channel_url} has no usable latest version ({shown})")
    log(f"{source.product} channel {value} -> {latest}")
    return latest


def _refuse_version_lookalike(value: str, product: str) -> None:
    """`1.28.9`, `v1.28.9`, `1.28.9+rke2r1`: a version with a part missing, not a channel (channels are
    `stable`, `latest`, `v1.28`): say what a version looks like, without asking a channel server."""
    m = _VERSION_LOOKALIKE_RE.match(value)
    if not m:
        return
    suffix = "rke2r1" if product == "rke2" else "k3s1"
    example = f"v{m['core']}+{m['build'] or suffix}"
    missing = [what for what, absent in (("the 'v' prefix", not m["v"]), ("its build suffix", not m["build"]))
               if absent]
    line = "v" + ".".join(m["core"].split(".")[:2])
    article = "an" if product == "rke2" else "a"
    raise InputError(f"{value!r} is not a channel but {article} {product} version with a part missing: it needs "
                     f"{' and '.join(missing)}, e.g. {example} (channels are names like stable, latest, {line})")


def cached_hint(source: ReleaseSource, limit: int = 10) -> str:
    """`cached rke2 versions in DIR: a, b, ...` (the newest `limit`), or that DIR holds none."""
    have = cached_versions(source)
    where = source.lists_dir / source.product
    if not have:
        return f"{where} holds no cached {source.product} versions"
    have = sorted(have, key=lambda v: [int(n) for n in re.findall(r"\d+", v)])
    shown = have[-limit:]
    more = f" (and {len(have) - limit} older)" if len(have) > limit else ""
    return f"cached {source.product} versions in {where}: {', '.join(shown)}{more}"


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
                raw = read_capped(path, CHECKSUMS_MAX_BYTES, "a checksum file")
            except FileNotFoundError:
                raise InputError(
                    f"no cached {name} for {self.source.product} {self.version} in {path.parent} "
                    f"({cached_hint(self.source)}); a typo in the version or --lists-dir? Offline use needs the "
                    f"lists fetched on a connected machine (rke2-mirror list {self.version} --product "
                    f"{self.source.product} --arch {arch}) and that directory copied here (--lists-dir)"
                ) from None
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
            origin = str(path)
        else:
            assert self.client is not None
            url = self.source.asset_url(self.version, name)
            raw = http_get(self.client, url, CHECKSUMS_MAX_BYTES, "a checksum file")
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
            cache_write(self.source.cache_dir(self.version) / name, raw, self.log)
        return origin, sums

    def _flavor_error(self, asset: str, flavor: str, arch: str, sums: Mapping[str, str]) -> InputError:
        """A flavor the release does not publish: one line naming the ones its checksum file does."""
        spec = self.source.spec
        flavors = spec.published_flavors(sums, arch)
        stem = asset.removesuffix(f"-{arch}.txt").removesuffix(".linux")
        note = spec.retired_note(flavor, self.version)
        near = near_flavor(flavor, flavors)
        return InputError(
            f"{self.version} publishes no {stem} list for {arch} ({asset} is not in {Product.checksum_asset(arch)}"
            + (f"; {note}" if note else "") + f"); it has: {', '.join(flavors) or '(none)'}"
            + (f"; did you mean {near!r}?" if near else "")
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
                return str(path), read_capped(path, LIST_MAX_BYTES, "an image list")
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
            if http_get(self.client, url, LIST_MAX_BYTES, "an image list") is None:
                raise self._flavor_error(asset, flavor, arch, sums)
            raise self._unnamed_error(asset, arch, self._where())
        data = http_get(self.client, url, LIST_MAX_BYTES, "an image list")
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
    *,
    detail: Log = _quiet,
    summary: bool = True,
) -> ReleaseImages:
    """The verified images of one release for the given arches × flavors, merged with duplicates removed,
    in stable order (arch by arch, flavor by flavor, each list in its own order).

    `log` gets one line for the release (the channel it was resolved from, the lists verified, the images;
    not with `summary=False`) and warnings (a list that could not be cached); `detail` one line per list."""
    arches_t, flavors_t = check_arches(arches), check_flavors(flavors)
    spec = source.spec
    assets = [(arch, flavor, spec.list_asset(flavor, arch)) for arch in arches_t for flavor in flavors_t]
    version = resolve_version(release, source, client, detail)
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
            cache_write(source.cache_dir(version) / asset, data, log)
        detail(f"{what}: {asset} verified ({len(refs)} images, sha256 {digest[:12]})")
        files.append(ListFile(asset, arch, flavor, digest, origin, len(refs)))
        lists.append(refs)
    images = tuple(merge_refs(*lists))
    if summary:
        lead = what if parse_release(release, source.product)[1] is False else \
            f"{source.product} channel {release.strip()} -> {version}"
        sums = ", ".join(Product.checksum_asset(a) for a in checksums)
        count = f"{len(files)} list{'s' if len(files) != 1 else ''}"
        where = f" read from the cache in {source.cache_dir(version)}" if source.offline else ""
        log(f"{lead}: {count}{where} verified against {sums} ({len(images)} images)")
    published = tuple((arch, tuple(spec.published_flavors(sums, arch))) for arch, sums in checksums.items())
    return ReleaseImages(source.product, release, version, images, tuple(files), published)
