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
    assert "5 signatures/attestations/SBOMs copied" in proc.stderr
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


def test_a_target_with_the_api_but_without_the_oci_subject_header_gets_no_tag_schema(registry_factory, key,
                                                                                      tmp_path):
    """Registries built on spec 1.1 release candidates serve the API but never say `OCI-Subject`: their own
    referrers list (asked once per pushed referrer) shows the push was indexed, so no tag schema index."""
    src, up = registry_factory(name="src"), registry_factory(name="dst")
    s = _sign_everything(src.url, key)
    lst = write_list(tmp_path / "images.txt", [REF])
    with start_referrers_front(up.url, subject_header=False) as front:
        proc = _mirror(src.url, front.url, lst)
        assert proc.returncode == 0, proc.stderr
        assert {d["digest"] for d in front.referrers(REPO, s["image"].digest)} == {s["ref_sig"], s["sbom"], s["att"]}
        assert not [t for t in list_tags(up.url, REPO) if t.startswith("sha256-") and "." not in t]
        _verify_both(front.url, REPO, s["image"].digest, key, s["identity"])


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


# --------------------------------------------------------------------------- hostile answers
# What a real registry won't produce: answers made with httpx.MockTransport, or a source in memory.

import json as _json  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from rke2_mirror.endpoints.registry import Registry  # noqa: E402
from rke2_mirror.engine.walk import GraphLimit, walk, walk_referrers  # noqa: E402
from rke2_mirror.model.errors import MirrorError, UnsupportedManifest  # noqa: E402
from rke2_mirror.model.oci import OCI_INDEX, OCI_MANIFEST, parse_manifest, sha256_digest  # noqa: E402
from rke2_mirror.model.referrers import MAX_REFERRER_DEPTH, ReferrerFilter  # noqa: E402

D = "sha256:" + "a" * 64


def _index(entries: list[dict]) -> bytes:
    return _json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def _registry(handler) -> Registry:
    return Registry("http://reg.test", transport=httpx.MockTransport(handler))


def test_a_referrers_answer_linking_to_another_host_is_refused():
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        return httpx.Response(200, content=_index([]), headers={
            "content-type": OCI_INDEX, "link": '<http://evil.test/v2/a/referrers/x>; rel="next"'})
    with _registry(handler) as reg, pytest.raises(MirrorError, match="links to another host"):
        reg.referrers("a", D)
    assert all(u.startswith("http://reg.test/") for u in seen)


def test_too_many_referrers_or_endless_pages_are_bounded():
    many = _index([{"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 1} for i in range(1001)])
    with _registry(lambda req: httpx.Response(200, content=many, headers={"content-type": OCI_INDEX})) as reg:
        with pytest.raises(UnsupportedManifest, match="more than 1000 referrers"):
            reg.referrers("a", D)
    calls = []

    def endless(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.path)
        if "/tags/list" in req.url.path:
            return httpx.Response(200, json={"tags": ["x"] * 10}, headers={"link": '</v2/a/tags/list?last=x>; rel="next"'})
        if req.method == "HEAD":
            return httpx.Response(404)
        return httpx.Response(404, json={"errors": []})
    with _registry(endless) as reg:
        assert reg.tagged_artifacts("a", D) == []  # the list is not read to its (missing) end: HEADs instead
    assert sum(1 for c in calls if "/tags/list" in c) <= 101 and len(calls) <= 110


class _MemSource:
    """Manifests in memory; `refs[subject]` lists the referrers the source claims."""

    def __init__(self):
        self.manifests: dict[str, bytes] = {}
        self.refs: dict[str, list[dict]] = {}
        self.asked = 0

    def put(self, doc: dict) -> dict:
        raw = _json.dumps(doc).encode()
        d = sha256_digest(raw)
        self.manifests[d] = raw
        return {"mediaType": OCI_MANIFEST, "digest": d, "size": len(raw), "artifactType": "application/x-test"}

    def get_manifest(self, repo, ref):
        from rke2_mirror.model.oci import Descriptor
        raw = self.manifests[ref]
        return Descriptor(OCI_MANIFEST, ref, len(raw)), raw

    def referrers(self, repo, subject, filt=None):
        from rke2_mirror.model.oci import Descriptor
        self.asked += 1
        return [Descriptor.from_json(e) for e in self.refs.get(subject, [])]


def _artifact(subject: str, n: int) -> dict:
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2}
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-test", "config": empty,
            "layers": [{"mediaType": "application/x-test", "digest": sha256_digest(str(n).encode()), "size": len(str(n))}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1}}


def _root(src: _MemSource):
    raw = _json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 1}, "layers": []}).encode()
    return walk(src, "r", parse_manifest(OCI_MANIFEST, raw))


def test_a_chain_of_referrers_stops_at_the_depth_limit_and_a_cycle_ends():
    src = _MemSource()
    g = _root(src)
    subject = g.root.digest
    for i in range(20):  # each referrer has a referrer of its own: 20 deep
        d = src.put(_artifact(subject, i))
        src.refs[subject] = [d]
        subject = d["digest"]
    walk_referrers(src, "r", g, ReferrerFilter())
    assert len(g.referrers) == MAX_REFERRER_DEPTH and src.asked == MAX_REFERRER_DEPTH
    # a referrer listed as a referrer of its own referrer (a cycle) is walked once
    src2 = _MemSource()
    g2 = _root(src2)
    a = src2.put(_artifact(g2.root.digest, 1))
    src2.refs[g2.root.digest] = [a]
    src2.refs[a["digest"]] = [a]
    walk_referrers(src2, "r", g2, ReferrerFilter())
    assert [e.descriptor.digest for e in g2.referrers] == [a["digest"]]


