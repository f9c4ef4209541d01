"""The products (rke2, k3s, rancher): where each publishes its releases and channels, what its versions
look like, how its image-list assets (and the checksum files naming them) are named per flavor and arch,
the published-digests files of its images (rancher), and the arches and flavors that can be asked for.  Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rke2_mirror.model.errors import InputError

KNOWN_ARCHES = ("amd64", "arm64", "s390x")
DEFAULT_ARCHES = ("amd64",)
DEFAULT_FLAVORS = ("all",)

# A release version as products publish it: v1.28.9+rke2r1, v1.28.9+k3s1, v1.30.0-rc1+rke2r1.
VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?\+[0-9A-Za-z.]+$")
# A Rancher version: v2.12.3, v2.13.0-rc1, v2.9.3-hotfix-2dcf.1 -- no build suffix, major 2 or later (RKE2 and
# k3s versions are v1.x with one).
RANCHER_VERSION_RE = re.compile(r"^v(?:[2-9]|[1-9]\d+)\.\d+\.\d+(?:-[0-9A-Za-z][0-9A-Za-z.-]*)?$")
_FLAVOR_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_ARCH_RE = re.compile(r"^[a-z0-9]{1,16}$")


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


# Rancher (rancher/rancher's release workflow, scripts/artifacts-list.sh): `rancher-images.txt` and
# `rancher-windows-images.txt`, for every arch, named in `sha256sum.txt` ("<hex> <name>" lines).
_RANCHER_LISTS = {"all": "rancher-images.txt", "default": "rancher-images.txt", "windows": "rancher-windows-images.txt"}


def _rancher_asset(flavor: str, arch: str) -> str:
    try:
        return _RANCHER_LISTS[flavor]
    except KeyError:
        raise InputError(f"rancher publishes rancher-images.txt (--flavor all) and rancher-windows-images.txt "
                         f"(--flavor windows); --flavor {flavor} is not one of them") from None


def _rancher_flavor_of(asset: str, arch: str) -> str | None:
    return {"rancher-images.txt": "all", "rancher-windows-images.txt": "windows"}.get(asset)


def _rancher_digest_assets(flavor: str, arch: str) -> tuple[str, ...]:
    """The published-digests files for a list, newest naming first: `rancher-images-digests-linux.txt` /
    `-windows.txt` (releases since July 2025, rancher/rancher#51039), before that one per arch
    (`-linux-amd64.txt`, `-linux-arm64.txt`) and per Windows version (`-windows-ltsc2022.txt`, `-ltsc2019`)."""
    if flavor == "windows":
        return ("rancher-images-digests-windows.txt", "rancher-images-digests-windows-ltsc2022.txt",
                "rancher-images-digests-windows-ltsc2019.txt")
    return ("rancher-images-digests-linux.txt", f"rancher-images-digests-linux-{arch}.txt")


def _typo_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance (insertions, deletions, substitutions, adjacent swaps)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def near_flavor(flavor: str, candidates: Iterable[str]) -> str | None:
    """The candidate `flavor` is clearly a typo of (one edit away: `al`, `trafik`, `calcio`), else None."""
    if flavor in candidates:
        return None
    near = [c for c in candidates if _typo_distance(flavor, c) <= 1]
    return near[0] if near else None


@dataclass(frozen=True)
class Product:
    """Where a product publishes, and how its image list assets are named."""

    name: str
    release_url: str
    channel_url: str
    list_asset: Callable[[str, str], str]  # (flavor, arch) -> asset name
    flavor_of: Callable[[str, str], str | None]  # (asset name, arch) -> flavor, None if not a list
    # The flavors its releases are known to publish. What a release publishes is read from its checksum
    # file (`published_flavors`); this table only orders them and catches typos before any download.
    flavors: tuple[str, ...] = ()
    open_flavors: bool = False  # a release may publish flavors not in `flavors` (rke2: ingress-nginx in v1.36.0)
    # (flavor, first version without it, why): said when a release of that version or later lacks it
    retired: tuple[tuple[str, tuple[int, int, int], str], ...] = ()
    version_re: re.Pattern[str] = VERSION_RE
    version_example: str = "v1.28.9+rke2r1"
    checksums: str = "sha256sum-{arch}.txt"  # the checksum file naming the lists (per arch, or one for all)
    # (flavor, arch) -> the files that may publish the top-level digest of each image of that list, in the order
    # they are looked for in the checksum files (`digest_checksums`, then `checksums`); None: no such files
    digest_assets: Callable[[str, str], tuple[str, ...]] | None = None
    digest_checksums: tuple[str, ...] = ()

    @property
    def per_arch(self) -> bool:
        """Does each arch have its own lists and checksum file (rke2), or do all arches share them (rancher)?"""
        return "{arch}" in self.checksums

    def unknown_flavor(self, flavor: str) -> str | None:
        """Why `flavor` cannot be asked for (None when it may be): before any download, a product with open
        flavors refuses only a clear typo of a known one; the others refuse any flavor not in the table."""
        if not self.flavors or flavor in self.flavors:
            return None
        near = near_flavor(flavor, self.flavors)
        if self.open_flavors and near is None:
            return None  # checked against the release's checksum file once it is read
        if near is None:
            import difflib

            close = difflib.get_close_matches(flavor, self.flavors, n=1, cutoff=0.5)
            near = close[0] if close else None
        hint = f"; did you mean {near!r}?" if near else ""
        return f"unknown {self.name} flavor {flavor!r} (known: {', '.join(self.flavors)}{hint})"

    def retired_note(self, flavor: str, version: str) -> str | None:
        """Why a release of `version` publishes no `flavor` list, when that is known (`retired`)."""
        m = re.match(r"^v(\d+)\.(\d+)\.(\d+)", version)
        if not m:
            return None
        have = tuple(int(n) for n in m.groups())
        for name, since, why in self.retired:
            if name == flavor and have >= since:
                return why
        return None

    def checksum_asset(self, arch: str) -> str:
        return self.checksums.format(arch=arch)

    def published_flavors(self, asset_names: Iterable[str], arch: str) -> list[str]:
        """The flavors whose list for `arch` the checksum file names (the release's own list of flavors):
        the known ones in table order, then any others by name, then `all` and `default`."""
        found = {f for name in asset_names if (f := self.flavor_of(name, arch)) is not None}
        order = [f for f in self.flavors if f not in ("all", "default")]
        return sorted(found, key=lambda f: (f in ("all", "default"), order.index(f) if f in order else len(order),
                                            f != "all", f))


PRODUCTS: Mapping[str, Product] = {
    "rke2": Product(
        "rke2",
        "https://github.com/rancher/rke2/releases/download",
        "https://update.rke2.io/v1-release/channels",
        _rke2_asset,
        _rke2_flavor_of,
        ("all", "default", "core", "canal", "calico", "cilium", "flannel", "ingress-nginx", "multus", "harvester",
         "traefik", "vsphere", "windows"),
        open_flavors=True,
        # v1.36.0: Traefik is in rke2-images-core, rke2-images-traefik is gone, ingress-nginx has its own list
        retired=(("traefik", (1, 36, 0), "Traefik moved into core in v1.36.0"),),
    ),
    "k3s": Product(
        "k3s",
        "https://github.com/k3s-io/k3s/releases/download",
        "https://update.k3s.io/v1-release/channels",
        _k3s_asset,
        _k3s_flavor_of,
        ("all", "default"),
        version_example="v1.28.9+k3s1",
    ),
    # No channel server: versions only (a --channel-url in the same format may be given).
    "rancher": Product(
        "rancher",
        "https://github.com/rancher/rancher/releases/download",
        "",
        _rancher_asset,
        _rancher_flavor_of,
        ("all", "default", "windows"),
        version_re=RANCHER_VERSION_RE,
        version_example="v2.12.3",
        checksums="sha256sum.txt",
        digest_assets=_rancher_digest_assets,
        digest_checksums=("images-digests-sha256sum.txt",),
    ),
}


def get_product(name: str) -> Product:
    try:
        return PRODUCTS[name]
    except KeyError:
        raise InputError(f"unknown product {name!r} (one of: {', '.join(PRODUCTS)})") from None


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

