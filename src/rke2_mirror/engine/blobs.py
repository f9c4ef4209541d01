"""Blob bytes as the engine passes them on: hashed while they stream, counted, stoppable."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from rke2_mirror.engine.cancel import NEVER, Cancel
from rke2_mirror.engine.retry import RetryPolicy
from rke2_mirror.model.errors import MirrorError
from rke2_mirror.model.oci import Descriptor, DigestingReader


def checked(chunks: Iterable[bytes], desc: Descriptor, what: str, *, on_bytes: Callable[[int], None] | None = None,
            cancel: Cancel = NEVER) -> Iterator[bytes]:
    """`chunks` checked against `desc` (size and sha256, raising before the last chunk is taken as the
    end), each chunk reported to `on_bytes`; stops with `Cancelled` between chunks once the run is
    interrupted."""
    for chunk in DigestingReader(chunks, desc, what=what):
        cancel.check()
        if on_bytes is not None:
            on_bytes(len(chunk))
        yield chunk


def blob_subject(source, repo: str, desc: Descriptor) -> str:
    """How error messages name a blob: where it was read, and the source's hint about what a mismatch
    there means (an archive: "corrupt archive")."""
    return f"blob {source.location(repo, desc.digest)}" + getattr(source, "damage_hint", "")


def read_blob(source, repo: str, desc: Descriptor, limit: int, retry: RetryPolicy | None = None) -> bytes:
    """A small blob (a config) whole, checked; refused above `limit` bytes."""
    if desc.size > limit:
        raise MirrorError(f"blob {desc.digest}: {desc.size} bytes, more than the {limit} read into memory")

    def once() -> bytes:
        with source.open_blob(repo, desc) as chunks:
            return b"".join(checked(chunks, desc, blob_subject(source, repo, desc)))
    return retry.call(once) if retry is not None else once()
