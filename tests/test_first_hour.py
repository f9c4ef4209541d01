"""A newcomer's first hour (issue 17), through the real command line: local input is checked before the
network (item 3) and by `sync --check-config` (item 5); hints that say what is cached, what a version looks
like, every bad line of a list, an unknown registries.yaml key (item 10); one line per release list read
(item 11); docker credential helpers; config.yaml comments kept; bounded node files and image lists.

No test here reaches the internet: release URLs point at a loopback port nothing listens on, so a download
attempted before a refusal would show up as "cannot reach".  Only the credential-helper copy needs the
docker-registry binary (skipped without it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rke2_mirror.endpoints import auth
from rke2_mirror.endpoints.auth import Credentials, lookup_credentials
from rke2_mirror.model.errors import InputError
from rke2_mirror_testkit.registry_proc import free_port
from rke2_mirror_testkit.release_server import start_release_server

ROOT = Path(__file__).resolve().parents[1]
REPO_LISTS = ROOT / "lists"
OLD, NEW = "v1.28.9+rke2r1", "v1.30.14+rke2r1"


def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, as a user sees it."""
    return subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def nowhere() -> list[str]:
    """Release and channel URLs on a loopback port nothing listens on: any download fails "cannot reach"."""
    url = f"http://127.0.0.1:{free_port()}"
    return ["--release-url", f"{url}/releases", "--channel-url", f"{url}/channels"]


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rke2-mirror: error: "), proc.stderr
    assert "cannot reach" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0][len("rke2-mirror: error: "):]


# --------------------------------------------------------------------------- item 3: local input first


def test_http_system_default_registry_is_refused_from_the_release_name_without_a_download(tmp_path):
    out = tmp_path / "registries.yaml"
    msg = one_error(cli("registries-yaml", "--to", "http://10.0.0.5:5000", "--release", "v1.22.8+rke2r1",
                        "-o", str(out), *nowhere()))
    assert msg.startswith("RKE2 v1.22.8+rke2r1 cannot use the plain-http registry 10.0.0.5:5000 as "
                          "system-default-registry") and "--no-system-default-registry" in msg
    assert not out.exists()
    # the docker-tag spelling of the version, and the oldest of several versions, are known by name too
    msg = one_error(cli("registries-yaml", "--to", "http://10.0.0.5:5000", "--release", "v1.30.14-rke2r1",
                        "--release", "v1.22.8-rke2r1", *nowhere()))
    assert msg.startswith("RKE2 v1.22.8+rke2r1 cannot use")
    # a fixed version gets as far as the download (and no further, here)
    proc = cli("registries-yaml", "--to", "http://10.0.0.5:5000", "--release", NEW, *nowhere())
    assert proc.returncode == 2 and "cannot reach http://127.0.0.1:" in proc.stderr


def test_registries_yaml_checks_every_local_file_before_the_network_and_writes_nothing_on_error(tmp_path):
    out, conf = tmp_path / "registries.yaml", tmp_path / "config.yaml"
    conf.write_text("token: x\nnode-label: [a\n")  # not YAML
    msg = one_error(cli("registries-yaml", "--to", "https://harbor.example", "--release", NEW, "-o", str(out),
                        "--config-yaml", str(conf), *nowhere()))
    assert msg.startswith(f"{conf}: not valid YAML") and not out.exists()
    assert conf.read_text() == "token: x\nnode-label: [a\n"
    msg = one_error(cli("registries-yaml", "--to", "https://harbor.example", "--release", NEW,
                        "--images", str(tmp_path / "missing.txt"), *nowhere()))
    assert msg == f"image list {tmp_path / 'missing.txt'}: no such file"
    msg = one_error(cli("registries-yaml", "--to", "https://harbor.example", "--release", "1.30.14", *nowhere()))
    assert "needs the 'v' prefix and its build suffix, e.g. v1.30.14+rke2r1" in msg
    # --merge: a bad existing file is named (not "existing registries.yaml"), before any download
    out.write_text("mirrors:\n  docker.io:\n    endpoint: https://not-a-list\n")
    msg = one_error(cli("registries-yaml", "--to", "https://harbor.example", "--release", NEW, "--merge",
                        "-o", str(out), *nowhere()))
    assert msg == f"{out}: mirrors.docker.io.endpoint: must be a list of URLs"


