"""Signatures, attestations and SBOMs travel with their images (OCI 1.1 referrers, the referrers tag
schema, cosign's legacy tags), checked as `cosign verify --key` would at the mirror.

Real parts: docker-registry 2.8 (no referrers API: the tag schema), the referrers front over one (the
API), the cosign look-alike signing with an ECDSA P-256 key (rke2_mirror_testkit.cosign)."""

from __future__ import annotations

import pytest

from rke2_mirror_testkit import cosign as cs
from rke2_mirror_testkit.images import ImagePusher, list_tags, push_image, read_manifest
from rke2_mirror_testkit.referrers_front import start_referrers_front

from tests.test_mirror import assert_complete, report, run_cli, write_list

REPO = "rancher/signed"
REF = f"docker.io/{REPO}:v1"


def _subject(img) -> dict:
    return {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest)}


def _writes(log: list[str]) -> list[str]:
    return [l for l in log if '"PUT ' in l or '"POST ' in l or '"PATCH ' in l or '"DELETE ' in l]


def _sign_everything(url: str, key, *, seed: str = "signed") -> dict:
    """A multi-arch image with a cosign .sig tag, an OCI 1.1 signature referrer, an SBOM referrer
    (cosign's attach-sbom shape: no artifactType, the config's media type says it), an in-toto
    attestation referrer, and a signature of that attestation (a referrer of a referrer)."""
    with ImagePusher(url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed=seed)
        ident = f"docker.io/{REPO}"  # what the signer named; the mirror's name differs, the digest doesn't
        out = {"image": img, "identity": ident,
               "tag_sig": cs.sign_tag_form(p, REPO, img.digest, key[0], identity=ident),
               "ref_sig": cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity=ident),
               "sbom": cs.attach_sbom_referrer(p, REPO, _subject(img)),
               "att": cs.attest_referrer(p, REPO, _subject(img), key[0], identity=ident)}
        out["att_sig"] = cs.sign_referrer_of(p, REPO, out["att"], key[0], identity=ident)
    return out


def _mirror(src_url: str, dst_url: str, lst, *extra: str):
    return run_cli("mirror", "--images", str(lst), "--to", dst_url, "--source-endpoint", f"docker.io={src_url}",
                   "--json", *extra)


def _verify_both(url: str, repo: str, digest: str, key, identity) -> None:
    for form in ("tag", "referrer"):
        got = cs.verify(url, repo, digest, key[1], form=form, identity=identity)
        assert got["image_digest"] == digest


@pytest.fixture
def key():
    return cs.new_key()


