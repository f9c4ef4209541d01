"""A release asset on disk (e.g. `rke2-images.linux-amd64.tar.zst`, given to `load --release`) checked
against the release's ``sha256sum-<arch>.txt`` before it is used.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from rke2_mirror.endpoints.tarfiles import resolve_parts
from rke2_mirror.model.errors import InputError
from rke2_mirror.releases.lists import ReleaseFetcher, resolve_version
from rke2_mirror.releases.source import Log

CHUNK = 1024 * 1024
_ARCH_IN_NAME = re.compile(r"(?:^|[.\-_])(amd64|arm64|s390x)(?:[.\-_]|$)")


def arch_of(path: Path, arches: Sequence[str] = ()) -> str:
    """Which sha256sum-<arch>.txt: --arch, else the arch in the file name, else amd64."""
    if arches:
        return arches[0]
    m = _ARCH_IN_NAME.search(Path(path).name)
    return m.group(1) if m else "amd64"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
    return h.hexdigest()


def verify_release_file(path: str | os.PathLike, release: str, source, arches: Sequence[str] = (),
                        client=None, log: Log = lambda s: None) -> str:
    """Check FILE against `release`'s sha256sum-<arch>.txt (downloaded, or from the lists cache when
    offline) before anything else: a mismatch, or a file the checksum file does not name, is refused
    (InputError).  `source` is a `ReleaseSource`.  Returns the asset name it matched."""
    p = Path(path)
    try:
        parts = resolve_parts(p)
    except InputError:
        raise
    if len(parts) != 1:
        raise InputError(f"--release: {p} is split in parts; a release asset is one file")
    arch = arch_of(p, arches)
    version = resolve_version(release, source, client, log)
    origin, sums = ReleaseFetcher(source, version, client, log).checksums(arch)
    checksum_name = source.spec.checksum_asset(arch)
    what = f"{source.product} {version}"
    try:
        actual = file_sha256(p)
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None
    if p.name in sums:
        if sums[p.name] != actual:
            raise InputError(f"{p} does not match {checksum_name} of {what}: expected sha256 {sums[p.name]}, "
                             f"got sha256 {actual} (from {origin}); refusing it")
        log(f"{p.name} verified against {checksum_name} of {what} (sha256 {actual[:12]})")
        return p.name
    same = sorted(a for a, h in sums.items() if h == actual)
    if same:
        log(f"{p.name} verified against {checksum_name} of {what}: it is {same[0]} (sha256 {actual[:12]})")
        return same[0]
    raise InputError(f"{p.name} is not named in {checksum_name} of {what} ({origin}) and its sha256 {actual} "
                     f"matches none of the release's files; refusing it (--arch?)")

