"""The products (rke2, k3s): where each publishes its releases and channels, how its image-list assets
are named per flavor and arch, and the arches and flavors that can be asked for.  Pure.
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


@dataclass(frozen=True)
class Product:
    """Where a product publishes, and how its image list assets are named."""

    name: str
    release_url: str
    channel_url: str
    list_asset: Callable[[str, str], str]  # (flavor, arch) -> asset name
    flavor_of: Callable[[str, str], str | None]  # (asset name, arch) -> flavor, None if not a list
    flavors: tuple[str, ...] = ()  # the flavors its releases are known to publish (a check before any download)

    def unknown_flavor(self, flavor: str) -> str | None:
        """Why `flavor` is not one this product is known to publish (None when it is), naming the known ones
        and the nearest."""
        if not self.flavors or flavor in self.flavors:
            return None
        import difflib

        close = difflib.get_close_matches(flavor, self.flavors, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.name} flavor {flavor!r} (known: {', '.join(self.flavors)}{hint})"

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
        ("all", "default", "core", "canal", "calico", "cilium", "flannel", "multus", "harvester", "traefik",
         "vsphere", "ingress-nginx", "windows"),
    ),
    "k3s": Product(
        "k3s",
        "https://github.com/k3s-io/k3s/releases/download",
        "https://update.k3s.io/v1-release/channels",
        _k3s_asset,
        _k3s_flavor_of,
        ("all", "default"),
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

