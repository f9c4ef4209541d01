"""The end-to-end demo, with no internet: local registries, a local release server, the real CLI.

    python -m rke2_mirror_testkit.demo [--keep]

1. a release server laid out like github.com/rancher/rke2/releases (302 redirects, sha256sum files)
   and a channel server, both serving the repository's lists/;
2. a "docker.io" registry seeded with generated RKE2-like images for every image of the release
   (multi-arch indexes sharing a base layer), and a Harbor look-alike (HTTPS with its own CA, token
   auth, project API) as the air-gapped mirror;
3. the commands an operator runs, printed before they run: list, mirror --dry-run, mirror, the same
   mirror again (no-op), registries-yaml, verify, and save/load through an archive when present.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rke2_mirror_testkit.images import ImagePusher, make_layer_blob, push_image
from rke2_mirror_testkit.pki import make_ca
from rke2_mirror_testkit.registry_proc import start_registry
from rke2_mirror_testkit.release_server import start_release_server
from rke2_mirror_testkit.tokenserver import default_users, start_harbor

REPO_ROOT = Path(__file__).resolve().parents[3]
CHANNEL_VERSION = "v1.30.14+rke2r1"


def _lists_root() -> Path:
    for cand in (REPO_ROOT / "lists", Path.cwd() / "lists"):
        if (cand / "rke2").is_dir():
            return cand
    raise SystemExit("demo: cannot find the repository's lists/ directory (run from the checkout)")


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _run(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(args, env=env, text=True)
    if proc.returncode not in ok:
        raise SystemExit(f"demo: command failed with exit status {proc.returncode}: {shown}")
    return proc


def _seed(url: str, refs: list[str]) -> None:
    """Push a small generated multi-arch image for every reference (docker.io/<repo>:<tag>)."""
    base = make_layer_blob("demo-base-os", 400_000)

    def one(i_ref: tuple[int, str]) -> None:
        i, ref = i_ref
        name, tag = ref.split("/", 1)[1].rsplit(":", 1)
        kind = "oci" if i % 3 == 0 else "docker"
        with ImagePusher(url) as p:
            push_image(p, name, tag, kind=kind, base=base, layer_sizes=(60_000 + 7_000 * (i % 5),), seed=ref,
                       platforms=(("linux", "amd64"), ("linux", "arm64")))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, enumerate(refs)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (its path is printed)")
    args = ap.parse_args(argv)
    cli = [sys.executable, "-m", "rke2_mirror"]
    work = Path(tempfile.mkdtemp(prefix="rke2-mirror-demo-"))
    stack: list = []
    try:
        lists = _lists_root()
        _say("starting a local release server, a source registry (as docker.io) and a Harbor look-alike")
        releases = start_release_server(lists, {"rke2": {"stable": CHANNEL_VERSION, "latest": CHANNEL_VERSION}})
        stack.append(releases)
        src = start_registry(work / "dockerhub")
        stack.append(src)
        ca = make_ca(work / "ca")
        harbor = start_harbor(work / "harbor", ca=ca, users=default_users())
        stack.append(harbor)
        print(f"release server {releases.release_url('rke2')}\nsource (docker.io) {src.url}\n"
              f"harbor {harbor.url} (CA {ca.cert_path}, user admin)")
        env = {**os.environ,
               "RKE2_MIRROR_RELEASE_URL": releases.release_url("rke2"),
               "RKE2_MIRROR_CHANNEL_URL": releases.channel_url("rke2"),
               "RKE2_MIRROR_USERNAME": "admin", "RKE2_MIRROR_PASSWORD": "Harbor12345",
               "XDG_CACHE_HOME": str(work / "cache"), "DOCKER_CONFIG": str(work / "docker-config")}
        common = ["--source-endpoint", f"docker.io={src.url}"]
        target = ["--to", harbor.url, "--ca-file", str(ca.cert_path)]

        _say("1. the release's image list, verified against its sha256sum file")
        listed = subprocess.run(cli + ["list", "stable"], env=env, text=True, capture_output=True)
        sys.stderr.write(listed.stderr)
        if listed.returncode != 0:
            raise SystemExit("demo: rke2-mirror list failed")
        refs = [l for l in listed.stdout.splitlines() if l.strip()]
        print(f"$ {' '.join(cli[1:])} list stable\n" + "\n".join(refs[:5]) + f"\n... ({len(refs)} images)")
        t0 = time.monotonic()
        _seed(src.url, refs)
        print(f"(seeded the local docker.io with {len(refs)} generated images in {time.monotonic() - t0:.1f}s)")

        _say("2. copy the release into Harbor (projects created, digests preserved)")
        _run(cli + ["mirror", "--release", "stable"] + target + common, env)
        _say("3. run it again: nothing to copy")
        _run(cli + ["mirror", "--release", "stable"] + target + common, env)

        node_yaml = work / "registries.yaml"
        node_cfg = work / "config.yaml"
        node_cfg.write_text("write-kubeconfig-mode: \"0644\"\n")
        _say("4. the node configuration that matches the mirror (credentials in it: written mode 0600)")
        _run(cli + ["registries-yaml", "--to", harbor.url, "--release", CHANNEL_VERSION,
                    "--node-ca-file", str(ca.cert_path), "--with-auth", "--output", str(node_yaml),
                    "--config-yaml", str(node_cfg)], env)
        print(_redacted(node_yaml.read_text()))
        print(f"config.yaml:\n{node_cfg.read_text()}")
        _say("5. check, as a node would resolve them, that every image will be found")
        _run(cli + ["verify", "--release", CHANNEL_VERSION, "--registries-yaml", str(node_yaml),
                    "--config-yaml", str(node_cfg)], env)
        _say("6. across the air gap: save to one archive, inspect it, load it into a fresh registry")
        archive = work / f"rke2-images-{CHANNEL_VERSION.replace('+', '-')}.tar"
        _run(cli + ["save", "--release", "stable", "--output", str(archive)] + common, env)
        _run(cli + ["inspect", str(archive)], env)
        inner = start_registry(work / "airgapped")
        stack.append(inner)
        _run(cli + ["load", str(archive), "--to", inner.url], env)
        _say("done")
        print(f"rke2 {CHANNEL_VERSION}: listed, mirrored into Harbor, node files written and verified, "
              "saved to an archive and loaded across the gap."
              + ("" if args.keep else " (The local registries stop now; --keep keeps the work directory.)"))
        return 0
    finally:
        for item in reversed(stack):
            try:
                item.stop()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if args.keep:
            print(f"(work directory kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _redacted(text: str) -> str:
    """registries.yaml as shown on screen: passwords masked (the file itself keeps them, mode 0600)."""
    import re

    return re.sub(r'(password|identity_token):\s*.*', r'\1: "***"', text)


if __name__ == "__main__":
    sys.exit(main())