def test_every_form_reaches_a_registry_without_the_api_and_verifies_there(registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    s = _sign_everything(src.url, key)
    img = s["image"]
    lst = write_list(tmp_path / "images.txt", [REF])
    proc = _mirror(src.url, dst.url, lst)
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    got = {r["digest"]: r for r in res["referrers"]}
    assert set(got) == {s["tag_sig"], s["ref_sig"], s["sbom"], s["att"], s["att_sig"]}
    assert got[s["tag_sig"]]["tag"] == img.digest.replace(":", "-") + ".sig"
    assert got[s["sbom"]]["kind"] == "sbom" and got[s["att"]]["kind"] == "attestation"
    assert got[s["att_sig"]]["subject"] == s["att"] and got[s["ref_sig"]]["kind"] == "signature"
    assert all(r["status"] == "copied" for r in got.values())
    # digests equal, and the signatures verify at the mirror as `cosign verify --key` would
    assert assert_complete(dst.url, REPO, "v1") == img.digest
    _verify_both(dst.url, REPO, img.digest, key, s["identity"])
    cs.verify(dst.url, REPO, s["att"], key[1], form="referrer", identity=s["identity"])
    # without the API the target got the tag schema: sha256-<hex> indexes listing the referrers
    tags = list_tags(dst.url, REPO)
    assert cs.referrers_tag(img.digest) in tags and cs.referrers_tag(s["att"]) in tags
    listed, via = cs.find_referrers(ImagePusher(dst.url), REPO, img.digest)
    assert via == "tag-schema" and {d["digest"] for d in listed} == {s["ref_sig"], s["sbom"], s["att"]}
    # a rerun writes nothing
    before = len(dst.access_log())
    proc = _mirror(src.url, dst.url, lst)
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert res["status"] == "skipped" and all(r["status"] == "present" for r in res["referrers"])
    assert _writes(dst.access_log()[before:]) == []


def test_referrer_type_filters_and_no_referrers_carries_none(registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    s = _sign_everything(src.url, key)
    lst = write_list(tmp_path / "images.txt", [REF])
    proc = _mirror(src.url, dst.url + "/sbom", lst, "--referrer-type", "sbom")
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert [r["digest"] for r in res["referrers"]] == [s["sbom"]]
    proc = _mirror(src.url, dst.url + "/sigs", lst, "--signatures")
    (res,) = report(proc)["images"]
    assert {r["digest"] for r in res["referrers"]} == {s["tag_sig"], s["ref_sig"]}  # not the attestation's
    _verify_both(dst.url, "sigs/" + REPO, s["image"].digest, key, s["identity"])
    proc = _mirror(src.url, dst.url + "/none", lst, "--no-referrers")
    (res,) = report(proc)["images"]
    assert "referrers" not in res and list_tags(dst.url, "none/" + REPO) == ["v1"]
    proc = _mirror(src.url, dst.url, lst, "--referrer-type", "not a type")
    assert proc.returncode == 2 and "--referrer-type" in proc.stderr and "Traceback" not in proc.stderr


def test_a_target_with_the_referrers_api_indexes_them_itself(registry_factory, key, tmp_path):
    src, up = registry_factory(name="src"), registry_factory(name="dst")
    s = _sign_everything(src.url, key)
    lst = write_list(tmp_path / "images.txt", [REF])
    with start_referrers_front(up.url) as front:
        proc = _mirror(src.url, front.url, lst)
        assert proc.returncode == 0, proc.stderr
        img = s["image"]
        assert {d["digest"] for d in front.referrers(REPO, img.digest)} == {s["ref_sig"], s["sbom"], s["att"]}
        assert {d["digest"] for d in front.referrers(REPO, s["att"])} == {s["att_sig"]}
        # the registry said so (OCI-Subject): no tag schema index was written
        assert not [t for t in list_tags(up.url, REPO) if t == cs.referrers_tag(img.digest)]
        _verify_both(front.url, REPO, img.digest, key, s["identity"])
        before = len(front.requests)
        proc = _mirror(src.url, front.url, lst)
        assert proc.returncode == 0, proc.stderr
        assert not [r for r in front.requests[before:] if r[0] in ("PUT", "POST", "PATCH")]


def test_a_source_with_the_referrers_api_gives_untagged_referrers(registry_factory, key, tmp_path):
    up, dst = registry_factory(name="src"), registry_factory(name="dst")
    with start_referrers_front(up.url) as front:
        with ImagePusher(front.url) as p:
            img = push_image(p, REPO, "v1", kind="oci", seed="api")
            sig = cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity="x/y", fallback_tag=False)
            sbom = cs.attach_sbom_referrer(p, REPO, _subject(img), style="oras", fallback_tag=False)
        assert not [t for t in list_tags(up.url, REPO) if t.startswith("sha256-")]  # no tag at all
        lst = write_list(tmp_path / "images.txt", [REF])
        proc = _mirror(front.url, dst.url, lst)
        assert proc.returncode == 0, proc.stderr
        (res,) = report(proc)["images"]
        assert {r["digest"] for r in res["referrers"]} == {sig, sbom}
        assert any(path.startswith(f"/v2/{REPO}/referrers/") for _, path in front.requests)
    cs.verify(dst.url, REPO, img.digest, key[1], form="referrer", identity="x/y")


def test_a_new_signature_of_an_image_in_place_is_carried(registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed="later")
    lst = write_list(tmp_path / "images.txt", [REF])
    assert _mirror(src.url, dst.url, lst).returncode == 0
    with ImagePusher(src.url) as p:
        sig = cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity="x/y")
    proc = _mirror(src.url, dst.url, lst)
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert res["status"] == "skipped" and [(r["digest"], r["status"]) for r in res["referrers"]] == [(sig, "copied")]
    cs.verify(dst.url, REPO, img.digest, key[1], form="referrer", identity="x/y")


def test_save_inspect_load_keeps_them(registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    s = _sign_everything(src.url, key)
    lst = write_list(tmp_path / "images.txt", [REF])
    out = tmp_path / "a.tar"
    proc = run_cli("save", "--images", str(lst), "-o", str(out), "--source-endpoint", f"docker.io={src.url}")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    import json
    doc = json.loads(proc.stdout)
    (row,) = doc["images"]  # the referrer entries are not images of their own
    assert {r["digest"] for r in row["referrers"]} == {s["tag_sig"], s["ref_sig"], s["sbom"], s["att"], s["att_sig"]}
    assert not doc["problems"]
    text = run_cli("inspect", str(out)).stdout
    assert "referrer" in text and "sbom" in text
    proc = run_cli("load", str(out), "--to", dst.url, "--json")
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert len(res["referrers"]) == 5
    assert assert_complete(dst.url, REPO, "v1") == s["image"].digest
    _verify_both(dst.url, REPO, s["image"].digest, key, s["identity"])
    mt, raw, digest = read_manifest(dst.url, REPO, s["sbom"])
    assert digest == s["sbom"]
    before = len(dst.access_log())
    assert run_cli("load", str(out), "--to", dst.url).returncode == 0
    assert _writes(dst.access_log()[before:]) == []


def test_list_check_reports_what_signs_each_image(registry_factory, key):
    import rke2_mirror.jobs.common as common
    from rke2_mirror.endpoints.routing import parse_source_endpoints
    from rke2_mirror.model.reference import ImageRef

    src = registry_factory(name="src")
    s = _sign_everything(src.url, key)
    opts = common.SourceOptions(endpoints=parse_source_endpoints([f"docker.io={src.url}"]))
    (c,) = common.check_sources([ImageRef.parse(REF)], opts)
    assert c.digest == s["image"].digest and c.referrers == {"signature": 2, "sbom": 1, "attestation": 1}
    before = len(src.access_log())
    (c,) = common.check_sources([ImageRef.parse(REF)], opts, referrers=False)
    assert c.referrers is None
    assert not [l for l in src.access_log()[before:] if '"GET ' in l and "/manifests/" in l]  # HEADs only
