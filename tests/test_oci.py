import hashlib
import json

import pytest

import rke2_mirror.model.oci as oci
from rke2_mirror.model.errors import DigestMismatch, UnsupportedManifest


def _index(mt=oci.OCI_INDEX):
    return json.dumps({"schemaVersion": 2, "mediaType": mt, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 10,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 10,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "3" * 64, "size": 10,
         "platform": {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.5329"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "4" * 64, "size": 10,
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]}).encode()


def test_parse_index_and_platforms():
    m = oci.parse_manifest(oci.OCI_INDEX, _index())
    assert m.is_index and len(m.children) == 4
    assert m.manifests[2].platform.os_version == "10.0.17763.5329"
    assert m.descriptor.digest == "sha256:" + hashlib.sha256(_index()).hexdigest()


def test_filter_index_keeps_only_wanted_platforms():
    m = oci.parse_manifest(None, _index())
    f = oci.filter_index(m, [oci.Platform.parse("linux/arm64")])
    assert [d.digest[-1] for d in f.manifests] == ["2"]
    assert f.descriptor.digest != m.descriptor.digest
    f2 = oci.filter_index(m, [oci.Platform.parse("linux/arm64/v8"), oci.Platform.parse("windows/amd64")])
    assert [d.digest[-1] for d in f2.manifests] == ["2", "3"]


def test_schema1_is_a_clear_error():
    raw = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(UnsupportedManifest, match="schema1"):
        oci.parse_manifest(oci.DOCKER_SCHEMA1_SIGNED, raw)
    with pytest.raises(UnsupportedManifest, match="schema1"):
        oci.parse_manifest("application/json", raw)


def test_manifest_media_type_from_body_when_header_is_generic():
    raw = json.dumps({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST,
                      "config": {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": 1},
                      "layers": []}).encode()
    m = oci.parse_manifest("application/octet-stream", raw)
    assert m.media_type == oci.DOCKER_MANIFEST and not m.is_index and len(m.blobs) == 1


def _desc(data: bytes) -> oci.Descriptor:
    return oci.Descriptor("application/octet-stream", oci.sha256_digest(data), len(data))


def test_digesting_reader_accepts_good_content():
    data = b"x" * 1000
    assert b"".join(oci.DigestingReader([data[:300], data[300:]], _desc(data))) == data


@pytest.mark.parametrize("chunks", [[b"y" * 1000], [b"x" * 999], [b"x" * 1001]])
def test_digesting_reader_rejects_wrong_content(chunks):
    with pytest.raises(DigestMismatch):
        b"".join(oci.DigestingReader(chunks, _desc(b"x" * 1000)))


def test_platform_parse():
    assert str(oci.Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    with pytest.raises(ValueError):
        oci.Platform.parse("linux")
