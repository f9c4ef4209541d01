"""Finding and recording referrers (model/referrers.py) at a registry, a layout or an archive.

At a registry: the referrers API when the registry serves it (found out once per registry from its
answer: a registry without the API answers 404), else the referrers tag schema (`sha256-<hex>` index);
cosign's legacy `.sig`/`.att`/`.sbom` tags at a source.  A source's tag list is read once per repository
(paginated, bounded): it says which of those tags exist without a request per manifest.  Writing: a
registry that indexes a pushed manifest's `subject` says so (`OCI-Subject`); one that does not gets the
tag schema index, read-merged-written (with `If-Match` where the registry gives an ETag) and read back.

At a layout (`save`'s work dir) and in an archive, referrers live in the tag schema, as index.json
entries named `<image>:sha256-<hex>`; cosign's tags as `<image>:sha256-<hex>.sig` and so on.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from rke2_mirror.model.errors import NotFound, RegistryError, UnsupportedManifest
from rke2_mirror.model.oci import OCI_INDEX, Descriptor, parse_manifest
from rke2_mirror.model.referrers import (MAX_REFERRERS, ReferrerFilter, fallback_tag, legacy_tags, merged_index,
                                         parse_referrers_index, referrer_descriptor)

MAX_PAGES = 20  # referrers API pages per subject
MAX_TAG_PAGES = 100  # tag list pages per repository; longer lists are not read (tags are asked for one by one)
MAX_TAGS = 100_000
TAG_PAGE = 1000
_NO_API = (400, 401, 403, 404, 405, 406, 501)  # what registries without the referrers API answer
_UPDATE_ATTEMPTS = 5


def _next_link(resp: httpx.Response, base_url: str) -> str | None:
    """The `Link: <...>; rel="next"` URL, only on the registry's own host (an answer never chooses where
    requests, and credentials, go)."""
    m = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', resp.headers.get("link", ""))
    if not m:
        return None
    url = str(httpx.URL(base_url).join(m.group(1)))
    a, b = urlsplit(url), urlsplit(base_url)
    if (a.scheme, a.netloc) != (b.scheme, b.netloc):
        raise RegistryError(f"{base_url}: a paginated answer links to another host ({a.netloc}): refused")
    return url


class RegistryReferrers:
    """The referrers side of one `Registry` (endpoints/registry.py): it makes its requests through it."""

    def __init__(self, registry) -> None:
        self.reg = registry
        self.api: bool | None = None  # does the registry serve the referrers API (None: not asked yet)
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._tags: dict[str, frozenset[str] | None] = {}  # repo -> its sha256-* tags (None: list too long)
        self._subject_locks: dict[tuple[str, str], threading.Lock] = {}

    # -- reading ---------------------------------------------------------------------------
    def referrers(self, repo: str, subject: str, filt: ReferrerFilter | None = None) -> list[Descriptor]:
        """OCI 1.1 referrers of `subject`: by the API when served, and by the tag schema (from the tag list
        where this run read it, else asked directly when there is no API)."""
        out: dict[str, Descriptor] = {}
        asked = False
        if self.api is None:  # the first answer says whether the registry serves the API: asked once
            with self._probe_lock:
                if self.api is None:
                    asked = True
                    for d in self._api(repo, subject, filt) or ():
                        out.setdefault(d.digest, d)
        if self.api and not asked:
            for d in self._api(repo, subject, filt) or ():
                out.setdefault(d.digest, d)
        tags = self._tags.get(repo)  # None: not listed in this run (a target), or too long to list
        if (fallback_tag(subject) in tags) if tags is not None else self.api is False:
            for d in self._fallback(repo, subject):
                out.setdefault(d.digest, d)
        return list(out.values())

    def _api(self, repo: str, subject: str, filt: ReferrerFilter | None) -> list[Descriptor] | None:
        params = {"artifactType": filt.single_type} if filt is not None and filt.single_type else None
        url: str | None = f"/v2/{repo}/referrers/{subject}"
        what = f"referrers of {self.reg.host}/{repo}@{subject}"
        out: list[Descriptor] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            resp = self.reg._request("GET", url, what, (200,) + _NO_API, headers={"Accept": OCI_INDEX},
                                     params=params, cap=self.reg.max_manifest_bytes)
            params = None  # a next link carries its own query
            if resp.status_code != 200:
                if self.api is None:
                    self.api = False
                return None if not out else out
            self.api = True
            out.extend(parse_referrers_index(resp.content, what))
            if len(out) > MAX_REFERRERS:
                raise UnsupportedManifest(f"{what}: more than {MAX_REFERRERS} referrers: refused")
            url = _next_link(resp, self.reg.base_url)
        return out

    def _fallback(self, repo: str, subject: str) -> list[Descriptor]:
        tag = fallback_tag(subject)
        try:
            desc, raw = self.reg.get_manifest(repo, tag)
        except NotFound:
            return []
        return parse_referrers_index(raw, self.reg.location(repo, tag))

    def _tag_list(self, repo: str) -> frozenset[str] | None:
        """The repository's `sha256-*` tags (one listing per run); None when the list is too long to read."""
        with self._lock:
            if repo in self._tags:
                return self._tags[repo]
        found: set[str] = set()
        total = 0
        url: str | None = f"/v2/{repo}/tags/list"
        params: dict | None = {"n": TAG_PAGE}
        result: frozenset[str] | None = None
        for _ in range(MAX_TAG_PAGES):
            resp = self.reg._request("GET", url, f"{self.reg.host}/{repo} tags", (200, 404), params=params)
            params = None
            if resp.status_code == 404:
                result = frozenset()
                break
            try:
                tags = resp.json().get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{self.reg.host}/{repo} tags: not a tag list") from None
            if not isinstance(tags, list):
                raise RegistryError(f"{self.reg.host}/{repo} tags: not a tag list")
            total += len(tags)
            found.update(t for t in tags if isinstance(t, str) and t.startswith("sha256-"))
            url = _next_link(resp, self.reg.base_url)
            if url is None:
                result = frozenset(found)
                break
            if total > MAX_TAGS:
                break
        with self._lock:
            return self._tags.setdefault(repo, result)

    def tagged(self, repo: str, subject: str) -> list[tuple[str, str]]:
        """cosign's legacy tags of `subject` that exist: (tag, kind)."""
        tags = self._tag_list(repo)
        wanted = legacy_tags(subject)
        if tags is not None:
            return [(t, k) for t, k in wanted.items() if t in tags]
        return [(t, k) for t, k in wanted.items() if self.reg.head_manifest(repo, t) is not None]

    def possible(self, repo: str) -> bool:
        """Can `repo` hold referrers at all?  False only when the registry has no API and the repository
        no `sha256-*` tag (then an image that is in place needs no more requests)."""
        if self.api is not False:
            return True
        tags = self._tag_list(repo)
        return tags is None or bool(tags)

    # -- writing ---------------------------------------------------------------------------
    def after_put(self, repo: str, media_type: str, raw: bytes, digest: str, resp: httpx.Response) -> None:
        """A manifest with a `subject` was stored: when the registry did not index it (no `OCI-Subject` in
        its answer), record it in the subject's tag schema index."""
        if b'"subject"' not in raw:
            return
        subject = parse_manifest(media_type or None, raw).subject
        if subject is None or resp.headers.get("oci-subject"):
            return
        # no OCI-Subject: a registry without the API -- or one that serves it but predates the header
        # (registries built on spec 1.1 release candidates): its own list says which
        if self.api is not False and any(d.digest == digest for d in self._api(repo, subject.digest, None) or ()):
            return
        self.add_to_index(repo, subject.digest, referrer_descriptor(media_type, raw, digest))

    def add_to_index(self, repo: str, subject: str, desc: Descriptor) -> None:
        """Read-merge-write the tag schema index of `subject`, then read it back: another run writing the
        same index at once is caught (If-Match where the registry gives ETags, else the read-back)."""
        key = (repo, subject)
        with self._lock:
            lock = self._subject_locks.setdefault(key, threading.Lock())
        tag = fallback_tag(subject)
        what = self.reg.location(repo, tag)
        with lock:
            for _ in range(_UPDATE_ATTEMPTS):
                old, etag = self._read_index(repo, tag, what)
                new = merged_index(old, desc, what)
                if new is None:
                    return
                headers = {"Content-Type": OCI_INDEX}
                if etag:
                    headers["If-Match"] = etag
                resp = self.reg._request("PUT", f"/v2/{repo}/manifests/{tag}", f"push {what}",
                                         (200, 201, 202, 412), content=new, headers=headers)
                if resp.status_code == 412:
                    continue
                check, _ = self._read_index(repo, tag, what)
                if check is not None and merged_index(check, desc, what) is None:
                    return
            raise RegistryError(f"{what}: the referrers index kept changing under us "
                                f"({_UPDATE_ATTEMPTS} attempts): {desc.digest} not recorded; run again")

    def _read_index(self, repo: str, tag: str, what: str) -> tuple[bytes | None, str | None]:
        resp = self.reg._request("GET", f"/v2/{repo}/manifests/{tag}", what, (200, 404),
                                 headers={"Accept": OCI_INDEX}, cap=self.reg.max_manifest_bytes)
        if resp.status_code == 404:
            return None, None
        return resp.content, resp.headers.get("etag")


# --------------------------------------------------------------------------- layouts and archives


def store_referrers(get_manifest: Callable[[str, str], tuple[Descriptor, bytes]], repo: str,
                    subject: str) -> list[Descriptor]:
    """Referrers of `subject` in a layout or an archive: its tag schema entry."""
    tag = fallback_tag(subject)
    try:
        _, raw = get_manifest(repo, tag)
    except NotFound:
        return []
    return parse_referrers_index(raw, f"{repo}:{tag}")


def store_tagged(has_tag: Callable[[str, str], bool], repo: str, subject: str) -> list[tuple[str, str]]:
    return [(t, k) for t, k in legacy_tags(subject).items() if has_tag(repo, t)]


__all__ = ["RegistryReferrers", "store_referrers", "store_tagged"]
