"""Hostile inputs: every YAML and JSON document rke2-mirror reads from outside -- registries.yaml, RKE2's
config.yaml, the sync config, a release server's channel answer, checksum files and image lists -- fails
in one line (exit 2), never a traceback, in bounded time and memory; and no config error prints a value
given under a credentials key.

The corpora go through the real command line (`python -m rke2_mirror ...`, several at a time) and, all of
them and faster, through the parsers in-process; `hypothesis` then feeds generated documents to the
registries.yaml and sync-config parsers, which must either parse them or raise the project's error class.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rke2_mirror.jobs.sync as job
from rke2_mirror import yamlsafe
from rke2_mirror.jobs.sync.config import is_secret
from rke2_mirror.model.errors import InputError, MirrorError
from rke2_mirror.model.reference import ImageRef, RegistryURL
from rke2_mirror.node.registries import Registries, load_yaml_mapping
from rke2_mirror.node.resolver import apply_rewrites, resolve_endpoints
from rke2_mirror.node.writer import (NodeConfig, build_registries, default_endpoint_disabled, dump_registries,
                                     set_system_default_registry, system_default_registry_of)
from rke2_mirror.releases import ReleaseSource, parse_channels, resolve_version
from rke2_mirror.releases.source import CHANNELS_MAX_BYTES, CHECKSUMS_MAX_BYTES, LIST_MAX_BYTES

SECRET = "Hunter2-Secret!"
FAST = 10.0  # seconds: every refusal below takes well under one on loopback; this is the "never hangs" bound

# --------------------------------------------------------------------------- the corpora


def alias_bomb(levels: int = 9, width: int = 10, key: str = "mirrors") -> str:
    """"Billion laughs": each anchor a list of `width` aliases of the one before (10**9 leaves)."""
    lines = ["a0: &a0 [lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{key}: *a{levels}\n"


def mapping_bomb(levels: int = 9) -> str:
    lines = ["b0: &b0 {x: lol, y: lol}"]
    lines += [f"b{i}: &b{i} {{{', '.join(f'k{j}: *b{i - 1}' for j in range(10))}}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_key_bomb(n: int = 3000) -> str:
    """`<<` merge keys chained: each mapping merges the previous one (quadratic expansion)."""
    lines = ["m0: &m0 {k0: v}"] + [f"m{i}: &m{i} {{<<: *m{i - 1}, k{i}: v}}" for i in range(1, n)]
    return "\n".join(lines) + "\n"


# Refused by the YAML layer whatever the document is for: name -> bytes.
NASTY_YAML: dict[str, bytes] = {
    "deep-flow-list": b"[" * 100_000 + b"]" * 100_000,
    "deep-flow-unclosed": b"[" * 100_000,
    "deep-flow-map": b"{a: " * 50_000,
    "deep-block-map": "".join(" " * i + f"k{i}:\n" for i in range(1500)).encode(),
    "deep-block-list": b"- " * 50_000 + b"x\n",
    "alias-bomb": alias_bomb().encode(),
    "alias-bomb-mapping": mapping_bomb().encode(),
    "merge-key-bomb": merge_key_bomb().encode(),
    "recursive-alias": b"mirrors: &a {docker.io: *a}\n",
    "huge-scalar": b"mirrors: " + b"x" * (5 * 1024 * 1024) + b"\n",
    "huge-comment": b"# " + b"x" * (5 * 1024 * 1024) + b"\n",
    "many-nodes": b"[" + b"1," * 1_000_000 + b"1]",
    "invalid-utf8": b"mirrors:\n  docker.io: \xff\xfe\n",
    "utf16": "mirrors: {}\n".encode("utf-16"),
    "nul-byte": b"mirrors:\n  docker.io:\x00\n",
    "control-char": b"mirrors: \x07\n",
    "python-tag": b"mirrors: !!python/object/apply:os.system ['touch /tmp/rke2-mirror-pwned']\n",
    "unknown-tag": b"mirrors: !secret x\n",
    "bad-int-tag": b"mirrors: !!int zz\n",
    "bad-timestamp": b"mirrors: !!timestamp 2001-13-45\n",
    "huge-int": b"mirrors: " + b"9" * 5000 + b"\n",
    "undefined-alias": b"mirrors: *nowhere\n",
    "two-documents": b"mirrors: {}\n---\nconfigs: {}\n",
    "syntax": b"mirrors: [\n",
    "tab-indent": b"mirrors:\n\t- x\n",
}

# Valid YAML, wrong shape for a registries.yaml: name -> text.
BAD_REGISTRIES: dict[str, str] = {
    "top-list": "[1, 2]\n",
    "top-scalar": "just text\n",
    "top-int": "42\n",
    "mirrors-list": "mirrors: [docker.io]\n",
    "mirror-list": "mirrors: {docker.io: [x]}\n",
    "endpoint-string": "mirrors: {docker.io: {endpoint: https://h}}\n",
    "endpoint-ints": "mirrors: {docker.io: {endpoint: [1, 2]}}\n",
    "endpoint-nested": "mirrors: {docker.io: {endpoint: [[https://h]]}}\n",
    "rewrite-list": "mirrors: {docker.io: {endpoint: [https://h], rewrite: [a]}}\n",
    "rewrite-value-list": "mirrors: {docker.io: {endpoint: [https://h], rewrite: {'^a': [b]}}}\n",
    "configs-list": "configs: [h]\n",
    "config-string": "configs: {h: tls}\n",
    "tls-list": "configs: {h: {tls: [x]}}\n",
    "tls-insecure-string": "configs: {h: {tls: {insecure_skip_verify: 'yes'}}}\n",
    "tls-ca-list": "configs: {h: {tls: {ca_file: [a, b]}}}\n",
    "tls-cert-mapping": "configs: {h: {tls: {cert_file: {a: b}}}}\n",
    "tls-key-binary": "configs: {h: {tls: {key_file: !!binary aGVsbG8=}}}\n",
    "auth-list": "configs: {h: {auth: [x]}}\n",
    "auth-password-mapping": f"configs: {{h: {{auth: {{username: u, password: {{v: '{SECRET}'}}}}}}}}\n",
    "auth-username-list": "configs: {h: {auth: {username: [u]}}}\n",
    "auth-token-list": "configs: {h: {auth: {identity_token: [t]}}}\n",
    "key-with-newline": 'mirrors: {"docker.io\\nevil": [x]}\n',
    "huge-key": "mirrors: {" + "k" * 200_000 + ": [x]}\n",
}

# Valid YAML, wrong shape for RKE2's config.yaml.
BAD_CONFIG_YAML: dict[str, str] = {
    "top-list": "[system-default-registry]\n",
    "sdr-list": "system-default-registry: [a, b]\n",
    "sdr-mapping": "system-default-registry: {a: b}\n",
    "sdr-int": "system-default-registry: 5000\n",
}

GOOD_SYNC = """\
version: 1
target:
  url: https://harbor.example.com
  credentials:
    env: {username: HARBOR_USERNAME, password: HARBOR_PASSWORD}
