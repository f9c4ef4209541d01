import pytest

from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef, RegistryURL, merge_refs, parse_image_lines, target_ref


@pytest.mark.parametrize("text,registry,repo,tag,digest", [
    ("nginx", "docker.io", "library/nginx", "latest", None),
    ("rancher/hardened-etcd:v3.5.9-k3s1", "docker.io", "rancher/hardened-etcd", "v3.5.9-k3s1", None),
    ("docker.io/rancher/x:v1", "docker.io", "rancher/x", "v1", None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None),
    ("localhost:5000/a/b", "localhost:5000", "a/b", "latest", None),
    ("localhost/a", "localhost", "a", "latest", None),
    ("127.0.0.1:5000/x/y:z", "127.0.0.1:5000", "x/y", "z", None),
    ("quay.io/a/b@sha256:" + "a" * 64, "quay.io", "a/b", None, "sha256:" + "a" * 64),
    ("a/b:t@sha256:" + "b" * 64, "docker.io", "a/b", "t", "sha256:" + "b" * 64),
])
def test_parse(text, registry, repo, tag, digest):
    r = ImageRef.parse(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert ImageRef.parse(str(r)) == r


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a b", "x@sha256:zz", "a/b:", "a//b", "-a/b", "a/b:t:t"])
def test_parse_rejects(bad):
    with pytest.raises(InputError):
        ImageRef.parse(bad)


def test_reference_prefers_digest():
    assert ImageRef.parse("a/b:t@sha256:" + "c" * 64).reference == "sha256:" + "c" * 64
    assert ImageRef.parse("a/b:t").reference == "t"


@pytest.mark.parametrize("text,scheme,host,prefix", [
    ("harbor.example.com", "https", "harbor.example.com", ""),
    ("http://127.0.0.1:5000", "http", "127.0.0.1:5000", ""),
    ("https://Harbor.Example.com:8443/mirror/rke2/", "https", "harbor.example.com:8443", "mirror/rke2"),
])
def test_registry_url(text, scheme, host, prefix):
    u = RegistryURL.parse(text)
    assert (u.scheme, u.host, u.prefix) == (scheme, host, prefix)


@pytest.mark.parametrize("bad", ["ftp://x", "https://user:pw@x", "https://x?y=1", "", "https://x:notaport", "https://x/UP"])
def test_registry_url_rejects(bad):
    with pytest.raises(InputError):
        RegistryURL.parse(bad)


def test_registry_url_error_does_not_echo_credentials_in_a_hint():
    with pytest.raises(InputError) as e:
        RegistryURL.parse("https://user:pw@x")
    assert "RKE2_MIRROR_USERNAME" in str(e.value)


def test_target_mapping():
    t = RegistryURL.parse("https://harbor.example:8443/pre")
    src = ImageRef.parse("rancher/hardened-etcd:v3.5.9")
    assert str(target_ref(src, t)) == "harbor.example:8443/pre/rancher/hardened-etcd:v3.5.9"
    assert str(target_ref(ImageRef.parse("busybox"), RegistryURL.parse("h"))) == "h/library/busybox:latest"
    assert str(target_ref(ImageRef.parse("quay.io/a/b:1"), RegistryURL.parse("h"))) == "h/a/b:1"


def test_parse_image_lines():
    text = "# comment\n\nrancher/a:v1\n  rancher/a:v1  \ndocker.io/rancher/a:v1 # trailing\nrancher/b:v2\n"
    refs = parse_image_lines(text, "list.txt")
    assert [str(r) for r in refs] == ["docker.io/rancher/a:v1", "docker.io/rancher/b:v2"]


def test_parse_image_lines_names_file_and_line():
    with pytest.raises(InputError, match=r"list\.txt:3: invalid"):
        parse_image_lines("a:1\n\nNOT A REF\n", "list.txt")


def test_merge_refs_keeps_first_order():
    a, b, c = (ImageRef.parse(x) for x in ("a", "b", "c"))
    assert merge_refs([b, a], [a, c, b]) == [b, a, c]


@pytest.mark.parametrize("text", ["https://admin:Hunter2-Secret@harbor.example", "admin:Hunter2-Secret@harbor.example",
                                  "ftp://admin:Hunter2-Secret@harbor.example"])
def test_a_password_typed_into_a_url_is_never_echoed(text):
    with pytest.raises(InputError) as info:
        RegistryURL.parse(text, what="--to")
    assert "Hunter2" not in str(info.value) and "***@" in str(info.value)


def test_whitespace_inside_a_url_is_refused_not_dropped():
    with pytest.raises(InputError, match="whitespace"):
        RegistryURL.parse("https://harbor.exa\nmple", what="--to")