def test_a_referrer_that_names_another_subject_or_too_many_blobs_is_refused():
    src = _MemSource()
    g = _root(src)
    other = src.put(_artifact("sha256:" + "b" * 64, 1))
    src.refs[g.root.digest] = [other]
    with pytest.raises(UnsupportedManifest, match="does not name it as its subject"):
        walk_referrers(src, "r", g, ReferrerFilter())
    src = _MemSource()
    g = _root(src)
    src.refs[g.root.digest] = [src.put(_artifact(g.root.digest, i)) for i in range(40)]
    with pytest.raises(GraphLimit):
        walk_referrers(src, "r", g, ReferrerFilter(), max_descriptors=50)


def test_dry_run_lists_them_and_a_delta_carries_a_new_signature_of_an_old_image(registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed="delta")
    lst = write_list(tmp_path / "images.txt", [REF])
    save = ("save", "--images", str(lst), "--source-endpoint", f"docker.io={src.url}")
    old, new = tmp_path / "old.tar", tmp_path / "new.tar"
    assert run_cli(*save, "-o", str(old)).returncode == 0
    with ImagePusher(src.url) as p:
        sig = cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity="x/y")
    proc = _mirror(src.url, dst.url, lst, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert res["status"] == "would-copy" and [(r["digest"], r["status"]) for r in res["referrers"]] == [(sig, "would-copy")]
    assert _writes(dst.access_log()) == []
    proc = run_cli(*save, "-o", str(new), "--since", str(old))
    assert proc.returncode == 0, proc.stderr
    for f in (old, new):
        proc = run_cli("load", str(f), "--to", dst.url, "--json")
        assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert res["status"] == "skipped" and [(r["digest"], r["status"]) for r in res["referrers"]] == [(sig, "copied")]
    cs.verify(dst.url, REPO, img.digest, key[1], form="referrer", identity="x/y")


def test_with_platform_the_kept_manifests_keep_their_referrers_and_the_rebuilt_index_has_none(
        registry_factory, key, tmp_path):
    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, REPO, "v1", kind="oci", seed="plat")
        amd64 = dict(img.children)["linux/amd64"]
        arm64 = dict(img.children)["linux/arm64"]
        cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity="x/y")  # the original index's
        on_amd64 = cs.sign_referrer_of(p, REPO, amd64, key[0], identity="x/y")
        cs.sign_referrer_of(p, REPO, arm64, key[0], identity="x/y")
    lst = write_list(tmp_path / "images.txt", [REF])
    proc = _mirror(src.url, dst.url, lst, "--platform", "linux/amd64")
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert [r["digest"] for r in res["referrers"]] == [on_amd64]
    cs.verify(dst.url, REPO, amd64, key[1], form="referrer", identity="x/y")


def test_the_tag_schema_index_is_merged_and_a_lost_update_is_repaired_by_the_next_run(registry_factory, key,
                                                                                      tmp_path):
    """Two runs adding referrers to one subject at a registry without the API: each merges (never
    replaces) the index; where the registry ignores If-Match and the other run's write lands between
    our read and write, the next run finds its referrer missing from the index and adds it again."""
    a, b, dst = registry_factory(name="a"), registry_factory(name="b"), registry_factory(name="dst")
    sigs = {}
    for reg in (a, b):
        with ImagePusher(reg.url) as p:
            img = push_image(p, REPO, "v1", kind="oci", seed="same")  # the same image at both sources
            sigs[reg.url] = cs.sign_referrer_form(p, REPO, _subject(img), key[0], identity=reg.url)
    lst = write_list(tmp_path / "images.txt", [REF])
    for reg in (a, b):
        assert _mirror(reg.url, dst.url, lst).returncode == 0
    listed, _ = cs.find_referrers(ImagePusher(dst.url), REPO, img.digest)
    assert {d["digest"] for d in listed} == set(sigs.values())  # merged, not replaced
    # b's run overwrote the index with only its own (a lost update), as a racing writer could
    from rke2_mirror_testkit.images import push_manifest
    only_b = [d for d in listed if d["digest"] == sigs[b.url]]
    with ImagePusher(dst.url) as p:
        push_manifest(p, REPO, cs.referrers_tag(img.digest), _index(only_b), OCI_INDEX)
    proc = _mirror(a.url, dst.url, lst)
    assert proc.returncode == 0, proc.stderr
    (res,) = report(proc)["images"]
    assert [(r["digest"], r["status"]) for r in res["referrers"]] == [(sigs[a.url], "copied")]
    listed, _ = cs.find_referrers(ImagePusher(dst.url), REPO, img.digest)
    assert {d["digest"] for d in listed} == set(sigs.values())


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                            max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["manifests", "mediaType", "schemaVersion", "x"]), _json_values, max_size=4),
       raw=st.binary(max_size=200))
def test_hostile_referrers_documents_fail_as_mirror_errors_only(doc, raw):
    from rke2_mirror.model.oci import Descriptor
    from rke2_mirror.model.referrers import merged_index, parse_referrers_index, referrer_descriptor
    add = Descriptor(OCI_MANIFEST, D, 1)
    for data in (_json.dumps(doc).encode(), raw):
        for call in (lambda: parse_referrers_index(data, "x"), lambda: merged_index(data, add, "x"),
                     lambda: referrer_descriptor(OCI_MANIFEST, data, D)):
            try:
                call()
            except MirrorError:
                pass


def test_the_referrers_api_is_probed_once_per_registry_however_many_threads_ask():
    import threading

    probes: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if "/referrers/" in req.url.path:
            probes.append(req.url.path)
            time.sleep(0.05)  # every thread is waiting by now
            return httpx.Response(404, text="404 page not found\n")
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
    with _registry(handler) as reg:
        threads = [threading.Thread(target=reg.referrers, args=(f"r{i}", D)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(probes) == 1