releases:
  - channels: [stable]
outputs:
  textfile: out/rke2_mirror.prom
"""

# Valid YAML, wrong types at every level of a sync config.
BAD_SYNC: dict[str, str] = {
    "empty": "",
    "blank": "  \n\n",
    "null-document": "~\n",
    "top-list": "[version, 1]\n",
    "top-scalar": "version 1\n",
    "version-string": GOOD_SYNC.replace("version: 1", "version: '1'"),
    "version-list": GOOD_SYNC.replace("version: 1", "version: [1]"),
    "version-bool": GOOD_SYNC.replace("version: 1", "version: true"),
    "target-list": "version: 1\ntarget: [https://h]\nreleases: [{channels: [stable]}]\n",
    "target-url-list": GOOD_SYNC.replace("url: https://harbor.example.com", "url: [https://h]"),
    "target-url-int": GOOD_SYNC.replace("url: https://harbor.example.com", "url: 443"),
    "target-url-newline": GOOD_SYNC.replace("url: https://harbor.example.com", 'url: "https://h\\nx"'),
    "credentials-list": GOOD_SYNC.replace("env: {username: HARBOR_USERNAME, password: HARBOR_PASSWORD}", "- x"),
    "env-list": GOOD_SYNC.replace("{username: HARBOR_USERNAME, password: HARBOR_PASSWORD}", "[a, b]"),
    "releases-mapping": GOOD_SYNC.replace("  - channels: [stable]", "  channels: [stable]"),
    "release-string": GOOD_SYNC.replace("  - channels: [stable]", "  - stable"),
    "channels-mapping": GOOD_SYNC.replace("channels: [stable]", "channels: {stable: 1}"),
    "channels-nested": GOOD_SYNC.replace("channels: [stable]", "channels: [[stable]]"),
    "arches-int": GOOD_SYNC.replace("channels: [stable]", "channels: [stable]\n    arches: 64"),
    "images-mapping": GOOD_SYNC + "images: {a: b}\n",
    "sources-list": GOOD_SYNC + "sources: [x]\n",
    "endpoints-list": GOOD_SYNC + "sources: {endpoints: [docker.io]}\n",
    "endpoint-value-list": GOOD_SYNC + "sources: {endpoints: {docker.io: [https://h]}}\n",
    "copy-list": GOOD_SYNC + "copy: [jobs]\n",
    "jobs-string": GOOD_SYNC + "copy: {jobs: many}\n",
    "jobs-huge": GOOD_SYNC + "copy: {jobs: " + "9" * 4000 + "}\n",
    "timeout-inf": GOOD_SYNC + "copy: {timeout: .inf}\n",
    "outputs-list": GOOD_SYNC.replace("  textfile: out/rke2_mirror.prom", "  - out/rke2_mirror.prom"),
    "textfile-mapping": GOOD_SYNC.replace("textfile: out/rke2_mirror.prom", "textfile: {a: b}"),
    "node-string": GOOD_SYNC + "node: yes\n",
    "with-auth-string": GOOD_SYNC + "node: {with_auth: 'yes'}\n",
    "lock-list": GOOD_SYNC + "lock: [a]\n",
    "key-int": GOOD_SYNC + "1: x\n",
    "key-list": GOOD_SYNC + "? [a, b]\n: x\n",
    "key-with-newline": GOOD_SYNC + '"lock\\nx": a\n',
    "huge-key": GOOD_SYNC + "k" * 200_000 + ": x\n",
    "duplicate-key": GOOD_SYNC + "version: 1\n",
}

# A credentials value that is printed today: none of these may appear in the error output.
SECRET_SYNC: dict[str, str] = {
    "env-password": GOOD_SYNC.replace("password: HARBOR_PASSWORD", f"password: '{SECRET}'"),
    "env-username": GOOD_SYNC.replace("username: HARBOR_USERNAME", f"username: '{SECRET}'"),
    "env-password-int": GOOD_SYNC.replace("password: HARBOR_PASSWORD", "password: 31337421"),
    "env-password-list": GOOD_SYNC.replace("password: HARBOR_PASSWORD", f"password: ['{SECRET}']"),
    "env-password-binary": GOOD_SYNC.replace("password: HARBOR_PASSWORD", "password: !!binary SHVudGVyMi1TZWNyZXQh"),
    "env-password-bad-int": GOOD_SYNC.replace("password: HARBOR_PASSWORD", f"password: !!int {SECRET}"),
    "env-password-bad-float": GOOD_SYNC.replace("password: HARBOR_PASSWORD", f"password: !!float {SECRET}"),
    "env-password-with-newline": GOOD_SYNC.replace("password: HARBOR_PASSWORD", f'password: "{SECRET}\\nX"'),
    "credentials-scalar": GOOD_SYNC.replace("env: {username: HARBOR_USERNAME, password: HARBOR_PASSWORD}",
                                            f"'{SECRET}'"),
    "env-scalar": GOOD_SYNC.replace("{username: HARBOR_USERNAME, password: HARBOR_PASSWORD}", f"'{SECRET}'"),
    "target-file-int": GOOD_SYNC.replace("env: {username: HARBOR_USERNAME, password: HARBOR_PASSWORD}",
                                         "file: 31337421"),
    "sources-file-bool": GOOD_SYNC + "sources: {credentials: {file: true}}\n",
    "url-userinfo": GOOD_SYNC.replace("url: https://harbor.example.com", f"url: 'https://admin:{SECRET}@h.example'"),
    "release-url-userinfo": GOOD_SYNC.replace("channels: [stable]",
                                              f"channels: [stable]\n    release_url: 'ftp://u:{SECRET}@r.example'"),
}
SECRET_TRACES = (SECRET, "31337421", "SHVudGVyMi1TZWNyZXQh", "Hunter2")

# --------------------------------------------------------------------------- helpers


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    seconds: float


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> Run:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rke2_mirror", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", **(env or {})})
    return Run(proc, time.monotonic() - t0)


def problems_of(name: str, run: Run, *, forbidden: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a run that must be refused: exit 2, exactly one `rke2-mirror: error:` line on
    stderr, nothing on stdout, no traceback, quick; none of `forbidden` anywhere in the output."""
    p, out = run.proc, []
    lines = p.stderr.splitlines()
    if p.returncode != 2:
        out.append(f"exit {p.returncode}")
    if len(lines) != 1 or not lines[0].startswith("rke2-mirror: error: "):
        out.append(f"stderr is not one error line: {p.stderr[:600]!r}")
    if "Traceback" in p.stderr + p.stdout:
        out.append("a traceback")
    if p.stdout.strip():
        out.append(f"stdout: {p.stdout[:200]!r}")
    if run.seconds > FAST:
        out.append(f"took {run.seconds:.1f}s")
    out += [f"printed {f!r}" for f in forbidden if f in p.stderr + p.stdout]
    return [f"{name}: {'; '.join(out)} (stderr: {p.stderr[:300]!r})"] if out else []


