"""A local stand-in for GitHub release downloads and the RKE2/k3s channel server (for tests and the demo).

Layout served, built from a directory in the ``lists/`` layout (``<root>/<product>/<version>/<asset>``):

- ``GET /<product>/releases/download/<version>/<asset>`` answers **302** with a ``Location`` of
  ``/objects/<sha256>/<asset>``, the way GitHub redirects to its object storage. 404 if there is no such file.
- ``GET /objects/<sha256>/<asset>`` serves the bytes the redirect was made for.
- ``GET /<product>/v1-release/channels`` serves a rancher/apiserver collection
  ``{"type": "collection", "data": [{"id": "stable", "name": "stable", "latest": "v…", …}, …]}``.

Files are read when they are requested, so a test can tamper with the directory while the server runs.
Only loopback addresses are used, on a free port.

A Rancher release (``<root>/rancher/<version>/``) is written by `write_rancher_release` with the asset names
and formats rancher/rancher's release workflow publishes; serve it at ``server.release_url("rancher")``.

    server = start_release_server("lists", channels={"rke2": {"stable": "v1.30.14+rke2r1"}})
    server.release_url("rke2")   # http://127.0.0.1:PORT/rke2/releases/download
    server.channel_url("rke2")   # http://127.0.0.1:PORT/rke2/v1-release/channels
    server.requests              # [RequestRecord(method, path, status), ...]
    server.stop()

Run it by hand (the demo does this): ``python -m rke2_mirror_testkit.release_server lists
--channel rke2:stable=v1.30.14+rke2r1 --port 0``. It prints the URLs as JSON, then serves until stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = ["ReleaseServer", "RequestRecord", "add_install_files", "start_release_server", "write_rancher_release"]


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # as requested (still percent-encoded)
    status: int


def _safe_segment(segment: str) -> bool:
    return bool(segment) and segment not in (".", "..") and "/" not in segment and "\\" not in segment


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.split("/")[1:]]
        status, headers, body = owner._route(parts)
        owner._record(RequestRecord(self.command, self.path, status))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ReleaseServer"


class ReleaseServer:
    """See the module docstring. Use `start_release_server` to create one."""

    def __init__(
        self,
        lists_root: Path | str,
        channels: Mapping[str, Mapping[str, str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path | str, Path | str] | None = None,
    ) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the release server binds to loopback only")
        self.lists_root = Path(lists_root)
        self._channels: dict[str, dict[str, str]] = {p: dict(c) for p, c in (channels or {}).items()}
        self._objects: dict[str, bytes] = {}
        self._requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.host = host
        self.port = self._httpd.server_address[1]
        self._stopped = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="release-server", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------- public

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def release_url(self, product: str = "rke2") -> str:
        return f"{self.base_url}/{product}/releases/download"

    def channel_url(self, product: str = "rke2") -> str:
        return f"{self.base_url}/{product}/v1-release/channels"

    def set_channels(self, product: str, channels: Mapping[str, str]) -> None:
        with self._lock:
            self._channels[product] = dict(channels)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ReleaseServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._requests.append(rec)

    def _route(self, parts: list[str]) -> tuple[int, dict[str, str], bytes]:
        if len(parts) == 5 and parts[1:3] == ["releases", "download"]:
            return self._asset(parts[0], parts[3], parts[4])
        if len(parts) == 3 and parts[0] == "objects":
            return self._object(parts[1])
        if len(parts) == 3 and parts[1:] == ["v1-release", "channels"]:
            return self._channel_collection(parts[0])
        return _not_found()

    def _asset(self, product: str, version: str, asset: str) -> tuple[int, dict[str, str], bytes]:
        if not all(_safe_segment(s) for s in (product, version, asset)):
            return _not_found()
        path = self.lists_root / product / version / asset
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return _not_found()
        token = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._objects[token] = data
        location = f"{self.base_url}/objects/{token}/{quote(asset)}"
        return 302, {"Location": location, "Content-Type": "text/html; charset=utf-8"}, b""

    def _object(self, token: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            data = self._objects.get(token)
        if data is None:
            return _not_found()
        return 200, {"Content-Type": "application/octet-stream"}, data

    def _channel_collection(self, product: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            channels = self._channels.get(product)
            channels = dict(channels) if channels is not None else None
        if channels is None:
            return _not_found()
        url = self.channel_url(product)
        doc = {
            "type": "collection",
            "links": {"self": url},
            "actions": {},
            "resourceType": "channel",
            "data": [
                {
                    "id": cid,
                    "type": "channel",
                    "links": {"self": f"{url}/{cid}"},
                    "name": cid,
                    "latest": latest,
                }
                for cid, latest in channels.items()
            ],
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(doc, indent=1).encode()


def _not_found() -> tuple[int, dict[str, str], bytes]:
    return 404, {"Content-Type": "text/plain; charset=utf-8"}, b"Not Found\n"


def write_rancher_release(
    lists_root: Path | str,
    version: str,
    images: list[str],
    *,
    windows_images: list[str] = (),  # type: ignore[assignment]
    digests: Mapping[str, str] | None = None,
    registry: str = "docker.io",
    digests_layout: str = "by-os",
) -> Path:
    """Write `version` of Rancher under ``<lists_root>/rancher/<version>/`` as rancher/rancher publishes it
    (.github/workflows/release.yml, scripts/artifacts-list.sh, scripts/artifacts-hashes.sh):

    - ``rancher-images.txt`` / ``rancher-windows-images.txt``: one ``repo:tag`` per line, and beside them
      ``rancher-images-sources.txt`` and ``rancher-components.txt``, all named in ``sha256sum.txt``
      (``<hex> <name>``, one space, as artifacts-hashes.sh writes it);
    - with `digests` (``{image as listed: "sha256:..."}``, an empty digest for an image the registry did not
      have): ``rancher-images-digests-linux.txt`` / ``-windows.txt`` (``digests_layout="by-os"``, releases
      since July 2025) or ``rancher-images-digests-linux-amd64.txt`` / ``-linux-arm64.txt`` /
      ``-windows-ltsc2022.txt`` (``"per-arch"``, before), lines ``<registry>/<image> <digest>`` sorted, as
      rancher/ecm-distro-tools writes them, named in ``images-digests-sha256sum.txt``.

    Returns the release's directory.  Tests tamper with the files afterwards as they need."""
    d = Path(lists_root) / "rancher" / version
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "rancher-images.txt": "".join(f"{i}\n" for i in images),
        "rancher-windows-images.txt": "".join(f"{i}\n" for i in windows_images),
        "rancher-images-sources.txt": "".join(f"{i} rancherImages\n" for i in images),
        "rancher-components.txt": f"# Images with -rc\nrancher {version}\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    _write_sums(d / "sha256sum.txt", d, sorted(files))
    if digests is not None:
        def lines(refs: list[str]) -> str:
            return "".join(f"{registry}/{i} {digests.get(i, '')}\n" for i in sorted(refs) if i in digests)

        if digests_layout == "by-os":
            named = {"rancher-images-digests-linux.txt": lines(images),
                     "rancher-images-digests-windows.txt": lines(list(windows_images))}
        elif digests_layout == "per-arch":
            named = {"rancher-images-digests-linux-amd64.txt": lines(images),
                     "rancher-images-digests-linux-arm64.txt": lines(images),
                     "rancher-images-digests-windows-ltsc2022.txt": lines(list(windows_images))}
        else:
            raise ValueError(f"digests_layout {digests_layout!r}: by-os or per-arch")
        for name, text in named.items():
            (d / name).write_text(text)
        _write_sums(d / "images-digests-sha256sum.txt", d, list(named))
    return d


