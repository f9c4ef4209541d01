"""registries.yaml / config.yaml writing (golden files) and the node-side resolution model.

Golden files live in tests/golden/registries/; regenerate with `UPDATE_GOLDEN=1 pytest tests/test_rke2config.py`
and review the diff.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.model.errors import InputError
from rke2_mirror.model.reference import ImageRef, RegistryURL
from rke2_mirror.node.registries import Registries
from rke2_mirror.node.resolver import Endpoint, apply_rewrites, node_image, puller_for, resolve_endpoints
from rke2_mirror.node.versions import (DEFAULT_ENDPOINT_TLS_FIX, HOSTS_TOML, RUNTIME_HTTP_TOKEN_FIX, WILDCARD_MIRRORS,
                                       RKE2Version, honours_default_endpoint_tls, version_from_images)
from rke2_mirror.node.writer import (NodeConfig, build_registries, dump_registries, render_registries_yaml,
                                     set_system_default_registry, system_default_registry_of)

GOLDEN = Path(__file__).parent / "golden" / "registries"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

RELEASE_IMAGES = [ImageRef.parse(s) for s in (
    "docker.io/rancher/rke2-runtime:v1.28.9-rke2r1",
    "docker.io/rancher/hardened-etcd:v3.5.9-k3s1-build20240418",
    "docker.io/rancher/mirrored-pause:3.6",
)]
EXTRA_IMAGES = RELEASE_IMAGES + [ImageRef.parse(s) for s in (
    "quay.io/cilium/cilium:v1.15.4",
    "registry.k8s.io/pause:3.9",
    "docker.io/library/busybox:1.36",
)]


def v(text: str) -> RKE2Version:
    return RKE2Version.parse(text)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not UPDATE:
            pytest.fail(f"golden file {path} was missing and has been written: review it and run again")
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 regenerates)"


def render(target: str, images=RELEASE_IMAGES, existing=None, **kw) -> tuple[str, list[str], dict]:
    cfg = NodeConfig.for_images(RegistryURL.parse(target), images, **kw)
    doc, warnings = build_registries(cfg, existing)
    text = dump_registries(doc, cfg)
    assert yaml.safe_load(text) == doc  # the text is exactly the document
    Registries.from_dict(doc)  # and valid for RKE2's parser model
    return text, warnings, doc


# -- golden files: one per combination ---------------------------------------------------------------
def test_golden_https_ca_file():
    text, warnings, doc = render("https://harbor.example", node_ca_file="/etc/rancher/rke2/harbor-ca.pem")
    golden("https-ca-file.yaml", text)
    assert doc["mirrors"]["harbor.example"]["endpoint"] == ["https://harbor.example"]
    assert doc["configs"]["harbor.example"] == {"tls": {"ca_file": "/etc/rancher/rke2/harbor-ca.pem"}}
    assert warnings == []


def test_golden_https_insecure_skip_verify_is_the_seed_experiment_2():
    text, _, doc = render("harbor.example", insecure_skip_verify=True)
    golden("https-insecure.yaml", text)
    assert doc["configs"] == {"harbor.example": {"tls": {"insecure_skip_verify": True}}}


def test_golden_https_port_kept():
    text, _, doc = render("https://harbor.example:8443", node_ca_file="/etc/ssl/ca.pem")
    golden("https-port.yaml", text)
    assert set(doc["mirrors"]) == {"docker.io", "harbor.example:8443"}
    assert doc["mirrors"]["docker.io"]["endpoint"] == ["https://harbor.example:8443"]
    assert list(doc["configs"]) == ["harbor.example:8443"]


def test_golden_http_sdr_unknown_version_warns():
    text, warnings, doc = render("http://harbor.example:5000")
    golden("http-sdr-unknown-version.yaml", text)
    assert doc["mirrors"]["harbor.example:5000"] == {"endpoint": ["http://harbor.example:5000"]}
    assert "configs" not in doc
    assert len(warnings) == 1 and "https" in warnings[0] and "robust" in warnings[0] and "#4308" in warnings[0]


def test_golden_http_sdr_fixed_version_no_warning():
    text, warnings, _ = render("http://harbor.example:5000", rke2_version=v("v1.27.3+rke2r1"))
    golden("http-sdr-v1.27.3.yaml", text)
    assert warnings == []


@pytest.mark.parametrize("version", ["v1.22.8+rke2r1", "v1.23.17+rke2r1", "v1.24.14+rke2r1", "v1.25.10+rke2r1",
                                     "v1.26.5+rke2r1", "v1.27.2+rke2r1"])
def test_http_sdr_refused_before_the_4308_fix(version):
    with pytest.raises(InputError) as e:
        render("http://harbor.example", rke2_version=v(version))
    msg = str(e.value)
    assert "rancher/rke2#4308" in msg and "--node-ca-file" in msg and "--no-system-default-registry" in msg
    assert "insecure-skip-verify" in msg
    if version == "v1.22.8+rke2r1":
        golden("http-sdr-refused-v1.22.8.yaml", yaml.safe_dump({"refused": msg}, width=4096))


def test_golden_http_without_sdr_allowed_on_old_version():
    text, warnings, doc = render("http://harbor.example", rke2_version=v("v1.22.8+rke2r1"),
                                 system_default_registry=False)
    golden("http-no-sdr-v1.22.8.yaml", text)
    assert doc["mirrors"]["harbor.example"]["endpoint"] == ["http://harbor.example"]
    assert warnings == []


def test_golden_prefix_rewrite():
    text, warnings, doc = render("https://harbor.example/mirror", node_ca_file="/etc/ssl/ca.pem")
    golden("prefix-rewrite.yaml", text)
    rw = {"^rancher/(.*)$": "mirror/rancher/$1"}
    assert doc["mirrors"]["docker.io"] == {"endpoint": ["https://harbor.example:443"], "rewrite": rw}
    # the registry's own entry must not equal its default endpoint, or rewrites are dropped (rke2#6889)
    assert doc["mirrors"]["harbor.example"] == {"endpoint": ["https://harbor.example:443"], "rewrite": rw}
    assert set(doc["configs"]) == {"harbor.example:443", "harbor.example"}
    assert any("#9404" in w and "rewrite rules" in w for w in warnings)  # unknown version: no path in SDR


def test_prefix_rewrite_applies_only_to_namespaces_with_images():
    repo, _ = apply_rewrites("rancher/x", [("^rancher/(.*)$", "mirror/rancher/$1")])
    assert repo == "mirror/rancher/x"
    assert apply_rewrites("mirror/rancher/x", [("^rancher/(.*)$", "mirror/rancher/$1")])[0] == "mirror/rancher/x"
    assert apply_rewrites("library/busybox", [("^rancher/(.*)$", "mirror/rancher/$1")])[0] == "library/busybox"


def test_golden_prefix_port_sdr_warns_unknown_version_and_refuses_on_hosts_toml_releases():
    text, warnings, _ = render("https://harbor.example:8443/mirror", node_ca_file="/etc/ssl/ca.pem")
    golden("prefix-port-sdr-unknown-version.yaml", text)
    assert any("rancher/rke2#6889" in w for w in warnings)
    with pytest.raises(InputError, match="rke2#6889"):
        render("https://harbor.example:8443/mirror", node_ca_file="/etc/ssl/ca.pem", rke2_version=v("v1.28.9+rke2r1"))
    _, warnings_old, _ = render("https://harbor.example:8443/mirror", node_ca_file="/etc/ssl/ca.pem",
                                rke2_version=v("v1.25.16+rke2r1"))
    assert not any("rke2#6889" in w for w in warnings_old)


def test_golden_prefix_no_sdr():
    text, warnings, doc = render("https://harbor.example:8443/mirror", images=EXTRA_IMAGES,
                                 node_ca_file="/etc/ssl/ca.pem", system_default_registry=False)
    golden("prefix-no-sdr-extra-registries.yaml", text)
    assert doc["mirrors"]["docker.io"]["rewrite"] == {"^library/(.*)$": "mirror/library/$1",
                                                      "^rancher/(.*)$": "mirror/rancher/$1"}
    assert doc["mirrors"]["quay.io"]["rewrite"] == {"^cilium/(.*)$": "mirror/cilium/$1"}
    assert doc["mirrors"]["registry.k8s.io"]["rewrite"] == {"^pause$": "mirror/pause"}
    assert warnings == []


def test_golden_extra_source_registries():
    text, _, doc = render("https://harbor.example", images=EXTRA_IMAGES, node_ca_file="/etc/ssl/ca.pem")
    golden("extra-source-registries.yaml", text)
    assert list(doc["mirrors"]) == ["docker.io", "quay.io", "registry.k8s.io", "harbor.example"]
    assert all(m == {"endpoint": ["https://harbor.example"]} for m in doc["mirrors"].values())


def test_golden_auth():
    text, _, doc = render("https://harbor.example", node_ca_file="/etc/ssl/ca.pem",
                          auth=Credentials("robot$rke2", "s3cr3t: yes"))
    golden("auth.yaml", text)
    assert doc["configs"]["harbor.example"]["auth"] == {"username": "robot$rke2", "password": "s3cr3t: yes"}


def test_golden_identity_token():
    text, _, doc = render("https://harbor.example", auth=Credentials("", "", "tok3n"))
    golden("auth-identity-token.yaml", text)
    assert doc["configs"]["harbor.example"] == {"auth": {"identity_token": "tok3n"}}


def test_golden_tls_default_endpoint_window_gets_explicit_port():
    text, warnings, doc = render("https://harbor.example", node_ca_file="/etc/ssl/ca.pem",
                                 rke2_version=v("v1.28.8+rke2r1"))
    golden("https-ca-file-v1.28.8.yaml", text)
    assert doc["mirrors"]["harbor.example"]["endpoint"] == ["https://harbor.example:443"]
    assert "harbor.example:443" in doc["configs"]
    assert any("explicit port" in w for w in warnings)


EXISTING = {
    "mirrors": {
        "docker.io": {"endpoint": ["https://old-mirror.example"]},
        "ghcr.io": {"endpoint": ["https://ghcr-cache.example"]},
    },
    "configs": {
        "ghcr-cache.example": {"auth": {"username": "u", "password": "p"}},
        "harbor.example": {"tls": {"cert_file": "/etc/c.pem", "key_file": "/etc/k.pem"}},
    },
}


def test_golden_merge():
    text, warnings, doc = render("https://harbor.example", existing=EXISTING, node_ca_file="/etc/ssl/ca.pem")
    golden("merge.yaml", text)
    assert doc["mirrors"]["ghcr.io"] == EXISTING["mirrors"]["ghcr.io"]
    assert doc["mirrors"]["docker.io"] == {"endpoint": ["https://harbor.example"]}
    assert doc["configs"]["ghcr-cache.example"] == EXISTING["configs"]["ghcr-cache.example"]
    assert doc["configs"]["harbor.example"] == {"tls": {"cert_file": "/etc/c.pem", "key_file": "/etc/k.pem",
                                                        "ca_file": "/etc/ssl/ca.pem"}}
    assert any("replaced mirrors.'docker.io'" in w for w in warnings)


def test_merge_keeps_existing_auth_when_not_given():
    existing = {"configs": {"harbor.example": {"auth": {"username": "u", "password": "p"}}}}
    _, _, doc = render("https://harbor.example", existing=existing, insecure_skip_verify=True)
    assert doc["configs"]["harbor.example"] == {"auth": {"username": "u", "password": "p"},
                                                "tls": {"insecure_skip_verify": True}}


def test_render_registries_yaml_signature():
    text, warnings = render_registries_yaml(RegistryURL.parse("https://harbor.example"), ["quay.io"],
                                            node_ca_file="/ca.pem")
    doc = yaml.safe_load(text)
    assert set(doc["mirrors"]) == {"docker.io", "quay.io", "harbor.example"}
    assert warnings == []


def test_ca_and_insecure_are_exclusive():
    with pytest.raises(InputError):
        render("https://harbor.example", node_ca_file="/ca.pem", insecure_skip_verify=True)


# -- config.yaml ---------------------------------------------------------------------------------------
def test_set_system_default_registry_keeps_other_keys_and_order():
    text = "token: abc\nsystem-default-registry: old.example\nnode-label:\n- a=b\ntls-san: [x, y]\n"
    out = set_system_default_registry(text, "harbor.example:5000")
    doc = yaml.safe_load(out)
    assert list(doc) == ["token", "system-default-registry", "node-label", "tls-san"]
    assert doc["system-default-registry"] == "harbor.example:5000"
    assert doc["node-label"] == ["a=b"] and doc["tls-san"] == ["x", "y"]
    assert system_default_registry_of(out) == "harbor.example:5000"


def test_set_system_default_registry_appends_and_removes():
    assert yaml.safe_load(set_system_default_registry("", "h:1")) == {"system-default-registry": "h:1"}
    out = set_system_default_registry("a: 1\n", "h")
    assert list(yaml.safe_load(out)) == ["a", "system-default-registry"]
    assert yaml.safe_load(set_system_default_registry(out, None)) == {"a": 1}
    with pytest.raises(InputError):
        set_system_default_registry("- a\n- b\n", "h")


# -- versions and gates --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expect", [
    ("v1.28.9+rke2r1", (1, 28, 9, "", 1)),
    ("v1.22.8-rke2r1", (1, 22, 8, "", 1)),
    ("1.27.3", (1, 27, 3, "", 0)),
    ("v1.27.3-rc2+rke2r1", (1, 27, 3, "rc2", 1)),
])
def test_version_parse(text, expect):
    r = v(text)
    assert (r.major, r.minor, r.patch, r.pre, r.rke2r) == expect


@pytest.mark.parametrize("bad", ["stable", "v1.28", "latest", "v1.28.x"])
def test_version_parse_rejects(bad):
    with pytest.raises(InputError):
        v(bad)


@pytest.mark.parametrize("version,fixed", [
    ("v1.22.8+rke2r1", False), ("v1.23.17+rke2r1", False), ("v1.24.14+rke2r1", False), ("v1.24.15+rke2r1", True),
    ("v1.25.10+rke2r1", False), ("v1.25.11+rke2r1", True), ("v1.26.6+rke2r1", True), ("v1.27.2+rke2r1", False),
    ("v1.27.3-rc2+rke2r1", True), ("v1.28.0+rke2r1", True), ("v1.31.1+rke2r1", True),
])
def test_runtime_token_gate(version, fixed):
    assert RUNTIME_HTTP_TOKEN_FIX.holds(v(version)) is fixed


@pytest.mark.parametrize("version,tls", [
    ("v1.22.8+rke2r1", True),    # legacy CRI registry config: by host, every endpoint (the seed's experiment 2)
    ("v1.26.12+rke2r1", True), ("v1.26.13+rke2r1", False), ("v1.26.15+rke2r1", False),
    ("v1.27.9+rke2r1", True), ("v1.27.12+rke2r1", False), ("v1.27.13+rke2r1", True),
    ("v1.28.8+rke2r1", False), ("v1.28.9+rke2r1", True), ("v1.29.3+rke2r1", False), ("v1.29.4+rke2r1", True),
    ("v1.30.0+rke2r1", True),
])
def test_default_endpoint_tls_gate(version, tls):
    assert honours_default_endpoint_tls(v(version)) is tls


def test_gate_descriptions():
    assert WILDCARD_MIRRORS.describe() == "v1.26.15 / v1.27.12 / v1.28.8 / v1.29.3"
    assert HOSTS_TOML.holds(v("v1.29.1+rke2r1")) and not HOSTS_TOML.holds(v("v1.28.5+rke2r1"))
    assert DEFAULT_ENDPOINT_TLS_FIX.describe() == "v1.27.13 / v1.28.9 / v1.29.4"


def test_version_from_runtime_tag():
    assert version_from_images(RELEASE_IMAGES) == v("v1.28.9+rke2r1")
    assert version_from_images([ImageRef.parse("rancher/rke2-runtime:v1.22.8-rke2r1-windows-amd64")]) == v("v1.22.8+rke2r1")
    assert version_from_images([ImageRef.parse("rancher/x:1")]) is None


# -- resolution ------------------------------------------------------------------------------------------
RUNTIME = ImageRef.parse("docker.io/rancher/rke2-runtime:v1.22.8-rke2r1")
ETCD = ImageRef.parse("docker.io/rancher/hardened-etcd:v3.5.9")


def test_node_image_applies_sdr_to_docker_io_only():
    assert str(node_image(ETCD, "harbor.example:5000")) == "harbor.example:5000/rancher/hardened-etcd:v3.5.9"
    q = ImageRef.parse("quay.io/cilium/cilium:v1")
    assert node_image(q, "harbor.example") == q
    assert node_image(ETCD, None) == ETCD
    assert puller_for(RUNTIME) == "rke2-runtime" and puller_for(ETCD) == "containerd"


def test_seed_experiment_1a_no_mirror_entry_means_default_https():
    regs = {"mirrors": {"docker.io": {"endpoint": ["http://harbor.example"]}}}
    for img in (RUNTIME, ETCD):
        attempts = resolve_endpoints(img, regs, "harbor.example", None)
        assert [a.endpoint.url for a in attempts] == ["https://harbor.example/v2"]
        assert attempts[0].default and attempts[0].mirror_key is None


def test_seed_experiment_1b_runtime_token_over_https_before_fix():
    regs = {"mirrors": {"harbor.example": {"endpoint": ["http://harbor.example"]}}}
    old = resolve_endpoints(RUNTIME, regs, "harbor.example", v("v1.22.8+rke2r1"))
    assert [(a.endpoint.url, a.token_over_https) for a in old] == [
        ("http://harbor.example/v2", True), ("https://harbor.example/v2", False)]
    new = resolve_endpoints(RUNTIME, regs, "harbor.example", v("v1.27.3+rke2r1"))
    assert not any(a.token_over_https for a in new)
    etcd = resolve_endpoints(ETCD, regs, "harbor.example", v("v1.22.8+rke2r1"))
    assert not any(a.token_over_https for a in etcd)  # containerd is not affected
    unknown = resolve_endpoints(RUNTIME, regs, "harbor.example", None)
    assert not unknown[0].token_over_https and any("#4308" in n for n in unknown[0].notes)


def test_configs_by_endpoint_host_and_ns():
    regs = Registries.from_dict({
        "mirrors": {"docker.io": {"endpoint": ["https://mirror.example:8443", "harbor.example"]}},
        "configs": {"mirror.example:8443": {"tls": {"ca_file": "/ca.pem"}, "auth": {"username": "u", "password": "p"}},
                    "docker.io": {"auth": {"username": "hub", "password": "x"}}},
    })
    a = resolve_endpoints(ETCD, regs, None, None)
    assert [x.endpoint.url for x in a] == ["https://mirror.example:8443/v2", "https://harbor.example/v2",
                                           "https://index.docker.io/v2"]
    assert a[0].tls.ca_file == "/ca.pem" and a[0].auth.username == "u" and a[0].ns == "docker.io"
    assert a[1].config_key is None and not a[1].endpoint.scheme_given
    assert any("without a scheme" in n for n in a[1].notes)
    assert a[2].default and a[2].auth.username == "hub" and a[2].ns is None


def test_wildcard_gated():
    regs = {"mirrors": {"*": {"endpoint": ["https://cache.example"]}}}
    assert resolve_endpoints(ETCD, regs, None, v("v1.28.7+rke2r1"))[0].default
    assert resolve_endpoints(ETCD, regs, None, v("v1.28.8+rke2r1"))[0].endpoint.host == "cache.example"
    unknown = resolve_endpoints(ETCD, regs, None, None)
    assert unknown[0].mirror_key == "*" and any('"*"' in n for n in unknown[0].notes)
    specific = {"mirrors": {"*": {"endpoint": ["https://cache.example"]},
                            "docker.io": {"endpoint": ["https://hub-mirror.example"]}}}
    assert resolve_endpoints(ETCD, specific, None, None)[0].endpoint.host == "hub-mirror.example"


def test_rewrites_on_mirror_endpoints_only_and_last_default_like_endpoint_merged():
    regs = {"mirrors": {"harbor.example:8443": {"endpoint": ["https://harbor.example:8443"],
                                                "rewrite": {"^rancher/(.*)$": "mirror/rancher/$1"}}},
            "configs": {"harbor.example:8443": {"tls": {"ca_file": "/ca.pem"}}}}
    new = resolve_endpoints(ETCD, regs, "harbor.example:8443", v("v1.28.9+rke2r1"))
    assert len(new) == 1 and new[0].default and new[0].repository == "rancher/hardened-etcd"
    assert new[0].tls.ca_file == "/ca.pem"
    window = resolve_endpoints(ETCD, regs, "harbor.example:8443", v("v1.28.8+rke2r1"))
    assert window[0].tls is None and any("5658" in n for n in window[0].notes)
    legacy = resolve_endpoints(ETCD, regs, "harbor.example:8443", v("v1.25.16+rke2r1"))
    assert [x.repository for x in legacy] == ["mirror/rancher/hardened-etcd", "rancher/hardened-etcd"]
    runtime = resolve_endpoints(ImageRef.parse("rancher/rke2-runtime:v1.28.9-rke2r1"), regs, "harbor.example:8443",
                                v("v1.28.9+rke2r1"))
    assert runtime[0].repository == "mirror/rancher/rke2-runtime" and not runtime[0].default  # wharfie: no merge


def test_explicit_443_keeps_the_mirror_endpoint():
    regs = {"mirrors": {"harbor.example": {"endpoint": ["https://harbor.example:443"],
                                           "rewrite": {"^rancher/(.*)$": "m/rancher/$1"}}}}
    a = resolve_endpoints(ETCD, regs, "harbor.example", v("v1.30.0+rke2r1"))
    assert [(x.endpoint.url, x.repository, x.default) for x in a] == [
        ("https://harbor.example:443/v2", "m/rancher/hardened-etcd", False),
        ("https://harbor.example/v2", "rancher/hardened-etcd", True)]


def test_go_rewrite_templates():
    assert apply_rewrites("rancher/x", [("^(rancher)/(.*)$", "${1}-mirror/$2")])[0] == "rancher-mirror/x"
    assert apply_rewrites("a/b", [("^a/(.*)$", "c/$1x")])[0] == "c/"  # Go: $1x is the group named "1x"
    assert apply_rewrites("a/b", [("^(?!z)a/(.*)$", "c/$1")]) == ("a/b", [
        "rewrite '^(?!z)a/(.*)$' ignored: RE2 (Go) has no look-around or back-references"])


def test_endpoint_parse():
    assert Endpoint.parse("https://h:5000/") == Endpoint("https", "h:5000")
    assert Endpoint.parse("http://h/v2/") == Endpoint("http", "h")
    assert Endpoint.parse("h").scheme == "https"
    assert Endpoint.parse("https://h/prefix/v2").path == "/prefix/v2"
    with pytest.raises(InputError):
        Endpoint.parse("ftp://h")


def test_registries_validation_errors():
    with pytest.raises(InputError):
        Registries.from_dict({"mirrors": {"docker.io": {"endpoint": "https://x"}}})
    with pytest.raises(InputError):
        Registries.parse("mirrors: [")
    with pytest.raises(InputError) as e:
        Registries.parse("configs:\n  h:\n    auth: {password: hunter2}\n    tls: {insecure_skip_verify: maybe}\n")
    assert "hunter2" not in str(e.value)


# -- the CLI ---------------------------------------------------------------------------------------------
runner = CliRunner()


def cli(*args, env=None):
    from rke2_mirror.cli.app import app
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_cli_stdout_and_warning(tmp_path):
    r = cli("registries-yaml", "--to", "http://harbor.example:5000")
    assert r.exit_code == 0
    assert yaml.safe_load(r.stdout)["mirrors"]["harbor.example:5000"] == {"endpoint": ["http://harbor.example:5000"]}
    assert "warning:" in r.stderr and "robust" in r.stderr


def test_cli_refuses_old_version(tmp_path):
    out = tmp_path / "registries.yaml"
    r = cli("registries-yaml", "--to", "http://harbor.example", "--rke2-version", "v1.22.8+rke2r1", "-o", str(out))
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.startswith("rke2-mirror: error: RKE2 v1.22.8+rke2r1 cannot use") and "#4308" in r.stderr


def test_cli_version_from_images_file_refuses(tmp_path):
    lst = tmp_path / "images.txt"
    lst.write_text("docker.io/rancher/rke2-runtime:v1.22.8-rke2r1\ndocker.io/rancher/hardened-etcd:v3\n")
    r = cli("registries-yaml", "--to", "http://harbor.example", "--images", str(lst))
    assert r.exit_code == 2 and "v1.22.8" in r.stderr


def test_cli_auth_file_is_0600_and_password_never_printed(tmp_path):
    out = tmp_path / "registries.yaml"
    env = {"RKE2_MIRROR_USERNAME": "robot", "RKE2_MIRROR_PASSWORD": "pa55-w0rd"}
    r = cli("registries-yaml", "--to", "https://harbor.example", "--node-ca-file", "/etc/ca.pem", "--with-auth",
            "-o", str(out), env=env)
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert yaml.safe_load(out.read_text())["configs"]["harbor.example"]["auth"] == {"username": "robot",
                                                                                    "password": "pa55-w0rd"}
    assert "pa55-w0rd" not in r.stderr and "pa55-w0rd" not in r.stdout
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_with_auth_needs_env(tmp_path):
    r = cli("registries-yaml", "--to", "https://harbor.example", "--with-auth")
    assert r.exit_code == 2 and "RKE2_MIRROR_PASSWORD" in r.stderr


def test_cli_merge_and_config_yaml(tmp_path):
    out = tmp_path / "registries.yaml"
    out.write_text(yaml.safe_dump(EXISTING))
    os.chmod(out, 0o640)
    conf = tmp_path / "config.yaml"
    conf.write_text("# a comment\ntoken: secret-token\nsystem-default-registry: old.example\nwrite-kubeconfig-mode: '0644'\n")
    os.chmod(conf, 0o600)
    r = cli("registries-yaml", "--to", "https://harbor.example", "--insecure-skip-verify", "--merge", "-o", str(out),
            "--config-yaml", str(conf))
    assert r.exit_code == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["mirrors"]["ghcr.io"] == EXISTING["mirrors"]["ghcr.io"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # the kept ghcr config holds credentials
    c = yaml.safe_load(conf.read_text())
    assert list(c) == ["token", "system-default-registry", "write-kubeconfig-mode"]
    assert c["system-default-registry"] == "harbor.example" and c["token"] == "secret-token"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    r = cli("registries-yaml", "--to", "https://harbor.example", "--no-system-default-registry", "--config-yaml", str(conf))
    assert r.exit_code == 0 and "system-default-registry" not in yaml.safe_load(conf.read_text())


def test_cli_merge_keeps_the_files_comments_and_order_and_equals_the_plain_merge(tmp_path):
    text = ("# site registries: owned by the platform team\n"
            "mirrors:\n"
            "  ghcr.io:   # our GitHub cache\n"
            "    endpoint:\n"
            "      - \"https://ghcr-cache.example\"\n"
            "  docker.io:\n"
            "    endpoint: [\"https://old.example\"]   # replaced by the merge\n"
            "configs:\n"
            "  ghcr-cache.example:\n"
            "    tls:\n"
            "      cert_file: /etc/ssl/client.pem   # kept\n")
    out = tmp_path / "registries.yaml"
    out.write_text(text)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(yaml.safe_load(text)))  # the same document without its comments
    for f in (out, plain):
        r = cli("registries-yaml", "--to", "https://harbor.example", "--merge", "-o", str(f))
        assert r.exit_code == 0, r.stderr
    merged = out.read_text()
    for comment in ("# site registries: owned by the platform team", "# our GitHub cache", "# kept"):
        assert comment in merged
    assert yaml.safe_load(merged) == yaml.safe_load(plain.read_text())  # the same document either way
    assert merged.index("ghcr.io") < merged.index("docker.io")  # the file's order
    assert yaml.safe_load(merged)["mirrors"]["docker.io"]["endpoint"] != ["https://old.example"]
    assert merged.endswith("# kept\n")
    r = cli("registries-yaml", "--to", "https://harbor.example", "--merge", "-o", str(out))
    assert r.exit_code == 0 and out.read_text() == merged  # a second merge changes nothing


def test_cli_merge_needs_output():
    r = cli("registries-yaml", "--to", "https://harbor.example", "--merge")
    assert r.exit_code == 2


def test_disable_default_registry_endpoint():
    regs = {"mirrors": {"docker.io": {"endpoint": ["https://m.example"]}}}
    a = resolve_endpoints(ETCD, regs, None, None, disable_default_endpoint=True)
    assert [x.endpoint.host for x in a] == ["m.example"]
    assert len(resolve_endpoints(ETCD, regs, None, v("v1.25.16+rke2r1"), disable_default_endpoint=True)) == 2
    assert len(resolve_endpoints(RUNTIME, regs, None, None, disable_default_endpoint=True)) == 2  # RKE2's own puller
    assert len(resolve_endpoints(ImageRef.parse("quay.io/a/b:1"), regs, None, None, disable_default_endpoint=True)) == 1


# -- RKE2 of 2025-2026: the gates of node.versions on both sides ------------------------------------------------
from rke2_mirror.node.versions import (DISABLE_DEFAULT_ENDPOINT, EMBEDDED_REGISTRY, SDR_PATH,
                                       accepts_sdr_path)
from rke2_mirror.node.writer import update_config_yaml


def render_node(target: str, images=RELEASE_IMAGES, config: str = "token: t\n", **kw) -> tuple[str, list[str], dict, str]:
    """registries.yaml and config.yaml as registries-yaml writes them, and one golden text of both."""
    text, warnings, doc = render(target, images, **kw)
    cfg = NodeConfig.for_images(RegistryURL.parse(target), images, **kw)
    conf = update_config_yaml(config, cfg.config_updates())
    return text, warnings, doc, text + "---\n# config.yaml\n" + conf


@pytest.mark.parametrize("version, accepts", [
    ("v1.32.13+rke2r1", False), ("v1.32.13+rke2r2", True), ("v1.32.13", False), ("v1.32.14+rke2r1", True),
    ("v1.33.9+rke2r1", False), ("v1.33.10+rke2r1", True), ("v1.34.5+rke2r1", False), ("v1.34.6+rke2r1", True),
    ("v1.35.2+rke2r1", False), ("v1.35.3+rke2r1", True), ("v1.36.0+rke2r1", True), ("v1.36.0-rc1+rke2r1", True),
    ("v1.31.14+rke2r1", False)])
def test_sdr_path_gate(version, accepts):
    assert accepts_sdr_path(v(version)) is accepts
    assert accepts_sdr_path(None) is False  # unknown: the rewrite rules, which work everywhere
    assert SDR_PATH.describe() == "v1.32.13+rke2r2 / v1.33.10 / v1.34.6 / v1.35.3"


def test_golden_sdr_path_v1_33_10_and_rewrite_v1_33_9():
    target = "https://harbor.example/docker.io"
    text, warnings, doc, both = render_node(target, node_ca_file="/etc/ssl/ca.pem", rke2_version=v("v1.33.10+rke2r1"))
    golden("sdr-path-v1.33.10.yaml", both)
    assert 'system-default-registry: "harbor.example/docker.io"' in both
    # the node asks for harbor.example/docker.io/rancher/x: no rewrite on the registry's own entry, no :443 needed
    assert doc["mirrors"]["harbor.example"] == {"endpoint": ["https://harbor.example"]}
    assert doc["mirrors"]["docker.io"]["rewrite"] == {"^rancher/(.*)$": "docker.io/rancher/$1"}
    assert any("#9404" in w and "#10822" in w for w in warnings)
    _, warnings, doc, both = render_node(target, node_ca_file="/etc/ssl/ca.pem", rke2_version=v("v1.33.9+rke2r1"))
    golden("sdr-path-refused-rewrite-v1.33.9.yaml", both)
    assert 'system-default-registry: "harbor.example"\n' in both
    assert doc["mirrors"]["harbor.example"]["rewrite"] == {"^rancher/(.*)$": "docker.io/rancher/$1"}
    assert any("host[:port] only" in w for w in warnings)


def test_golden_disable_default_endpoint_v1_29_1_and_refused_v1_29_0():
    assert DISABLE_DEFAULT_ENDPOINT.describe() == "v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1"
    _, warnings, _, both = render_node("https://harbor.example", node_ca_file="/etc/ssl/ca.pem",
                                       rke2_version=v("v1.29.1+rke2r1"), disable_default_endpoint=True)
    golden("disable-default-endpoint-v1.29.1.yaml", both)
    assert "disable-default-registry-endpoint: true" in both and not any("disable" in w for w in warnings)
    with pytest.raises(InputError) as e:
        render("https://harbor.example", rke2_version=v("v1.29.0+rke2r1"), disable_default_endpoint=True)
    golden("disable-default-endpoint-refused-v1.29.0.yaml", yaml.safe_dump({"refused": str(e.value)}, width=4096))
    assert "\n" not in str(e.value) and "v1.29.1" in str(e.value)
    _, warnings, _ = render("https://harbor.example", disable_default_endpoint=True)  # unknown version: a warning
    assert any("--disable-default-endpoint" in w for w in warnings)


def test_golden_embedded_registry_v1_28_6_and_refused_v1_28_5():
    assert EMBEDDED_REGISTRY.describe() == "v1.26.13 / v1.27.10 / v1.28.6 / v1.29.1"
    _, warnings, doc, both = render_node("https://harbor.example", EXTRA_IMAGES, node_ca_file="/etc/ssl/ca.pem",
                                         rke2_version=v("v1.28.6+rke2r1"), embedded_registry=True)
    golden("embedded-registry-v1.28.6.yaml", both)
    assert "embedded-registry: true" in both
    # every source registry has a mirrors entry (so it is shared), each keeping the Harbor endpoint
    for reg in ("docker.io", "quay.io", "registry.k8s.io"):
        assert doc["mirrors"][reg]["endpoint"] == ["https://harbor.example:443"]  # :443: the rke2#5658 window
    assert any("server option" in w for w in warnings)
    with pytest.raises(InputError) as e:
        render("https://harbor.example", rke2_version=v("v1.28.5+rke2r1"), embedded_registry=True)
    golden("embedded-registry-refused-v1.28.5.yaml", yaml.safe_dump({"refused": str(e.value)}, width=4096))


def test_update_config_yaml_keeps_comments_and_sets_several_keys():
    old = "# node\ntoken: t\nsystem-default-registry: old.example\n"
    new = update_config_yaml(old, {"system-default-registry": "h.example/p", "embedded-registry": True})
    assert new.startswith("# node\ntoken: t\n")
    assert yaml.safe_load(new) == {"token": "t", "system-default-registry": "h.example/p", "embedded-registry": True}
    assert update_config_yaml(new, {"embedded-registry": True}) == new
    assert update_config_yaml("", {"embedded-registry": True}) == "embedded-registry: true\n"


def test_resolver_sdr_path_per_version():
    etcd = ImageRef.parse("docker.io/rancher/hardened-etcd:v3.5.9-k3s1-build20240418")
    regs = {"mirrors": {"harbor.example": {"endpoint": ["https://harbor.example"]}}}
    for version, note in (("v1.34.6+rke2r1", False), ("v1.34.5+rke2r1", True), (None, True)):
        a = resolve_endpoints(etcd, regs, "harbor.example/docker.io", v(version) if version else None)
        assert a[0].manifest_url == ("https://harbor.example/v2/docker.io/rancher/hardened-etcd/manifests/"
                                     "v3.5.9-k3s1-build20240418")
        assert any("refuses to start" in n or "accepted only from" in n for n in a[0].notes) is note


def test_disable_default_endpoint_gate_and_runtime_note():
    regs = {"mirrors": {"docker.io": {"endpoint": ["https://m.example"]}}}
    assert len(resolve_endpoints(ETCD, regs, None, v("v1.29.1+rke2r1"), disable_default_endpoint=True)) == 1
    assert len(resolve_endpoints(ETCD, regs, None, v("v1.29.0+rke2r1"), disable_default_endpoint=True)) == 2
    rt = resolve_endpoints(RUNTIME, regs, None, v("v1.29.1+rke2r1"), disable_default_endpoint=True)
    assert rt[-1].default and any("wharfie" in n for n in rt[-1].notes)


def test_cli_config_yaml_options_and_path_sdr(tmp_path):
    conf = tmp_path / "config.yaml"
    conf.write_text("# servers\ntoken: t\n")
    r = cli("registries-yaml", "--to", "https://harbor.example/docker.io", "--rke2-version", "v1.35.3+rke2r1",
            "--embedded-registry", "--disable-default-endpoint", "--config-yaml", str(conf))
    assert r.exit_code == 0, r.stderr
    assert conf.read_text().startswith("# servers\n")
    assert yaml.safe_load(conf.read_text()) == {"token": "t", "system-default-registry": "harbor.example/docker.io",
                                                "embedded-registry": True, "disable-default-registry-endpoint": True}
    before = conf.read_text()
    r = cli("registries-yaml", "--to", "https://harbor.example", "--rke2-version", "v1.26.12+rke2r1",
            "--embedded-registry", "--config-yaml", str(conf))
    assert r.exit_code == 2 and conf.read_text() == before
    assert r.stderr.count("\n") == 1 and "--embedded-registry" in r.stderr
    r = cli("registries-yaml", "--to", "https://harbor.example", "--disable-default-endpoint")
    assert r.exit_code == 0 and "no --config-yaml" in r.stderr