def test_verify_reads_its_files_before_the_network(tmp_path):
    msg = one_error(cli("verify", "--registries-yaml", "/nonexistent/registries.yaml", "--release", NEW, *nowhere()))
    assert msg == "registries.yaml /nonexistent/registries.yaml: no such file"
    regs = tmp_path / "registries.yaml"
    regs.write_text("mirrors: {}\n")
    msg = one_error(cli("verify", "--registries-yaml", str(regs), "--config-yaml", str(tmp_path / "config.yaml"),
                        "--release", NEW, *nowhere()))
    assert msg == f"config.yaml {tmp_path / 'config.yaml'}: no such file"
    msg = one_error(cli("verify", "--registries-yaml", str(regs), "--node-root", str(tmp_path / "etc"),
                        "--release", NEW, *nowhere()))
    assert msg == f"--node-root {tmp_path / 'etc'}: no such directory"


# --------------------------------------------------------------------------- item 5: sync --check-config


def write_sync(tmp_path: Path, body: str, name: str = "sync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GOOD = f"""\
version: 1
target:
  url: https://harbor.example.com
releases:
  - versions: [{NEW}]
    flavors: [core]
    release_url: http://127.0.0.1:{{port}}/releases
images: [extra.txt]
outputs:
  registries_yaml: node/registries.yaml
  config_yaml: node/config.yaml
"""


def test_check_config_checks_what_the_run_would_refuse(tmp_path):
    port = free_port()
    (tmp_path / "extra.txt").write_text("rancher/extra:v1\n")
    good = write_sync(tmp_path, GOOD.format(port=port))
    proc = cli("sync", str(good), "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stderr and "cannot reach" not in proc.stderr

    cfg = tmp_path / "sync.yaml"
    cases = {
        "missing ca_file": (GOOD.replace("  url: https://harbor.example.com\n",
                                         "  url: https://harbor.example.com\n  ca_file: harbor-ca.pem\n"),
                            f"target.ca_file {tmp_path / 'harbor-ca.pem'}: no such file"),
        "flavor typo": (GOOD.replace("flavors: [core]", "flavors: [al]"),
                        f"{cfg}:5: releases[0]: flavors: unknown rke2 flavor 'al' (known: all, default, core, "),
        "version typo": (GOOD.replace(f"versions: [{NEW}]", "versions: [1.30.14]"),
                         f"{cfg}:5: releases[0]: versions: '1.30.14' is not a channel but an rke2 version"),
        "http trap": (GOOD.replace("https://harbor", "http://harbor").replace(NEW, "v1.22.8+rke2r1"),
                      "RKE2 v1.22.8+rke2r1 cannot use the plain-http registry harbor.example.com as "
                      "system-default-registry"),
        "missing images file": (GOOD.replace("[extra.txt]", "[nope.txt]"),
                                f"images: {tmp_path / 'nope.txt'}: no such file"),
        "with_auth without credentials": (GOOD + "node:\n  with_auth: true\n",
                                          "node.with_auth: true needs target.credentials in the config"),
        "credentials file missing": (GOOD.replace("  url: https://harbor.example.com\n",
                                                  "  url: https://harbor.example.com\n  credentials:\n"
                                                  "    file: auth.json\n"),
                                     f"target.credentials.file {tmp_path / 'auth.json'}: no such file"),
        "offline, not cached": (GOOD.replace("    flavors: [core]\n", "    flavors: [core]\n    offline: true\n"),
                                f"no cached sha256sum-amd64.txt for rke2 {NEW}"),
    }
    for name, (body, expected) in cases.items():
        write_sync(tmp_path, body.format(port=port))
        msg = one_error(cli("sync", str(cfg), "--check-config"))
        assert msg.startswith(expected), (name, msg)

    # an unset credentials variable is a warning: the run's environment (systemd, Kubernetes) may differ
    path = write_sync(tmp_path, GOOD.format(port=port).replace(
        "  url: https://harbor.example.com\n",
        "  url: https://harbor.example.com\n  credentials:\n    env: {username: HUSER, password: HPASS}\n"))
    proc = cli("sync", str(path), "--check-config", env={"HUSER": "robot"})
    assert proc.returncode == 0, proc.stderr
    assert "rke2-mirror: warning: target.credentials.env: HPASS not set in this environment" in proc.stderr


def test_sync_run_refuses_the_http_trap_before_any_download(tmp_path):
    path = write_sync(tmp_path, GOOD.format(port=free_port()).replace("https://harbor", "http://harbor")
                      .replace(NEW, "v1.22.8+rke2r1"))
    (tmp_path / "extra.txt").write_text("rancher/extra:v1\n")
    msg = one_error(cli("sync", str(path)))
    assert msg.startswith("RKE2 v1.22.8+rke2r1 cannot use the plain-http registry")
    assert not (tmp_path / "node").exists()


# --------------------------------------------------------------------------- item 10: hints


def test_offline_typo_and_wrong_lists_dir_say_what_is_cached(tmp_path):
    msg = one_error(cli("list", "v1.30.41+rke2r1", "--offline", "--lists-dir", str(REPO_LISTS)))
    assert f"(cached rke2 versions in {REPO_LISTS / 'rke2'}: {OLD}, {NEW})" in msg
    assert "a typo in the version or --lists-dir?" in msg
    msg = one_error(cli("list", NEW, "--offline", "--lists-dir", str(tmp_path / "lits")))
    assert f"({tmp_path / 'lits' / 'rke2'} holds no cached rke2 versions)" in msg


@pytest.mark.parametrize("given,needs", [
    ("1.28.9", "it needs the 'v' prefix and its build suffix, e.g. v1.28.9+rke2r1"),
    ("v1.28.9", "it needs its build suffix, e.g. v1.28.9+rke2r1"),
    ("1.28.9+rke2r1", "it needs the 'v' prefix, e.g. v1.28.9+rke2r1"),
])
def test_a_version_with_a_part_missing_is_not_called_a_channel(given, needs):
    msg = one_error(cli("list", given, *nowhere()))
    assert msg == (f"{given!r} is not a channel but an rke2 version with a part missing: {needs} "
                   "(channels are names like stable, latest, v1.28)")


def test_a_garbage_images_file_reports_the_count_and_the_first_bad_lines(tmp_path):
    bad = tmp_path / "images.txt"
    bad.write_text("rancher/ok:v1\nNot An Image\n\n# comment\nUPPER/case:1\nhttp://x/y:1\nspaces here\nz!z\n")
    msg = one_error(cli("mirror", "--to", "http://127.0.0.1:1", "--images", str(bad)))
    assert msg.startswith(f"{bad}:2: invalid image reference 'Not An Image'; {bad}:5: ")
    assert f"; {bad}:6: " in msg and msg.endswith(f"; and 2 more (5 lines of {bad} are not image references)")


def test_verify_warns_about_an_unknown_top_level_key(tmp_path):
    regs = tmp_path / "registries.yaml"
    regs.write_text("mirrorz:\n  docker.io:\n    endpoint: [https://harbor.example]\n")
    images = tmp_path / "images.txt"
    images.write_text("rancher/mirrored-pause:3.6\n")
    proc = cli("verify", "--registries-yaml", str(regs), "--images", str(images))
    assert proc.returncode == 1, proc.stderr
    warning = (f"rke2-mirror: warning: {regs}: unknown top-level key 'mirrorz' (did you mean 'mirrors'?): RKE2 reads "
               "only 'mirrors' and 'configs' and ignores the rest")
    assert proc.stderr.splitlines()[0] == warning  # before the checks, not after the table


# --------------------------------------------------------------------------- item 11: one line per release


def test_reading_a_release_logs_one_line(tmp_path):
    proc = cli("list", NEW, "--offline", "--lists-dir", str(REPO_LISTS), "--flavor", "core", "--flavor", "canal")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [  # and `list` says which flavors the release publishes
        f"rke2-mirror: rke2 {NEW}: 2 lists read from the cache in {REPO_LISTS / 'rke2' / NEW} verified against "
        f"sha256sum-amd64.txt ({len(proc.stdout.splitlines())} images)",
        f"FLAVORS published by {NEW} (amd64): core, canal, flannel, traefik, windows, all, default"]
    server = start_release_server(REPO_LISTS, {"rke2": {"stable": OLD}})
    try:
        proc = cli("list", "stable", "--arch", "amd64", "--arch", "arm64", "--release-url", server.release_url(),
                   "--channel-url", server.channel_url(), "--lists-dir", str(tmp_path / "cache"))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    line, *flavors = proc.stderr.splitlines()
    assert [f.split(":")[0] for f in flavors] == [f"FLAVORS published by {OLD} (amd64)",
                                                  f"FLAVORS published by {OLD} (arm64)"]
    assert line.startswith(f"rke2-mirror: rke2 channel stable -> {OLD}: 2 lists verified against "
                           "sha256sum-amd64.txt, sha256sum-arm64.txt (")


def test_release_bump_prints_a_line_per_release_before_its_diff(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_LISTS / "rke2" / OLD, repo / "lists" / "rke2" / OLD)  # every flavor, two arches
    server = start_release_server(REPO_LISTS, {"rke2": {"stable": NEW}})
    try:
        proc = subprocess.run([str(ROOT / "scripts" / "release-bump"), "stable", "--no-stage",
                               "--release-url", server.release_url(), "--channel-url", server.channel_url()],
                              cwd=repo, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert f"rke2 {OLD} -> {NEW}:" in proc.stdout
    lines = proc.stderr.splitlines()
    assert ".txt verified" not in proc.stderr and "read from the cache in" not in proc.stderr
    assert len(lines) <= 8, proc.stderr  # was ~30
    assert any(line.startswith(f"release-bump: rke2 {OLD}: ") and "lists read (from the cache)" in line
               for line in lines)


# --------------------------------------------------------------------------- credential helpers

HELPER = """\
#!/bin/sh
[ "$1" = get ] || exit 2
server=$(cat)
echo "$server" >> "$(dirname "$0")/asked"
case "$server" in
  harbor.example:8443) echo '{"ServerURL":"harbor.example:8443","Username":"robot","Secret":"s3cret-pw"}' ;;
  token.example) echo '{"Username":"<token>","Secret":"refresh-tok"}' ;;
  https://index.docker.io/v1/) echo '{"Username":"hub","Secret":"hub-pw"}' ;;
  127.0.0.1:*) echo "{\\"Username\\":\\"alice\\",\\"Secret\\":\\"wonderland-pw\\"}" ;;
  fail.example) echo "keyring locked" >&2; exit 3 ;;
  slow.example) sleep 20 ;;
  big.example) head -c 100000 /dev/zero | tr '\\0' a ;;
  garbage.example) echo 'Username=robot Secret=s3cret-pw' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def helper_env(tmp_path, rke2_mirror_env, monkeypatch):
    """A fake `docker-credential-test` on PATH, named by the docker config's credsStore."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker-credential-test"
    script.write_text(HELPER)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rke2_mirror_env.docker_config_file.write_text(json.dumps({
        "auths": {"harbor.example:8443": {}},  # what `docker login` leaves with a credsStore
        "credsStore": "test", "credHelpers": {"other.example": "missing"}}))
    monkeypatch.setattr(auth, "_helper_warned", set())
    return bin_dir


def test_credential_helpers_are_asked_after_env_and_auths(helper_env, rke2_mirror_env):
    warnings: list[str] = []
    assert lookup_credentials("harbor.example:8443", log=warnings.append) == Credentials("robot", "s3cret-pw")
    token = lookup_credentials("token.example", log=warnings.append)
    assert (token.username, token.password, token.identity_token) == ("", "", "refresh-tok")
    assert lookup_credentials("registry-1.docker.io", log=warnings.append) == Credentials("hub", "hub-pw")
    assert lookup_credentials("unknown.example", log=warnings.append) is None  # "not found": no warning
    assert warnings == []
    assert (helper_env / "asked").read_text().split() == ["harbor.example:8443", "token.example",
                                                         "https://index.docker.io/v1/", "unknown.example"]
    # env (the target) and an auths entry win over the helper
    rke2_mirror_env.write_docker_auth("harbor.example:8443", "from-auths", "pw")
    assert lookup_credentials("harbor.example:8443").username == "from-auths"
    assert lookup_credentials("harbor.example:8443", target=True,
                              env={**os.environ, "RKE2_MIRROR_USERNAME": "env", "RKE2_MIRROR_PASSWORD": "p"}
                              ).username == "env"


def test_a_failing_or_missing_helper_is_one_warning_then_anonymous(helper_env, monkeypatch):
    warnings: list[str] = []
    for _ in range(2):
        assert lookup_credentials("fail.example", log=warnings.append) is None
        assert lookup_credentials("other.example", log=warnings.append) is None
        assert lookup_credentials("big.example", log=warnings.append) is None
        assert lookup_credentials("garbage.example", log=warnings.append) is None
    assert warnings == [
        "warning: credential helper docker-credential-test: 'get' failed (exit status 3): keyring locked; "
        "fail.example is accessed anonymously",
        f"warning: credential helper docker-credential-missing: not found on PATH (named in "
        f"{os.environ['DOCKER_CONFIG']}/config.json); other.example is accessed anonymously",
        "warning: credential helper docker-credential-test: answered more than 64 KiB; big.example is accessed "
        "anonymously",
        'warning: credential helper docker-credential-test: its answer is not the JSON {"Username", "Secret"} '
        "expected; garbage.example is accessed anonymously",
    ]
    assert not any("s3cret" in w for w in warnings)
    monkeypatch.setattr(auth, "HELPER_TIMEOUT", 1.0)
    import time
    started = time.monotonic()
    assert lookup_credentials("slow.example", log=warnings.append) is None
    assert time.monotonic() - started < 5
    assert warnings[-1] == ("warning: credential helper docker-credential-test: no answer within 1s; slow.example "
                            "is accessed anonymously")


def test_mirror_uses_the_credential_helper_for_the_target(helper_env, basic_registry, registry_factory, tmp_path):
    from rke2_mirror_testkit.images import ImagePusher, push_image

    src = registry_factory(name="src")
    with ImagePusher(src.url) as p:
        push_image(p, "rancher/helper-test", "v1", seed="helper")
    images = tmp_path / "images.txt"
    images.write_text("rancher/helper-test:v1\n")
    proc = cli("mirror", "--images", str(images), "--to", basic_registry.url, "--source-endpoint",
               f"docker.io={src.url}")
    assert proc.returncode == 0, proc.stderr
    assert "1 copied" in proc.stderr and "wonderland-pw" not in proc.stderr + proc.stdout
    assert basic_registry.host in (helper_env / "asked").read_text().split()


# --------------------------------------------------------------------------- config.yaml comments, bounds

COMMENTED = """\
# /etc/rancher/rke2/config.yaml -- managed by hand, comments matter
token: my-shared-secret   # the join token
# where the system images come from:
system-default-registry: old.example
tls-san:
  - rke2.example.com   # the load balancer
  - 10.0.0.10
