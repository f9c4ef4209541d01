"""Hostile registries against the real command line (`python -m rke2_mirror mirror`, a child process):
a huge manifest, a huge error body, a huge /v2/ or token answer, bodies trickled at one byte a second, and
token services where the credentials do not belong (another host, plain http).

Each run must end within `BOUND_S` seconds with `--timeout 3 --retries 1`, its peak RSS (the CLI
process's own, from wait4) below `RSS_MB`, with one clear line: a failed image (exit 1), or one error (exit 2) when the
configuration is at fault; no traceback, and nothing pushed to the target (a recording sink).

The figures (case, refused in one line, seconds, peak RSS, pushed) are printed as a table at the end of
the module (`pytest -s`) and written to `<pytest's base temp dir>/hostile-registry-results.json`.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rke2_mirror_testkit.hostile import HostileRegistry, start_hostile

BOUND_S = 20.0
RSS_MB = 150.0
IMAGE = "docker.io/rancher/hostile:v1"
RESULTS: list[dict] = []


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    rss_mb: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


# Runs the command in a child of its own and writes that child's peak RSS (KiB) to argv[1].  A process
# started by the test process directly would report the test process's peak too: Linux records the
# memory of the process a child execs from (vfork: the parent's) in the child's ru_maxrss.
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(args: list[str], tmp: Path, env: dict[str, str] | None = None, limit: float = 45.0) -> Run:
    """The CLI in a child process, its own peak RSS measured; killed (its whole group) after `limit` seconds."""
    out, err, rss = tmp / "stdout", tmp / "stderr", tmp / "maxrss"
    full_env = dict(os.environ, NO_PROXY="127.0.0.1,127.0.0.2,localhost", no_proxy="127.0.0.1,127.0.0.2,localhost",
                    **(env or {}))
    t0 = time.monotonic()
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, str(rss), sys.executable, "-m", "rke2_mirror", *args],
                                stdout=o, stderr=e, env=full_env, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    rss_mb = int(rss.read_text()) / 1024 if rss.exists() else float("nan")
    return Run(proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), seconds, rss_mb)


def mirror_args(tmp: Path, source: HostileRegistry, sink: HostileRegistry, *extra: str) -> list[str]:
    images = tmp / "images.txt"
    images.write_text(IMAGE + "\n")
    return ["mirror", "--images", str(images), "--to", sink.url, "--source-endpoint", f"docker.io={source.url}",
            "--timeout", "3", "--retries", "1", *extra]


def auth_file(tmp: Path, host: str) -> dict[str, str]:
    path = tmp / "auth.json"
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"alice:secret-pw").decode()}}}))
    return {"REGISTRY_AUTH_FILE": str(path)}


def check_bounded(run: Run, sink: HostileRegistry, case: str, want_rc: int, *needles: str) -> None:
    """The common verdict; records the case's figures first, so a failing case is in the table too."""
    if want_rc == 1:
        mine = [line for line in run.lines if line.startswith("failed") and IMAGE in line]
    else:
        mine = [line for line in run.lines if line.startswith("rke2-mirror: error:")]
    one_line = (run.rc == want_rc and len(mine) == 1 and "Traceback" not in run.stderr
                and all(n in mine[0] for n in needles))
    RESULTS.append({"case": case, "exit": run.rc, "refused_in_one_line": one_line, "seconds": round(run.seconds, 1),
                    "peak_rss_mb": round(run.rss_mb, 1), "pushed": len(sink.pushed),
                    "line": mine[0] if mine else None})
    assert "Traceback" not in run.stderr, run.stderr
    assert run.rc == want_rc, run.stderr
    assert len(mine) == 1, run.stderr
    for n in needles:
        assert n in mine[0], mine[0]
    assert run.seconds < BOUND_S, run.seconds
    assert run.rss_mb < RSS_MB, run.rss_mb
    assert sink.pushed == [], sink.pushed


