"""Helm charts and plain files as small OCI graphs (one manifest, a config, the file blobs).  Pure: no I/O.

A chart is stored the way Helm 3.8+ pushes one (helm.sh/helm/v3/pkg/registry): an OCI image manifest whose
config is `application/vnd.cncf.helm.config.v1+json` (Chart.yaml's metadata as JSON) and whose one layer
is `application/vnd.cncf.helm.chart.content.v1.tar+gzip` (the .tgz bytes unchanged), so that
`helm pull oci://HOST/charts/NAME --version V` reads it.  Unlike helm, no `created` annotation: the same
chart gives the same digest on every run (a rerun finds it in place).

Files (RKE2's install files) are an OCI artifact manifest: `artifactType` FILES_ARTIFACT_TYPE, the empty
config, one layer per file with `org.opencontainers.image.title` = its file name and VERIFIED_ANNOTATION
= the sha256 it was verified with (and where that sha256 came from).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rke2_mirror.model.errors import InputError
from rke2_mirror.model.oci import OCI_MANIFEST, Descriptor, Manifest

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
HELM_PROV_LAYER = "application/vnd.cncf.helm.chart.provenance.v1.prov"
FILES_ARTIFACT_TYPE = "application/vnd.rke2-mirror.files.v1"
FILE_LAYER = "application/octet-stream"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_BYTES = b"{}"
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
DESCRIPTION = "org.opencontainers.image.description"
VERIFIED_ANNOTATION = "io.rke2-mirror.verified.sha256"
VERIFIED_FROM_ANNOTATION = "io.rke2-mirror.verified.from"

LOCAL_REGISTRY = "rke2-mirror.local"  # the registry name charts and files have in an archive
CHARTS_PREFIX = "charts"  # charts/NAME:VERSION (under the target's prefix)
FILES_REPOSITORY = "files/rke2"  # files/rke2:<version>-<arch>

# Chart.yaml keys in the order helm's chart.Metadata marshals them (its JSON tags), empty ones left out
_METADATA_KEYS = ("name", "home", "sources", "version", "description", "keywords", "maintainers", "icon",
                  "apiVersion", "condition", "tags", "appVersion", "deprecated", "annotations", "kubeVersion",
                  "dependencies", "type")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def oci_tag(version: str) -> str:
    """A chart version as an OCI tag: `+` (semver build metadata) becomes `_`, as helm does."""
    tag = version.replace("+", "_")
    if not _TAG_RE.match(tag):
        raise InputError(f"chart version {version!r} cannot be an OCI tag")
    return tag


@dataclass(frozen=True)
class ChartSpec:
    """`--chart`: https://REPO/NAME@VERSION (a chart repository) or oci://HOST/PATH/NAME:VERSION."""

    text: str
    name: str
    version: str
    repo_url: str | None = None  # http(s) chart repository (index.yaml there)
    oci_ref: str | None = None  # HOST/PATH/NAME:VERSION

    @property
    def tag(self) -> str:
        return oci_tag(self.version)

    @property
    def repository(self) -> str:
        """Where the chart goes (under the target's prefix): charts/NAME."""
        return f"{CHARTS_PREFIX}/{self.name}"


def parse_chart_spec(text: str) -> ChartSpec:
    s = text.strip()
    bad = InputError(f"--chart {text!r}: expected https://REPO/NAME@VERSION (a chart repository) or "
                     "oci://HOST/PATH/NAME:VERSION")
    if s.startswith("oci://"):
        rest = s[len("oci://"):]
        path, colon, version = rest.rpartition(":")
        if not colon or "/" not in path or "/" in version or not version or "@" in rest:
            raise bad
        name = path.rsplit("/", 1)[1]
        if not _NAME_RE.match(name):
            raise bad
        oci_tag(version)
        return ChartSpec(s, name, version, oci_ref=f"{path}:{oci_tag(version)}")
    if s.startswith(("https://", "http://")):
        base, at, version = s.rpartition("@")
        if not at or not version or "/" in version:
            raise bad
        repo, slash, name = base.rstrip("/").rpartition("/")
        if not slash or "://" not in repo or not repo.split("://", 1)[1] or not _NAME_RE.match(name):
            raise bad
        oci_tag(version)
        return ChartSpec(s, name, version, repo_url=repo)
    raise bad


def helm_config(chart_yaml: dict) -> bytes:
    """Chart.yaml's metadata as helm writes the config blob (compact JSON, its key order, empties left out)."""
    doc = {k: chart_yaml[k] for k in _METADATA_KEYS if chart_yaml.get(k) not in (None, "", [], {}, False)}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_bytes(config: Descriptor, layers: list[Descriptor], *, annotations: dict | None = None,
                   artifact_type: str | None = None) -> bytes:
    doc: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = {"mediaType": config.media_type, "digest": config.digest, "size": config.size}
    doc["layers"] = [_desc(d) for d in layers]
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, indent=2).encode("utf-8")


def _desc(d: Descriptor) -> dict:
    out = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    return out


def chart_annotations(meta: dict) -> dict:
    out = {}
    if meta.get("description"):
        out[DESCRIPTION] = str(meta["description"])
    out[TITLE] = str(meta.get("name", ""))
    out[VERSION] = str(meta.get("version", ""))
    return out


def safe_file_name(name: object) -> str | None:
    """A file name to write into a directory: one path component, no `..`, no NUL, not hidden-as-dots."""
    if not isinstance(name, str) or not name or len(name) > 255:
        return None
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith(".."):
        return None
    return name


def content_kind(m: Manifest) -> str:
    """What an archive entry holds: chart, files or image (anything else)."""
    if m.is_index or m.config is None:
        return "image"
    if m.config.media_type == HELM_CONFIG:
        return "chart"
    try:
        at = json.loads(m.raw).get("artifactType")
    except (ValueError, AttributeError):
        at = None
    if at == FILES_ARTIFACT_TYPE:
        return "files"
    return "image"


def file_entries(m: Manifest) -> list[dict]:
    """The files of a files artifact: name (None when unsafe), the raw title, digest, size, verified sha256."""
    out = []
    for d in m.layers:
        ann = d.annotations or {}
        title = ann.get(TITLE)
        out.append({"name": safe_file_name(title), "title": title, "digest": d.digest, "size": d.size,
                    "verified_sha256": ann.get(VERIFIED_ANNOTATION), "verified_from": ann.get(VERIFIED_FROM_ANNOTATION)})
    return out
