"""Faults between rke2-mirror and real registries (issue #7), through the real command line.

A fault-injecting proxy (`rke2_mirror_testkit.faultproxy`) sits in front of the source and/or the
target docker-registry: connection resets mid-blob and mid-upload, 500/502/503, 429 with
Retry-After, truncated bodies, a final PUT or a manifest PUT that the registry committed but the client
heard fail, and a wrong blob served under its digest.  Plans are deterministic (occurrence counts per
object, never timing) and every transient fault stays within the retry bound: no operation sees more
than two faulted attempts in a row, so the runs that mix in permanent faults use `--retries 3` (the
default is 5).  What was injected is asserted > 0, kind by kind, so a proxy that injects nothing fails
the test.  The module prints the figures for benchmarks/RESULTS.md at its end.

Stalls past the read timeout are tested at the engine level: the CLI's read timeout (60 s, the
`Registry(timeout=)` default) is not settable from the command line or the environment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rke2_mirror.model.oci import parse_manifest
from rke2_mirror_testkit.faultproxy import Fault, FaultProxy, Plan, start_fault_proxy
from rke2_mirror_testkit.images import ImagePusher, blob_exists, list_tags, make_layer_blob, push_image
from rke2_mirror_testkit.registry_proc import REGISTRY_BINARY, start_registry

from .test_crash import catalog
from .test_mirror import assert_complete, run_cli, write_list

GOOD = ["docker.io/rancher/alpha:v1", "docker.io/rancher/beta:v2", "docker.io/rancher/gamma:v3",
        "docker.io/library/delta:1.0"]
BAD_500 = "docker.io/rancher/bad-500:v1"  # one layer always answers 500
BAD_WRONG = "docker.io/rancher/bad-wrong:v1"  # one (chunked-upload sized) layer served with a byte changed
BIG = 5_000_000  # > the 4 MiB monolithic limit: goes up in PATCHes
KILLS = 3

# Figures for benchmarks/RESULTS.md, printed at the end of the module.
FIGURES: Counter = Counter()


def repo_tag(ref: str) -> tuple[str, str]:
    name, tag = ref.split("/", 1)[1].rsplit(":", 1)
    return name, tag


def last_layer(img) -> str:
    return parse_manifest(img.media_type, img.manifest).layers[-1].digest


# --------------------------------------------------------------------------- plans

# The faults are spread over the four images so that no single image (they go in parallel) waits
# through every backoff in turn.
ALPHA_DELTA = r"^/v2/(rancher/alpha|library/delta)/"
BETA_DELTA = r"^/v2/(rancher/beta|library/delta)/"
BETA_GAMMA = r"^/v2/rancher/(beta|gamma)/"
GAMMA_DELTA = r"^/v2/(rancher/gamma|library/delta)/"


def src_transient() -> Plan:
    """Source side: manifests 502/429/503 (a cold copy GETs a tag at once, a rerun HEADs it first);
    the first GET of each blob (gamma's aside: its 5 MB layer meets its RST at the target, inside
    the PATCH) reset after 1000 bytes; alpha's second GETs truncated (FIN while Content-Length
    promised more)."""
    return Plan([
        Fault("status", status=502, method=("GET", "HEAD"), target="manifest", match=BETA_GAMMA),  # 1st ask for a tag
        Fault("status", status=429, headers={"Retry-After": "1"}, method="GET", target="manifest", per="repo",
              match=ALPHA_DELTA),  # 1st manifest GET
        Fault("status", status=503, method=("GET", "HEAD"), target="manifest", every=5, per="all"),
        Fault("reset", target="blob", after_bytes=1000, match=r"^/v2/(?!rancher/gamma/)"),
        Fault("truncate", target="blob", nth=(2,), after_bytes=5000, match=r"^/v2/rancher/alpha/blobs/"),
    ], seed=7)


def dst_transient() -> Plan:
    """Target side: HEADs 502/503, mounts 502, an RST inside the PATCH body of a 5 MB layer, beta's final
    PUTs committed then answered with an RST, delta's answered 500, a child manifest's PUT body cut by
    an RST, tags stored but answered 500.  No object gets two faulted requests in a row here, and
    with src_transient no operation sees more than two faults in a row: `--retries 3` gets through."""
    return Plan([
        Fault("status", status=503, method="GET", target="ping"),
        Fault("status", status=503, method="HEAD", target="manifest", match=GAMMA_DELTA + r"manifests/(?!sha256:)"),
        Fault("status", status=502, method="HEAD", target="blob", every=3, per="all"),
        Fault("status", status=502, method="POST", target="upload", match=r"mount="),
        Fault("reset", method="PATCH", target="upload", after_bytes=200_000),
        Fault("reset", method="PUT", target="upload", phase="response", match=r"^/v2/rancher/beta/"),
        Fault("status", status=500, method="PUT", target="upload", match=r"^/v2/library/delta/"),
        Fault("status", status=500, method="PUT", target="manifest", forward=True,
              match=BETA_DELTA + r"manifests/(?!sha256:)"),  # tags
        Fault("reset", method="PUT", target="manifest", after_bytes=100, per="repo",  # RST inside the body of
              match=r"^/v2/rancher/alpha/manifests/sha256:"),  # alpha's first child manifest
    ], seed=11, max_streak=1)


PERMANENT_LABELS = ("http-500-permanent", "corrupt-permanent")


def src_permanent(images) -> Plan:
    """BAD_500's layer always answers 500; BAD_WRONG's big layer is always served with one byte changed
    (same length, same digest claimed); everything else as in src_transient."""
    return Plan([
        Fault("status", status=500, target="blob", always=True, transient=False, match=last_layer(images[BAD_500]),
              name="http-500-permanent"),
        Fault("corrupt", target="blob", always=True, transient=False, match=last_layer(images[BAD_WRONG]),
              name="corrupt-permanent"),
        *src_transient().faults,
    ], seed=3)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One source registry for the module: four good images (every manifest kind, a shared base layer,
    a 5 MB layer) and two that the permanent plans break."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip(f"{REGISTRY_BINARY} not installed (apt-get install docker-registry)")
    reg = start_registry(tmp_path_factory.mktemp("faults-src"))
    base = make_layer_blob("faults-base", 150_000)
    try:
        with ImagePusher(reg.url) as p:
            images = {
                GOOD[0]: push_image(p, "rancher/alpha", "v1", kind="docker", base=base, seed="alpha",
                                    layer_sizes=(120_000,)),
                GOOD[1]: push_image(p, "rancher/beta", "v2", kind="oci", base=base, seed="beta",
                                    layer_sizes=(90_000, 30_000)),
                GOOD[2]: push_image(p, "rancher/gamma", "v3", kind="docker", platforms=None, base=base, seed="gamma",
                                    layer_sizes=(BIG,)),
                GOOD[3]: push_image(p, "library/delta", "1.0", kind="oci", platforms=None, seed="delta",
                                    layer_sizes=(60_000,)),
                BAD_500: push_image(p, "rancher/bad-500", "v1", kind="docker", platforms=None, base=base,
                                    seed="bad-500", layer_sizes=(70_000,)),
                BAD_WRONG: push_image(p, "rancher/bad-wrong", "v1", kind="oci", platforms=None, seed="bad-wrong",
                                      layer_sizes=(BIG,)),
            }
        yield reg, images
    finally:
        reg.stop()


@pytest.fixture
def proxies():
    """`proxies(backend_url, plan, **kw) -> FaultProxy`; stopped at teardown, injections added to FIGURES."""
    started: list[FaultProxy] = []

    def make(url: str, plan: Plan, **kw) -> FaultProxy:
        fp = start_fault_proxy(url, plan, **kw)
        started.append(fp)
        return fp

    yield make
    for fp in started:
        fp.stop()
        for label, n in fp.snapshot().items():
            FIGURES[f"fault {label}"] += n
            FIGURES["faults injected"] += n


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield
    if not FIGURES:
        return
    lines = ["fault-injection figures (tests/test_faults.py):"]
    for key in ("faults injected", "runs killed", "images verified", "tags checked after a kill", "images lost"):
        lines.append(f"  {key}: {FIGURES.get(key, 0)}")
    for key in sorted(k for k in FIGURES if k.startswith("fault ")):
        lines.append(f"  {key[6:]}: {FIGURES[key]}")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + "\n".join(lines))


def verify(url: str, images: dict, refs: list[str]) -> None:
    """Every tag of `refs` resolves at `url` to complete content with the source's digest."""
    for ref in refs:
        repo, tag = repo_tag(ref)
        try:
            assert assert_complete(url, repo, tag) == images[ref].digest, ref
        except (AssertionError, LookupError):
            FIGURES["images lost"] += 1
            raise
        FIGURES["images verified"] += 1


