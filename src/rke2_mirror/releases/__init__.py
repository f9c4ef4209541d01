"""Release image lists: the products, where their lists come from, resolving and verifying them.

`products` (rke2, k3s, rancher: versions, asset names, flavors, arches, published digests), `source` (URLs, the cache, HTTP), `lists`
(channels -> versions, checksum-verified lists, diffs), `checksums` (a release file on disk checked
against the release's sha256sum file; import it from its module: it reads archives).
"""

from rke2_mirror.releases.lists import (
    Change,
    ImageDiff,
    ListFile,
    ReleaseFetcher,
    ReleaseImages,
    diff_refs,
    fetch_channels,
    parse_channels,
    parse_checksums,
    parse_digests,
    parse_release,
    release_images,
    resolve_version,
    sha256_hex,
    verify_list,
)
from rke2_mirror.releases.products import (
    DEFAULT_ARCHES,
    DEFAULT_FLAVORS,
    KNOWN_ARCHES,
    PRODUCTS,
    Product,
    check_arches,
    check_flavors,
    get_product,
)
from rke2_mirror.releases.source import (
    ENV_CHANNEL_URL,
    ENV_RELEASE_URL,
    Log,
    ReleaseSource,
    cached_versions,
    default_lists_dir,
    http_get,
)

__all__ = [
    "DEFAULT_ARCHES", "DEFAULT_FLAVORS", "ENV_CHANNEL_URL", "ENV_RELEASE_URL", "KNOWN_ARCHES", "PRODUCTS",
    "Change", "ImageDiff", "ListFile", "Log", "Product", "ReleaseFetcher", "ReleaseImages", "ReleaseSource",
    "cached_versions", "check_arches", "check_flavors", "default_lists_dir", "diff_refs", "fetch_channels",
    "get_product", "http_get", "parse_channels", "parse_checksums", "parse_digests", "parse_release", "release_images",
    "resolve_version", "sha256_hex", "verify_list",
]