write-kubeconfig-mode: "0644"
"""


def test_config_yaml_keeps_its_comments_key_order_and_lists(tmp_path):
    conf = tmp_path / "config.yaml"
    conf.write_text(COMMENTED)
    proc = cli("registries-yaml", "--to", "https://harbor.example.com", "--config-yaml", str(conf),
               "-o", str(tmp_path / "registries.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert conf.read_text() == COMMENTED.replace("system-default-registry: old.example",
                                                 'system-default-registry: "harbor.example.com"')
    proc = cli("registries-yaml", "--to", "https://harbor.example.com", "--no-system-default-registry",
               "--config-yaml", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert conf.read_text() == COMMENTED.replace("system-default-registry: old.example\n", "")
    proc = cli("registries-yaml", "--to", "https://h2.example", "--config-yaml", str(conf))
    assert conf.read_text() == COMMENTED.replace("system-default-registry: old.example\n", "") + \
        'system-default-registry: "h2.example"\n'
    only_comments = tmp_path / "new.yaml"
    only_comments.write_text("# nothing set yet\n")
    assert cli("registries-yaml", "--to", "https://h2.example", "--config-yaml", str(only_comments)).returncode == 0
    assert only_comments.read_text() == '# nothing set yet\nsystem-default-registry: "h2.example"\n'


def test_node_files_and_image_lists_are_bounded_and_named(tmp_path):
    big = tmp_path / "config.yaml"
    big.write_bytes(b"# x\n" * (1024 * 1024 + 1))
    msg = one_error(cli("registries-yaml", "--to", "https://h.example", "--config-yaml", str(big)))
    assert msg == f"{big}: more than 4 MiB: refused unparsed"
    latin = tmp_path / "registries.yaml"
    latin.write_bytes(b"mirrors: {}\n# caf\xe9\n")
    msg = one_error(cli("verify", "--registries-yaml", str(latin), "--images", str(latin)))
    assert msg == f"{latin}:2: not UTF-8 text"
    huge = tmp_path / "images.txt"
    huge.write_bytes(b"rancher/x:v1\n" * (400 * 1024))  # 5.2 MB
    msg = one_error(cli("mirror", "--to", "http://127.0.0.1:1", "--images", str(huge)))
    assert msg == f"image list {huge}: more than 4 MiB, the most accepted for an image list; refused"
    config = write_sync(tmp_path, "version: 1\ntarget: {url: https://h.example}\nimages: [images.txt]\n")
    msg = one_error(cli("sync", str(config), "--check-config"))
    assert msg == f"images: {huge}: more than 4 MiB, the most accepted for an image list; refused"


def test_sync_target_credentials_file_asks_its_credential_helper_and_a_huge_file_is_one_line(helper_env,
                                                                                            rke2_mirror_env, tmp_path):
    from types import SimpleNamespace

    from rke2_mirror.jobs.sync.run import target_credentials
    cfg_file = rke2_mirror_env.docker_config_file
    spec = SimpleNamespace(env=None, file=str(cfg_file))
    loaded = SimpleNamespace(config=SimpleNamespace(target=SimpleNamespace(credentials=spec)),
                             target=SimpleNamespace(host="harbor.example:8443"), path=tmp_path / "sync.yaml")
    assert target_credentials(loaded) == Credentials("robot", "s3cret-pw")  # from credsStore's helper
    huge = tmp_path / "huge.json"
    huge.write_bytes(b'{"auths": {"x": "' + b"a" * (auth.MAX_CREDENTIALS_FILE + 10) + b'"}}')
    with pytest.raises(InputError, match="larger than") as exc:
        auth.credentials_from_file(huge, "x")
    assert "aaaa" not in str(exc.value)