def run_corpus(cases: dict[str, list[str]], *, forbidden: tuple[str, ...] = ()) -> dict[str, Run]:
    """Run each case's command line (two at a time) and assert every one was refused properly."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(cases, pool.map(lambda args: cli(*args), cases.values())))
    bad = [p for name, run in runs.items() for p in problems_of(name, run, forbidden=forbidden)]
    assert not bad, "\n".join(bad)
    return runs


def write_files(directory: Path, docs: dict[str, bytes | str], suffix: str = ".yaml") -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, doc in docs.items():
        path = directory / f"{name}{suffix}"
        path.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
        out[name] = path
    return out


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images.txt"
    path.write_text("docker.io/rancher/mirrored-pause:3.6\n")
    return path


# --------------------------------------------------------------------------- the YAML layer in-process


@pytest.mark.parametrize("name", NASTY_YAML)
def test_the_yaml_layer_refuses_each_nasty_document_quickly(name: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(yamlsafe.YAMLRefused) as info:
        yamlsafe.load(NASTY_YAML[name])
    assert time.monotonic() - t0 < 3, name
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize("name", ["deep-flow-list", "deep-flow-unclosed", "alias-bomb", "merge-key-bomb",
                                  "recursive-alias", "nul-byte"])
def test_the_pure_python_parser_is_bounded_too(name: str) -> None:
    """PyYAML without libyaml: the same bounds (slower, still bounded)."""
    with pytest.raises(yamlsafe.YAMLRefused):
        yamlsafe._run(NASTY_YAML[name], yamlsafe.MAX_BYTES,
                      (yamlsafe.MAX_DEPTH, yamlsafe.MAX_NODES, yamlsafe.MAX_CHARS), True, yamlsafe._PyLoader)


def test_the_yaml_layer_names_the_line_and_keeps_ordinary_documents() -> None:
    assert yamlsafe.load("a: 1\nb: [x, y]\nc: &c {d: 2}\ne: *c\n") == {"a": 1, "b": ["x", "y"], "c": {"d": 2},
                                                                       "e": {"d": 2}}
    assert yamlsafe.load("") is None and yamlsafe.load("\ufeffa: 1\n") == {"a": 1}
    for text, line in [("a: 1\nb: \x00\n", 2), (b"a: 1\n\nb: \xff\n", 3), ("a: 1\nb: [\n", 3),
                       ("x: 1\ny: " + "[" * 100, 2), (alias_bomb(), 6)]:
        with pytest.raises(yamlsafe.YAMLRefused) as info:
            yamlsafe.load(text)
        assert info.value.line == line, (text[:40], str(info.value))
    # as deep and as big as allowed still parses
    assert yamlsafe.load("[" * yamlsafe.MAX_DEPTH + "]" * yamlsafe.MAX_DEPTH) is not None
    assert len(yamlsafe.load(alias_bomb(levels=4, width=10))["mirrors"]) == 10


@pytest.mark.parametrize("name", list(NASTY_YAML) + list(BAD_REGISTRIES))
def test_registries_yaml_parser_refuses_in_one_line(name: str) -> None:
    doc = NASTY_YAML.get(name) or BAD_REGISTRIES[name]
    with pytest.raises(InputError) as info:
        Registries.parse(doc, "registries.yaml")
    message = str(info.value)
    assert message.startswith("registries.yaml") and "\n" not in message and len(message) < 400, message
    assert SECRET not in message


@pytest.mark.parametrize("name", list(NASTY_YAML) + list(BAD_CONFIG_YAML))
def test_config_yaml_readers_refuse_in_one_line(name: str) -> None:
    doc = NASTY_YAML.get(name) or BAD_CONFIG_YAML[name]
    readers = [system_default_registry_of]
    if name in NASTY_YAML or name == "top-list":  # the other keys are kept: a wrong SDR is simply replaced
        readers += [default_endpoint_disabled, lambda t, o: set_system_default_registry(t, "h.example", o)]
    for reader in readers:
        with pytest.raises(InputError) as info:
            reader(doc, "config.yaml")
        assert str(info.value).startswith("config.yaml") and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("name", list(NASTY_YAML) + list(BAD_SYNC))
def test_sync_config_parser_refuses_in_one_line(name: str) -> None:
    doc = NASTY_YAML.get(name) or BAD_SYNC[name]
    with pytest.raises(job.ConfigError) as info:
        job.parse_config(doc, "sync.yaml", Path("/etc/rke2-mirror"))
    message = str(info.value)
    assert message.startswith("sync.yaml") and "\n" not in message and len(message) < 2100, message


@pytest.mark.parametrize("name", SECRET_SYNC)
def test_sync_config_errors_never_print_a_credentials_value(name: str) -> None:
    with pytest.raises(job.ConfigError) as info:
        job.parse_config(SECRET_SYNC[name], "sync.yaml", Path("/etc/rke2-mirror"))
    message = str(info.value)
    assert message.startswith("sync.yaml:") and "\n" not in message, message
    assert not [s for s in SECRET_TRACES if s in message], message


def test_secret_keys_are_recognised() -> None:
    for path in ("target.credentials", "target.credentials.env.password", "sources.credentials.file",
                 "x.password", "x.api_token", "x.client_secret", "x.auth", "x.passwd"):
        assert is_secret(path), path
    for path in ("target.url", "copy.jobs", "releases[0].channels[1]", "outputs.textfile", "node.ca_file"):
        assert not is_secret(path), path


def test_hostile_rewrites_and_endpoints_are_notes_not_hangs_or_crashes() -> None:
    t0 = time.monotonic()
    repo = "rancher/mirrored-sig-storage-snapshot-validation-webhook"
    for pattern in (r"^([a-z/-]|[a-z/-])*X$", r"^(\w+-?)+X$", r"^(a+)+$", "(" * 3000 + ")" * 3000, "x" * 5000,
                    "[", r"a{99999999999}"):
        result, notes = apply_rewrites(repo, [(pattern, "y/$1")])
        assert result == repo and notes, pattern
    assert time.monotonic() - t0 < 2
    regs = Registries.parse("mirrors:\n  docker.io:\n    endpoint: ['http://[::1', 'https://h:99999', 'https://h:x',"
                            " '', '\\n']\n")
    attempts = resolve_endpoints(ImageRef.parse("docker.io/rancher/x:1"), regs, None, None)
    assert attempts[-1].default and any("endpoint ignored" in n for n in attempts[-1].notes)


# --------------------------------------------------------------------------- the YAML parsers through the CLI

# The command line gets a sample of each corpus (a run costs ~0.6 s of start-up); the parsers get all of it above.
CLI_NASTY = ["deep-flow-unclosed", "deep-block-map", "alias-bomb", "merge-key-bomb", "recursive-alias",
             "huge-scalar", "many-nodes", "invalid-utf8", "nul-byte", "python-tag"]


def test_cli_verify_refuses_hostile_registries_yaml(tmp_path: Path, images: Path) -> None:
    docs = {n: NASTY_YAML[n] for n in CLI_NASTY} | {n: BAD_REGISTRIES[n] for n in (
        "top-list", "auth-password-mapping", "key-with-newline")}
    paths = write_files(tmp_path / "registries", docs)
    runs = run_corpus({n: ["verify", "--images", str(images), "--registries-yaml", str(p)] for n, p in paths.items()},
                      forbidden=(SECRET,))
    assert str(paths["alias-bomb"]) in runs["alias-bomb"].proc.stderr  # the file is named
    assert not Path("/tmp/rke2-mirror-pwned").exists()


def test_cli_verify_refuses_hostile_config_yaml(tmp_path: Path, images: Path) -> None:
    registries = tmp_path / "registries.yaml"
    registries.write_text("mirrors: {}\n")
    docs = {n: NASTY_YAML[n] for n in ("deep-flow-unclosed", "alias-bomb", "huge-comment", "nul-byte")}
    docs |= {n: BAD_CONFIG_YAML[n] for n in ("top-list", "sdr-list")}
    paths = write_files(tmp_path / "config", docs)
    run_corpus({n: ["verify", "--images", str(images), "--registries-yaml", str(registries), "--config-yaml", str(p)]
                for n, p in paths.items()})


def test_cli_registries_yaml_merge_refuses_a_hostile_existing_file_and_keeps_it(tmp_path: Path) -> None:
    docs = {n: NASTY_YAML[n] for n in ("deep-flow-unclosed", "alias-bomb", "recursive-alias", "huge-scalar",
                                       "invalid-utf8")}
    docs |= {n: BAD_REGISTRIES[n] for n in ("top-scalar", "auth-password-mapping")}
    paths = write_files(tmp_path / "existing", docs)
    before = {n: p.read_bytes() for n, p in paths.items()}
    run_corpus({n: ["registries-yaml", "--to", "https://harbor.example.com", "--merge", "--output", str(p)]
                for n, p in paths.items()}, forbidden=(SECRET,))
    assert {n: p.read_bytes() for n, p in paths.items()} == before  # nothing lost
    # a hostile --config-yaml: refused, kept, and --output not written either (both are built before either is)
    config = tmp_path / "config.yaml"
    config.write_bytes(NASTY_YAML["alias-bomb"])
    run = cli("registries-yaml", "--to", "https://harbor.example.com", "--output", str(tmp_path / "registries.yaml"),
              "--config-yaml", str(config))
    assert run.proc.returncode == 2 and "Traceback" not in run.proc.stderr and run.seconds < FAST
    (line,) = run.proc.stderr.splitlines()  # the error alone: no "wrote ..." before it
    assert line.startswith(f"rke2-mirror: error: {config}: more than 50000 YAML nodes")
    assert config.read_bytes() == NASTY_YAML["alias-bomb"]
    assert not (tmp_path / "registries.yaml").exists()


def test_cli_sync_check_config_refuses_hostile_configs(tmp_path: Path) -> None:
    docs: dict[str, bytes | str] = {n: NASTY_YAML[n] for n in CLI_NASTY} | {"huge-comment": NASTY_YAML["huge-comment"]}
    docs |= {n: BAD_SYNC[n] for n in ("empty", "top-list", "target-url-newline", "jobs-huge", "huge-key")}
    paths = write_files(tmp_path / "sync", docs)
    run_corpus({n: ["sync", str(p), "--check-config"] for n, p in paths.items()})
    # and a run (not only --check-config): refused before the lock, no textfile (no outputs section was read)
    runs = run_corpus({n: ["sync", str(paths[n])] for n in ("alias-bomb", "deep-flow-unclosed")})
    assert not list((tmp_path / "sync").glob("*.lock")) and runs


def test_cli_sync_never_prints_a_credentials_value(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "secret", {n: SECRET_SYNC[n] for n in (
        "env-password", "env-password-int", "env-password-bad-int", "credentials-scalar", "url-userinfo")})
    runs = run_corpus({n: ["sync", str(p), "--check-config"] for n, p in paths.items()}, forbidden=SECRET_TRACES)
    line = runs["env-password"].proc.stderr.strip()
    assert line == (f"rke2-mirror: error: {paths['env-password']}:5: target.credentials.env.password: not an "
                    "environment variable name (the config names the variable, never the secret itself; the value is "
                    "not shown)")


def test_sync_output_node_files_are_read_with_the_same_bounds(tmp_path: Path) -> None:
    """An existing config.yaml (kept keys: parsed) or registries.yaml to merge that is hostile is refused
    before anything is written over it; one not merged is simply replaced."""
    text = GOOD_SYNC.replace("  textfile: out/rke2_mirror.prom",
                             "  registries_yaml: node/registries.yaml\n  config_yaml: node/config.yaml")
    cfg = job.LoadedConfig(tmp_path / "c.yaml", job.parse_config(text, "c.yaml", tmp_path))
    node = tmp_path / "node"
    node.mkdir()
    refs = [ImageRef.parse("docker.io/rancher/mirrored-pause:3.6")]
    (node / "config.yaml").write_bytes(NASTY_YAML["alias-bomb"])
    with pytest.raises(InputError, match="config.yaml: more than 50000 YAML nodes"):
        job.write_node_files(cfg, refs, [], None, lambda s: None)
    (node / "config.yaml").write_bytes(b"x" * (yamlsafe.MAX_BYTES + 10))
    with pytest.raises(InputError, match=r"config\.yaml: more than 4 MiB"):
        job.write_node_files(cfg, refs, [], None, lambda s: None)
    assert (node / "config.yaml").stat().st_size == yamlsafe.MAX_BYTES + 10  # untouched
    (node / "registries.yaml").write_bytes(b"\xff" * 10)  # not merged: replaced
    (node / "config.yaml").write_text("token: x\n")
    written = job.write_node_files(cfg, refs, [], None, lambda s: None)
    assert sorted(Path(p).name for p in written) == ["config.yaml", "registries.yaml"]
    assert "mirrors" in yaml.safe_load((node / "registries.yaml").read_text())


def test_a_sync_run_with_a_hostile_node_file_stops_before_copying_and_says_so(monkeypatch, tmp_path: Path) -> None:
    def no_engine(*a, **k):
        raise AssertionError("nothing may be copied when a node file cannot be parsed")

    monkeypatch.setattr(job.run.mirror_job, "mirror", no_engine)
    (tmp_path / "l.txt").write_text("rancher/x:1\n")
    (tmp_path / "node").mkdir()
    bomb = NASTY_YAML["alias-bomb"]
    config = tmp_path / "c.yaml"
    for name, merge in (("config.yaml", False), ("registries.yaml", True)):
        (tmp_path / "node" / name).write_bytes(bomb)
        config.write_text("version: 1\ntarget: {url: 'http://127.0.0.1:1'}\nimages: [l.txt]\n"
                          f"node: {{merge: {str(merge).lower()}}}\n"
                          "outputs: {textfile: out/sync.prom, registries_yaml: node/registries.yaml, "
                          "config_yaml: node/config.yaml}\n")
        with pytest.raises(InputError, match=f"node/{name}: more than 50000 YAML nodes") as info:
            job.sync(config)
        assert info.value.exit_code == 2
        assert "rke2_mirror_last_run_success{config=\"c\"} 0" in (tmp_path / "out" / "sync.prom").read_text()
        assert (tmp_path / "node" / name).read_bytes() == bomb  # kept
        (tmp_path / "node" / name).write_text("{}\n")


# --------------------------------------------------------------------------- release-server answers


OFFERED = 300 * 1024 * 1024  # what a hostile endpoint offers to send


class HostileRelease(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.sent: dict[str, int] = {}
        self.routes: dict[str, object] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _gzip_stream(total: int, chunk: int = 1024 * 1024) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * chunk
    return b"".join(z.compress(zeros) for _ in range(total // chunk)) + z.flush()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileRelease

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        kind, payload = route  # type: ignore[misc]
        sent = 0
        try:
            if kind in ("endless", "redirect"):  # no Content-Length, bytes until the client hangs up (or OFFERED)
                if kind == "redirect":  # ... after a redirect to `payload`
                    self.send_response(302)
                    self.send_header("Location", payload.decode())
                else:
                    self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                block = payload * (65536 // len(payload))
                while sent < OFFERED:
                    self.wfile.write(block)
                    sent += len(block)
            elif kind == "declared":  # a Content-Length of OFFERED, honestly followed by the bytes
                self.send_response(200)
                self.send_header("Content-Length", str(OFFERED))
                self.end_headers()
                block = b"a" * 65536
                while sent < OFFERED:
                    self.wfile.write(block)
                    sent += len(block)
            else:  # "body": fixed bytes, optionally with headers
                body, headers = payload
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                sent = len(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.server.lock:
                self.server.sent[self.path] = self.server.sent.get(self.path, 0) + sent


@pytest.fixture(scope="module")
def hostile() -> HostileRelease:
    server = HostileRelease()
    version = "v1.28.9+rke2r1"
    list_name = "rke2-images-all.linux-amd64.txt"
    bomb = _gzip_stream(OFFERED)
    deep_data = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    weird = {"data": [{"id": "stable", "latest": "x\n" * 100_000}, {"id": "a\nb" * 1000, "latest": "v1"},
                      {"id": "k" * 100_000}, {"id": ["x"]}, "junk", {"id": "latest", "latest": 1}]}
    big_sum = hashlib.sha256(b"never sent").hexdigest()
    server.routes = {
        "/ch/endless": ("endless", b'{"data": ['),
        "/ch/declared": ("declared", None),
        "/ch/gzip-bomb": ("body", (bomb, {"Content-Encoding": "gzip"})),
        "/ch/deep-data": ("body", (deep_data, {})),
        "/ch/deep-top": ("body", (b"[" * 200_000 + b"]" * 200_000, {})),
        "/ch/not-json": ("body", (b"\xff\xfe<html>", {})),
        "/ch/array": ("body", (b"[]", {})),
        "/ch/data-mapping": ("body", (b'{"data": {"stable": "v1.28.9+rke2r1"}}', {})),
        "/ch/empty": ("body", (b"", {})),
        "/ch/weird-ids": ("body", (json.dumps(weird).encode(), {})),
        "/ch/brotli": ("body", (b"\x0b\x02\x80{}\x03", {"Content-Encoding": "br"})),
        "/ch/bad-gzip": ("body", (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"})),
        "/ch/small": ("body", (json.dumps({"data": [{"id": "stable", "latest": version}]}).encode(), {})),
        "/ch/redirect-endless": ("redirect", b"/ch/small"),
        # release assets: a checksum file without end; a list named by its checksum file but without end
        f"/rel-sum/{version.replace('+', '%2B')}/sha256sum-amd64.txt": ("endless", b"0" * 64 + b"  x.txt\n"),
        f"/rel-list/{version.replace('+', '%2B')}/sha256sum-amd64.txt": ("body", (f"{big_sum}  {list_name}\n".encode(), {})),
        f"/rel-list/{version.replace('+', '%2B')}/{list_name}": ("endless", b"docker.io/rancher/x:1\n"),
    }
    yield server
    server.stop()


PEAK_RSS = r"""
import atexit, resource, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
sys.argv[0] = "rke2-mirror"
from rke2_mirror.cli.app import main
main()
"""


def cli_peak_kib(tmp_path: Path, *args: str) -> tuple[Run, int]:
    """The CLI run in-process of a wrapper that reports its peak RSS (KiB) at exit."""
    out = tmp_path / f"rss-{time.monotonic_ns()}"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(out), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
    return Run(proc, time.monotonic() - t0), int(out.read_text())


def test_endless_and_oversized_channel_answers_end_in_one_line_with_flat_memory(hostile, tmp_path: Path) -> None:
    base_run, baseline = cli_peak_kib(tmp_path, "list", "stable", "--channel-url", f"{hostile.url}/ch/not-json",
                                      "--lists-dir", str(tmp_path / "lists"))
    assert not problems_of("baseline", base_run)
    for route in ("endless", "declared", "gzip-bomb"):
        url = f"{hostile.url}/ch/{route}"
        run, peak = cli_peak_kib(tmp_path, "list", "stable", "--channel-url", url, "--lists-dir", str(tmp_path / "lists"))
        assert not problems_of(route, run)
        line = run.proc.stderr.strip()
        assert url in line and "1 MiB" in line, line  # names the URL and the cap
        assert peak - baseline < 48 * 1024, (route, peak, baseline)  # KiB: far below the 300 MB offered
        assert hostile.sent.get(f"/ch/{route}", 0) < 64 * 1024 * 1024, hostile.sent  # most was never sent


def test_hostile_channel_answers_end_in_one_line(hostile, tmp_path: Path) -> None:
    routes = ["deep-data", "deep-top", "not-json", "array", "data-mapping", "empty", "brotli", "bad-gzip", "weird-ids"]
    runs = run_corpus({r: ["list", "stable", "--channel-url", f"{hostile.url}/ch/{r}", "--lists-dir",
                           str(tmp_path / "lists")] for r in routes})
    assert "nested too deeply" in runs["deep-data"].proc.stderr
    assert "no usable latest version" in runs["weird-ids"].proc.stderr
    unknown = cli("list", "nightly", "--channel-url", f"{hostile.url}/ch/weird-ids", "--lists-dir", str(tmp_path))
    assert not problems_of("unknown", unknown)
    assert "channels: stable, latest" in unknown.proc.stderr and "kkkk" not in unknown.proc.stderr


def test_endless_checksum_file_and_image_list_are_refused_at_their_caps(hostile, tmp_path: Path) -> None:
    cases = {"checksums": ("/rel-sum", "sha256sum-amd64.txt", "1 MiB"),
             "list": ("/rel-list", "rke2-images-all.linux-amd64.txt", "4 MiB")}
    runs = run_corpus({n: ["list", "v1.28.9+rke2r1", "--release-url", f"{hostile.url}{prefix}", "--lists-dir",
                           str(tmp_path / "lists")] for n, (prefix, _, _) in cases.items()})
    for name, (prefix, asset, cap) in cases.items():
        line = runs[name].proc.stderr
        assert asset in line and cap in line and f"{hostile.url}{prefix}/" in line, line
    assert CHECKSUMS_MAX_BYTES == CHANNELS_MAX_BYTES == 1024 * 1024 and LIST_MAX_BYTES == 4 * 1024 * 1024
    assert not (tmp_path / "lists" / "rke2" / "v1.28.9+rke2r1" / "rke2-images-all.linux-amd64.txt").exists()


def test_an_oversized_cached_file_is_refused_offline(tmp_path: Path) -> None:
    d = tmp_path / "lists" / "rke2" / "v1.28.9+rke2r1"
    d.mkdir(parents=True)
    with open(d / "sha256sum-amd64.txt", "wb") as f:
        f.truncate(CHECKSUMS_MAX_BYTES + 1)  # sparse: costs no disk
    run = cli("list", "v1.28.9+rke2r1", "--offline", "--lists-dir", str(tmp_path / "lists"))
    assert not problems_of("offline", run)
    assert "sha256sum-amd64.txt: more than 1 MiB" in run.proc.stderr


def test_a_redirect_with_an_endless_body_is_followed_without_reading_it(hostile, tmp_path: Path) -> None:
    import httpx

    source = ReleaseSource.default("rke2", f"{hostile.url}/rel", f"{hostile.url}/ch/redirect-endless", tmp_path,
                                   env={})
    t0 = time.monotonic()
    with httpx.Client(timeout=10) as client:
        assert resolve_version("stable", source, client) == "v1.28.9+rke2r1"
    assert time.monotonic() - t0 < FAST
    assert hostile.sent.get("/ch/redirect-endless", 0) < 64 * 1024 * 1024, hostile.sent


def test_channel_parser_in_process() -> None:
    for raw in (b"[" * 100_000, b'{"data": ' + b"[" * 100_000, b"\xff", b"", b"null", b"[]", b'"x"',
                b"x" * (CHANNELS_MAX_BYTES + 1), b'{"data": 1}'):
        with pytest.raises(InputError) as info:
            parse_channels(raw, "http://ch.example/channels")
        assert str(info.value).startswith("channel server http://ch.example/channels") and "\n" not in str(info.value)


def test_resolve_version_with_an_in_memory_gzip_answer_is_capped(tmp_path: Path) -> None:
    """httpx.MockTransport answers are decoded in memory already: the cap still applies to them."""
    import httpx

    body = gzip.compress(b" " * (2 * 1024 * 1024))
    source = ReleaseSource.default("rke2", "http://rel.test/d", "http://rel.test/channels", tmp_path, env={})
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Encoding": "gzip"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as c, \
            pytest.raises(InputError, match=r"^http://rel\.test/channels: more than 1 MiB"):
        resolve_version("stable", source, c)


# --------------------------------------------------------------------------- property-based

KEYS = ["mirrors", "configs", "endpoint", "rewrite", "tls", "auth", "ca_file", "cert_file", "key_file",
        "insecure_skip_verify", "username", "password", "auth", "identity_token", "docker.io", "*", "h:5000",
        "version", "target", "url", "credentials", "env", "file", "releases", "channels", "versions", "arches",
        "flavors", "product", "images", "sources", "endpoints", "copy", "jobs", "max_rps", "outputs", "textfile",
        "node", "with_auth", "lock", "system-default-registry", "<<"]
YAML_ALPHABET = "[]{}:,-?&*!|>'\"#%@`\n\t \\/.0123456789abcxyz<=~" + "\x00\x85\u2028\ufeff\xe9"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.sampled_from(KEYS + ["https://h", "http://[::1", "^a/(.*)$", "(a+)+", "v1.28.9+rke2r1",
                                            "stable", "", " ", "1", "yes", "~", "&a", "*a", "!!binary x"]),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(0, 9)), inner, max_size=4)),
    max_leaves=30)


@st.composite
def yamlish(draw) -> str | bytes:
    """Mostly-valid YAML with random types at every level, sometimes mutated by YAML-significant characters,
    sometimes raw bytes."""
    doc = draw(values)
    kind = draw(st.sampled_from(["flow", "block", "json"]))
    try:
        if kind == "json":
            text = json.dumps(doc, allow_nan=True, default=str)
        else:
            text = yaml.safe_dump(doc, default_flow_style=kind == "flow", allow_unicode=True, sort_keys=False)
    except (TypeError, ValueError, yaml.YAMLError):
        text = repr(doc)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(alphabet=YAML_ALPHABET, min_size=1, max_size=6)) + text[pos:]
    if draw(st.integers(0, 9)) == 0:
        return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=4))
    return text


PROPERTY = settings(max_examples=250, deadline=2000, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TARGET = RegistryURL.parse("https://harbor.example.com/prefix", what="--to")
IMAGE = ImageRef.parse("docker.io/rancher/mirrored-pause:3.6")


@PROPERTY
@given(yamlish())
def test_property_registries_yaml_parses_or_raises_input_error(doc) -> None:
    try:
        regs = Registries.parse(doc, "registries.yaml")
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    existing = load_yaml_mapping(doc, "registries.yaml")
    try:  # and what reads it next does not crash either
        resolve_endpoints(IMAGE, regs, None, None)
        merged, _ = build_registries(NodeConfig(TARGET), existing)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    dump_registries(merged)


@PROPERTY
@given(yamlish())
def test_property_config_yaml_readers_parse_or_raise_input_error(doc) -> None:
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc
    for reader in (system_default_registry_of, default_endpoint_disabled,
                   lambda t, o: set_system_default_registry(t, "h.example", o)):
        try:
            reader(text, "config.yaml")
        except InputError as exc:
            assert "\n" not in str(exc)


@PROPERTY
@given(yamlish())
def test_property_sync_config_parses_or_raises_config_error(doc) -> None:
    try:
        job.parse_config(doc, "sync.yaml", Path("/etc/rke2-mirror"))
    except job.ConfigError as exc:
        assert "\n" not in str(exc)


FULL_SYNC = {
    "version": 1,
    "target": {"url": "https://harbor.example.com", "ca_file": "ca.pem", "insecure_skip_verify": False,
               "credentials": {"env": {"username": "HARBOR_USERNAME", "password": "HARBOR_PASSWORD"}},
               "public_projects": False},
    "releases": [{"product": "rke2", "channels": ["stable"], "versions": ["v1.30.14+rke2r1"], "arches": ["amd64"],
                  "flavors": ["all"], "release_url": "https://r.example", "channel_url": "https://c.example",
                  "offline": False}],
    "images": ["extra.txt"],
    "sources": {"endpoints": {"docker.io": "https://cache.example"}, "ca_file": "src.pem",
                "insecure_skip_verify": False, "credentials": {"file": "auth.json"}},
    "copy": {"jobs": 4, "retries": 5, "timeout": 60, "platforms": ["linux/amd64"], "signatures": False,
             "max_rps": 20, "pull_floor": 20},
    "lists_dir": "lists",
    "outputs": {"report": "r.json", "textfile": "t.prom", "registries_yaml": "registries.yaml",
                "config_yaml": "config.yaml"},
    "node": {"ca_file": "/etc/ca.pem", "with_auth": False, "merge": False, "system_default_registry": True,
             "rke2_version": "v1.30.14+rke2r1"},
    "lock": "sync.lock",
}
FULL_REGISTRIES = {
    "mirrors": {"docker.io": {"endpoint": ["https://h:443"], "rewrite": {"^rancher/(.*)$": "p/rancher/$1"}},
                "*": {"endpoint": ["https://h"]}},
    "configs": {"h:443": {"tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
                                  "insecure_skip_verify": False},
                          "auth": {"username": "u", "password": "p", "auth": "dTpw", "identity_token": "t"}}},
}


def _paths(doc, prefix=()):
    """Every path into `doc` (keys and list indexes), the containers' own included."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _replaced(doc, path, value):
    if not path:
        return value
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[path[0]] = _replaced(out[path[0]], path[1:], value)
    return out


