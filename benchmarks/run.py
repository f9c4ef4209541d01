#!/usr/bin/env python3
"""Benchmark rke2-mirror against skopeo and a minimal parallel client (the ceiling).

One command (see benchmarks/README.md):

    .venv/bin/python benchmarks/run.py            # full set: 150 images, 600 MB, ~15 min
    .venv/bin/python benchmarks/run.py --quick    # smoke run: 30 images, 60 MB, ~2 min

Everything runs on 127.0.0.1: a source docker-registry seeded with a generated image set
(benchmarks/dataset.py), a fresh target registry for every cold run, all in a temporary
directory and all stopped at the end (also on Ctrl-C / SIGTERM).  Prints a table and, for a full
run (or with --results PATH), writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import dataset  # noqa: E402  (benchmarks/dataset.py)

from rke2_mirror_testkit.images import ImagePusher  # noqa: E402
from rke2_mirror_testkit.pki import make_ca  # noqa: E402
from rke2_mirror_testkit.registry_proc import RunningRegistry, start_registry  # noqa: E402
from rke2_mirror_testkit.tokenserver import start_token_registry  # noqa: E402

VENV_BIN = Path(sys.executable).parent
RKE2_MIRROR = str(VENV_BIN / "rke2-mirror") if (VENV_BIN / "rke2-mirror").exists() else shutil.which("rke2-mirror")
PY_SPY = str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else shutil.which("py-spy")
SKOPEO = shutil.which("skopeo")
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
SKOPEO_CACHES = [Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb"),
                 Path.home() / ".local/share/containers/cache/blob-info-cache-v1.boltdb"]
TOKEN_USER, TOKEN_PASSWORD = "admin", "Harbor12345"
MB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT = 900.0  # one command; a full run's slowest (the skopeo copy loop, per image) is far below


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measuring


@dataclass
class Measure:
    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    rss_kb: int = 0
    reg_cpu: float = 0.0  # CPU seconds of the registries (+ the in-process token server) meanwhile
    rc: int = 0
    calls: int = 1
    requests: Counter = field(default_factory=Counter)  # "src GET manifest" -> n, from the access logs
    load: float = 0.0  # 1-minute load average when the run started (others' work on the machine)
    machine_cpu: float = 0.0  # CPU seconds the whole machine was busy during the run (/proc/stat)

    @property
    def others_cpu(self) -> float:
        """CPU seconds used meanwhile by processes that are neither the client nor the registries."""
        return max(0.0, self.machine_cpu - self.cpu - self.reg_cpu)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def add(self, other: "Measure") -> None:
        """Accumulate a loop of commands: times add up, RSS is the max."""
        self.wall += other.wall
        self.user += other.user
        self.sys += other.sys
        self.rss_kb = max(self.rss_kb, other.rss_kb)
        self.reg_cpu += other.reg_cpu
        self.rc = self.rc or other.rc
        self.calls += other.calls
        self.requests.update(other.requests)
        self.machine_cpu += other.machine_cpu
        self.load = max(self.load, other.load)

    @property
    def n_requests(self) -> int:
        return sum(self.requests.values())


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


_REQ = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (/v2/\S*) HTTP/')


def _kind(method: str, path: str) -> str:
    p = path.split("?", 1)
    q = p[1] if len(p) > 1 else ""
    if "/blobs/uploads/" in p[0]:
        return f"{method} upload" + (" (mount)" if "mount=" in q else " (finish)" if "digest=" in q else "")
    if "/blobs/" in p[0]:
        return f"{method} blob"
    if "/manifests/" in p[0]:
        return f"{method} manifest"
    if p[0].endswith("/tags/list"):
        return f"{method} tags/list"
    if "/referrers/" in p[0]:
        return f"{method} referrers"
    return f"{method} {p[0] if p[0] == '/v2/' else 'other'}"


class AccessLog:
    """Requests a registry logged since the last look (its access log, read from an offset)."""

    def __init__(self, role: str, reg):
        self.role = role
        self.path = getattr(reg, "registry", reg).log
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def take(self) -> Counter:
        c: Counter = Counter()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return c
        self.offset += len(data)
        for m in _REQ.finditer(data.decode(errors="replace")):
            c[f"{self.role} {_kind(m.group(1), m.group(2))}"] += 1
        return c


def machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all CPUs)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / CLK_TCK


def quiesce(budget: list[float], limit: float = 20.0, busy_max: float = 0.25) -> None:
    """Wait until the machine is idle enough (others' test suites on a shared box distort wall
    times): at most ``limit`` s, and at most what is left of ``budget[0]`` for the whole benchmark."""
    t0 = time.monotonic()
    while budget[0] > 0 and time.monotonic() - t0 < limit:
        b0, w0 = machine_busy(), time.monotonic()
        time.sleep(0.5)
        dt = time.monotonic() - w0
        if (machine_busy() - b0) / (dt * (os.cpu_count() or 1)) <= busy_max:
            return
        budget[0] -= dt


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Runner:
    """Runs commands with wall time, user/sys CPU and peak RSS (GNU time, else a rusage wrapper)."""

    def __init__(self, logdir: Path, quiesce_budget: float = 0.0):
        self.logdir = logdir
        self.n = 0
        self.budget = [quiesce_budget]  # seconds we may still wait for an idle machine

    def run(self, name: str, argv: list[str], *, env: dict | None = None, watch: dict = None,
            token_server: bool = False, timeout: float = RUN_TIMEOUT, quiet: bool = False) -> tuple[Measure, Path]:
        """``watch``: {"src": registry, "dst": registry}: their CPU and access logs are counted."""
        self.n += 1
        stem = self.logdir / f"{self.n:03d}-{name}"
        out, err, tfile = stem.with_suffix(".out"), stem.with_suffix(".err"), stem.with_suffix(".time")
        if GNU_TIME:
            full = [GNU_TIME, "-f", "%e %U %S %M", "-o", str(tfile), *argv]
        else:
            full = [sys.executable, str(Path(__file__).resolve()), "--rusage-wrapper", str(tfile), "--", *argv]
        if not quiet:
            log(f"$ {shlex.join(argv)[:220]}")
        watch = watch or {}
        regs = [getattr(r, "registry", r) for r in watch.values()]
        logs_ = [AccessLog(role, r) for role, r in watch.items()]
        reg0 = sum(proc_cpu(r.process.pid) for r in regs)
        self0 = self_cpu() if token_server else 0.0
        if not quiet:
            quiesce(self.budget)
        load = os.getloadavg()[0]
        busy0 = machine_busy()
        t0 = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen(full, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env)
            try:
                rc = p.wait(timeout)
            except BaseException:  # timeout or Ctrl-C: never leave it behind
                p.kill()
                p.wait(10)
                raise
        wall = time.monotonic() - t0
        m = Measure(wall=wall, rc=rc, load=load, machine_cpu=machine_busy() - busy0)
        m.reg_cpu = sum(proc_cpu(r.process.pid) for r in regs) - reg0 + ((self_cpu() - self0) if token_server else 0.0)
        for al in logs_:
            m.requests.update(al.take())
        try:
            lines = [l for l in tfile.read_text().splitlines() if l and l[0].isdigit()]
            _e, u, s, rss = lines[-1].split()
            m.user, m.sys, m.rss_kb = float(u), float(s), int(rss)
        except (OSError, IndexError, ValueError):
            pass
        if rc != 0:
            tail = err.read_text(errors="replace").strip().splitlines()[-5:]
            log(f"  exit {rc}: " + " | ".join(tail))
        return m, out


def rusage_wrapper(tfile: str, argv: list[str]) -> int:
    """Fallback without GNU time: run argv, write '%e %U %S %M' of it (ru_maxrss is in KB)."""
    t0 = time.monotonic()
    rc = subprocess.call(argv)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(tfile).write_text(f"{time.monotonic() - t0:.2f} {r.ru_utime:.2f} {r.ru_stime:.2f} {r.ru_maxrss}\n")
    return rc


# --------------------------------------------------------------------------- registries


class Lab:
    """Every registry of the run lives here; close() stops them all."""

    def __init__(self, root: Path):
        self.root = root
        self.live: list = []
        self.n = 0

    def registry(self, name: str) -> RunningRegistry:
        self.n += 1
        reg = start_registry(self.root / f"{self.n:02d}-{name}")
        self.live.append(reg)
        return reg

    def tls_registry(self, name: str) -> RunningRegistry:
        """HTTPS, no auth: separates the cost of TLS from the cost of tokens."""
        self.n += 1
        work = self.root / f"{self.n:02d}-{name}"
        ca = make_ca(work / "ca")
        reg = start_registry(work / "registry", tls=ca.issue(work / "tls", name="registry"), ca_file=ca.cert_path)
        self.live.append(reg)
        return reg

    def token_registry(self, name: str):
        self.n += 1
        work = self.root / f"{self.n:02d}-{name}"
        ca = make_ca(work / "ca")
        reg = start_token_registry(work, ca=ca)
        self.live.append(reg)
        return reg

    def drop(self, reg) -> None:
        """Stop a target and delete its storage (disk stays small)."""
        reg.stop()
        if reg in self.live:
            self.live.remove(reg)
        inner = getattr(reg, "registry", reg)
        shutil.rmtree(inner.root, ignore_errors=True)

    def close(self) -> None:
        for reg in reversed(self.live):
            try:
                reg.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {reg.url}: {exc}")
        self.live.clear()


def watching(src=None, dst=None) -> dict:
    return {k: v for k, v in (("src", src), ("dst", dst)) if v is not None}


def clear_skopeo_cache() -> None:
    for p in SKOPEO_CACHES:
        p.unlink(missing_ok=True)


def verify(url: str, ds: dataset.DataSet, *, auth=None, verify_tls=True, images=None) -> tuple[int, int]:
    """(tags present, tags whose digest equals the source's) at the target (`images`: default all)."""
    present = same = 0
    with ImagePusher(url, auth=auth, verify=verify_tls, timeout=30.0) as p:
        for im in (ds.images if images is None else images):
            r = p.request("HEAD", f"/v2/{im.repo}/manifests/{im.tag}", repo=im.repo,
                          headers={"Accept": ", ".join(dataset_accept())})
            if r.status_code == 200:
                present += 1
                same += r.headers.get("docker-content-digest") == ds.digests[im.ref]
    return present, same


def dataset_accept() -> tuple[str, ...]:
    from rke2_mirror_testkit.images import ALL_MANIFEST_TYPES
    return ALL_MANIFEST_TYPES


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    tool: str
    cold: list[Measure] = field(default_factory=list)
    noop: list[Measure] = field(default_factory=list)
    note: str = ""
    ok: bool = True

    @staticmethod
    def _best(ms: list[Measure]) -> Measure | None:
        return min(ms, key=lambda m: m.wall) if ms else None

    @property
    def best_cold(self) -> Measure | None:
        return self._best(self.cold)

    @property
    def best_noop(self) -> Measure | None:
        return self._best(self.noop)

    @property
    def rss_kb(self) -> int:
        return max([m.rss_kb for m in self.cold + self.noop] or [0])


def fmt_s(m: Measure | None) -> str:
    return f"{m.wall:.2f}" if m else "–"


def ratio(a: Measure | None, b: Measure | None) -> str:
    return f"{a.wall / b.wall:.2f}×" if a and b and b.wall > 0 else "–"


def table(rows: list[Row], ref: Row) -> str:
    head = ("| tool | cold s | no-op s | cold ÷ rke2-mirror | no-op ÷ rke2-mirror | client CPU s cold / no-op "
            "| registries CPU s cold | others' CPU s cold | HTTP requests cold / no-op | peak RSS MB | cold runs s | note |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c, n = r.best_cold, r.best_noop
        runs = ", ".join(f"{m.wall:.2f}" for m in r.cold) or "–"
        cpu = f"{c.cpu:.2f} / {n.cpu:.2f}" if c and n else (f"{c.cpu:.2f}" if c else (f"– / {n.cpu:.2f}" if n else "–"))
        reqs = (f"{c.n_requests} / {n.n_requests}" if c and n else
                (str(c.n_requests) if c else (f"– / {n.n_requests}" if n else "–")))
        lines.append(f"| {r.tool} | {fmt_s(c)} | {fmt_s(n)} | {ratio(c, ref.best_cold)} | {ratio(n, ref.best_noop)} "
                     f"| {cpu} | {f'{c.reg_cpu:.2f}' if c else '–'} | {f'{c.others_cpu:.2f}' if c else '–'} | {reqs} | {r.rss_kb / 1024:.0f} | {runs} "
                     f"| {r.note} |")
    return "\n".join(lines)


def requests_table(rows: list[Row]) -> str:
    """Requests per kind seen by the source and target registries during each tool's best cold run."""
    cols = [(r.tool.strip("*"), r.best_cold) for r in rows if r.best_cold]
    cols += [(r.tool.strip("*") + " (no-op)", r.best_noop) for r in rows if r.best_noop]
    kinds = sorted({k for _, m in cols for k in m.requests})
    out = ["| request | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in kinds:
        out.append(f"| {k} | " + " | ".join(str(m.requests.get(k, 0)) for _, m in cols) + " |")
    out.append("| **total** | " + " | ".join(f"**{m.n_requests}**" for _, m in cols) + " |")
    return "\n".join(out)


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    def ver(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "skopeo": ver([SKOPEO, "--version"]) if SKOPEO else "absent",
            "registry": ver(["/usr/bin/docker-registry", "--version"]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --------------------------------------------------------------------------- profile


def _where(frame: str) -> str:
    m = re.search(r"\((.*?):\d+\)$", frame)
    return m.group(1) if m else frame


_THIRD_PARTY = {"httpx", "httpcore", "h11", "tenacity", "typer", "click", "tqdm", "yaml", "anyio", "idna", "certifi",
                "pydantic", "pydantic_core", "rich", "sniffio", "typing_extensions", "annotated_types", "shellingham"}


def _category(frames: list[str]) -> str:
    """Where a CPU sample goes: start-up imports, rke2_mirror itself, a library, or the stdlib module."""
    if any("importlib._bootstrap" in f for f in frames):
        return "imports (start-up)"
    path = _where(frames[-1])
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    top = path.split("/", 1)[0].removesuffix(".py")
    if top == "rke2_mirror":
        return "rke2_mirror (own code)"
    if top in ("httpcore", "h11"):
        return "httpcore + h11 (HTTP/1.1 protocol)"
    if top in _THIRD_PARTY:
        return top
    if "/lib/python3" in path:
        top = path.split("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return f"stdlib {top}"


def summarize_profile(raw: Path, top: int = 20) -> dict:
    """py-spy raw (collapsed) stacks -> shares by library, by nearest rke2_mirror frame, by function."""
    cats: Counter = Counter()
    own: Counter = Counter()
    self_c: Counter = Counter()
    total = empty = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        try:
            k = int(n)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            empty += k
            continue
        total += k
        cats[_category(frames)] += k
        self_c[_short(frames[-1])] += k
        mine = [f for f in frames if "rke2_mirror/" in f]
        own[_short(mine[-1]) if mine else "(no rke2_mirror frame: start-up, typer, thread pool)"] += k
    return {"samples": total, "empty": empty, "categories": cats.most_common(top),
            "nearest_own": own.most_common(top), "self": self_c.most_common(top)}


def _short(frame: str) -> str:
    """'func (/long/path/site-packages/pkg/mod.py:123)' -> 'func (pkg/mod.py:123)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        if "/lib/python3" in where:  # the standard library
            where = where.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{name} ({where})"


def profile_md(p: dict) -> str:
    total = p["samples"] or 1
    out = [f"{p['samples']} samples with a Python stack (+{p['empty']} with none, left out: the GIL holder was "
           "in native code py-spy cannot attribute).", "",
           "By library (the sampled frame's package):", "", "| share | where |", "|---:|---|"]
    out += [f"| {c / total * 100:.1f}% | {f} |" for f, c in p["categories"][:12]]
    out += ["", "By the innermost rke2_mirror frame on the stack (what of ours caused the work):", "",
            "| share | function |", "|---:|---|"]
    out += [f"| {c / total * 100:.1f}% | `{f}` |" for f, c in p["nearest_own"][:15]]
    out += ["", "Self time, top functions:", "", "| share | function |", "|---:|---|"]
    out += [f"| {c / total * 100:.1f}% | `{f}` |" for f, c in p["self"][:15]]
    return "\n".join(out)


# --------------------------------------------------------------------------- the benchmark


RKE2: list[str] = [RKE2_MIRROR] if RKE2_MIRROR else []  # the command benchmarked (--rke2-mirror)


def rke2_available(sub: str) -> bool:
    try:
        return subprocess.run([*RKE2, sub, "--help"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def profiled(cmd: list[str]) -> list[str]:
    """py-spy must start the Python interpreter itself, not a script with a shebang or env."""
    if Path(cmd[0]).name.startswith("python"):
        return cmd
    if Path(cmd[0]).name == "env":
        return cmd  # env VAR=... python ...: py-spy follows the exec
    return [sys.executable, *cmd]


def write_sync_yaml(path: Path, src: RunningRegistry, ds: dataset.DataSet) -> None:
    lines = [f"{src.host}:", "  tls-verify: false", "  images:"]
    lines += [f"    {im.repo}: ['{im.tag}']" for im in ds.images]
    path.write_text("\n".join(lines) + "\n")


# Presets.  rancher: about the size of a Rancher release's image list (issue #18): ~4 MB per image as in the
# standard set, so per-image and per-GB figures compare; the slow, per-image skopeo loops are left out by
# default (give --skip yourself to choose other parts).
PROFILES = {
    "standard": {"images": 150, "mb": 600.0, "repeat": 2, "big_mb": 1024, "scale": 0, "skip": []},
    "rancher": {"images": 1500, "mb": 6144.0, "repeat": 1, "big_mb": 0, "scale": 150,
                "skip": ["skopeo-copy", "archive-skopeo", "token", "profile", "whatif"]},
}


def pin(pid: int, cpus: str) -> None:
    """Every thread of a running process onto `cpus` (taskset -a: a Go registry has many threads)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=False)


def sha256_pass(nbytes: int, piece: int = 1 << 20) -> tuple[float, float]:
    """(wall s, CPU s) of one hashlib sha256 pass over `nbytes` bytes, fed 1 MiB at a time (the client's
    chunks are 64 KiB-1 MiB; above ~2 KiB hashlib releases the GIL, so this is the hash alone)."""
    import hashlib
    buf = os.urandom(64 * MB)
    views = [memoryview(buf)[i:i + piece] for i in range(0, len(buf), piece)]
    h = hashlib.sha256()
    left = nbytes
    c0, t0 = self_cpu(), time.monotonic()
    while left > 0:
        for v in views:
            if left <= 0:
                break
            h.update(v if left >= len(v) else v[:left])
            left -= len(v)
    h.hexdigest()
    return time.monotonic() - t0, self_cpu() - c0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="rke2-mirror benchmarks (loopback only).")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 images, 60 MB, 64 MB big layer, 1 repeat")
    ap.add_argument("--images", type=int, default=None, help="images in the set (default 150; --quick 30)")
    ap.add_argument("--mb", type=float, default=None, help="MB of unique blobs (default 600; --quick 60)")
    ap.add_argument("--jobs", type=int, default=8, help="rke2-mirror --jobs (default 8)")
    ap.add_argument("--threads", type=int, default=16, help="ceiling client threads (default 16)")
    ap.add_argument("--repeat", type=int, default=None, help="cold runs of the ceiling and rke2-mirror (best kept; default 2, --quick 1)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the single-layer image for the RSS check (default 1024; --quick 64; 0 skips)")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["skopeo-sync", "skopeo-copy", "token", "archive", "archive-skopeo", "big", "profile", "whatif"],
                    help="leave a part out (repeatable)")
    ap.add_argument("--workdir", type=Path, default=None, help="where registries and logs go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, archives) at the end")
    ap.add_argument("--results", type=Path, default=None,
                    help="write the Markdown report here (default benchmarks/RESULTS.md for a full run, none for --quick)")
    ap.add_argument("--quiesce", type=float, default=None, metavar="SECONDS",
                    help="before each timed run wait (up to 20 s) for the machine to be idle; at most this much "
                         "waiting in total (default 180, --quick 30; 0 = never wait)")
    ap.add_argument("--rke2-mirror", metavar="CMD", default=None,
                    help="command to benchmark instead of the venv's rke2-mirror, e.g. "
                         "'env PYTHONPATH=/other/src python -m rke2_mirror'")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="standard",
                    help="preset sizes: standard (150 images, 600 MB), rancher (1,500 images, 6 GB: issue #18); "
                         "--images/--mb/--repeat/--skip still apply on top")
    ap.add_argument("--scale", type=int, default=None, metavar="K",
                    help="also mirror the first K images cold + no-op, for per-image overhead at K vs the whole set "
                         "(rancher profile: 150)")
    ap.add_argument("--jobs-sweep", default=None, metavar="LIST",
                    help="cold runs of rke2-mirror --jobs N (and the ceiling with 2N threads) for each N, e.g. 1,2,4,8")
    ap.add_argument("--pin", action="store_true",
                    help="with --jobs-sweep: registries on CPU 0, the client on the other CPUs (taskset)")
    ap.add_argument("--rusage-wrapper", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rusage_wrapper:
        return rusage_wrapper(a.rusage_wrapper[0], a.rest)

    prof = PROFILES[a.profile]
    n_images = a.images or (30 if a.quick else prof["images"])
    mb = a.mb or (60.0 if a.quick else prof["mb"])
    repeat = a.repeat or (1 if a.quick else prof["repeat"])
    big_mb = a.big_mb if a.big_mb is not None else (64 if a.quick else prof["big_mb"])
    if a.scale is None:
        a.scale = prof["scale"]
    results_path = a.results or (None if a.quick or a.profile != "standard" else HERE / "RESULTS.md")
    skip = set(a.skip) | set(prof["skip"])
    if not SKOPEO:
        skip |= {"skopeo-sync", "skopeo-copy", "archive-skopeo"}
        log("skopeo not found: skopeo runs skipped (apt-get install skopeo)")
    if not PY_SPY:
        skip.add("profile")
        log("py-spy not found: profile skipped (.venv/bin/pip install py-spy)")
    if a.rke2_mirror:
        RKE2[:] = shlex.split(a.rke2_mirror)
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        # an installed package has its bytecode (pip compiles at install); without it every run of ours would
        # compile ~100 modules (~0.1 s) that the ceiling, one script on installed libraries, never does.
        # The `mirror --help` below writes the caches.
        log("PYTHONDONTWRITEBYTECODE unset for the runs: measured as installed, with bytecode caches")
    if not RKE2:
        log("rke2-mirror not found next to this Python (use the project's .venv/bin/python)")
        return 2
    try:
        ok = subprocess.run([*RKE2, "mirror", "--help"], capture_output=True, timeout=60)
    except OSError as exc:
        ok = None
        log(f"cannot run {shlex.join(RKE2)}: {exc}")
    if ok is None or ok.returncode != 0:
        if ok is not None:
            log(f"`{shlex.join(RKE2)} mirror --help` fails:\n{ok.stderr.decode(errors='replace')[-2000:]}")
        return 2

    work = a.workdir or Path(tempfile.mkdtemp(prefix="rke2-mirror-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    lab = Lab(work / "registries")
    runner = Runner(logs, quiesce_budget=a.quiesce if a.quiesce is not None else (30.0 if a.quick else 180.0))
    prev_term = signal.signal(signal.SIGTERM, _interrupt)
    prev_int = signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
    t_start = time.monotonic()
    try:
        report = bench(a, lab, runner, work, n_images, mb, repeat, big_mb, skip)
    except KeyboardInterrupt:
        log("interrupted: stopping registries")
        return 130
    finally:
        lab.close()
        signal.signal(signal.SIGTERM, prev_term)
        signal.signal(signal.SIGINT, prev_int)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    report = report.replace("@TOTAL@", f"{(time.monotonic() - t_start) / 60:.1f}")
    print(report)
    if results_path:
        results_path.write_text(report)
        log(f"wrote {results_path}")
    return 0


def bench(a, lab: Lab, runner: Runner, work: Path, n_images: int, mb: float, repeat: int, big_mb: int,
          skip: set[str]) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RKE2_MIRROR_USERNAME", "RKE2_MIRROR_PASSWORD", "REGISTRY_AUTH_FILE", "HTTP_PROXY",
                        "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["DOCKER_CONFIG"] = str(work / "docker-config")  # no credentials from the user's files
    env["REGISTRY_AUTH_FILE"] = str(work / "auth.json")  # skopeo too (absent file = anonymous)
    env["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir(exist_ok=True)

    # ---- the source
    src = lab.registry("source")
    log(f"source registry {src.url}; seeding {n_images} images, {mb:.0f} MB of unique blobs")
    t0 = time.monotonic()
    ds = dataset.push(dataset.plan(n_images, mb), src.url, threads=4, log=log)
    seed_s = time.monotonic() - t0
    log(f"seeded {len(ds.images)} images, {ds.manifests} manifests, {ds.unique_blobs} blobs, "
        f"{ds.unique_bytes / MB:.1f} MB in {seed_s:.1f}s")
    images_txt = work / "images.txt"
    images_txt.write_text(ds.image_list())
    sync_yaml = work / "sync.yaml"
    write_sync_yaml(sync_yaml, src, ds)
    src_ep = f"docker.io={src.url}"
    n = len(ds.images)
    problems: list[str] = []
    details: list[str] = []

    @contextmanager
    def part(name: str):
        """One part of the benchmark: a failure is reported, the others still run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            log(f"{name} FAILED:\n{traceback.format_exc()}")
            problems.append(f"{name} failed: {exc.__class__.__name__}: {exc}")

    def check(name: str, url: str, m: Measure, *, digests=True, images=None, **kw) -> bool:
        present, same = verify(url, ds, images=images, **kw)
        k = n if images is None else len(images)
        good = m.rc == 0 and present == k and (same == k or not digests)
        msg = f"{name}: {m.wall:.2f}s, exit {m.rc}, {present}/{k} tags present, {same}/{k} digests equal the source's"
        details.append(msg)
        log("  " + msg)
        if not good:
            problems.append(msg)
        return good

    token_log: list[tuple[str, list]] = []  # (run, token requests it made)
    last_out: dict[str, Path] = {}  # run name -> its stdout (the --json report)

    def rke2_mirror(name: str, dst, *, noop_too: bool, extra_env=None, ca=None, token=False,
                    tls_only=False, images=None, jobs=None, prefix=()) -> tuple[Measure, Measure | None]:
        """`images`: a subset of the set (its own list file); `prefix`: e.g. taskset -c 1."""
        lst = images_txt
        if images is not None:
            lst = work / f"images-{len(images)}.txt"
            lst.write_text("".join(f"{im.ref}\n" for im in images))
        argv = [*prefix, *RKE2, "mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", src_ep,
                "--jobs", str(jobs or a.jobs), "--json"]
        if ca:
            argv += ["--ca-file", str(ca)]
        e = {**env, **(extra_env or {})}
        t0 = len(dst.token_requests) if token else 0
        cold, out = runner.run(name, argv, env=e, watch=watching(src, dst), token_server=token)
        if token:  # counted here: the check below fetches tokens of its own
            token_log.append(("cold", dst.token_requests[t0:]))
        kw = {"auth": (TOKEN_USER, TOKEN_PASSWORD), "verify_tls": str(ca)} if token else {}
        if tls_only:
            kw = {"verify_tls": str(ca)}
        check(name + " cold", dst.url, cold, images=images, **kw)
        last_out[name] = out
        noop = None
        if noop_too:
            t0 = len(dst.token_requests) if token else 0
            noop, out2 = runner.run(name + "-noop", argv, env=e, watch=watching(src, dst), token_server=token)
            last_out[name + "-noop"] = out2
            if token:
                token_log.append(("no-op", dst.token_requests[t0:]))
            try:
                summ = json.loads(out2.read_text())["summary"]
                if summ["skipped"] != (n if images is None else len(images)):
                    problems.append(f"{name} no-op: {summ}")
            except (ValueError, KeyError) as exc:
                problems.append(f"{name} no-op: unreadable report ({exc})")
        return cold, noop

    ceiling = Row("ceiling (benchmarks/ceiling.py)", note=f"{a.threads} threads")
    ours = Row("**rke2-mirror mirror**", note=f"--jobs {a.jobs}")
    ours_noref = Row("rke2-mirror mirror --no-referrers (no-op only)",
                     note="the ceiling's work: no source tag list for signatures/SBOMs")
    # ---- ceiling and rke2-mirror, interleaved so drift hits both alike
    ceiling_detail = {}
    for rep in range(repeat):
        dst = lab.registry("ceiling")
        m, out = runner.run("ceiling", [sys.executable, str(HERE / "ceiling.py"), "--src", src.url, "--dst", dst.url,
                                        "--images", str(images_txt), "--threads", str(a.threads)],
                            env=env, watch=watching(src, dst))
        try:
            ceiling_detail = json.loads(out.read_text())
        except ValueError:
            pass
        check("ceiling cold", dst.url, m)
        ceiling.cold.append(m)
        if rep == 0:
            m2, _ = runner.run("ceiling-noop", [sys.executable, str(HERE / "ceiling.py"), "--src", src.url, "--dst",
                                                dst.url, "--images", str(images_txt), "--threads", str(a.threads),
                                                "--noop"], env=env, watch=watching(src, dst))
            ceiling.noop.append(m2)
        lab.drop(dst)

        dst = lab.registry("rke2-mirror")
        cold, noop = rke2_mirror("rke2-mirror", dst, noop_too=True)
        ours.cold.append(cold)
        ours.noop.append(noop)
        # the same no-op without looking for new signatures/SBOMs (the ceiling looks for none): like for like
        m3, _ = runner.run("rke2-mirror-noop-noref", [*RKE2, "mirror", "--images", str(images_txt), "--to", dst.url,
                                                      "--source-endpoint", src_ep, "--jobs", str(a.jobs), "--json",
                                                      "--no-referrers"], env=env, watch=watching(src, dst))
        ours_noref.noop.append(m3)
        lab.drop(dst)

    rows = [ceiling, ours, ours_noref]

    # ---- client CPU per GB: the ceiling, ours, and one sha256 pass over as many bytes (issue #18)
    gib = ds.unique_bytes / 2**30
    sha_wall, sha_cpu = sha256_pass(ds.unique_bytes)
    log(f"one sha256 pass over {ds.unique_bytes / MB:.0f} MB: {sha_wall:.2f}s wall, {sha_cpu:.2f}s CPU "
        f"({sha_cpu / gib:.2f} s/GiB)")

    # ---- per-image overhead: the first K images alone (cold + no-op), against the whole set above
    scale_rows: list[tuple[int, Measure, Measure, int, int]] = []  # (images, cold, no-op, report bytes, no-op report bytes)
    if a.scale and 0 < a.scale < n and ours.best_cold:
        with part("scale"):
            sub = ds.images[:a.scale]
            dst = lab.registry("scale")
            cold, noop = rke2_mirror("rke2-mirror-scale", dst, noop_too=True, images=sub)
            lab.drop(dst)
            size = lambda name: last_out[name].stat().st_size if name in last_out else 0  # noqa: E731
            scale_rows.append((len(sub), cold, noop, size("rke2-mirror-scale"), size("rke2-mirror-scale-noop")))
            scale_rows.append((n, ours.best_cold, ours.best_noop, size("rke2-mirror"), size("rke2-mirror-noop")))

    # ---- throughput vs --jobs (registries and client on different CPUs with --pin)
    sweep_rows: list[tuple[str, int, Measure]] = []
    if a.jobs_sweep:
        with part("jobs sweep"):
            ncpu = os.cpu_count() or 1
            client_cpus = f"1-{ncpu - 1}" if ncpu > 2 else "1"
            prefix = ("taskset", "-c", client_cpus) if a.pin and ncpu > 1 else ()
            if prefix:
                pin(src.process.pid, "0")
            try:
                for j in (int(x) for x in a.jobs_sweep.split(",")):
                    dst = lab.registry("sweep-ceiling")
                    if prefix:
                        pin(dst.process.pid, "0")
                    m, _ = runner.run(f"sweep-ceiling-{2 * j}", [*prefix, sys.executable, str(HERE / "ceiling.py"),
                                                                  "--src", src.url, "--dst", dst.url, "--images",
                                                                  str(images_txt), "--threads", str(2 * j)],
                                      env=env, watch=watching(src, dst))
                    check(f"sweep ceiling threads {2 * j}", dst.url, m)
                    sweep_rows.append(("ceiling", 2 * j, m))
                    lab.drop(dst)
                    dst = lab.registry("sweep")
                    if prefix:
                        pin(dst.process.pid, "0")
                    cold, _ = rke2_mirror(f"sweep-jobs{j}", dst, noop_too=False, jobs=j, prefix=prefix)
                    sweep_rows.append(("rke2-mirror", j, cold))
                    lab.drop(dst)
            finally:
                if prefix:
                    pin(src.process.pid, f"0-{ncpu - 1}")

    # ---- token-auth TLS target
    token_row = None
    if "token" not in skip:
        with part('token-auth target'):
            tls_row = Row("rke2-mirror → TLS target, no auth", note="--ca-file (separates TLS from tokens)")
            token_row = Row("rke2-mirror → token-auth TLS target", note="admin/Harbor12345, --ca-file")
            for rep in range(repeat):  # interleaved, best of `repeat` each: their ratio is the cost of tokens
                dst = lab.tls_registry("tls")
                cold, noop = rke2_mirror("rke2-mirror-tls", dst, noop_too=True, ca=dst.ca_file, tls_only=True)
                tls_row.cold.append(cold)
                tls_row.noop.append(noop)
                lab.drop(dst)

                dst = lab.token_registry("token")
                kept = len(token_log)
                cold, noop = rke2_mirror("rke2-mirror-token", dst, noop_too=True, ca=dst.ca_file, token=True,
                                         extra_env={"RKE2_MIRROR_USERNAME": TOKEN_USER,
                                                    "RKE2_MIRROR_PASSWORD": TOKEN_PASSWORD})
                token_row.cold.append(cold)
                token_row.noop.append(noop)
                if rep:
                    del token_log[kept:]  # the token counts of the first round are the ones reported
                lab.drop(dst)
            rows.append(tls_row)
            said = []
            for run_name, reqs in token_log:
                distinct = len({r.scope for r in reqs})
                said.append(f"{len(reqs)} token requests {run_name} ({distinct} distinct scope sets)")
                details.append(f"token requests, {run_name}: {len(reqs)}, {distinct} distinct scope sets "
                               f"(so each fetched {'once' if distinct == len(reqs) else 'MORE than once'}); "
                               f"scopes per request: {dict(Counter(len(r.scopes) for r in reqs))}; "
                               f"HTTP status: {dict(Counter(r.status for r in reqs))}")
            token_row.note += f"; {', '.join(said)} for {n} repositories"
            rows.append(token_row)

    # ---- skopeo sync
    if "skopeo-sync" not in skip:
        with part('skopeo sync'):
            row = Row("skopeo sync --all --preserve-digests", note="YAML source, one process")
            dst = lab.registry("skopeo-sync")
            argv = [SKOPEO, "sync", "--all", "--preserve-digests", "--src", "yaml", "--dest", "docker",
                    "--dest-tls-verify=false", str(sync_yaml), f"{dst.host}/{dataset.NAMESPACE}"]
            clear_skopeo_cache()
            cold, _ = runner.run("skopeo-sync", argv, env=env, watch=watching(src, dst))
            check("skopeo sync cold", dst.url, cold)
            noop, _ = runner.run("skopeo-sync-noop", argv, env=env, watch=watching(src, dst))
            row.cold.append(cold)
            row.noop.append(noop)
            lab.drop(dst)
            rows.append(row)

    # ---- skopeo copy loop
    if "skopeo-copy" not in skip:
        with part('skopeo copy loop'):
            row = Row("skopeo copy --all --preserve-digests (loop)", note=f"{n} sequential processes")
            dst = lab.registry("skopeo-copy")
            clear_skopeo_cache()
            for mode in ("cold", "noop"):
                quiesce(runner.budget)
                total = Measure(calls=0)
                for im in ds.images:
                    m, _ = runner.run(f"skopeo-copy-{mode}", [
                        SKOPEO, "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{src.host}/{im.repo}:{im.tag}", f"docker://{dst.host}/{im.repo}:{im.tag}"],
                        env=env, watch=watching(src, dst), quiet=True)
                    total.add(m)
                log(f"  skopeo copy loop ({mode}): {total.wall:.2f}s for {total.calls} processes")
                if mode == "cold":
                    check("skopeo copy loop cold", dst.url, total)
                    row.cold.append(total)
                else:
                    row.noop.append(total)
            lab.drop(dst)
            rows.append(row)

    # ---- save / load
    archive_rows: list[tuple[str, Measure | None, Measure | None, int, str]] = []
    pairs: list[tuple[Measure, Measure, Measure]] = []  # (save, load, the cold mirror run just before them)
    if "archive" not in skip:
        with part('save / load'):
            if rke2_available("save") and rke2_available("load"):
                tar = work / "tmp" / "set.tar"
                size = 0
                for _ in range(repeat):  # best of `repeat`; each pair right after a cold mirror run of its own
                    paired_dst = lab.registry("rke2-mirror-paired")
                    mirror_before, _ = rke2_mirror("rke2-mirror-paired", paired_dst, noop_too=False)
                    lab.drop(paired_dst)
                    clear = lab.registry("rke2-load")
                    save, _ = runner.run("rke2-save", [*RKE2, "save", "--images", str(images_txt), "--output", str(tar),
                                                       "--source-endpoint", src_ep, "--jobs", str(a.jobs), "--json"],
                                         env=env, watch=watching(src))
                    size = tar.stat().st_size if tar.exists() else 0
                    load, _ = runner.run("rke2-load", [*RKE2, "load", str(tar), "--to", clear.url, "--jobs", str(a.jobs),
                                                        "--json"], env=env,
                                         watch=watching(dst=clear))
                    check("rke2-mirror load", clear.url, load)
                    pairs.append((save, load, mirror_before))
                    tar.unlink(missing_ok=True)
                    lab.drop(clear)
                runs = ", ".join(f"{s.wall:.2f} + {l.wall:.2f} (mirror just before: {m.wall:.2f})" for s, l, m in pairs)
                archive_rows.append(("rke2-mirror save / load", Row._best([s for s, _, _ in pairs]),
                                     Row._best([l for _, l, _ in pairs]), size,
                                     f"one archive; best of {len(pairs)} (save + load runs s: {runs})"))
            else:
                archive_rows.append(("rke2-mirror save / load", None, None, 0,
                                     "not measured: `rke2-mirror save --help` / `load --help` do not exist yet"))
            if SKOPEO and "archive-skopeo" not in skip:
                adir = work / "tmp" / "oci-archives"
                adir.mkdir(parents=True, exist_ok=True)
                clear_skopeo_cache()
                quiesce(runner.budget)
                save = Measure(calls=0)
                for im in ds.images:
                    m, _ = runner.run("skopeo-save", [SKOPEO, "copy", "--all", "--src-tls-verify=false",
                                                      f"docker://{src.host}/{im.repo}:{im.tag}",
                                                      f"oci-archive:{adir}/{im.index:03d}.tar"],
                                      env=env, watch=watching(src), quiet=True)
                    save.add(m)
                size = sum(p.stat().st_size for p in adir.glob("*.tar"))
                dst = lab.registry("skopeo-load")
                clear_skopeo_cache()
                quiesce(runner.budget)
                load = Measure(calls=0)
                for im in ds.images:
                    m, _ = runner.run("skopeo-load", [SKOPEO, "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                                                      f"oci-archive:{adir}/{im.index:03d}.tar",
                                                      f"docker://{dst.host}/{im.repo}:{im.tag}"],
                                      env=env, watch=watching(dst=dst), quiet=True)
                    load.add(m)
                present, same = verify(dst.url, ds)
                details.append(f"skopeo oci-archive loop: save {save.wall:.2f}s, load {load.wall:.2f}s, {present}/{n} "
                               f"present, {same}/{n} digests equal the source's (Docker-format images become OCI)")
                if present != n or save.rc or load.rc:
                    problems.append(f"skopeo oci-archive loop: {present}/{n} present, rc {save.rc}/{load.rc}")
                archive_rows.append(("skopeo copy --all ↔ oci-archive: (loop)", save, load, size,
                                     f"{n} archives; {same}/{n} digests kept (Docker-format images are converted to OCI)"))
                shutil.rmtree(adir, ignore_errors=True)
                lab.drop(dst)

    # ---- one big layer: peak RSS
    big_rows: list[tuple[str, Measure]] = []
    if "big" not in skip and big_mb > 0:
        with part('big layer'):
            log(f"pushing a single-layer image of {big_mb} MB")
            big_ref = dataset.big_image(src.url, big_mb * MB)
            big_list = work / "big.txt"
            big_list.write_text(big_ref + "\n")
            dst = lab.registry("big-rke2")
            m, _ = runner.run("big-rke2-mirror", [*RKE2, "mirror", "--images", str(big_list), "--to", dst.url,
                                                  "--source-endpoint", src_ep, "--jobs", str(a.jobs), "--json"],
                              env=env, watch=watching(src, dst))
            big_rows.append(("rke2-mirror mirror", m))
            lab.drop(dst)
            dst = lab.registry("big-ceiling")
            m, _ = runner.run("big-ceiling", [sys.executable, str(HERE / "ceiling.py"), "--src", src.url, "--dst", dst.url,
                                              "--images", str(big_list), "--threads", str(a.threads)],
                              env=env, watch=watching(src, dst))
            big_rows.append(("ceiling", m))
            lab.drop(dst)
            if SKOPEO:
                dst = lab.registry("big-skopeo")
                clear_skopeo_cache()
                ref = big_ref.split("/", 1)[1]
                m, _ = runner.run("big-skopeo", [SKOPEO, "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                                                 "--dest-tls-verify=false", f"docker://{src.host}/{ref}",
                                                 f"docker://{dst.host}/{ref}"], env=env, watch=watching(src, dst))
                big_rows.append(("skopeo copy", m))
                lab.drop(dst)
            for name, m in big_rows:
                if m.rc:
                    problems.append(f"big layer, {name}: exit {m.rc}")

    # ---- profile
    prof_md = ""
    if "profile" not in skip:
        with part('profile'):
            dst = lab.registry("profile")
            raw = work / "logs" / "pyspy-gil.txt"
            argv = [PY_SPY, "record", "--gil", "-r", "100", "-f", "raw", "-o", str(raw), "--",
                    *profiled(RKE2), "mirror", "--images", str(images_txt), "--to", dst.url,
                    "--source-endpoint", src_ep, "--jobs", str(a.jobs), "--json"]
            m, _ = runner.run("profile", argv, env=env, watch=watching(src, dst))
            if raw.exists() and m.rc == 0:
                prof = summarize_profile(raw)
                prof_md = (f"Cold `mirror` of the same set under `py-spy record --gil -r 100` (samples only the thread "
                           f"holding the GIL, i.e. Python CPU time; {m.wall:.2f}s wall with the profiler attached):\n\n"
                           + profile_md(prof))
                shutil.copy(raw, work / "pyspy-gil.txt")
            else:
                prof_md = f"the profiled run failed (exit {m.rc}); see the logs of the run (--keep)"
                problems.append(f"profile run: exit {m.rc}")
            lab.drop(dst)

    # ---- what if: engine changes patched in at run time (benchmarks/whatif.py), each a cold run
    whatif_rows: list[tuple[str, Measure]] = []
    if "whatif" not in skip and not a.rke2_mirror:
        with part("what if"):
            for variant in ("", "nohash", "nohead", "stream", "noretry", "nohash,nohead,stream,noretry"):
                dst = lab.registry("whatif")
                m, out = runner.run(f"whatif-{variant.replace(',', '+') or 'none'}", [
                    sys.executable, str(HERE / "whatif.py"), "mirror", "--images", str(images_txt), "--to", dst.url,
                    "--source-endpoint", src_ep, "--jobs", str(a.jobs), "--json"],
                    env={**env, "RKE2_MIRROR_WHATIF": variant}, watch=watching(src, dst))
                err = out.with_suffix(".err").read_text(errors="replace")
                if "not applied" in err:
                    variant += " (NOT applied: engine changed)"
                check(f"what if {variant or 'none'}", dst.url, m)
                whatif_rows.append((variant or "none (same wrapper, no patch)", m))
                lab.drop(dst)

    # ---- report
    info = machine()
    ref = ours
    ceil_c, ours_c, ours_n = ceiling.best_cold, ours.best_cold, ours.best_noop
    sync = next((r for r in rows if r.tool.startswith("skopeo sync")), None)
    targets = []

    def target(name: str, value: str, goal: str, met: bool | None) -> None:
        targets.append(f"| {name} | {value} | {goal} | {'met' if met else ('n/a' if met is None else '**NOT met**')} |")

    target("cold: rke2-mirror ÷ ceiling", ratio(ours_c, ceil_c), "≤ 1.15×",
           ours_c.wall <= 1.15 * ceil_c.wall if ours_c and ceil_c else None)
    if sync:
        target("cold: skopeo sync ÷ rke2-mirror", ratio(sync.best_cold, ours_c), "≥ 2×",
               sync.best_cold.wall >= 2 * ours_c.wall)
        # issue #18 re-based the no-op target on the ceiling (below): "≥ 10× skopeo sync" is out of any client's reach
        targets.append(f"| (info) no-op: skopeo sync ÷ rke2-mirror | {ratio(sync.best_noop, ours_n)} | – | – |")
    if token_row and token_row.best_cold:
        target("token-auth TLS target ÷ anonymous (cold)", ratio(token_row.best_cold, ours_c), "≤ 1.3×",
               token_row.best_cold.wall <= 1.3 * ours_c.wall)
    tls_row = next((r for r in rows if r.tool.startswith("rke2-mirror → TLS")), None)
    if token_row and token_row.best_cold and tls_row and tls_row.best_cold:
        targets.append(f"| (info) token-auth TLS ÷ TLS without auth: the cost of tokens alone | "
                       f"{ratio(token_row.best_cold, tls_row.best_cold)} | – | – |")
        targets.append(f"| (info) TLS without auth ÷ anonymous http: the cost of TLS alone | "
                       f"{ratio(tls_row.best_cold, ours_c)} | – | – |")
    if ceiling.best_noop and ours_n:
        target("no-op: rke2-mirror ÷ ceiling (issue #18; referrers looked for: a source tag list per repository)",
               ratio(ours_n, ceiling.best_noop), "≤ 1.1×", ours_n.wall <= 1.1 * ceiling.best_noop.wall)
    if ceiling.best_noop and ours_noref.best_noop:
        target("no-op --no-referrers ÷ ceiling (the same requests as the ceiling's no-op)",
               ratio(ours_noref.best_noop, ceiling.best_noop), "≤ 1.1×",
               ours_noref.best_noop.wall <= 1.1 * ceiling.best_noop.wall)
    ours_archive = next((r for r in archive_rows if r[0].startswith("rke2-mirror") and r[1] and r[2]), None)
    if pairs:
        # Each save + load pair against the cold mirror run made just before it (the machine's speed
        # drifts over a run: comparing the best of runs minutes apart measures the drift); the median.
        ratios = sorted((s.wall + l.wall) / m.wall for s, l, m in pairs)
        med = statistics.median(ratios)
        shown = ", ".join(f"{r:.2f}×" for r in ratios)
        targets.append(f"| save + load ÷ rke2-mirror mirror (cold, each pair next to its own mirror run; median; issue #4) | "
                       f"{med:.2f}× ({shown}) | ≤ 1.5× | {'met' if med <= 1.5 else '**NOT met**'} |")
    if ours_archive and ours_c:
        both = ours_archive[1].wall + ours_archive[2].wall
        targets.append(f"| (info) best save + best load ÷ best cold mirror above | {both:.2f} s ÷ {ours_c.wall:.2f} s = "
                       f"{both / ours_c.wall:.2f}× | – | – |")
    rss_all = [(m.rss_kb, "set") for m in ours.cold + ours.noop] + [(m.rss_kb, "big") for nme, m in big_rows
                                                                      if nme.startswith("rke2")]
    if token_row and token_row.best_cold:
        rss_all += [(m.rss_kb, "token") for m in token_row.cold + token_row.noop]
    peak = max(k for k, _ in rss_all) / 1024
    target(f"rke2-mirror peak RSS (all its runs{', incl. the ' + str(big_mb) + ' MB layer' if big_rows else ''})",
           f"{peak:.0f} MB", "< 150 MB", peak < 150)

    md = [
        "# rke2-mirror benchmarks",
        "",
        f"Latest run: {info['date']}, `{shlex.join(['benchmarks/run.py', *sys.argv[1:]])}` "
        f"(total wall time @TOTAL@ min).",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, {info['skopeo']}, docker-registry {info['registry']}. Everything on 127.0.0.1; "
        "each registry is a CNCF distribution process with filesystem storage in a temp dir.",
        "",
        f"Image set: {n} images ({sum(1 for im in ds.images if im.kind == 'docker')} Docker manifest lists / "
        f"single manifests, {sum(1 for im in ds.images if im.kind == 'oci')} OCI), {ds.manifests} manifests, "
        f"{ds.unique_blobs} unique blobs, **{ds.unique_bytes / MB:.0f} MB** unique; one "
        f"{ds.base.size / MB:.1f} MB base layer in every image and platform, {len(ds.groups)} shared "
        f"{ds.groups[0].size / MB:.1f} MB group layers; 1-3 own layers per platform "
        f"(seeded in {seed_s:.0f}s).",
        "",
        "Times are wall seconds of the whole command (process start to exit), best of "
        f"{repeat} for the ceiling, rke2-mirror and its TLS and token-auth targets (all runs listed), one run for "
        "the others. Cold = fresh "
        "empty target registry (and skopeo's blob-info cache deleted); no-op = the same command again at once. "
        "Client CPU = user+sys of the client process(es); registries CPU = source + target registry "
        "processes (+ the in-process token server for the token run) during the run; others' CPU = what the rest "
        "of the machine used meanwhile (/proc/stat; other people's test suites on this shared box: when it is "
        "not ~0, that run's wall time is inflated). RSS from GNU time. Before each timed run the script waits "
        "(bounded) for the machine to be idle.",
        "",
        table(rows, ref),
        "",
        "## Targets",
        "",
        "| target | measured | goal | status |",
        "|---|---:|---:|---|",
        *targets,
        "",
    ]
    md += ["CPU view (less sensitive than wall time to other load on the machine, not immune: shared cores slow every instruction): client + registries CPU seconds per cold run, "
           "and that total ÷ rke2-mirror's. On 2 cores, total ÷ 2 is a floor for the wall time.", "",
           "| tool | client + registries CPU s (cold) | ÷ rke2-mirror |", "|---|---:|---:|"]
    for r in rows:
        c = r.best_cold
        if c and ours_c:
            md.append(f"| {r.tool} | {c.cpu + c.reg_cpu:.2f} | {(c.cpu + c.reg_cpu) / (ours_c.cpu + ours_c.reg_cpu):.2f}× |")
    md.append("")
    loads = [m.load for r in rows for m in r.cold + r.noop]
    if loads:
        busy = max(loads) > 1.5
        md += [f"1-minute load average when each run started: {min(loads):.1f}–{max(loads):.1f}"
               + (" — **other work was running on the machine during this benchmark; wall times are noisy** "
                  "(request counts are not affected; CPU seconds much less so than wall times)." if busy else "."), ""]
    md += ["## HTTP requests (from the registries' access logs, best cold run and the no-op run)", "",
           requests_table(rows), ""]
    if ceiling_detail:
        md += ["Ceiling phases (last run, seconds inside the client): "
               + ", ".join(f"{k} {v:.2f}" for k, v in ceiling_detail.get("phases", {}).items())
               + f"; {ceiling_detail.get('blobs')} uploads, {ceiling_detail.get('mounts')} mounts, "
               f"{ceiling_detail.get('manifests')} manifests.", ""]
    if archive_rows:
        md += ["## save / load", "", "| tool | save s | load s | archive MB | save RSS MB | load RSS MB | note |",
               "|---|---:|---:|---:|---:|---:|---|"]
        for name, s, l, size, note in archive_rows:
            md.append(f"| {name} | {fmt_s(s)} | {fmt_s(l)} | {size / MB:.0f} | "
                      f"{(s.rss_kb / 1024 if s else 0):.0f} | {(l.rss_kb / 1024 if l else 0):.0f} | {note} |")
        md.append("")
    if big_rows:
        md += [f"## One {big_mb} MB layer (peak RSS)", "", "| tool | s | client CPU s | peak RSS MB |",
               "|---|---:|---:|---:|"]
        md += [f"| {name} | {m.wall:.2f} | {m.cpu:.2f} | {m.rss_kb / 1024:.0f} |" for name, m in big_rows]
        md.append("")
    if ceil_c and ours_c:
        per = lambda m: m.cpu / gib  # noqa: E731
        goal = 1.1 * per(ceil_c) + sha_cpu / gib
        md += ["## Client CPU per GiB (cold, best run; issue #18)", "",
               f"{ds.unique_bytes / MB:.0f} MB of unique blobs = {gib:.3f} GiB. One hashlib sha256 pass over as many "
               f"bytes in this process, same run: {sha_wall:.2f} s wall, {sha_cpu:.2f} s CPU = **{sha_cpu / gib:.2f} s/GiB**.",
               "", "| | client CPU s (user + sys) | s per GiB | ÷ ceiling | MB per client CPU-s |",
               "|---|---:|---:|---:|---:|"]
        for name, m in (("ceiling", ceil_c), ("rke2-mirror", ours_c)):
            md.append(f"| {name} | {m.cpu:.2f} ({m.user:.2f} + {m.sys:.2f}) | {per(m):.2f} | "
                      f"{per(m) / per(ceil_c):.2f}× | {ds.unique_bytes / MB / m.cpu:.0f} |")
        md.append(f"| target: 1.1 × ceiling + one sha256 pass | | {goal:.2f} | | |")
        md += ["", f"rke2-mirror: {per(ours_c):.2f} s/GiB vs goal {goal:.2f} s/GiB: "
               f"**{'met' if per(ours_c) <= goal else 'NOT met'}** (rke2-mirror − ceiling = "
               f"{per(ours_c) - per(ceil_c):.2f} s/GiB; the sha256 pass alone {sha_cpu / gib:.2f} s/GiB).", ""]
    if scale_rows:
        md += ["## Per-image overhead: the first K images vs the whole set (rke2-mirror, same source)", "",
               "| images | cold s | cold client CPU s | cold CPU ms / image | cold requests / image "
               "| no-op s | no-op client CPU s | no-op CPU ms / image | no-op requests / image | no-op report bytes / image "
               "| peak RSS MB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, c, nn, rep, rep_n in scale_rows:
            md.append(f"| {k} | {c.wall:.2f} | {c.cpu:.2f} | {c.cpu / k * 1000:.1f} | {c.n_requests / k:.2f} "
                      f"| {nn.wall:.2f} | {nn.cpu:.2f} | {nn.cpu / k * 1000:.2f} | {nn.n_requests / k:.2f} | "
                      f"{rep_n / k:.0f} | {max(c.rss_kb, nn.rss_kb) / 1024:.0f} |")
        (k1, c1, n1, _, _), (k2, c2, n2, _, _) = scale_rows
        md += ["", f"Marginal no-op client CPU per image from {k1} to {k2} images: "
               f"{(n2.cpu - n1.cpu) / (k2 - k1) * 1000:.2f} ms (average at {k1}: {n1.cpu / k1 * 1000:.2f} ms incl. "
               f"start-up); marginal no-op wall per image {(n2.wall - n1.wall) / (k2 - k1) * 1000:.2f} ms. Marginal cold "
               f"client CPU per image: {(c2.cpu - c1.cpu) / (k2 - k1) * 1000:.1f} ms (average at {k1}: "
               f"{c1.cpu / k1 * 1000:.1f} ms). Marginal ≤ average means nothing grows worse than linearly.", ""]
        md += [f"Requests by kind, {k1} vs {k2} images (no-op):", "",
               "| request | " + f"{k1} images | {k2} images | per image at {k1} | per image at {k2} |",
               "|---|---:|---:|---:|---:|"]
        for kind in sorted(set(n1.requests) | set(n2.requests)):
            md.append(f"| {kind} | {n1.requests.get(kind, 0)} | {n2.requests.get(kind, 0)} | "
                      f"{n1.requests.get(kind, 0) / k1:.3f} | {n2.requests.get(kind, 0) / k2:.3f} |")
        md.append("")
    if sweep_rows:
        md += [f"## Throughput vs --jobs (cold, {ds.unique_bytes / MB:.0f} MB; "
               + ("registries pinned to CPU 0, the client to the rest with taskset" if a.pin else "no pinning")
               + ")", "", "| client | --jobs / threads | wall s | MB/s | client CPU s | MB per client CPU-s "
               "| registries CPU s | others' CPU s | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, j, m in sweep_rows:
            md.append(f"| {name} | {j} | {m.wall:.2f} | {ds.unique_bytes / MB / m.wall:.0f} | {m.cpu:.2f} | "
                      f"{ds.unique_bytes / MB / m.cpu:.0f} | {m.reg_cpu:.2f} | {m.others_cpu:.2f} | {m.load:.1f} |")
        md.append("")
    if prof_md:
        md += ["## Profile (cold rke2-mirror mirror)", "", prof_md, ""]
    if whatif_rows:
        base = whatif_rows[0][1]
        md += ["## What if (engine changes patched in at run time by benchmarks/whatif.py; cold runs)", "",
               "See whatif.py for what each patch does. One run each: compare CPU seconds and requests more than "
               "wall time.", "",
               "| patch | wall s | client CPU s | Δ client CPU | registries CPU s | client + registries CPU s "
               "| requests | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in whatif_rows:
            md.append(f"| {name} | {m.wall:.2f} | {m.cpu:.2f} | {m.cpu - base.cpu:+.2f} | {m.reg_cpu:.2f} "
                      f"| {m.cpu + m.reg_cpu:.2f} | {m.n_requests} | {m.rss_kb / 1024:.0f} |")
        if ceiling.best_cold:
            c = ceiling.best_cold
            md.append(f"| *ceiling, for reference (best cold run above)* | {c.wall:.2f} | {c.cpu:.2f} | | "
                      f"{c.reg_cpu:.2f} | {c.cpu + c.reg_cpu:.2f} | {c.n_requests} | {c.rss_kb / 1024:.0f} |")
        md.append("")
    md += ["## Checks", ""]
    md += [f"- {d}" for d in details]
    md += [f"- **problem**: {p}" for p in problems] or ["- no problems: every target registry held every tag with "
                                                       "the source's digest after each cold run"]
    md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
