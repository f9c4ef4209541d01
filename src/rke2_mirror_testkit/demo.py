"""The end-to-end demo, with no internet: local registries, a local release server, the real CLI.

    scripts/demo.sh [--keep]        (or: python -m rke2_mirror_testkit.demo [--keep])

1. a release server laid out like github.com/rancher/rke2/releases (302 redirects, sha256sum files)
   and a channel server, both serving the repository's lists/;
2. a "docker.io" registry seeded with generated RKE2-like images for every image of the release
   (multi-arch indexes sharing a base layer), and a Harbor look-alike (HTTPS with its own CA, token
   auth, project API) as the air-gapped mirror;
3. the commands an operator runs, each printed as typed (`$ rke2-mirror ...`, after the `cd` and
   `export` lines they need) before its output: list, mirror, mirror --dry-run (what another run would
   copy: nothing), the same mirror again (nothing copied), registries-yaml, verify, then save, inspect
   and load through one archive into a fresh registry, and `save --for-node`: a tarball for a node's
   agent/images directory, and what `inspect` says a node will find in it;
4. the rest of the air-gap payload: `save` with a Helm chart from a local chart repository (its declared
   images join the image set) and the release's install files, `inspect` showing them, and `extract`
   writing the files into a directory for INSTALL_RKE2_ARTIFACT_PATH (each hashed again).

--keep keeps the work directory and, on a terminal, the local registries and release server until you
press Enter, so the printed commands can be run again from another shell.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rke2_mirror_testkit.chart_repo import start_chart_repo
from rke2_mirror_testkit.images import ImagePusher, make_layer_blob, push_image
from rke2_mirror_testkit.pki import make_ca
from rke2_mirror_testkit.registry_proc import start_registry
from rke2_mirror_testkit.release_server import add_install_files, start_release_server
from rke2_mirror_testkit.tokenserver import default_users, start_harbor

REPO_ROOT = Path(__file__).resolve().parents[2]
CHANNEL_VERSION = "v1.30.14+rke2r1"
PROG = "rke2-mirror"


def _lists_root() -> Path:
    for cand in (REPO_ROOT / "lists", Path.cwd() / "lists"):
        if (cand / "rke2").is_dir():
            return cand
    raise SystemExit("demo: cannot find the repository's lists/ directory (run from the checkout)")


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _cli_bin(work: Path) -> Path:
    """The directory holding the `rke2-mirror` command this demo runs: the venv's bin/ next to this
    interpreter, or (not installed as a console script) a two-line wrapper in the work directory."""
    here = Path(sys.executable).parent
    if (here / PROG).is_file() and os.access(here / PROG, os.X_OK):
        return here
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / PROG
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m rke2_mirror \"$@\"\n")
    wrapper.chmod(0o755)
    return bin_dir


class Shell:
    """Runs `rke2-mirror ...` in the work directory with the demo's environment, printing each command
    first exactly as an operator types it (the `cd` and `export` lines are printed by `setup`)."""

    def __init__(self, work: Path, bin_dir: Path, exports: list[tuple[str, str, str]]) -> None:
        self.work = work
        self.exports = exports  # (name, value, why)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    **{name: value for name, value, _ in exports}}
        self.exe = shutil.which(PROG, path=self.env["PATH"])
        if self.exe is None:  # pragma: no cover - _cli_bin made one
            raise SystemExit(f"demo: no {PROG} command in {bin_dir}")
        self.bin_dir = bin_dir

    def setup(self) -> None:
        print(f"$ cd {shlex.quote(str(self.work))}")
        print(f"$ export PATH={shlex.quote(str(self.bin_dir))}:$PATH   # where {PROG} is installed here")
        for name, value, why in self.exports:
            print(f"$ export {name}={shlex.quote(value)}" + (f"   # {why}" if why else ""))
        sys.stdout.flush()

    def run(self, args: list[str], ok: tuple[int, ...] = (0,), head: int | None = None,
            only: tuple[str, ...] | None = None) -> subprocess.CompletedProcess:
        """`rke2-mirror ARGS`, printed, then run; with `head`, stdout is captured and its first lines shown;
        with `only`, the lines starting with one of those words."""
        shown = shlex.join([PROG, *args])
        print(f"$ {shown}", flush=True)
        capture = head is not None or only is not None
        proc = subprocess.run([self.exe, *args], env=self.env, cwd=self.work, text=True,
                              stdout=subprocess.PIPE if capture else None)
        if head is not None:
            lines = proc.stdout.splitlines()
            print("\n".join(lines[:head]) + (f"\n... ({len(lines)} lines in all)" if len(lines) > head else ""), flush=True)
        elif only is not None:
            lines = proc.stdout.splitlines()
            kept = [line for line in lines if line.startswith(only)]
            print("\n".join(kept) + f"\n... ({len(lines)} lines in all; the lines above are the ones that matter "
                  "here)", flush=True)
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
    ap = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (its path is printed) and, on a terminal, the local registries "
                         "until Enter, so the printed commands can be run again")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rke2-mirror-demo-"))
    stack: list = []
    try:
        lists = work / "lists"  # the release's lists, and its install files (generated) beside them
        shutil.copytree(_lists_root() / "rke2" / CHANNEL_VERSION, lists / "rke2" / CHANNEL_VERSION)
        add_install_files(lists / "rke2" / CHANNEL_VERSION, "amd64")
        _say("starting a local release server, a source registry (as docker.io) and a Harbor look-alike")
        releases = start_release_server(lists, {"rke2": {"stable": CHANNEL_VERSION, "latest": CHANNEL_VERSION}})
        stack.append(releases)
        charts = start_chart_repo()
        stack.append(charts)
        src = start_registry(work / "dockerhub")
        stack.append(src)
        ca = make_ca(work / "ca")
        harbor = start_harbor(work / "harbor", ca=ca, users=default_users())
        stack.append(harbor)
        ca_file = str(ca.cert_path.relative_to(work)) if ca.cert_path.is_relative_to(work) else str(ca.cert_path)
        print(f"release server {releases.release_url('rke2')}   (instead of github.com and update.rke2.io)\n"
              f"source registry {src.url}   (stands in for docker.io: --source-endpoint docker.io=URL below)\n"
              f"Harbor look-alike {harbor.url}   (HTTPS, its CA in {ca_file}; user admin)")
        sh = Shell(work, _cli_bin(work), [
            ("RKE2_MIRROR_RELEASE_URL", releases.release_url("rke2"), "release image lists from the local server"),
            ("RKE2_MIRROR_CHANNEL_URL", releases.channel_url("rke2"), "and its channels (stable, latest)"),
            ("RKE2_MIRROR_USERNAME", "admin", "the Harbor account (never on the command line)"),
            ("RKE2_MIRROR_PASSWORD", "Harbor12345", "the look-alike's demo password"),
            ("XDG_CACHE_HOME", str(work / "cache"), "the verified lists are cached here"),
            ("DOCKER_CONFIG", str(work / "docker-config"), "no credentials from your own ~/.docker"),
        ])
        sh.setup()
        common = ["--source-endpoint", f"docker.io={src.url}"]
        target = ["--to", harbor.url, "--ca-file", ca_file]

        _say("1. the release's image list, verified against its sha256sum file")
        refs = [l for l in sh.run(["list", "stable"], head=5).stdout.splitlines() if l.strip()]
        t0 = time.monotonic()
        _seed(src.url, refs)
        print(f"(seeded the local docker.io with {len(refs)} generated images in {time.monotonic() - t0:.1f}s)")

        _say("2. copy the release into Harbor (projects created, digests preserved)")
        sh.run(["mirror", "--release", "stable", *target, *common])
        print("(each size is what that image added: the base layer all these images share is copied once, "
              "with whichever image reached it first)")
        _say("3. what another run would copy, without writing anything (a dry run: manifest requests only)")
        sh.run(["mirror", "--release", "stable", *target, *common, "--dry-run"])
        _say("4. run it again: nothing to copy")
        sh.run(["mirror", "--release", "stable", *target, *common])

        node_yaml, node_cfg = "registries.yaml", "config.yaml"
        (work / node_cfg).write_text("write-kubeconfig-mode: \"0644\"\n")
        _say("5. the node configuration that matches the mirror (credentials in it: written mode 0600)")
        print(f"(config.yaml stands for a node's /etc/rancher/rke2/config.yaml: {(work / node_cfg).read_text().strip()})")
        sh.run(["registries-yaml", "--to", harbor.url, "--release", CHANNEL_VERSION,
                "--node-ca-file", str(ca.cert_path), "--with-auth", "--output", node_yaml, "--config-yaml", node_cfg])
        print(f"{node_yaml} (passwords masked here):\n" + _redacted((work / node_yaml).read_text()))
        print(f"{node_cfg}:\n{(work / node_cfg).read_text()}")
        _say("6. check, as a node would resolve them, that every image will be found")
        sh.run(["verify", "--release", CHANNEL_VERSION, "--registries-yaml", node_yaml, "--config-yaml", node_cfg])
        _say("7. across the air gap: save to one archive, inspect it, load it into a fresh registry")
        archive = f"rke2-images-{CHANNEL_VERSION.replace('+', '-')}.tar"
        sh.run(["save", "--release", "stable", "--output", archive, *common])
        sh.run(["inspect", archive])
        print("(inspect gives each image's full size, shared layers included; save and load count a shared "
              "layer once, for the first image that needed it)")
        inner = start_registry(work / "airgapped")
        stack.append(inner)
        print(f"(a fresh registry inside the gap: {inner.url})")
        sh.run(["load", archive, "--to", inner.url])
        _say("8. or no registry at all: one tarball per arch a node boots from (its agent/images directory)")
        node_tar = "rke2-images.linux-amd64.tar.zst"
        sh.run(["save", "--for-node", "--release", "stable", "--platform", "linux/amd64",
                "--system-default-registry", harbor.url.split("://", 1)[1], "--output", node_tar, *common])
        sh.run(["inspect", node_tar], only=("archive:", "contents:", "node:"))
        _say("9. the whole payload: a Helm chart (and the images it declares) and RKE2's install files too")
        charts.add_chart("demo-app", "1.0.0", images=[refs[0]])
        print(f"(a local chart repository at {charts.url} holds demo-app 1.0.0, which declares one image of the "
              "release; install.sh stands for https://get.rke2.io)")
        (work / "install.sh").write_text("#!/bin/sh\necho 'install rke2 from INSTALL_RKE2_ARTIFACT_PATH'\n")
        payload = "airgap.tar"
        sh.run(["save", "--release", "stable", "--arch", "amd64", "--chart", f"{charts.url}/demo-app@1.0.0",
                "--install-files", "--install-script", "install.sh", "--output", payload, *common])
        sh.run(["inspect", payload], only=("archive:", "contents:", "IMAGE", "rke2-mirror.local/", "  ↳"))
        sh.run(["extract", payload, "--to", "artifacts"])
        _say("done")
        print(f"rke2 {CHANNEL_VERSION}: listed, mirrored into Harbor, checked with a dry run, node files written and "
              "verified, saved to an archive and loaded across the gap, a node tarball written, and a chart and the "
              "install files carried in an archive and written out for INSTALL_RKE2_ARTIFACT_PATH.")
        _hold_or_stop(args.keep, sys.stdin.isatty())
        return 0
    finally:
        for item in reversed(stack):
            try:
                item.stop()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if args.keep:
            print(f"(stopped the local registries; work directory kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _hold_or_stop(keep: bool, interactive: bool) -> None:
    """Say what happens to the local registries now; with --keep on a terminal, keep them until Enter."""
    if not keep:
        print("The local registries and the release server stop now and the work directory is removed; "
              "scripts/demo.sh --keep keeps them (on a terminal, until you press Enter).")
    elif interactive:
        print(f"The local registries and the release server keep running: in another shell, the `cd` and `export` "
              f"lines above, then any `$ {PROG} ...` line, run as shown.", flush=True)
        try:
            input("Press Enter to stop them (the work directory stays). ")
        except (EOFError, KeyboardInterrupt):
            print()
    else:
        print("The local registries and the release server stop now (stdin is not a terminal, so the demo "
              "cannot wait for Enter): the commands above will no longer reach them. Run scripts/demo.sh --keep "
              "in a terminal to keep them running until you press Enter.")


def _redacted(text: str) -> str:
    """registries.yaml as shown on screen: passwords masked (the file itself keeps them, mode 0600)."""
    return re.sub(r'(password|identity_token):\s*.*', r'\1: "***"', text)


if __name__ == "__main__":
    sys.exit(main())
