"""Release image lists: channels, release assets, checksum verification, the lists/ cache.

An RKE2 (or k3s) release publishes its image lists as release assets, e.g.
``<release-url>/v1.28.9+rke2r1/rke2-images-all.linux-amd64.txt``, next to ``sha256sum-<arch>.txt``.
Every list is checked against that checksum file. A mismatch, or a list the file does not name,
is an ``InputError`` (exit 2). Nothing can switch that check off.

A Rancher release publishes ``rancher-images.txt`` and ``rancher-windows-images.txt`` (for every arch) named
in ``sha256sum.txt`` and, in releases since late 2024, the top-level digest of each image in
``rancher-images-digests-linux.txt`` / ``-windows.txt`` (until mid-2025 ``-linux-<arch>.txt``,
``-windows-ltsc2022.txt``) named in ``images-digests-sha256sum.txt``.  Those are verified the same way and
given with the images (`ReleaseImages.digests`), for the copy to check.

Verified lists are kept, with their checksum file, under ``<lists-dir>/<product>/<version>/``.
``offline`` reads only that cache and verifies each list against the cached checksum file again.

No typer, no tqdm. Notes go through a ``log`` callback, and HTTP goes through an injected ``httpx.Client``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef, merge_refs, parse_image_lines
from rke2_mirror.releases.products import (
    DEFAULT_ARCHES,
    DEFAULT_FLAVORS,
    PRODUCTS,
    Product,
    check_arches,
    check_flavors,
    get_product,
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
    read_cached,
)

# The docker-tag spelling of a version (`+` is not allowed in tags): v1.28.9-rke2r1.
_DOCKERIZED_RE = re.compile(r"^(v\d+\.\d+\.\d+(?:-rc\d+)?)-((?:rke2r|k3s)\d+)$")
# A version with a part missing: `1.28.9`, `v1.28.9`, `1.28.9+rke2r1`, `1.28.9-rke2r1` (never a channel name).
_VERSION_LOOKALIKE_RE = re.compile(r"^(?P<v>v?)(?P<core>\d+\.\d+\.\d+(?:-rc\d+)?)(?:[+-](?P<build>(?:rke2r|k3s)\d+))?$")
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_LISTED = 100  # channels named in an "unknown channel" message
_CHECKSUM_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(?:\./)?(\S+)$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# The registries a published-digests line may name before the image's own name (rancher/ecm-distro-tools
# `release generate rancher docker-images-digests --registry`; the older scripts wrote docker.io).
_DIGEST_REGISTRIES = frozenset({"docker.io", "index.docker.io", "registry.rancher.com", "stgregistry.suse.com"})


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
    # the top-level digest the release publishes for its images (rancher), from these verified files
    digests: Mapping[ImageRef, str] = field(default_factory=dict, compare=False, repr=False)
    digest_files: tuple[str, ...] = ()


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
    build suffix), not a channel.  Rancher versions (``v2.12.3``) have no build suffix; a version of the
    other shape than `product`'s is an InputError naming the product it looks like."""
    s = text.strip()
    spec = get_product(product)
    if spec.version_re.match(s):
        return s, False
    m = _DOCKERIZED_RE.match(s)
    if m and spec.version_re.match(f"{m[1]}+{m[2]}"):
        return f"{m[1]}+{m[2]}", False
    _refuse_other_product(s, spec)
    _refuse_version_lookalike(s, product)
    if _CHANNEL_RE.match(s):
        return s, True
    channel = " or a channel like stable" if spec.channel_url else ""
    raise InputError(f"invalid release {text!r}: give a version like {spec.version_example}{channel}")


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
    if not source.channel_url:
        raise InputError(f"{value!r} is not a {source.product} version (they look like {source.spec.version_example}) "
                         f"and {source.product} has no channel server to resolve it as a channel (--channel-url): "
                         "give the full version")
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
    if not source.spec.version_re.match(latest):
        shown = repr(latest) if len(latest) <= 100 else repr(latest[:100]) + "..."
        raise InputError(f"channel {value!r} at {source.channel_url} has no usable latest version ({shown})")
    log(f"{source.product} channel {value} -> {latest}")
    return latest