def _dump_or_none(doc) -> str | None:
    try:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError, TypeError):  # pragma: no cover - a value safe_dump cannot write
        return None


@PROPERTY
@given(st.sampled_from(list(_paths(FULL_SYNC))[1:]), values)
def test_property_sync_config_with_a_wrong_value_anywhere(path, value) -> None:
    """A complete, valid config with one value (at any depth) replaced: parsed, or one ConfigError line that
    never shows a value given under a credentials key."""
    text = _dump_or_none(_replaced(FULL_SYNC, path, value))
    if text is None:
        return
    try:
        job.parse_config(text, "sync.yaml", Path("/etc/rke2-mirror"))
    except MirrorError as exc:
        message = str(exc)
        assert isinstance(exc, job.ConfigError) and "\n" not in message, message
        if "credentials" in path and isinstance(value, str) and len(value.strip()) >= 6:
            assert value.strip() not in message, (path, message)


@PROPERTY
@given(st.sampled_from(list(_paths(FULL_REGISTRIES))[1:]), values)
def test_property_registries_yaml_with_a_wrong_value_anywhere(path, value) -> None:
    text = _dump_or_none(_replaced(FULL_REGISTRIES, path, value))
    if text is None:
        return
    try:
        regs = Registries.parse(text, "registries.yaml")
        resolve_endpoints(IMAGE, regs, None, None)
        doc, _ = build_registries(NodeConfig(TARGET), load_yaml_mapping(text, "registries.yaml"))
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message, message
        if "auth" in path and isinstance(value, str) and len(value.strip()) >= 6:
            assert value.strip() not in message, (path, message)
        return
    dump_registries(doc)


@PROPERTY
@given(st.one_of(st.binary(max_size=64), values.map(lambda v: json.dumps(v, default=str).encode()),
                 values.map(lambda v: json.dumps({"data": v}, default=str).encode())))
def test_property_channel_answers_parse_or_raise_input_error(raw: bytes) -> None:
    try:
        channels = parse_channels(raw, "http://ch.example/channels")
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(k, str) and isinstance(v, str) and "\n" not in k for k, v in channels.items())
