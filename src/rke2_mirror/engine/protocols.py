"""What the engine needs from endpoints, split into a read side and a write side.

In the spirit of containers/image (ImageSource / ImageDestination, TryReusingBlob, commit last) and
regclient (one API, several backends).  A registry is both; an OCI layout directory is both (the work dir
of `save`); an OCI archive and a docker archive are sources only.  Repositories are named as each
endpoint names them (a registry's path; the full image name in a layout).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from rke2_mirror.model.oci import Descriptor
from rke2_mirror.model.reference import ImageRef


@runtime_checkable
class Source(Protocol):
    """The read side.  `open_blob` yields the blob's bytes as stored, unchecked: the engine hashes every
    blob while it streams (`engine.blobs.checked`), so no source needs to."""

    def location(self, repo: str, reference: str) -> str:
        """How to name (repo, tag-or-digest) to a user."""
        ...

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        """The manifest's descriptor (the digest may be '' when a registry does not say), None if absent."""
        ...

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        """The manifest's exact bytes, bounded in size and checked against a digest reference."""
        ...

    def open_blob(self, repo: str, desc: Descriptor) -> AbstractContextManager[Iterable[bytes]]: ...

    # Optional (looked up with getattr; a source without them has no referrers, e.g. a docker archive):
    #   referrers(repo, subject, filt) -> list[Descriptor]: OCI 1.1 referrers of `subject` (API or tag
    #       schema), each with its artifact_type and annotations.
    #   tagged_artifacts(repo, subject) -> list[(tag, kind)]: cosign's legacy sha256-<hex>.sig/.att/.sbom tags.
    #   referrers_possible(repo) -> bool: False when `repo` can hold none (no request need be made).


@runtime_checkable
class Destination(Protocol):
    """The write side.  Blobs first, then child manifests by digest, then the tag: the engine keeps
    that order, so a tag never names content that is not there."""

    def location(self, repo: str, reference: str) -> str: ...

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        """Is this tag/digest there and complete (a layout counts a manifest only when all it references is)?"""
        ...

    def repository_is_new(self, repo: str) -> bool:
        """True when the destination knows nothing of `repo` (so nothing of it need be asked for)."""
        ...

    def has_blob(self, repo: str, desc: Descriptor) -> bool:
        """Is the blob in `repo` (a HEAD; a file of the right size)?  Read-only: what a dry run asks."""
        ...

    def reuse_blob(self, repo: str, desc: Descriptor, *, fresh: bool, mount_from: str | None) -> bool:
        """Make the blob present in `repo` without sending its bytes, if this destination can: it is there
        already, or it can be mounted from `mount_from` (a repository this run put it into).  False: the
        engine pushes it.  `fresh`: `repo` was new when the run looked, so nothing of it can be there; a
        destination decides for itself whether asking is worth a round trip."""
        ...

    def push_blob(self, repo: str, desc: Descriptor, chunks: Iterable[bytes]) -> None:
        """Store a blob.  `chunks` come from the engine, checked: the iterator raises before it ends when
        size or digest is wrong, so a destination commits only once it is exhausted, and need not hash."""
        ...

    def put_manifest(self, repo: str, reference: str, media_type: str, raw: bytes) -> str:
        """Store manifest bytes as they are under a digest or a tag; returns the digest.  A manifest with a
        `subject` is made findable as a referrer of it (a registry without the referrers API, a layout:
        in the subject's tag schema index)."""
        ...

    def get_manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        """What is stored (an image in place: its child manifests, whose referrers are looked for)."""
        ...

    # Optional: referrers(repo, subject) -> list[Descriptor]: what is findable there as referrers of
    # `subject` (else a referrer counts as present when its manifest is).


class Locator(Protocol):
    """Where an image reference lives: (endpoint, repository name at that endpoint)."""

    def locate(self, ref: ImageRef) -> tuple[object, str]: ...


def counts_pulls(source: object) -> bool:
    """Does a manifest GET at this source count against a pull quota (Docker Hub)?  Then a dry run sends
    HEADs only.  A source says so with a true `manifest_gets_are_pulls` attribute."""
    return bool(getattr(source, "manifest_gets_are_pulls", False))