@pytest.fixture(scope="module", autouse=True)
def results_table(tmp_path_factory: pytest.TempPathFactory):
    yield
    if not RESULTS:
        return
    path = tmp_path_factory.getbasetemp() / "hostile-registry-results.json"
    path.write_text(json.dumps(RESULTS, indent=2))
    rows = [("case", "exit", "refused in one line", "seconds", "peak RSS MB", "pushed")]
    rows += [(r["case"], str(r["exit"]), "yes" if r["refused_in_one_line"] else "no", f"{r['seconds']:.1f}",
              f"{r['peak_rss_mb']:.0f}", str(r["pushed"])) for r in RESULTS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n\nhostile registries (--timeout 3 --retries 1; figures also in {path}):")
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(row)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


@pytest.fixture
def sink():
    s = start_hostile("sink")
    yield s
    s.stop()


# --------------------------------------------------------------------------- unbounded and trickling answers

CASES = [
    # mode, exit status, what the one line says
    ("huge-manifest", 1, ("answer of 314572800 bytes refused", "4194304 bytes (4 MiB)", "/rancher/hostile:v1")),
    ("huge-manifest-chunked", 1, ("answer refused: longer than the 4194304 bytes (4 MiB)", "/rancher/hostile:v1")),
    ("huge-error", 1, ("not found",)),
    ("trickle-manifest", 1, ("slower than 1 KiB/s over 3s", "/rancher/hostile:v1")),
    ("trickle-blob", 1, ("slower than 1 KiB/s over 3s", "/rancher/hostile@sha256:")),
    ("huge-ping", 2, ("source", "/v2/", "1048576 bytes (1 MiB)")),
    ("huge-token", 2, ("token service", "/token", "1048576 bytes (1 MiB)")),
]


@pytest.mark.parametrize("mode,rc,needles", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_source_costs_bounded_time_and_memory(mode, rc, needles, sink, tmp_path):
    src = start_hostile(mode, deadline=25.0)
    try:
        run = run_cli(mirror_args(tmp_path, src, sink), tmp_path)
    finally:
        src.stop()
    check_bounded(run, sink, mode, rc, *needles)
    if mode == "huge-manifest":
        assert src.sent < 64 * 1024 * 1024  # refused by its Content-Length: what went is socket buffers
    if mode.startswith("trickle"):
        assert run.seconds < 12  # a few seconds of trickle, not the server's 25 s


# --------------------------------------------------------------------------- where credentials go


@pytest.fixture
def tls_pair(pki, tmp_path):
    return pki.issue(tmp_path / "tls", ["127.0.0.1", "localhost"], name="hostile")


REALMS = [
    # case, token service on: host, registry over https?
    ("realm-other-host", "127.0.0.2", False),
    ("realm-http", "127.0.0.1", True),
]


@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
@pytest.mark.parametrize("case,token_host,https", REALMS, ids=[r[0] for r in REALMS])
def test_credentials_go_to_a_foreign_token_service_only_with_a_warning(case, token_host, https, strict, sink,
                                                                      tmp_path, pki, tls_pair):
    token = start_hostile("token", host=token_host)
    src = start_hostile("bearer", realm=f"{token.url}/token", tls=tls_pair if https else None)
    extra = ["--src-ca-file", str(pki.cert_path)] if https else []
    if strict:
        extra.append("--strict-auth-realm")
    try:
        run = run_cli(mirror_args(tmp_path, src, sink, *extra), tmp_path, env=auth_file(tmp_path, src.netloc))
    finally:
        src.stop()
        token.stop()
    concern = "another host" if token_host != "127.0.0.1" else "plain http while the registry is https"
    name = f"{case} --strict-auth-realm" if strict else case
    if strict:
        check_bounded(run, sink, name, 2, src.netloc, f"http://{token.netloc}", concern, "--strict-auth-realm")
        assert token.authorized == [] and token.requests == []  # nothing was sent there at all
    else:
        # allowed, with one warning naming both hosts; the image itself is not at the source (404)
        check_bounded(run, sink, name, 1, "not found")
        warnings = [line for line in run.lines if "warning:" in line]
        assert len(warnings) == 1, run.stderr
        assert src.netloc in warnings[0] and token.netloc in warnings[0] and concern in warnings[0]
        assert token.authorized and all(r.authorization.startswith("Basic ") for r in token.authorized)


def test_anonymous_token_requests_are_allowed_even_when_strict(sink, tmp_path):
    token = start_hostile("token", host="127.0.0.2")
    src = start_hostile("bearer", realm=f"{token.url}/token")
    try:
        run = run_cli(mirror_args(tmp_path, src, sink, "--strict-auth-realm"), tmp_path)
    finally:
        src.stop()
        token.stop()
    assert run.rc == 1 and "warning" not in run.stderr and "not found" in run.stderr, run.stderr
    assert token.requests and token.authorized == []


def test_the_hostile_server_stops_by_itself(tmp_path):
    """The test kit's own bound: a trickle nobody abandons ends at the server's deadline."""
    import httpx

    src = start_hostile("trickle-manifest", deadline=1.5, trickle_interval=0.2)
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=5) as c, pytest.raises(httpx.HTTPError):
            c.get(f"{src.url}/v2/a/manifests/v1").read()  # announced 1000 bytes, got about 7
    finally:
        src.stop()
    assert time.monotonic() - t0 < 5 and 0 < src.sent < 20
