"""A Helm chart repository over http on loopback (index.yaml + .tgz packages), and chart packages built in
memory the way `helm package` lays them out (NAME/Chart.yaml, values.yaml, templates/).  For tests and the demo.

    repo = start_chart_repo()
    tgz = repo.add_chart("cert-manager", "v1.15.3")    # the package's bytes
    repo.url                                             # http://127.0.0.1:PORT
    repo.requests                                        # paths asked for
    repo.stop()

`add_chart(..., wrong_digest=True)` publishes a digest in index.yaml that does not match the package.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["ChartRepo", "build_chart", "start_chart_repo"]


def build_chart(name: str, version: str, *, app_version: str = "1.0.0", images: list[str] | None = None) -> bytes:
    """A chart package (.tgz) with NAME/Chart.yaml, values.yaml and one template; deterministic bytes."""
    chart_yaml = (f"apiVersion: v2\nname: {name}\nversion: {version}\nappVersion: {json.dumps(app_version)}\n"
                  f"description: A test chart named {name}\ntype: application\n")
    if images:
        chart_yaml += "annotations:\n  artifacthub.io/images: |\n" + "".join(
            f"    - name: img{i}\n      image: {img}\n" for i, img in enumerate(images))
    files = {
        f"{name}/Chart.yaml": chart_yaml.encode(),
        f"{name}/values.yaml": b"replicaCount: 1\n",
        f"{name}/templates/configmap.yaml": (b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
                                             b"  name: {{ .Release.Name }}\ndata:\n  x: y\n"),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue())
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        path = urlsplit(self.path).path
        status, body = owner._route(path)
        owner._record(path)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream" if path.endswith(".tgz") else "text/yaml")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ChartRepo"


class ChartRepo:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._charts: dict[str, bytes] = {}  # path -> bytes
        self._entries: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="chart-repo")
        self._thread.start()

    def add_chart(self, name: str, version: str, *, wrong_digest: bool = False, data: bytes | None = None,
                  **kw) -> bytes:
        tgz = data if data is not None else build_chart(name, version, **kw)
        digest = hashlib.sha256(tgz + (b"x" if wrong_digest else b"")).hexdigest()
        with self._lock:
            self._charts[f"/charts/{name}-{version}.tgz"] = tgz
            self._entries.setdefault(name, []).append({
                "apiVersion": "v2", "name": name, "version": version, "appVersion": "1.0.0",
                "created": "2024-01-01T00:00:00Z", "digest": digest,
                "urls": [f"charts/{name}-{version}.tgz"]})
        return tgz

    def index_yaml(self) -> bytes:
        with self._lock:
            doc = {"apiVersion": "v1", "entries": self._entries, "generated": "2024-01-01T00:00:00Z"}
            return json.dumps(doc, indent=1).encode()  # JSON is YAML

    @property
    def requests(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def _record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    def _route(self, path: str) -> tuple[int, bytes]:
        if path == "/index.yaml":
            return 200, self.index_yaml()
        with self._lock:
            data = self._charts.get(path)
        return (200, data) if data is not None else (404, b"not found\n")

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ChartRepo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_chart_repo() -> ChartRepo:
    return ChartRepo()