def _product_of(value: str) -> str | None:
    """The product whose versions `value` looks like, by shape (build suffix, major version), else None."""
    if get_product("rancher").version_re.match(value):
        return "rancher"
    m = _VERSION_LOOKALIKE_RE.match(value)
    build = (m["build"] or "") if m else value.partition("+")[2]
    for name in ("rke2", "k3s"):
        if build.startswith("rke2r" if name == "rke2" else "k3s"):
            return name
    return None


def _refuse_other_product(value: str, spec: Product) -> None:
    """`v2.12.3` given for rke2, `v1.30.14+rke2r1` for rancher: one line naming the product it looks like."""
    other = _product_of(value)
    if other is None or other == spec.name:
        return
    if spec.name != "rancher" and other != "rancher":
        return  # rke2 vs k3s: the same shape (`release not found` hints at the other product)

    def a(name: str) -> str:
        return f"an {name}" if name == "rke2" else f"a {name}"

    raise InputError(f"{value!r} is not {a(spec.name)} version ({spec.name} versions look like "
                     f"{spec.version_example}); it looks like {a(other)} version: use --product {other}")


def _refuse_version_lookalike(value: str, product: str) -> None:
    """`1.28.9`, `v1.28.9`, `1.28.9+rke2r1`: a version with a part missing, not a channel (channels are
    `stable`, `latest`, `v1.28`): say what a version looks like, without asking a channel server."""
    m = _VERSION_LOOKALIKE_RE.match(value)
    if not m:
        return
    if product == "rancher":
        if m["v"] or m["build"]:  # v1.28.9: no Rancher version (`_refuse_other_product` took v2.x and +rke2r1)
            raise InputError(f"{value!r} is not a rancher version (rancher versions look like v2.12.3; an rke2 or k3s "
                             "version needs --product rke2 or k3s and its build suffix)")
        raise InputError(f"{value!r} is not a channel but a rancher version with a part missing: it needs the "
                         f"'v' prefix, e.g. v{m['core']}")
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
        name = self.source.spec.checksum_asset(arch)
        if self.source.offline:
            path = self.source.cache_dir(self.version) / name
            try:
                raw = read_cached(path, CHECKSUMS_MAX_BYTES, "a checksum file")
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
                for_arch = f" for {arch}" if arch != "amd64" and self.source.spec.per_arch else ""
                raise InputError(
                    f"release {self.version} not found at {self.source.release_url}{for_arch} (no {name})"
                    + _wrong_product_hint(self.version, self.source.product)
                )
            origin = url
        return origin, self._checksum_lines(name, origin, raw)

    def _checksum_lines(self, name: str, origin: str, raw: bytes) -> dict[str, str]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{origin}: not a text checksum file") from None
        sums = parse_checksums(text, origin)
        if not self.source.offline:
            cache_write(self.source.cache_dir(self.version) / name, raw, self.log)
        return sums

    def optional_checksums(self, name: str) -> tuple[str, dict[str, str]] | None:
        """A checksum file the release may not have (rancher's images-digests-sha256sum.txt): None when it
        is not published (or, offline, not cached)."""
        got = self.optional_asset(name, CHECKSUMS_MAX_BYTES, "a checksum file")
        return None if got is None else (got[0], self._checksum_lines(name, *got))

    def optional_asset(self, asset: str, limit: int = LIST_MAX_BYTES, what: str = "an image list"
                       ) -> tuple[str, bytes] | None:
        """(where it came from, its bytes), not verified; None when the release (or the cache) lacks it."""
        if self.source.offline:
            path = self.source.cache_dir(self.version) / asset
            try:
                return str(path), read_cached(path, limit, what)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        assert self.client is not None
        url = self.source.asset_url(self.version, asset)
        data = http_get(self.client, url, limit, what)
        return None if data is None else (url, data)

    def _flavor_error(self, asset: str, flavor: str, arch: str, sums: Mapping[str, str]) -> InputError:
        """A flavor the release does not publish: one line naming the ones its checksum file does."""
        spec = self.source.spec
        flavors = spec.published_flavors(sums, arch)
        stem = asset.removesuffix(f"-{arch}.txt").removesuffix(".linux").removesuffix(".txt")
        note = spec.retired_note(flavor, self.version)
        near = near_flavor(flavor, flavors)
        for_arch = f" for {arch}" if spec.per_arch else ""
        return InputError(
            f"{self.version} publishes no {stem} list{for_arch} ({asset} is not in {spec.checksum_asset(arch)}"
            + (f"; {note}" if note else "") + f"); it has: {', '.join(flavors) or '(none)'}"
            + (f"; did you mean {near!r}?" if near else "")
        )

    def _unnamed_error(self, asset: str, arch: str, where: str) -> InputError:
        return InputError(
            f"{asset} of {self.source.product} {self.version} is not named in {self.source.spec.checksum_asset(arch)} "
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
                return str(path), read_cached(path, LIST_MAX_BYTES, "an image list")
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
                f"{asset} of {self.source.product} {self.version} is named in {self.source.spec.checksum_asset(arch)} "
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


def parse_digests(text: str) -> tuple[dict[ImageRef, str], int]:
    """A published-digests file (rancher's ``rancher-images-digests-*.txt``): ``REGISTRY/REPO:TAG DIGEST`` per
    line, the digest being the tag's top-level one (a multi-arch image's index digest), as the release workflow
    writes it (rancher/ecm-distro-tools `release generate rancher docker-images-digests`: the registry's
    Docker-Content-Digest; before it, rancher/rancher scripts/generate-linux-digests.sh: the sha256 of the raw
    manifest or index).  The leading registry (docker.io, registry.rancher.com, ...) is where the digest was
    taken; the image is the rest, read as an image list reads it.  Returns (image -> digest, lines that give
    no usable digest: an image not found when the file was made has an empty one)."""
    out: dict[ImageRef, str] = {}
    unusable = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2 or not _DIGEST_RE.match(fields[1]):
            unusable += 1
            continue
        name = fields[0]
        first, sep, rest = name.partition("/")
        if sep and first in _DIGEST_REGISTRIES:
            name = rest
        try:
            ref = ImageRef.parse(name)
        except InputError:
            unusable += 1
            continue
        if ref.digest or not ref.tag:
            unusable += 1
            continue
        out[ref] = fields[1]
    return out, unusable


def _published_digests(fetcher: ReleaseFetcher, combos: Sequence[tuple[str, str]],
                       list_sums: Mapping[str, Mapping[str, str]], what: str, detail: Log
                       ) -> tuple[dict[ImageRef, str], list[str], str]:
    """The digests the release publishes for the lists read (`combos`: (arch, flavor)), from the files its
    checksum files name (`Product.digest_assets`), each verified like a list (a mismatch is an InputError).
    Returns (image -> digest, the files read, a note for the release's summary line)."""
    spec = fetcher.source.spec
    assert spec.digest_assets is not None
    extra: list[tuple[str, str, Mapping[str, str]]] = []  # (checksum file, origin, sums)
    for name in spec.digest_checksums:
        got = fetcher.optional_checksums(name)
        if got is not None:
            extra.append((name, got[0], got[1]))
    found: dict[ImageRef, str] = {}
    conflicting: set[ImageRef] = set()
    files: list[str] = []
    checked_against: list[str] = []
    unusable = 0
    for arch, flavor in combos:
        sources = extra + [(spec.checksum_asset(arch), "", list_sums[arch])]
        named = next(((asset, cname, sums) for asset in spec.digest_assets(flavor, arch)
                      for cname, _, sums in sources if asset in sums), None)
        if named is None or named[0] in files:
            continue
        asset, cname, sums = named
        got = fetcher.optional_asset(asset, LIST_MAX_BYTES, "a published-digests file")
        if got is None:
            where = fetcher.source.cache_dir(fetcher.version) if fetcher.source.offline else \
                fetcher.source.asset_url(fetcher.version, asset)
            fetcher.log(f"warning: {asset} of {what} is named in {cname} but missing ({where}): its digests are "
                        "not checked")
            continue
        origin, data = got
        digest = verify_list(asset, data, sums[asset], cname, origin, what)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{asset} of {what}: not UTF-8 text") from None
        if not fetcher.source.offline:
            cache_write(fetcher.source.cache_dir(fetcher.version) / asset, data, fetcher.log)
        entries, bad = parse_digests(text)
        unusable += bad
        for ref, d in entries.items():
            if found.setdefault(ref, d) != d:
                conflicting.add(ref)
        detail(f"{what}: {asset} verified against {cname} ({len(entries)} digests, sha256 {digest[:12]})")
        files.append(asset)
        checked_against.append(cname)
    for ref in conflicting:  # two files disagree: no check rather than a wrong one
        del found[ref]
    if not files:
        names = ", ".join(dict.fromkeys([*spec.digest_checksums, *(spec.checksum_asset(a) for a, _ in combos)]))
        return {}, [], f"no digests file named in {names}: image digests are not checked"
    note = f"{', '.join(files)} verified against {', '.join(dict.fromkeys(checked_against))}"
    if conflicting:
        note += f"; {len(conflicting)} image{'s' if len(conflicting) != 1 else ''} with conflicting digests left out"
    if unusable:
        note += f"; {unusable} line{'s' if unusable != 1 else ''} without a digest"
    return found, files, note


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
    in stable order (arch by arch, flavor by flavor, each list in its own order).  A product whose lists are
    the same for every arch (rancher) reads each list once.  Where the product publishes digests (rancher),
    the release's verified digests of these images come with them (`ReleaseImages.digests`).

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
    by_name: dict[str, dict[str, str]] = {}  # checksum file -> its lines (rancher: one file for every arch)
    files: list[ListFile] = []
    lists: list[list[ImageRef]] = []
    for arch, flavor, asset in assets:
        cname = spec.checksum_asset(arch)
        if arch not in checksums:
            if cname not in by_name:
                by_name[cname] = fetcher.checksums(arch)[1]
            checksums[arch] = by_name[cname]
        sums = checksums[arch]
        if any(f.name == asset and spec.checksum_asset(f.arch) == cname for f in files):
            continue  # the same list again (another arch of a product whose lists serve every arch)
        origin, data = fetcher.list_bytes(asset, flavor, arch, sums)
        digest = verify_list(asset, data, sums[asset], cname, origin, what)
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
    digests: dict[ImageRef, str] = {}
    digest_files: list[str] = []
    digest_note = ""
    if spec.digest_assets is not None:
        published, digest_files, digest_note = _published_digests(
            fetcher, [(a, f) for a, f, _ in assets], checksums, what, detail)
        digests = {r: published[r] for r in images if r in published}
        if digest_files:
            digest_note = f"; {len(digests)} with a published digest, checked when copied: {digest_note}"
        else:
            digest_note = f"; {digest_note}"
        if not summary:
            detail(f"{what}:{digest_note.removeprefix(';')}")
    if summary:
        lead = what if parse_release(release, source.product)[1] is False else \
            f"{source.product} channel {release.strip()} -> {version}"
        sums = ", ".join(by_name)
        count = f"{len(files)} list{'s' if len(files) != 1 else ''}"
        where = f" read from the cache in {source.cache_dir(version)}" if source.offline else ""
        log(f"{lead}: {count}{where} verified against {sums} ({len(images)} images{digest_note})")
    published_flavors = tuple((arch, tuple(spec.published_flavors(sums, arch))) for arch, sums in checksums.items())
    return ReleaseImages(source.product, release, version, images, tuple(files), published_flavors,
                         digests, tuple(digest_files))