def assert_injected(fp: FaultProxy, *labels: str, methods: dict[str, str] | None = None) -> None:
    got = fp.snapshot()
    missing = [l for l in labels if got[l] == 0]
    assert not missing, f"the proxy injected no {missing}: {dict(got)}"
    for label, method in (methods or {}).items():
        assert any(e.label == label and e.method == method for e in fp.events), (label, method, fp.events)


def by_source(stdout: str) -> dict[str, dict]:
    return {i["source"]: i for i in json.loads(stdout)["images"]}


def assert_untouched(dst, images: dict, ref: str) -> None:
    """Nothing of a failed image is tagged at the target."""
    repo, _ = repo_tag(ref)
    assert list_tags(dst.url, repo) == [], f"{ref} was tagged although it failed"


def assert_wrong_blob_never_committed(dst, images: dict) -> None:
    digest = last_layer(images[BAD_WRONG])
    with ImagePusher(dst.url) as p:
        assert not blob_exists(p, "rancher/bad-wrong", digest)
    quoted = digest.replace(":", "%3A")
    assert not [l for l in dst.access_log() if '"PUT ' in l and quoted in l and '" 201 ' in l]


def mirror_args(lst: Path, to: str, src_url: str, *extra: str) -> list[str]:
    return ["mirror", "--images", str(lst), "--to", to, "--source-endpoint", f"docker.io={src_url}", *extra]


