"""The ceiling: the least a registry -> registry copy of an image set must do, done in parallel.

1. read every manifest (tags, then the children of indexes) from the source;
2. fetch each unique blob once and upload it once (POST, then one streamed PUT ?digest=) into the
   first repository that uses it, biggest blobs first;
3. mount it into every other repository that uses it;
4. put the manifests, children first, tag last.

httpx + a thread pool; no retries, no checks beyond the HTTP status, no resume, no skip: it
assumes an empty target.  ``--noop`` instead does the least a rerun must do: HEAD the tag at
both ends and compare digests.  Prints a JSON summary on stdout.

    python benchmarks/ceiling.py --src http://127.0.0.1:5000 --dst http://127.0.0.1:5001 \
        --images images.txt [--threads 16] [--noop]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
INDEXES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


def parse_ref(line: str) -> tuple[str, str]:
    """``[registry/]repo:tag`` -> (repo, tag); the registry part (with a dot or colon) is dropped."""
    s = line.strip()
    first, _, rest = s.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        s = rest
    repo, _, tag = s.rpartition(":")
    return repo, tag


def check(r: httpx.Response, *ok: int) -> httpx.Response:
    if r.status_code not in ok:
        raise RuntimeError(f"{r.request.method} {r.request.url}: HTTP {r.status_code} {r.text[:200]}")
    return r


def run(src: str, dst: str, refs: list[tuple[str, str]], threads: int) -> dict:
    limits = httpx.Limits(max_connections=threads * 2, max_keepalive_connections=threads * 2)
    timeout = httpx.Timeout(120.0)
    s = httpx.Client(base_url=src, limits=limits, timeout=timeout, trust_env=False)
    d = httpx.Client(base_url=dst, limits=limits, timeout=timeout, trust_env=False)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(threads) as pool:
            # 1. manifests
            def read(ref: tuple[str, str]):
                repo, tag = ref
                r = check(s.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}), 200)
                mt = r.headers["content-type"].split(";")[0]
                top = (tag, mt, r.content)
                children = []
                layers: list[dict] = []
                doc = r.json()
                if mt in INDEXES:
                    for m in doc["manifests"]:
                        c = check(s.get(f"/v2/{repo}/manifests/{m['digest']}", headers={"Accept": ACCEPT}), 200)
                        children.append((m["digest"], c.headers["content-type"].split(";")[0], c.content))
                        cd = c.json()
                        layers += [cd["config"], *cd["layers"]]
                else:
                    layers += [doc["config"], *doc["layers"]]
                return repo, top, children, layers

            images = list(pool.map(read, refs))
            phases["read manifests"] = time.monotonic() - t0
            users: dict[str, tuple[int, list[str]]] = {}
            for repo, _, _, layers in images:
                for b in layers:
                    size, repos = users.setdefault(b["digest"], (b["size"], []))
                    if repo not in repos:
                        repos.append(repo)

            # 2. each unique blob once, biggest first
            t1 = time.monotonic()

            def upload(digest: str) -> int:
                size, repos = users[digest]
                repo = repos[0]
                start = check(d.post(f"/v2/{repo}/blobs/uploads/"), 202)
                loc = httpx.URL(dst).join(start.headers["location"])
                with s.stream("GET", f"/v2/{repo}/blobs/{digest}", follow_redirects=True) as r:
                    check(r, 200)
                    check(d.put(loc.copy_merge_params({"digest": digest}), content=r.iter_raw(),
                                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"}),
                          201)
                return size

            order = sorted(users, key=lambda k: -users[k][0])
            nbytes = sum(pool.map(upload, order))
            phases["upload blobs"] = time.monotonic() - t1

            # 3. mounts
            t2 = time.monotonic()

            def mount(job: tuple[str, str, str]) -> None:
                digest, repo, frm = job
                check(d.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": frm}), 201)

            mounts = [(dg, repo, repos[0]) for dg, (_, repos) in users.items() for repo in repos[1:]]
            list(pool.map(mount, mounts))
            phases["mount blobs"] = time.monotonic() - t2

            # 4. manifests, children first
            t3 = time.monotonic()

            def put(image) -> int:
                repo, (tag, mt, raw), children, _ = image
                for digest, cmt, craw in children:
                    check(d.put(f"/v2/{repo}/manifests/{digest}", content=craw, headers={"Content-Type": cmt}), 201)
                check(d.put(f"/v2/{repo}/manifests/{tag}", content=raw, headers={"Content-Type": mt}), 201)
                return len(children) + 1

            n_manifests = sum(pool.map(put, images))
            phases["put manifests"] = time.monotonic() - t3
    finally:
        s.close()
        d.close()
    return {"seconds": round(time.monotonic() - t0, 3), "images": len(refs), "blobs": len(users),
            "bytes": nbytes, "mounts": len(mounts), "manifests": n_manifests,
            "phases": {k: round(v, 3) for k, v in phases.items()}}


def noop(src: str, dst: str, refs: list[tuple[str, str]], threads: int) -> dict:
    limits = httpx.Limits(max_connections=threads * 2, max_keepalive_connections=threads * 2)
    s = httpx.Client(base_url=src, limits=limits, timeout=60.0, trust_env=False)
    d = httpx.Client(base_url=dst, limits=limits, timeout=60.0, trust_env=False)
    t0 = time.monotonic()

    def same(ref: tuple[str, str]) -> bool:
        repo, tag = ref
        a = check(s.head(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}), 200)
        b = check(d.head(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}), 200, 404)
        return b.status_code == 200 and a.headers["docker-content-digest"] == b.headers["docker-content-digest"]

    try:
        with ThreadPoolExecutor(threads) as pool:
            present = sum(pool.map(same, refs))
    finally:
        s.close()
        d.close()
    return {"seconds": round(time.monotonic() - t0, 3), "images": len(refs), "present": present}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="source registry URL (http://127.0.0.1:PORT)")
    ap.add_argument("--dst", required=True, help="target registry URL (empty)")
    ap.add_argument("--images", required=True, help="file of references, one per line")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--noop", action="store_true", help="only compare tags (what a no-op rerun must do)")
    a = ap.parse_args(argv)
    with open(a.images) as f:
        refs = [parse_ref(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
    out = (noop if a.noop else run)(a.src.rstrip("/"), a.dst.rstrip("/"), refs, a.threads)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