def add_install_files(release_dir: Path | str, arch: str = "amd64", *, size: int = 200_000) -> dict[str, bytes]:
    """Add RKE2's install tarball (``rke2.linux-<arch>.tar.gz``, a small gzip'd tar with bin/rke2 of
    deterministic bytes) to an RKE2 release directory and name it in its ``sha256sum-<arch>.txt`` (two spaces,
    as RKE2's release publishes it).  Returns {name: bytes} of the tarball and the new checksum file."""
    import gzip
    import io
    import tarfile

    d = Path(release_dir)
    name = f"rke2.linux-{arch}.tar.gz"
    payload = hashlib.sha256(f"{d.name}-{arch}".encode()).digest() * (size // 32 + 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("bin/rke2")
        info.size, info.mode, info.mtime = size, 0o755, 1_700_000_000
        tf.addfile(info, io.BytesIO(payload[:size]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue())
    (d / name).write_bytes(out.getvalue())
    sums = d / f"sha256sum-{arch}.txt"
    old = sums.read_text() if sums.is_file() else ""
    lines = [l for l in old.splitlines() if not l.endswith(f" {name}")]
    lines.append(f"{hashlib.sha256(out.getvalue()).hexdigest()}  {name}")
    sums.write_text("\n".join(lines) + "\n")
    return {name: out.getvalue(), sums.name: sums.read_bytes()}


def _write_sums(path: Path, directory: Path, names: list[str]) -> None:
    path.write_text("".join(f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()} {n}\n" for n in names))


def start_release_server(
    lists_root: Path | str,
    channels: Mapping[str, Mapping[str, str]] | None = None,
    *,
    port: int = 0,
    tls: tuple[Path | str, Path | str] | None = None,
) -> ReleaseServer:
    """Serve ``lists_root`` (the ``lists/`` layout) and the given channels (``{product: {id: version}}``)
    on 127.0.0.1 (a free port unless ``port`` is given). ``tls=(cert, key)`` serves https."""
    return ReleaseServer(lists_root, channels, port=port, tls=tls)


# --------------------------------------------------------------------------- by hand


def _parse_channel(text: str) -> tuple[str, str, str]:
    try:
        product, rest = text.split(":", 1)
        cid, version = rest.split("=", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--channel {text!r}: expected PRODUCT:ID=VERSION") from None
    return product, cid, version


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a lists/ directory like GitHub release downloads.")
    ap.add_argument("lists_root", type=Path)
    ap.add_argument("--channel", action="append", default=[], type=_parse_channel,
                    metavar="PRODUCT:ID=VERSION", help="e.g. rke2:stable=v1.30.14+rke2r1 (repeatable)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    channels: dict[str, dict[str, str]] = {}
    for product, cid, version in args.channel:
        channels.setdefault(product, {})[cid] = version
    server = start_release_server(args.lists_root, channels, port=args.port)
    products = sorted({p.name for p in args.lists_root.iterdir() if p.is_dir()} | set(channels))
    print(json.dumps({
        "base_url": server.base_url,
        "release_url": {p: server.release_url(p) for p in products},
        "channel_url": {p: server.channel_url(p) for p in products},
    }), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
