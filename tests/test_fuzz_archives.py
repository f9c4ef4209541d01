"""Generated hostile input for the archive readers and the manifest parser (hypothesis): every input
gives a correct result or the project's own one-line error (a MirrorError), within bounded time; never
another exception.  The nastiest cases found are kept below as plain regression tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rke2_mirror.endpoints.dockerarchive import open_archive  # noqa: E402
from rke2_mirror.jobs.inspect import inspect  # noqa: E402
from rke2_mirror.model.errors import MirrorError  # noqa: E402
from rke2_mirror.model.oci import parse_manifest  # noqa: E402

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SETTINGS = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.function_scoped_fixture])

# JSON-ish values: what a hostile manifest or index.json can put anywhere
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=20)
digests = st.one_of(st.just("sha256:" + "a" * 64), st.text(max_size=80),
                    st.builds(lambda b: "sha256:" + hashlib.sha256(b).hexdigest(), st.binary(max_size=8)))
descriptors = st.fixed_dictionaries(
    {"mediaType": st.one_of(st.just(OCI_MANIFEST), st.just(OCI_INDEX), st.text(max_size=20), scalars),
     "digest": st.one_of(digests, scalars), "size": st.one_of(st.integers(-5, 10**12), scalars)},
    optional={"platform": st.one_of(json_values, st.fixed_dictionaries({"os": json_values, "architecture": json_values})),
              "annotations": json_values})


def _manifest_docs():
    index = st.fixed_dictionaries({"schemaVersion": st.just(2), "mediaType": st.just(OCI_INDEX),
                                   "manifests": st.lists(descriptors, max_size=5)})
    manifest = st.fixed_dictionaries({"schemaVersion": st.just(2), "mediaType": st.just(OCI_MANIFEST),
                                      "config": descriptors, "layers": st.lists(descriptors, max_size=5)},
                                     optional={"subject": json_values})
    return st.one_of(index, manifest, json_values)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _blob(members: dict[str, bytes], data: bytes) -> str:
    d = hashlib.sha256(data).hexdigest()
    members[f"blobs/sha256/{d}"] = data
    return "sha256:" + d


def _read(path) -> None:
    t0 = time.monotonic()
    try:
        with open_archive(path) as reader:
            inspect(reader, check=True)
    except MirrorError as exc:
        text = str(exc)
        assert text and "\n" not in text, repr(text)
    assert time.monotonic() - t0 < 5


@SETTINGS
@given(doc=_manifest_docs(), media_type=st.one_of(st.none(), st.just(OCI_INDEX), st.just(OCI_MANIFEST)))
def test_parse_manifest_takes_anything(doc, media_type):
    raw = json.dumps(doc).encode()
    try:
        m = parse_manifest(media_type, raw)
    except MirrorError as exc:
        assert "\n" not in str(exc)
        return
    assert m.raw == raw


@SETTINGS
@given(root=_manifest_docs(), children=st.lists(_manifest_docs(), max_size=3), index_extra=json_values,
       names=st.lists(st.one_of(st.text(max_size=30), st.just("docker.io/rancher/x:v1"), scalars), min_size=0, max_size=3),
       layout=st.one_of(st.just({"imageLayoutVersion": "1.0.0"}), json_values))
def test_oci_archive_readers_take_anything(tmp_path_factory, root, children, index_extra, names, layout):
    members: dict[str, bytes] = {"oci-layout": json.dumps(layout).encode()}
    for c in children:
        _blob(members, json.dumps(c).encode())
    root_raw = json.dumps(root).encode()
    rd = _blob(members, root_raw)
    entries = [{"mediaType": OCI_INDEX, "digest": rd, "size": len(root_raw),
                "annotations": {"io.containerd.image.name": n, "org.opencontainers.image.ref.name": n}} for n in names]
    index = {"schemaVersion": 2, "manifests": entries, "extra": index_extra}
    members["index.json"] = json.dumps(index).encode()
    path = tmp_path_factory.mktemp("fuzz") / "a.tar"
    path.write_bytes(_tar(members))
    _read(path)


@SETTINGS
@given(manifest=json_values, config=json_values, layer_tar=st.binary(max_size=600))
def test_docker_archive_reader_takes_anything(tmp_path_factory, manifest, config, layer_tar):
    members = {"manifest.json": json.dumps(manifest).encode(), "config.json": json.dumps(config).encode(),
               "layer.tar": layer_tar}
    path = tmp_path_factory.mktemp("fuzz") / "d.tar"
    path.write_bytes(_tar(members))
    _read(path)


# -- the nastiest cases, kept as plain tests -----------------------------------------------------------

def test_deeply_nested_index_json_is_one_line(tmp_path):
    members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": b"[" * 200_000 + b"]" * 200_000}
    path = tmp_path / "deep.tar"
    path.write_bytes(_tar(members))
    with pytest.raises(MirrorError, match="nested too deeply"):
        with open_archive(path):
            pass


def test_deeply_nested_manifest_json_in_a_docker_archive_is_one_line(tmp_path):
    members = {"manifest.json": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}
    path = tmp_path / "deep.tar"
    path.write_bytes(_tar(members))
    with pytest.raises(MirrorError, match="nested too deeply"):
        with open_archive(path):
            pass


def test_a_manifest_nested_deeply_is_refused_in_one_line():
    with pytest.raises(MirrorError, match="nested too deeply"):
        parse_manifest(None, b'{"manifests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