# --------------------------------------------------------------------------- mirror

def test_mirror_completes_through_transient_faults(source, registry_factory, proxies, tmp_path):
    src, images = source
    dst = registry_factory(name="dst")
    sp, dp = proxies(src.url, src_transient()), proxies(dst.url, dst_transient())
    lst = write_list(tmp_path / "images.txt", GOOD)
    proc = run_cli(*mirror_args(lst, dp.url, sp.url, "--json"), timeout=90)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["summary"]["copied"] == len(GOOD) and rep["summary"]["failed"] == 0
    verify(dst.url, images, GOOD)
    assert_injected(sp, "http-503", "http-502", "http-429", "reset", "truncate")
    assert_injected(dp, "http-503", "http-502", "reset", "http-500", "http-500-after-forward",
                    methods={"reset": "PATCH"})
    assert any(e.label == "reset" and e.method == "PUT" for e in dp.events)  # committed, then RST
    assert sum(sp.snapshot().values()) >= 12 and sum(dp.snapshot().values()) >= 10


def test_mirror_permanent_faults_fail_exactly_that_image(source, registry_factory, proxies, tmp_path):
    src, images = source
    dst = registry_factory(name="dst")
    sp = proxies(src.url, src_permanent(images))
    lst = write_list(tmp_path / "images.txt", GOOD + [BAD_500, BAD_WRONG])
    failed_list = tmp_path / "failed.txt"
    proc = run_cli(*mirror_args(lst, dst.url, sp.url, "--json", "--retries", "3", "--jobs", "6",
                               "--failed-list", str(failed_list)), timeout=90)
    assert proc.returncode == 1, proc.stderr
    res = by_source(proc.stdout)
    assert {r for r, i in res.items() if i["status"] == "failed"} == {BAD_500, BAD_WRONG}
    assert "HTTP 500" in res[BAD_500]["error"] and last_layer(images[BAD_500]) in res[BAD_500]["error"]
    assert "hashes to" in res[BAD_WRONG]["error"] and last_layer(images[BAD_WRONG]) in res[BAD_WRONG]["error"]
    assert "Traceback" not in proc.stderr
    assert [l for l in failed_list.read_text().splitlines() if not l.startswith("#")] == [BAD_500, BAD_WRONG]
    verify(dst.url, images, GOOD)
    assert_untouched(dst, images, BAD_500)
    assert_untouched(dst, images, BAD_WRONG)
    assert_wrong_blob_never_committed(dst, images)
    got = sp.snapshot()  # one per attempt (--retries 3), and the transient ones on the way
    assert got["http-500-permanent"] >= 3 and got["corrupt-permanent"] >= 1
    assert_injected(sp, "http-503", "http-502", "http-429", "reset", "truncate")


