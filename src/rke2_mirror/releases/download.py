"""Files fetched and verified before they are copied as OCI artifacts: a chart from an HTTP chart repository
(its index.yaml, the entry's `digest` checked) and RKE2's install files (checked against the release's
sha256sum-<arch>.txt).  Large files are streamed to disk (hashed while they stream), never buffered.

No credentials are sent to chart repositories (this round): redirects are followed (at most
`MAX_REDIRECTS`), never from https down to http.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from rke2_mirror import yamlsafe
from rke2_mirror.endpoints.artifacts import LocalFile, file_digest
from rke2_mirror.model.artifacts import ChartSpec
from rke2_mirror.model.errors import InputError
from rke2_mirror.releases.lists import ReleaseFetcher
from rke2_mirror.releases.source import (DOWNLOAD_DEADLINE, ReleaseSource, _transport_error, describe_size,
                                         http_get, open_following)

Log = Callable[[str], None]

CHART_INDEX_MAX_BYTES = 64 * 1024 * 1024  # big public repositories' index.yaml run to tens of MiB
CHART_MAX_BYTES = 64 * 1024 * 1024  # a chart .tgz: KiB to a few MiB
CHART_YAML_MAX_BYTES = 1024 * 1024
RKE2_TARBALL_MAX_BYTES = 2 * 1024 * 1024 * 1024  # rke2.linux-amd64.tar.gz: ~40 MiB
INSTALL_SCRIPT_MAX_BYTES = 4 * 1024 * 1024  # install.sh: ~30 KiB
DEFAULT_INSTALL_SCRIPT = "https://get.rke2.io"
CHUNK = 1024 * 1024


def install_file_names(arch: str) -> tuple[str, str, str]:
    """(tarball, checksum file, install script) as RKE2 publishes them and INSTALL_RKE2_ARTIFACT_PATH wants them."""
    return f"rke2.linux-{arch}.tar.gz", f"sha256sum-{arch}.txt", "install.sh"


def download(client: httpx.Client, url: str, dest: Path, limit: int, what: str) -> tuple[str, int] | None:
    """GET `url` into the new file `dest` (O_EXCL), streamed and hashed; (sha256 hex, size), None on 404.
    Redirects followed by hand (never https -> http); more than `limit` bytes or `DOWNLOAD_DEADLINE` seconds
    is refused; any failure is one InputError and leaves no file."""
    started = time.monotonic()
    try:
        with open_following(client, url) as resp:
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise InputError(f"HTTP {resp.status_code} fetching {url}")
            declared = resp.headers.get("content-length", "")
            if declared.strip().isdigit() and int(declared) > limit:
                raise InputError(f"{url}: more than {describe_size(limit)}, the most accepted for {what}; refused")
            return _stream_to(resp, dest, url, limit, what, started)
    except httpx.HTTPError as exc:
        raise _transport_error(url, exc) from None


def _stream_to(resp: httpx.Response, dest: Path, url: str, limit: int, what: str, started: float) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise InputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    ok = False
    try:
        with os.fdopen(fd, "wb") as f:
            for data in resp.iter_bytes(CHUNK):
                n += len(data)
                if n > limit:
                    raise InputError(f"{url}: more than {describe_size(limit)}, the most accepted for {what}; refused")
                if time.monotonic() - started > DOWNLOAD_DEADLINE * 10:
                    raise InputError(f"{url}: still downloading after {DOWNLOAD_DEADLINE * 10:.0f}s; refused")
                h.update(data)
                f.write(data)
        ok = True
    finally:
        if not ok:
            dest.unlink(missing_ok=True)
    return h.hexdigest(), n


# --------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class FetchedChart:
    spec: ChartSpec
    tgz: LocalFile
    chart_yaml: dict


def _index_entry(index: object, spec: ChartSpec, origin: str) -> dict:
    if not isinstance(index, dict) or not isinstance(index.get("entries"), dict):
        raise InputError(f"{origin}: not a chart repository index (no 'entries')")
    versions = index["entries"].get(spec.name)
    if not isinstance(versions, list):
        raise InputError(f"{origin}: no chart named {spec.name!r}")
    for e in versions:
        if isinstance(e, dict) and str(e.get("version", "")) == spec.version:
            return e
    have = [str(e.get("version")) for e in versions[:8] if isinstance(e, dict)]
    raise InputError(f"{origin}: chart {spec.name} has no version {spec.version} (it has {', '.join(have) or 'none'}"
                     f"{', …' if len(versions) > 8 else ''})")


def read_chart_yaml(tgz: Path, origin: str) -> dict:
    """Chart.yaml from a chart package (NAME/Chart.yaml), bounded; one InputError if it is not a chart."""
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for m in tf:
                parts = m.name.split("/")
                if len(parts) == 2 and parts[1] == "Chart.yaml" and m.isfile():
                    if m.size > CHART_YAML_MAX_BYTES:
                        raise InputError(f"{origin}: Chart.yaml larger than {describe_size(CHART_YAML_MAX_BYTES)}")
                    f = tf.extractfile(m)
                    assert f is not None
                    data = f.read(CHART_YAML_MAX_BYTES + 1)
                    break
            else:
                raise InputError(f"{origin}: no NAME/Chart.yaml in the chart package")
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{origin}: not a chart package (.tgz): {exc}") from None
    try:
        doc = yamlsafe.load(data, limit=CHART_YAML_MAX_BYTES)
    except yamlsafe.YAMLRefused as exc:
        raise InputError(exc.describe(f"{origin}: Chart.yaml")) from None
    if not isinstance(doc, dict) or not doc.get("name") or not doc.get("version"):
        raise InputError(f"{origin}: Chart.yaml names no chart name and version")
    return doc


def fetch_chart(client: httpx.Client, spec: ChartSpec, dest_dir: Path, log: Log = lambda s: None) -> FetchedChart:
    """A chart from an HTTP chart repository: index.yaml, the entry for NAME/VERSION, its .tgz (from the
    entry's urls, relative to the repository), the entry's `digest` checked; Chart.yaml read from it."""
    assert spec.repo_url is not None
    index_url = spec.repo_url.rstrip("/") + "/index.yaml"
    raw = http_get(client, index_url, CHART_INDEX_MAX_BYTES, "a chart repository index")
    if raw is None:
        raise InputError(f"--chart {spec.text}: no chart repository at {spec.repo_url} ({index_url}: 404)")
    try:
        index = yamlsafe.load(raw, limit=CHART_INDEX_MAX_BYTES, max_nodes=20_000_000,
                              max_chars=4 * CHART_INDEX_MAX_BYTES)
    except yamlsafe.YAMLRefused as exc:
        raise InputError(exc.describe(index_url)) from None
    entry = _index_entry(index, spec, index_url)
    urls = entry.get("urls")
    if not isinstance(urls, list) or not urls or not isinstance(urls[0], str):
        raise InputError(f"{index_url}: chart {spec.name} {spec.version} has no download URL")
    url = urljoin(spec.repo_url.rstrip("/") + "/", urls[0])
    if urlsplit(url).scheme not in ("http", "https"):
        raise InputError(f"{index_url}: chart {spec.name} {spec.version}: URL {urls[0][:100]!r} is not http(s)")
    want = entry.get("digest")
    if not isinstance(want, str) or len(want.removeprefix("sha256:")) != 64:
        raise InputError(f"{index_url}: chart {spec.name} {spec.version} has no sha256 digest to check it against")
    want = want.removeprefix("sha256:").lower()
    dest = dest_dir / f"chart-{spec.name}-{spec.tag}.tgz"
    dest.unlink(missing_ok=True)
    got = download(client, url, dest, CHART_MAX_BYTES, "a chart package")
    if got is None:
        raise InputError(f"--chart {spec.text}: {url}: 404")
    sha, size = got
    if sha != want:
        dest.unlink(missing_ok=True)
        raise InputError(f"chart {spec.name} {spec.version} from {url} does not match its index.yaml digest: "
                         f"expected sha256 {want}, got sha256 {sha}; refused")
    meta = read_chart_yaml(dest, url)
    if str(meta.get("name")) != spec.name or str(meta.get("version")) != spec.version:
        raise InputError(f"{url}: Chart.yaml says {meta.get('name')} {meta.get('version')}, not "
                         f"{spec.name} {spec.version}; refused")
    log(f"chart {spec.name} {spec.version} verified against {index_url} (sha256 {sha[:12]})")
    return FetchedChart(spec, LocalFile(dest, dest.name, sha, size, index_url), meta)


# --------------------------------------------------------------------------- install files


def fetch_install_files(source: ReleaseSource, version: str, arch: str, client: httpx.Client | None,
                        dest_dir: Path, install_script: str = DEFAULT_INSTALL_SCRIPT,
                        log: Log = lambda s: None) -> list[LocalFile]:
    """RKE2's install files for `version`/`arch`: the tarball (checked against sha256sum-<arch>.txt), that
    checksum file, and the install script: from the release when it publishes one (checked), else from
    `install_script` (a file or an http(s) URL; the release does not publish its sha256: it is recorded as
    fetched)."""
    tar_name, sums_name, script_name = install_file_names(arch)
    fetcher = ReleaseFetcher(source, version, client, log)
    origin, sums = fetcher.checksums(arch)
    out: list[LocalFile] = []
    sums_raw = fetcher.optional_asset(sums_name, 1024 * 1024, "a checksum file")
    if sums_raw is None:
        raise InputError(f"{source.product} {version}: no {sums_name}")
    sums_path = dest_dir / sums_name
    sums_path.write_bytes(sums_raw[1])
    sha = hashlib.sha256(sums_raw[1]).hexdigest()
    out_sums = LocalFile(sums_path, sums_name, sha, len(sums_raw[1]), origin)
    want = sums.get(tar_name)
    if want is None:
        raise InputError(f"{sums_name} of {source.product} {version} ({origin}) does not name {tar_name}")
    tar_path = dest_dir / tar_name
    tar_path.unlink(missing_ok=True)
    if source.offline:
        cached = source.cache_dir(version) / tar_name
        if not cached.is_file():
            raise InputError(f"--offline: no {tar_name} in {cached.parent}")
        got_sha, size = file_digest(cached)
        tar_path = cached
    else:
        assert client is not None
        url = source.asset_url(version, tar_name)
        got = download(client, url, tar_path, RKE2_TARBALL_MAX_BYTES, "an RKE2 tarball")
        if got is None:
            raise InputError(f"{source.product} {version}: {url}: 404")
        got_sha, size = got
    if got_sha != want:
        raise InputError(f"{tar_name} of {source.product} {version} does not match {sums_name}: expected sha256 "
                         f"{want}, got sha256 {got_sha}; refused")
    log(f"{tar_name} verified against {sums_name} of {source.product} {version} (sha256 {got_sha[:12]})")
    out.append(LocalFile(tar_path, tar_name, got_sha, size, f"{sums_name} ({origin})"))
    out.append(out_sums)
    out.append(_install_script(source, version, fetcher, sums, client, dest_dir, install_script, log))
    return out


def _install_script(source: ReleaseSource, version: str, fetcher: ReleaseFetcher, sums: dict[str, str],
                    client: httpx.Client | None, dest_dir: Path, install_script: str, log: Log) -> LocalFile:
    _, sums_name, name = install_file_names("x")
    path = dest_dir / name
    path.unlink(missing_ok=True)
    if name in sums:  # published with the release: checked like the tarball
        got = fetcher.optional_asset(name, INSTALL_SCRIPT_MAX_BYTES, "an install script")
        if got is not None:
            sha = hashlib.sha256(got[1]).hexdigest()
            if sha != sums[name]:
                raise InputError(f"{name} of {source.product} {version} does not match its checksum file: expected "
                                 f"sha256 {sums[name]}, got sha256 {sha}; refused")
            path.write_bytes(got[1])
            return LocalFile(path, name, sha, len(got[1]), f"the release's checksum file ({got[0]})")
    if install_script.startswith(("http://", "https://")):
        if client is None:
            raise InputError(f"--offline: give --install-script FILE (a copy of {install_script})")
        got2 = download(client, install_script, path, INSTALL_SCRIPT_MAX_BYTES, "an install script")
        if got2 is None:
            raise InputError(f"--install-script {install_script}: 404")
        sha, size = got2
        where = install_script
    else:
        src = Path(install_script)
        try:
            data = src.read_bytes()
        except OSError as exc:
            raise InputError(f"--install-script {src}: {exc.strerror or exc}") from None
        if len(data) > INSTALL_SCRIPT_MAX_BYTES:
            raise InputError(f"--install-script {src}: larger than {describe_size(INSTALL_SCRIPT_MAX_BYTES)}")
        path.write_bytes(data)
        sha, size, where = hashlib.sha256(data).hexdigest(), len(data), str(src)
    log(f"{name}: from {where} (sha256 {sha[:12]}; the release publishes no checksum for it)")
    return LocalFile(path, name, sha, size, f"as fetched from {where}")


__all__ = ["FetchedChart", "download", "fetch_chart", "fetch_install_files", "install_file_names",
           "read_chart_yaml"]
