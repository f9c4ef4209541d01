"""Sharding, the request-rate cap and Docker Hub's pull budget."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from rke2_mirror.cli.options import parse_shard
from rke2_mirror.engine.copy import CopyEngine, CopyOptions, CopyTask
from rke2_mirror.model.errors import InputError
from rke2_mirror.endpoints.ratelimit import PullBudget, RequestRateLimiter
from rke2_mirror.model.reference import ImageRef, RegistryURL, shard, target_ref
from rke2_mirror.endpoints.registry import Registry
from rke2_mirror.endpoints.routing import SourceRouter, TargetLocator
from rke2_mirror_testkit.images import ImagePusher, list_tags, push_image

from .test_engine import FAST, FaultTransport
from .test_mirror import run_cli, write_list

REFS = [ImageRef.parse(f"docker.io/rancher/img{i}:v{i % 7}") for i in range(300)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16])
def test_shards_partition_the_set_exactly(n):
    parts = [shard(REFS, i, n) for i in range(n)]
    flat = [r for p in parts for r in p]
    assert sorted(flat) == sorted(REFS) and len(flat) == len(set(flat))  # disjoint, complete
    assert all(shard(list(reversed(REFS)), i, n) == list(reversed(parts[i])) for i in range(n))  # order-independent
    if n > 1:
        assert all(parts)  # no empty shard on 300 refs


def test_shard_defaults_from_indexed_job_env():
    assert parse_shard(None, {}) is None
    assert parse_shard(None, {"JOB_COMPLETION_INDEX": "2", "RKE2_MIRROR_SHARDS": "5"}) == (2, 5)
    assert parse_shard("1/3", {"JOB_COMPLETION_INDEX": "2", "RKE2_MIRROR_SHARDS": "5"}) == (1, 3)
    for bad in ("3/3", "a/2", "1", "-1/2"):
        with pytest.raises(InputError):
            parse_shard(bad, {})


def test_rate_limiter_spaces_calls_across_threads():
    lim = RequestRateLimiter(50)
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda: [lim() for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert elapsed >= 39 / 50 * 0.95  # 40 calls at 50/s: the 40th waits ~0.78 s


def test_budget_parses_docker_hub_headers():
    b = PullBudget(floor=5)
    req = httpx.Request("GET", "https://registry-1.docker.io/v2/library/x/manifests/1")
    b.observe(httpx.Response(200, headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "7;w=21600"},
                             request=req))
    assert (b.remaining, b.limit) == (7, 100) and b.exhausted() is None
    b.observe(httpx.Response(200, headers={"ratelimit-remaining": "5;w=21600"}, request=req))
    assert "5 of 100" in b.exhausted()
    throttled = PullBudget()
    throttled.observe(httpx.Response(429, headers={"retry-after": "1"}, request=req))
    assert throttled.exhausted() is None  # throttling: retried after the pause
    limited = PullBudget()
    limited.observe(httpx.Response(429, request=req))
    assert "429" in limited.exhausted()


def _hub_like(start: int):
    """A transport that answers like Docker Hub: every manifest GET costs one pull from `start`."""
    state = {"left": start}
    inner = httpx.HTTPTransport()

    def rule(req: httpx.Request):
        if "/manifests/" not in req.url.path:
            return None
        if req.method == "GET":
            state["left"] -= 1
        if state["left"] < 0:
            return httpx.Response(429, json={"errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit"}]},
                                  headers={"ratelimit-limit": f"{start};w=21600", "ratelimit-remaining": "0;w=21600"})
        real = inner.handle_request(req)
        real.read()
        headers = dict(real.headers)
        headers.update({"ratelimit-limit": f"{start};w=21600", "ratelimit-remaining": f"{state['left']};w=21600"})
        return httpx.Response(real.status_code, headers=headers, content=real.content)

    return FaultTransport(rule)


def _run(src, dst, names, transport, floor):
    budget = PullBudget(floor)
    target = RegistryURL.parse(dst.url)
    router = SourceRouter(lambda base: Registry(base, retry=FAST, transport=transport, on_response=budget.observe),
                          {"docker.io": RegistryURL.parse(src.url)})
    reg = Registry(target.base_url, retry=FAST, actions="pull,push")
    tasks = [CopyTask(r, target_ref(r, target)) for r in map(ImageRef.parse, names)]
    try:
        rep = CopyEngine(router, TargetLocator(reg), CopyOptions(retry=FAST, jobs=1, stop_check=budget.exhausted)).run(tasks)
    finally:
        router.close()
        reg.close()
    return rep, budget


def test_budget_floor_stops_cleanly_and_defers_the_rest(registry_factory):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    names = []
    with ImagePusher(src.url) as p:
        for i in range(6):
            push_image(p, f"rancher/r{i}", "v1", seed=f"r{i}", platforms=None, layer_sizes=(2_000,))
            names.append(f"rancher/r{i}:v1")
    # each single-platform image costs one manifest GET: 10 pulls, stop at 6 left -> 4 copied
    rep, budget = _run(src, dst, names, _hub_like(10), floor=6)
    status = [r.status for r in rep.images]
    assert status == ["copied"] * 4 + ["deferred"] * 2, [(r.status, r.error) for r in rep.images]
    assert "floor 6" in rep.stopped and budget.remaining == 6
    assert list_tags(dst.url, "rancher/r4") == []
    j = rep.to_json()["summary"]
    assert j["deferred"] == 2 and j["failed"] == 2


def test_pull_limit_429_stops_without_hammering(registry_factory):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    names = []
    with ImagePusher(src.url) as p:
        for i in range(5):
            push_image(p, f"rancher/q{i}", "v1", seed=f"q{i}", platforms=None, layer_sizes=(2_000,))
            names.append(f"rancher/q{i}:v1")
    t = _hub_like(2)
    rep, budget = _run(src, dst, names, t, floor=0)
    status = [r.status for r in rep.images]
    assert status[:2] == ["copied", "copied"] and "deferred" in status, status
    manifest_gets = [u for m, u, h in t.seen if m == "GET" and "/manifests/" in u]
    assert len(manifest_gets) <= 2 + FAST.attempts  # stops after the limit, no request storm


def test_cli_max_rps_caps_requests(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    with ImagePusher(src.url) as p:
        for i in range(3):
            push_image(p, f"rancher/m{i}", "v1", seed=f"m{i}", platforms=None, layer_sizes=(1_000,))
    lst = write_list(tmp_path / "l.txt", [f"rancher/m{i}:v1" for i in range(3)])
    t0 = time.monotonic()
    proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                   "--max-rps", "20")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    n = len(dst.access_log())
    assert n >= 20 and elapsed >= (n - 1) / 20 * 0.9, (n, elapsed)


def test_cli_shard_copies_only_its_part(registry_factory, tmp_path):
    src = registry_factory(name="src")
    dst = registry_factory(name="dst")
    names = [f"rancher/s{i}:v1" for i in range(8)]
    with ImagePusher(src.url) as p:
        for i in range(8):
            push_image(p, f"rancher/s{i}", "v1", seed=f"s{i}", platforms=None, layer_sizes=(1_000,))
    lst = write_list(tmp_path / "l.txt", names)
    copied = set()
    for i in range(3):
        proc = run_cli("mirror", "--images", str(lst), "--to", dst.url, "--source-endpoint", f"docker.io={src.url}",
                       "--json", env={"JOB_COMPLETION_INDEX": str(i), "RKE2_MIRROR_SHARDS": "3"})
        assert proc.returncode == 0, proc.stderr
        import json
        mine = {x["source"] for x in json.loads(proc.stdout)["images"]}
        assert not mine & copied
        copied |= mine
    assert copied == {str(ImageRef.parse(n)) for n in names}
