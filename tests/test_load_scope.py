"""`load` of a delta archive never lets the archive choose where the operator's credentials mount from:
left-out blobs are mounted only from repositories in the same project, or in a project named with
`--mount-from`; and Harbor projects exist before the delta check asks the target anything."""

from __future__ import annotations

import pytest

from rke2_mirror_testkit.images import ImagePusher, list_tags, make_layer_blob, push_image, read_manifest

from .test_archive import blob_names, cli, error_lines


def _blob_in(url: str, repo: str, digest: str, **kw) -> bool:
    import httpx

    with httpx.Client(base_url=url, **kw) as c:
        return c.head(f"/v2/{repo}/blobs/{digest}").status_code == 200


@pytest.fixture
def delta_across_projects(registry_factory, tmp_path):
    """An archive of `rancher/app:v1` made against `private/secret:v1`: the shared base layer is left
    out, and the delta file says it lives in `private/secret` (another project)."""
    src = registry_factory(name="src")
    base = make_layer_blob("scope-base", 30000)
    with ImagePusher(src.url) as p:
        app = push_image(p, "rancher/app", "v1", base=base, seed="scope-app", platforms=None)
        secret = push_image(p, "private/secret", "v1", base=base, seed="scope-secret", platforms=None)
    ep = f"docker.io={src.url}"
    old_list, new_list = tmp_path / "old.txt", tmp_path / "new.txt"
    old_list.write_text("private/secret:v1\n")
    new_list.write_text("rancher/app:v1\n")
    old_tar, delta = tmp_path / "old.tar", tmp_path / "delta.tar"
    assert cli("save", "-i", old_list, "-o", old_tar, "--source-endpoint", ep)[0] == 0
    code, _, err = cli("save", "-i", new_list, "--since", old_list, "-o", delta, "--source-endpoint", ep)
    assert code == 0, err
    assert base.digest.split(":")[1] not in blob_names(delta)  # really left out
    return app, secret, base, old_tar, delta


def test_a_delta_does_not_mount_across_projects_unless_named(delta_across_projects, registry_factory):
    app, secret, base, old_tar, delta = delta_across_projects
    dst = registry_factory(name="dst")
    assert cli("load", old_tar, "--to", dst.url)[0] == 0
    assert _blob_in(dst.url, "private/secret", base.digest)

    code, _, err = cli("load", delta, "--to", dst.url)
    assert code == 2, err
    (line,) = error_lines(err)
    assert base.digest in line and "private/secret" in line and "--mount-from private" in line
    assert not _blob_in(dst.url, "rancher/app", base.digest)  # nothing mounted behind the operator's back
    assert list_tags(dst.url, "rancher/app") == []

    code, _, err = cli("load", delta, "--to", dst.url, "--mount-from", "private")
    assert code == 0, err
    assert read_manifest(dst.url, "rancher/app", "v1")[2] == app.digest
    assert _blob_in(dst.url, "rancher/app", base.digest)


def test_harbor_projects_are_created_before_the_delta_check(delta_across_projects, harbor, pki, rke2_mirror_env):
    """The delta's images go into a project that does not exist yet: the run creates it, then checks
    (and mounts) the left-out blobs, instead of failing on a bare 401 from the missing project."""
    app, secret, base, old_tar, delta = delta_across_projects
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    tls = ["--ca-file", pki.cert_path]
    code, _, err = cli("load", old_tar, "--to", harbor.url, *tls)
    assert code == 0, err
    assert "rancher" not in harbor.projects
    code, _, err = cli("load", delta, "--to", harbor.url, *tls, "--mount-from", "private")
    assert code == 0, err
    assert "rancher" in harbor.projects
    got = read_manifest(harbor.url, "rancher/app", "v1", auth=("admin", "Harbor12345"), verify=harbor.ca_file)
    assert got[2] == app.digest
