"""Run the rke2-mirror CLI with engine changes patched in at run time, to measure what they would buy.

For measurement only: nothing here changes the engine's files, and the patches skip the safety
the engine has on purpose where noted.  Used by run.py's "what if" section:

    RKE2_MIRROR_WHATIF=nohash,nohead python benchmarks/whatif.py mirror --images ... --to ...

Patches (comma-separated in RKE2_MIRROR_WHATIF):

- ``nohash``  blobs are not sha256-hashed by the client (sizes still checked).  Registry -> registry
  the target recomputes the digest on the final ``PUT ?digest=`` and refuses a mismatch anyway
  (distribution: 400 DIGEST_INVALID), so the client's hash is a second check of the same bytes.
- ``nohead``  no ``HEAD`` of the target blob before each upload (registry.Registry.reuse_blob).
  Not a drop-in change (a resumed run would upload again what is already there: correct, since the
  registry deduplicates by digest, but it costs bandwidth); it measures what the
  906 round trips cost on a cold run, i.e. what skipping them when they cannot succeed (e.g. the
  target repository had no tag and no blob of this run yet) would save.
- ``stream``  every blob is one ``POST`` + one streamed ``PUT ?digest=`` with Content-Length, instead
  of reading blobs up to 4 MB into memory (b"".join) and sending bigger ones as 64 MB PATCHes.
- ``pool``    twice the connections per registry client (registry.Registry: max_connections is 2×jobs
  while jobs image threads + 2×jobs blob threads share it, so threads queue in httpcore's pool).
- ``noretry`` the engine's blob-copy retry off (``engine.retry.RetryPolicy.call`` runs the call once; the
  transport's per-request retries stay: they cost nothing until something fails).

A patch whose target no longer exists in the engine is skipped with a note on stderr.
"""

from __future__ import annotations

import os
import sys


def _apply(patches: set[str]) -> list[str]:
    import rke2_mirror.engine.retry as retry
    import rke2_mirror.model.oci as oci
    import rke2_mirror.endpoints.registry as rg

    applied: list[str] = []
    if "nohash" in patches and hasattr(oci, "DigestingReader"):
        def _iter(self):
            for chunk in self._chunks:
                if chunk:
                    self.read += len(chunk)
                    yield chunk
            if self.read != self.expected.size:
                raise oci.DigestMismatch(f"{self.expected.digest}: got {self.read} bytes, expected {self.expected.size}")
        oci.DigestingReader.__iter__ = _iter
        applied.append("nohash")
    if "nohead" in patches and hasattr(rg.Registry, "reuse_blob") and hasattr(rg.Registry, "_mount"):
        def reuse_blob(self, repo, desc, *, fresh, mount_from):
            return bool(mount_from) and self._mount(repo, desc, mount_from)
        rg.Registry.reuse_blob = reuse_blob
        applied.append("nohead")
    if "stream" in patches and hasattr(rg.Registry, "push_blob") and hasattr(rg, "_with_digest"):
        def push_blob(self, repo, desc, chunks):
            what = f"push {desc.digest} to {self.host}/{repo}"
            start = self._request("POST", f"/v2/{repo}/blobs/uploads/", what, (202,))
            loc = self._location(start, what)
            self._request("PUT", rg._with_digest(loc, desc.digest), what, (201, 204), content=iter(chunks),
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
        rg.Registry.push_blob = push_blob
        applied.append("stream")
    if "pool" in patches and hasattr(rg.Registry, "__init__"):
        orig_init = rg.Registry.__init__

        def __init__(self, *args, jobs: int = 8, **kwargs):
            orig_init(self, *args, jobs=jobs * 2, **kwargs)
        rg.Registry.__init__ = __init__
        applied.append("pool")
    if "noretry" in patches and hasattr(retry, "RetryPolicy"):
        retry.RetryPolicy.call = lambda self, fn, cancel=None: fn()
        applied.append("noretry")
    return applied


def main() -> None:
    patches = {p.strip() for p in os.environ.get("RKE2_MIRROR_WHATIF", "").split(",") if p.strip()}
    applied = _apply(patches)
    missing = patches - set(applied)
    if missing:
        print(f"whatif: not applied (engine changed?): {', '.join(sorted(missing))}", file=sys.stderr)
    from rke2_mirror.cli.app import main as cli_main
    sys.argv[0] = "rke2-mirror"
    cli_main()


if __name__ == "__main__":
    main()