def test_mirror_into_harbor_through_api_and_registry_faults(source, harbor, pki, rke2_mirror_env, proxies, tmp_path):
    """A Harbor target (HTTPS, token auth) behind the proxy: systeminfo 503, project HEAD 502, the project
    POST answered 500 after Harbor created it (the retry gets 409), and registry faults."""
    src, images = source
    rke2_mirror_env.set_credentials("admin", "Harbor12345")
    dp = proxies(harbor.url, Plan([
        Fault("status", status=503, method="GET", target="other", match=r"^/api/v2\.0/systeminfo"),
        Fault("status", status=502, method="HEAD", target="other", match=r"^/api/v2\.0/projects"),
        Fault("status", status=500, method="POST", target="other", match=r"^/api/v2\.0/projects", forward=True),
        Fault("status", status=503, method="HEAD", target="blob", every=3, per="all"),
        Fault("reset", method="PUT", target="upload", phase="response"),
        Fault("status", status=500, method="PUT", target="manifest", forward=True, match=r"/manifests/(?!sha256:)"),
    ]), backend_verify=harbor.ca_file)
    lst = write_list(tmp_path / "images.txt", GOOD[:1])
    proc = run_cli("mirror", "--images", str(lst), "--to", dp.url, "--ca-file", str(pki.cert_path),
                   "--source-endpoint", f"docker.io={src.url}", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert set(harbor.projects) == {"rancher"} and not harbor.projects["rancher"].public
    auth = ("admin", "Harbor12345")
    for ref in GOOD[:1]:
        repo, tag = repo_tag(ref)
        assert assert_complete(harbor.url, repo, tag, verify=harbor.verify, auth=auth) == images[ref].digest
        FIGURES["images verified"] += 1
    assert_injected(dp, "http-503", "http-502", "http-500-after-forward", "reset")
    assert any(e.method == "POST" and "projects" in e.path for e in dp.events)


def test_target_failing_every_request_is_one_line_and_exit_2(source, registry_factory, proxies, tmp_path):
    src, images = source
    dst = registry_factory(name="dst")
    dp = proxies(dst.url, Plan([Fault("status", status=503, method="*", target="any", always=True,
                                      transient=False)]))
    lst = write_list(tmp_path / "images.txt", GOOD[:1])
    proc = run_cli(*mirror_args(lst, dp.url, src.url, "--retries", "2"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rke2-mirror: error: target ") and "503" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert dp.snapshot()["http-503"] == 2  # --retries 2: two attempts, then it stops
    assert [l for l in dst.access_log() if "rke2-mirror" in l] == []  # nothing reached the registry


# --------------------------------------------------------------------------- save / load

def archive_names(path: Path) -> tuple[set[str], set[str]]:
    """(image names in index.json, blob digests) of an archive."""
    with tarfile.open(path) as tf:
        index = json.load(tf.extractfile("index.json"))
        blobs = {"sha256:" + n.rsplit("/", 1)[1] for n in tf.getnames() if n.startswith("blobs/sha256/")}
    names = {e["annotations"]["io.containerd.image.name"] for e in index["manifests"]}
    return names, blobs


def test_save_and_load_through_transient_and_permanent_faults(source, registry_factory, proxies, tmp_path):
    src, images = source
    # save: the good images come through the transient faults, the two broken ones fail, and the
    # archive holds exactly the good ones; the wrong blob is neither in it nor in the work dir
    sp = proxies(src.url, src_permanent(images))
    out = tmp_path / "images.tar"
    lst = write_list(tmp_path / "images.txt", GOOD + [BAD_500, BAD_WRONG])
    proc = run_cli("save", "--images", str(lst), "--output", str(out), "--source-endpoint", f"docker.io={sp.url}",
                   "--json", "--retries", "3", "--jobs", "6", timeout=90)
    assert proc.returncode == 1, proc.stderr
    res = by_source(proc.stdout)
    assert {r for r, i in res.items() if i["status"] == "failed"} == {BAD_500, BAD_WRONG}
    assert all(res[r]["status"] == "copied" and res[r]["digest"] == images[r].digest for r in GOOD)
    assert "hashes to" in res[BAD_WRONG]["error"] and "HTTP 500" in res[BAD_500]["error"]
    names, blobs = archive_names(out)
    assert names == set(GOOD)
    assert last_layer(images[BAD_WRONG]) not in blobs and last_layer(images[BAD_500]) not in blobs
    work = tmp_path / "images.tar.work" / "blobs" / "sha256"
    assert work.is_dir() and not (work / last_layer(images[BAD_WRONG]).split(":")[1]).exists()
    assert sp.snapshot()["corrupt-permanent"] >= 1 and sp.snapshot()["http-500-permanent"] >= 3
    assert_injected(sp, "http-503", "http-502", "http-429", "reset", "truncate")

    # load through transient target faults (it re-hashes every blob as it streams): exit 0, digests equal
    dst = registry_factory(name="dst")
    dp = proxies(dst.url, dst_transient())
    proc = run_cli("load", str(out), "--to", dp.url, "--json", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["copied"] == len(GOOD)
    verify(dst.url, images, GOOD)
    assert_injected(dp, "http-503", "http-502", "reset", "http-500", "http-500-after-forward",
                    methods={"reset": "PATCH"})

    # load where the target always refuses the final PUT of gamma's big layer (and cuts its first PATCH
    # short): gamma fails, untagged, the others load
    dst2 = registry_factory(name="dst2")
    big = last_layer(images[GOOD[2]])
    dp2 = proxies(dst2.url, Plan([
        Fault("status", status=500, method="PUT", target="upload", always=True, transient=False, match=big,
              name="http-500-permanent"),
        Fault("reset", method="PATCH", target="upload", after_bytes=200_000),
    ]))
    proc = run_cli("load", str(out), "--to", dp2.url, "--json", "--retries", "3", timeout=90)
    assert proc.returncode == 1, proc.stderr
    res = by_source(proc.stdout)
    assert {r for r, i in res.items() if i["status"] == "failed"} == {GOOD[2]}
    assert "HTTP 500" in res[GOOD[2]]["error"]
    verify(dst2.url, images, [r for r in GOOD if r != GOOD[2]])
    assert_untouched(dst2, images, GOOD[2])
    with ImagePusher(dst2.url) as p:
        assert not blob_exists(p, "rancher/gamma", big)
    assert dp2.snapshot()["http-500-permanent"] >= 1 and dp2.snapshot()["reset"] > 0

    # the source is healthy again: the same save resumes in its work dir and completes
    sp.set_plan([])
    proc = run_cli("save", "--images", str(lst), "--output", str(out), "--source-endpoint", f"docker.io={sp.url}",
                   "--json", "--jobs", "6", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert archive_names(out)[0] == set(GOOD + [BAD_500, BAD_WRONG])
    assert not (tmp_path / "images.tar.work").exists()


# --------------------------------------------------------------------------- sync

def write_sync_config(tmp_path: Path, name: str, src_url: str, dst_url: str, refs: list[str], retries: int) -> Path:
    lst = write_list(tmp_path / f"{name}.txt", refs)
    doc = {"version": 1, "target": {"url": dst_url}, "images": [lst.name],
           "sources": {"endpoints": {"docker.io": src_url}}, "copy": {"retries": retries, "jobs": len(refs)},
           "outputs": {"report": f"out/{name}.json"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_sync_through_transient_and_permanent_faults(source, registry_factory, proxies, tmp_path):
    """One scheduled run with both kinds at once and `copy.retries: 3`: the good images come through,
    the two broken ones are reported per image, exit 1."""
    src, images = source
    dst = registry_factory(name="dst")
    sp, dp = proxies(src.url, src_permanent(images)), proxies(dst.url, dst_transient())
    config = write_sync_config(tmp_path, "faults", sp.url, dp.url, GOOD + [BAD_500, BAD_WRONG], retries=3)
    proc = run_cli("sync", str(config), "--json", timeout=90)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["result"] == "failed" and rep["summary"]["failed"] == 2 and rep["summary"]["copied"] == len(GOOD)
    status = {i["source"]: i["status"] for i in rep["images"]}
    assert status == {**{r: "copied" for r in GOOD}, BAD_500: "failed", BAD_WRONG: "failed"}
    assert json.loads((tmp_path / "out" / "faults.json").read_text())["summary"]["failed"] == 2
    assert f"failed   {BAD_500}" in proc.stderr and f"failed   {BAD_WRONG}" in proc.stderr
    verify(dst.url, images, GOOD)
    assert_untouched(dst, images, BAD_500)
    assert_untouched(dst, images, BAD_WRONG)
    assert_wrong_blob_never_committed(dst, images)
    assert_injected(sp, "http-503", "http-502", "http-429", "reset", "truncate", *PERMANENT_LABELS)
    assert_injected(dp, "http-503", "http-502", "reset", "http-500", "http-500-after-forward",
                    methods={"reset": "PATCH"})


# --------------------------------------------------------------------------- concurrency and SIGKILL

def light_plans() -> tuple[Plan, Plan]:
    """Fewer, cheaper faults (no 429 pause) for the runs that are about concurrency and SIGKILL."""
    return (Plan([Fault("reset", target="blob", after_bytes=1000),
                  Fault("status", status=503, method=("GET", "HEAD"), target="manifest", every=4, per="all")]),
            Plan([Fault("reset", method="PATCH", target="upload", nth=(1, 2), after_bytes=200_000),
                  Fault("status", status=500, method="PUT", target="upload",
                        match=r"/(library/delta|rancher/alpha)/blobs/"),
                  Fault("reset", method="PUT", target="upload", phase="response", match=r"/rancher/beta/blobs/"),
                  Fault("status", status=500, method="PUT", target="manifest", forward=True)]))


def test_concurrent_mirrors_through_faults_into_one_target(source, registry_factory, proxies, tmp_path):
    src, images = source
    dst = registry_factory(name="dst")
    src_plan, dst_plan = light_plans()
    sp, dp = proxies(src.url, src_plan), proxies(dst.url, dst_plan)
    lst = write_list(tmp_path / "images.txt", GOOD)
    cmd = [sys.executable, "-m", "rke2_mirror", *mirror_args(lst, dp.url, sp.url)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    verify(dst.url, images, GOOD)
    assert sum(sp.snapshot().values()) > 0 and sum(dp.snapshot().values()) > 0


def test_sigkill_during_faulty_runs_then_rerun_completes(source, registry_factory, proxies, tmp_path):
    """Runs killed at random points while faults are being injected; after every kill each tag at the
    target resolves to complete content; then a rerun completes with equal digests."""
    src, images = source
    dst = registry_factory(name="dst")
    sp, dp = proxies(src.url, light_plans()[0]), proxies(dst.url, light_plans()[1])
    lst = write_list(tmp_path / "images.txt", GOOD)
    cmd = [sys.executable, "-m", "rke2_mirror", *mirror_args(lst, dp.url, sp.url)]
    rng = random.Random(20261207)
    # Kill points are counted in requests reaching the target, not in seconds (on a loaded machine a
    # timer kills runs that are still importing Python): the first run dies among its blob transfers,
    # the next ones among their tag PUTs, so there are tags to check.
    points = [("requests", rng.randint(5, 40))] + [("tag PUTs", rng.randint(1, 3)) for _ in range(KILLS - 1)]
    for what, at in points:
        count = (lambda: dp.seen()) if what == "requests" else (
            lambda: dp.seen("PUT", "manifest", match=r"/manifests/(?!sha256:)"))
        start = count()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proc.poll() is None and count() - start < at and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before its kill point ({at} {what})"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        FIGURES["runs killed"] += 1
        for repo, tags in catalog(dst.url).items():
            for tag in tags:
                assert_complete(dst.url, repo, tag)  # never a tag pointing at missing content
                FIGURES["tags checked after a kill"] += 1
    assert sum(sp.snapshot().values()) > 0 and sum(dp.snapshot().values()) > 0
    sp.set_plan([]), dp.set_plan([])  # the network is healthy again
    final = run_cli(*mirror_args(lst, dp.url, sp.url), timeout=90)
    assert final.returncode == 0, final.stderr
    verify(dst.url, images, GOOD)


# --------------------------------------------------------------------------- regressions of bugs this suite found

def test_platform_check_of_a_single_platform_image_retries_its_config_read(source, registry_factory, proxies,
                                                                           tmp_path):
    src, images = source
    dst = registry_factory(name="dst")
    config = parse_manifest(images[GOOD[3]].media_type, images[GOOD[3]].manifest).config.digest
    sp = proxies(src.url, Plan([Fault("status", status=503, target="blob", match=config)]))  # its 1st GET only
    lst = write_list(tmp_path / "images.txt", GOOD[3:4])
    proc = run_cli(*mirror_args(lst, dst.url, sp.url, "--platform", "linux/amd64"), timeout=60)
    assert sp.snapshot()["http-503"] == 1
    assert proc.returncode == 0, proc.stderr  # the config read is retried like every other request
    verify(dst.url, images, GOOD[3:4])


def test_a_signature_that_cannot_be_read_fails_its_image_before_the_tag(registry_factory, proxies, tmp_path):
    """Referrers go after their subject and before its tag: when the signature can't be read, the image
    fails (named), its tag is not written, and a rerun without the fault completes it."""
    from rke2_mirror_testkit.images import push_signature

    src, dst = registry_factory(name="src"), registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        img = push_image(p, "rancher/signed", "v1", seed="signed", platforms=None, layer_sizes=(10_000,))
        sig_digest = push_signature(p, "rancher/signed", img.digest)
    sp = proxies(src.url, Plan([Fault("status", status=503, method="GET", target="manifest", match=r"\.sig$",
                                      always=True, transient=False)]))
    lst = write_list(tmp_path / "images.txt", ["docker.io/rancher/signed:v1"])
    proc = run_cli(*mirror_args(lst, dst.url, sp.url, "--signatures", "--retries", "2", "--json"), timeout=60)
    assert sp.snapshot()["http-503"] >= 1  # the fault fired
    res = by_source(proc.stdout)["docker.io/rancher/signed:v1"]
    assert proc.returncode == 1 and res["status"] == "failed" and ".sig" in res["error"], res
    assert "v1" not in list_tags(dst.url, "rancher/signed")  # no tag on an image whose signature is missing
    proc = run_cli(*mirror_args(lst, dst.url, src.url, "--signatures", "--json"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert assert_complete(dst.url, "rancher/signed", "v1") == img.digest
    sig = img.digest.replace(":", "-") + ".sig"
    assert assert_complete(dst.url, "rancher/signed", sig) == sig_digest


# --------------------------------------------------------------------------- stalls

def test_cli_timeout_gives_up_on_a_stalled_read_and_retries(source, registry_factory, proxies, tmp_path):
    """`--timeout 1`: a source blob GET that stalls for 12 s after its headers is abandoned after a
    second and fetched again; the run ends long before the stall would have (60 s default: ≥ 12 s)."""
    src, images = source
    dst = registry_factory(name="dst")
    sp = proxies(src.url, Plan([Fault("stall", target="blob", after_bytes=0, seconds=12, per="all", nth=(1,))]))
    lst = write_list(tmp_path / "images.txt", [GOOD[0]])
    t0 = time.monotonic()
    proc = run_cli(*mirror_args(lst, dst.url, sp.url, "--timeout", "1", "--retries", "3"), timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert sp.snapshot()["stall"] == 1
    assert elapsed < 10, elapsed
    verify(dst.url, images, [GOOD[0]])
    bad = run_cli(*mirror_args(lst, dst.url, sp.url, "--timeout", "0"), timeout=30)
    assert bad.returncode == 2 and "--timeout" in bad.stderr


def test_stalls_past_the_read_timeout_are_retried(source, registry_factory, proxies):
    """Engine level, every kind of stall: timeout=1.5 s against proxies that stall for 4 s: a source blob GET after 1000 bytes, a manifest GET after its
    headers, a target manifest HEAD before any byte, and a final PUT the registry committed but whose
    answer is held back."""
    from rke2_mirror.engine.copy import CopyEngine, CopyOptions, CopyTask
    from rke2_mirror.model.reference import ImageRef, RegistryURL, target_ref
    from rke2_mirror.endpoints.registry import Registry
    from rke2_mirror.engine.retry import RetryPolicy
    from rke2_mirror.endpoints.routing import SourceRouter, TargetLocator

    src, images = source
    dst = registry_factory(name="dst")
    sp = proxies(src.url, Plan([
        Fault("stall", target="blob", after_bytes=1000, seconds=4, match=r"^/v2/rancher/(alpha|gamma)/"),
        Fault("stall", target="manifest", method="GET", seconds=4, after_bytes=0, per="repo"),
    ]))
    dp = proxies(dst.url, Plan([
        # a tag's HEAD: no body, so the stall comes before the status line
        Fault("stall", target="manifest", method="HEAD", seconds=4, match=r"/manifests/(?!sha256:)"),
        Fault("stall", method="PUT", target="upload", seconds=4, match=r"^/v2/rancher/gamma/"),
    ]))
    retry = RetryPolicy(attempts=4, initial_wait=0.05, max_wait=0.5)
    target = RegistryURL.parse(dp.url)
    router = SourceRouter(lambda base: Registry(base, retry=retry, timeout=1.5),
                          {"docker.io": RegistryURL.parse(sp.url)})
    dst_reg = Registry(target.base_url, retry=retry, actions="pull,push", timeout=1.5)
    refs = [GOOD[0], GOOD[2]]
    t0 = time.monotonic()
    try:
        rep = CopyEngine(router, TargetLocator(dst_reg), CopyOptions(retry=retry)).run(
            [CopyTask(r, target_ref(r, target)) for r in map(ImageRef.parse, refs)])
    finally:
        router.close()
        dst_reg.close()
    assert [r.status for r in rep.images] == ["copied", "copied"], [r.error for r in rep.images]
    assert time.monotonic() - t0 < 40
    verify(dst.url, images, refs)
    got_src, got_dst = sp.snapshot(), dp.snapshot()
    assert got_src["stall"] >= 4 and got_dst["stall"] >= 3, (got_src, got_dst)
    assert any(e.method == "HEAD" for e in dp.events) and any(e.method == "PUT" for e in dp.events)
