"""The referrers test kit itself: the OCI 1.1 referrers front over a real distribution 2.8, and the
cosign look-alike (signatures in tag and referrer form, SBOMs, attestations, the verifier)."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from rke2_mirror_testkit import cosign as cs
from rke2_mirror_testkit.images import (
    COSIGN_SIMPLESIGNING,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    ImagePusher,
    list_tags,
    push_blob,
    push_image,
    push_manifest,
    read_blob,
    read_manifest,
    sha256_digest,
)
from rke2_mirror_testkit.referrers_front import start_referrers_front, valid_digest

REPO = "rancher/demo"


def _subject(img) -> dict:
    return {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest)}


def _get(url: str, **kw) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as c:
        return c.get(url, **kw)


@pytest.fixture
def front(registry):
    with start_referrers_front(registry.url) as f:
        yield f


@pytest.fixture
def key():
    return cs.new_key()


# --------------------------------------------------------------------------- the front as a proxy


def test_front_forwards_pushes_and_pulls(registry, front):
    with ImagePusher(front.url) as p:
        oci = push_image(p, REPO, "v1", kind="oci", seed="fwd")
        docker = push_image(p, REPO, "v1-docker", kind="docker", platforms=None, seed="fwd-d")

        for img in (oci, docker):  # the upstream has exactly what went through the front
            assert read_manifest(registry.url, REPO, img.tag)[1] == img.manifest
            assert read_manifest(p, REPO, img.digest)[1] == img.manifest
        for d in sorted(oci.blobs)[:3]:
            assert read_blob(p, REPO, d) == read_blob(registry.url, REPO, d)
        assert list_tags(p, REPO) == ["v1", "v1-docker"]

        blob = min(oci.blobs)
        h = p.request("HEAD", f"/v2/{REPO}/blobs/{blob}", repo=REPO)
        assert h.status_code == 200 and h.headers["Docker-Content-Digest"] == blob and h.content == b""
        assert int(h.headers["Content-Length"]) == len(read_blob(registry.url, REPO, blob))

        # a chunked PATCH (httpx sends an iterator chunked) and upload URLs rewritten to the front
        data = random.Random(7).randbytes(300_000)
        r = p.request("POST", f"/v2/{REPO}/blobs/uploads/", repo=REPO)
        assert r.status_code == 202
        loc = r.headers["Location"]
        assert registry.host not in loc and loc.startswith((front.url, "/"))
        loc = httpx.URL(front.url).join(loc)
        r = p.client.patch(loc, content=iter([data[:100_000], data[100_000:]]),
                           headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        assert r.request.headers.get("Transfer-Encoding") == "chunked"
        loc = str(httpx.URL(front.url).join(r.headers["Location"]))
        r = p.client.put(f"{loc}{'&' if '?' in loc else '?'}digest={sha256_digest(data)}")
        assert r.status_code == 201, r.text
        assert read_blob(registry.url, REPO, sha256_digest(data)) == data

        # a manifest without subject: no OCI-Subject, nothing recorded
        r = p.request("PUT", f"/v2/{REPO}/manifests/again", repo=REPO, content=oci.manifest,
                      headers={"Content-Type": oci.media_type})
        assert r.status_code == 201 and "OCI-Subject" not in r.headers
        assert front.referrers(REPO, oci.digest) == []
    assert front.seen("PUT", r"/manifests/") >= 5 and front.seen("PATCH") == 1
    assert ("GET", f"/v2/{REPO}/tags/list") in front.requests


def test_plain_distribution_has_no_referrers_api(registry, basic_registry):
    """What a spec client meets at distribution 2.8: 404, plain text, no challenge even with auth."""
    with ImagePusher(registry.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", platforms=None, seed="plain")
    for reg in (registry, basic_registry):
        r = _get(f"{reg.url}/v2/{REPO}/referrers/{img.digest}")
        assert r.status_code == 404
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.text == "404 page not found\n"
        assert "WWW-Authenticate" not in r.headers


# --------------------------------------------------------------------------- referrers API


def test_front_answers_referrers(registry, front, key):
    priv, _ = key
    with ImagePusher(front.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed="refs")
        subj = _subject(img)
        sig = cs.sign_referrer_form(p, REPO, subj, priv, annotations={"org.example/who": "ci"})
        sbom_cosign = cs.attach_sbom_referrer(p, REPO, subj, style="cosign")
        sbom_oras = cs.attach_sbom_referrer(p, REPO, subj, style="oras")
        att = cs.attest_referrer(p, REPO, subj, priv)

        # the front answered OCI-Subject, so no client kept a tag schema index
        with pytest.raises(LookupError):
            read_manifest(registry.url, REPO, cs.referrers_tag(img.digest))

        r = _get(f"{front.url}/v2/{REPO}/referrers/{img.digest}")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == OCI_INDEX
        assert "OCI-Filters-Applied" not in r.headers and "Link" not in r.headers
        body = r.json()
        assert body["schemaVersion"] == 2 and body["mediaType"] == OCI_INDEX
        by = {d["digest"]: d for d in body["manifests"]}
        assert list(by) == [sig, sbom_cosign, sbom_oras, att]
        assert by[sig]["artifactType"] == cs.SIG_ARTIFACT_TYPE
        assert by[sig]["annotations"] == {"org.example/who": "ci"}
        assert by[sbom_cosign]["artifactType"] == cs.SBOM_ARTIFACT_TYPE  # from config.mediaType
        assert "annotations" not in by[sbom_cosign]
        assert by[sbom_oras]["artifactType"] == cs.SPDX_JSON
        assert by[att]["artifactType"] == cs.INTOTO_ARTIFACT_TYPE
        assert by[att]["annotations"] == {"org.opencontainers.image.created": cs.DEFAULT_CREATED}
        for d in by.values():
            _, data, digest = read_manifest(registry.url, REPO, d["digest"])
            assert (d["mediaType"], d["size"], d["digest"]) == (OCI_MANIFEST, len(data), digest)
        sbom_doc = json.loads(read_manifest(registry.url, REPO, sbom_cosign)[1])
        assert "artifactType" not in sbom_doc and sbom_doc["layers"][0]["mediaType"] == cs.COSIGN_SPDX_JSON

        r = _get(f"{front.url}/v2/{REPO}/referrers/{img.digest}", params={"artifactType": cs.SPDX_JSON})
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert [d["digest"] for d in r.json()["manifests"]] == [sbom_oras]
        assert cs.find_referrers(p, REPO, img.digest, artifact_type=cs.SIG_ARTIFACT_TYPE) == (
            [by[sig]], "referrers-api")

        # nothing known: an empty list, also for an unknown repository, and HEAD works
        child = img.children[0][1]
        for repo, digest in ((REPO, child), ("nobody/here", img.digest)):
            r = _get(f"{front.url}/v2/{repo}/referrers/{digest}")
            assert r.status_code == 200 and r.json()["manifests"] == []
        with httpx.Client(trust_env=False) as c:
            h = c.head(f"{front.url}/v2/{REPO}/referrers/{img.digest}")
        assert h.status_code == 200 and h.headers["Content-Type"] == OCI_INDEX

        for bad in ("sha256:zz", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "nodigest",
                    "sha256:" + "a" * 64 + "%0A"):
            r = _get(f"{front.url}/v2/{REPO}/referrers/{bad}")
            assert r.status_code == 400, bad
            assert r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert valid_digest("sha512:" + "0" * 128) and not valid_digest("sha512:" + "0" * 64)

        # OCI-Subject on a raw PUT; the same manifest pushed again is listed once; DELETE drops it
        push_blob(p, REPO, Blob.of(cs.EMPTY_JSON))
        raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x.test",
                          "config": cs.EMPTY_DESCRIPTOR, "layers": [cs.EMPTY_DESCRIPTOR],
                          "subject": {"mediaType": img.media_type, "digest": child, "size": 1}}).encode()
        for ref in (sha256_digest(raw), "tagged-referrer"):
            r = p.request("PUT", f"/v2/{REPO}/manifests/{ref}", repo=REPO, content=raw,
                          headers={"Content-Type": OCI_MANIFEST})
            assert r.status_code == 201 and r.headers["OCI-Subject"] == child
        assert [d["digest"] for d in front.referrers(REPO, child)] == [sha256_digest(raw)]
        assert front.referrers(REPO, child)[0]["artifactType"] == "application/x.test"
        r = p.request("DELETE", f"/v2/{REPO}/manifests/{sha256_digest(raw)}", repo=REPO)
        assert r.status_code == 202
        assert _get(f"{front.url}/v2/{REPO}/referrers/{child}").json()["manifests"] == []


def test_front_paginates(registry):
    with start_referrers_front(registry.url, page_size=2) as front, ImagePusher(front.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", platforms=None, seed="pages")
        sigs = [cs.sign_referrer_form(p, REPO, _subject(img), cs.new_key()[0]) for _ in range(4)]
        sbom = cs.attach_sbom_referrer(p, REPO, _subject(img), style="oras")
        url, pages, seen = f"/v2/{REPO}/referrers/{img.digest}", [], []
        while url:
            r = _get(front.url + url)
            assert r.status_code == 200
            pages.append(len(r.json()["manifests"]))
            seen += [d["digest"] for d in r.json()["manifests"]]
            link = r.headers.get("Link")
            if link:
                assert link.startswith(f"</v2/{REPO}/referrers/{img.digest}?") and link.endswith('>; rel="next"')
            url = link[1:link.index(">")] if link else None
        assert pages == [2, 2, 1] and seen == sigs + [sbom]
        # the filter survives into the next links
        r = _get(f"{front.url}/v2/{REPO}/referrers/{img.digest}", params={"artifactType": cs.SIG_ARTIFACT_TYPE})
        assert "artifactType=" in r.headers["Link"] and r.headers["OCI-Filters-Applied"] == "artifactType"
        found, via = cs.find_referrers(p, REPO, img.digest, artifact_type=cs.SIG_ARTIFACT_TYPE)
        assert via == "referrers-api" and [d["digest"] for d in found] == sigs
        assert front.seen("GET", r"last=") >= 3


def test_front_keeps_upstream_auth(basic_registry, key):
    priv, pub = key
    creds = ("alice", "wonderland-pw")
    with start_referrers_front(basic_registry.url) as front, ImagePusher(front.url, auth=creds) as p:
        img = push_image(p, REPO, "v1", kind="oci", platforms=None, seed="auth")
        sig = cs.sign_referrer_form(p, REPO, _subject(img), priv)
        r = _get(f"{front.url}/v2/{REPO}/referrers/{img.digest}")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
        r = _get(f"{front.url}/v2/{REPO}/referrers/{img.digest}", auth=creds)
        assert r.status_code == 200 and [d["digest"] for d in r.json()["manifests"]] == [sig]
        with pytest.raises(cs.VerificationError):  # anonymous readers see nothing
            cs.verify(front.url, REPO, img.digest, pub, form="referrer")
        assert cs.verify(front.url, REPO, img.digest, pub, form="referrer", auth=creds)["via"] == "referrers-api"


def test_front_over_tls_upstream(tls_registry, key):
    priv, pub = key
    with start_referrers_front(tls_registry.url, verify=tls_registry.ca_file) as front, \
            ImagePusher(front.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", platforms=None, seed="tls", layer_sizes=(3_000_000,))
        sig = cs.sign_referrer_form(p, REPO, _subject(img), priv)
        assert read_manifest(tls_registry.url, REPO, "v1", verify=tls_registry.verify)[1] == img.manifest
        assert cs.verify(front.url, REPO, img.digest, pub, form="referrer")["signature_manifest"] == sig
    with start_referrers_front(tls_registry.url) as untrusted:  # system store: the test CA is unknown
        assert _get(f"{untrusted.url}/v2/").status_code == 502


# --------------------------------------------------------------------------- sign / verify


@pytest.mark.parametrize("target", ["front", "plain"])
@pytest.mark.parametrize("form", ["tag", "referrer"])
def test_sign_verify_roundtrip(registry, front, key, target, form):
    priv, pub = key
    url = front.url if target == "front" else registry.url
    with ImagePusher(url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed=f"rt-{target}-{form}")
        if form == "tag":
            sig = cs.sign_tag_form(p, REPO, img.digest, priv)
            assert cs.signature_tag(img.digest) in list_tags(p, REPO)
        else:
            sig = cs.sign_referrer_form(p, REPO, _subject(img), priv)
        res = cs.verify(url, REPO, img.digest, pub, form=form, identity=f"{p.url.split('://')[1]}/{REPO}")
    assert res["signature_manifest"] == sig and res["image_digest"] == img.digest
    assert res["image_media_type"] == OCI_INDEX and res["payload"]["critical"]["type"] == cs.SIMPLESIGNING_TYPE
    assert res["via"] == {"tag": "tag", "referrer": "referrers-api" if target == "front" else "tag-schema"}[form]
    fallback = cs.referrers_tag(img.digest)
    if form == "referrer" and target == "plain":  # no OCI-Subject: the client kept the tag schema index
        mt, data, _ = read_manifest(registry.url, REPO, fallback)
        index = json.loads(data)
        assert mt == OCI_INDEX and index["mediaType"] == OCI_INDEX
        assert [(d["digest"], d["artifactType"]) for d in index["manifests"]] == [(sig, cs.SIG_ARTIFACT_TYPE)]
    else:
        assert fallback not in list_tags(registry.url, REPO)
    # both forms verify from the other side of the front too (the front serves what the registry has)
    other = registry.url if target == "front" else front.url
    if form == "tag":
        assert cs.verify(other, REPO, img.digest, pub, form=form)["signature_manifest"] == sig
    elif target == "front":  # what went through the front only: the registry has neither API nor tag schema
        with pytest.raises(cs.VerificationError, match="no referrer .* via tag-schema"):
            cs.verify(other, REPO, img.digest, pub, form=form)
    else:
        # the front answers 200, so a client never looks at the tag schema index behind it ...
        with pytest.raises(cs.VerificationError, match="no referrer .* via referrers-api"):
            cs.verify(front.url, REPO, img.digest, pub, form=form)
        # ... unless it includes preexisting tag schema referrers, as the spec tells registries to
        with start_referrers_front(registry.url, include_tag_schema=True) as merging:
            res = cs.verify(merging.url, REPO, img.digest, pub, form=form)
        assert res["via"] == "referrers-api" and res["signature_manifest"] == sig


@pytest.mark.parametrize("target", ["front", "plain"])
def test_signature_of_a_referrer_and_attestation(registry, front, key, target):
    priv, pub = key
    url = front.url if target == "front" else registry.url
    with ImagePusher(url) as p:
        img = push_image(p, REPO, "v1", kind="docker", seed=f"att-{target}")
        att = cs.attest_referrer(p, REPO, _subject(img), priv, predicate_type="https://spdx.dev/Document")
        sig_of_att = cs.sign_referrer_of(p, REPO, att, priv, config_style="cosign")
        sig_of_img = cs.sign_referrer_form(p, REPO, _subject(img), priv, fallback_tag=True)
        doc = json.loads(read_manifest(p, REPO, sig_of_att)[1])
        assert doc["config"]["mediaType"] == cs.SIG_ARTIFACT_TYPE == doc["artifactType"]
        assert doc["subject"] == cs.descriptor_of(p, REPO, att)
        found, _ = cs.find_referrers(p, REPO, att)
        assert [d["digest"] for d in found] == [sig_of_att]
        found, _ = cs.find_referrers(p, REPO, img.digest)
        assert {d["digest"] for d in found} == {att, sig_of_img}
    res = cs.verify(url, REPO, att, pub, form="referrer")
    assert res["signature_manifest"] == sig_of_att
    assert cs.verify(url, REPO, img.digest, pub, form="referrer")["signature_manifest"] == sig_of_img
    a = cs.verify_attestation(url, REPO, img.digest, pub, predicate_type="https://spdx.dev/Document")
    assert a["attestation_manifest"] == att and a["statement"]["subject"][0]["digest"]["sha256"] == img.digest[7:]
    with pytest.raises(cs.VerificationError, match="predicateType"):
        cs.verify_attestation(url, REPO, img.digest, pub, predicate_type="https://slsa.dev/provenance/v1")
    # fallback_tag=True on the front: the index is there too (and lists only what was pushed with it)
    tags = list_tags(registry.url, REPO)
    assert (cs.referrers_tag(img.digest) in tags) and ((cs.referrers_tag(att) in tags) == (target == "plain"))


def test_verification_failures(registry, key):
    priv, pub = key
    other_pub = cs.new_key()[1]
    with ImagePusher(registry.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", platforms=None, seed="bad")
        with pytest.raises(cs.VerificationError, match="not found"):
            cs.verify(registry.url, REPO, img.digest, pub, form="tag")
        with pytest.raises(cs.VerificationError, match="no referrer"):
            cs.verify(registry.url, REPO, img.digest, pub, form="referrer")
        cs.sign_tag_form(p, REPO, img.digest, priv)
        cs.sign_referrer_form(p, REPO, _subject(img), priv)
        for form in ("tag", "referrer"):
            with pytest.raises(cs.VerificationError, match="does not match the payload with this key"):
                cs.verify(registry.url, REPO, img.digest, other_pub, form=form)
            assert cs.verify(registry.url, REPO, img.digest, pub, form=form)
            with pytest.raises(cs.VerificationError, match="expected 'elsewhere/x'"):
                cs.verify(registry.url, REPO, img.digest, pub, form=form, identity="elsewhere/x")
        with pytest.raises(cs.VerificationError, match="not found"):  # the signed image must be there
            cs.verify(registry.url, REPO, "sha256:" + "1" * 64, pub, form="tag")

        # a second image: its payload tampered with (the signature kept), then a payload for another image
        img2 = push_image(p, REPO, "v2", kind="oci", platforms=None, seed="bad2")
        good = cs.simple_signing_payload(img2.digest, "x/y")
        tampered = good.replace(b'"x/y"', b'"x/z"')
        cs.push_referrer(p, REPO, _subject(img2), artifact_type=cs.SIG_ARTIFACT_TYPE,
                         layers=[(Blob.of(tampered, COSIGN_SIMPLESIGNING),
                                  {cs.SIGNATURE_ANNOTATION: cs.sign_bytes(priv, good)})])
        with pytest.raises(cs.VerificationError, match="does not match the payload"):
            cs.verify(registry.url, REPO, img2.digest, pub, form="referrer")
        cs.sign_tag_form(p, REPO, img2.digest, priv, payload=cs.simple_signing_payload(img.digest, "x/y"))
        with pytest.raises(cs.VerificationError, match=f"the payload signs {img.digest}"):
            cs.verify(registry.url, REPO, img2.digest, pub, form="tag")

        # a referrers tag that is not an index: the client refuses to overwrite it
        img3 = push_image(p, REPO, "v3", kind="oci", platforms=None, seed="bad3")
        push_manifest(p, REPO, cs.referrers_tag(img3.digest), img.manifest, img.media_type)
        with pytest.raises(RuntimeError, match="not a referrers index"):
            cs.sign_referrer_form(p, REPO, _subject(img3), priv)

    # a blob corrupted in the registry's storage (same length): the sha256 check catches it
    res = cs.verify(registry.url, REPO, img.digest, pub, form="tag")
    hexpart = res["payload_digest"].split(":")[1]
    path = registry.root / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"cosign container image signature", b"cosign container image signaturE"))
    with pytest.raises(cs.VerificationError, match="wrong content"):
        cs.verify(registry.url, REPO, img.digest, pub, form="tag")


def test_referrers_tag_schema_names():
    assert cs.referrers_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert cs.referrers_tag("sha512:" + "b" * 128) == "sha512-" + "b" * 64
    odd = ("test+algorithm+using+algorithm+separators+and+lots+of+characters+to+excercise+overall+truncation:"
           "alsoSome=InTheEncodedSectionToShowHyphenReplacementAndLotsAndLotsOfCharactersToExcerciseEncodedTruncation")
    assert cs.referrers_tag(odd) == ("test-algorithm-using-algorithm-s-"
                                     "alsoSome-InTheEncodedSectionToShowHyphenReplacementAndLotsAndLot")
    assert cs.signature_tag("sha256:" + "c" * 64) == "sha256-" + "c" * 64 + ".sig"
    assert cs.EMPTY_DESCRIPTOR["digest"] == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
