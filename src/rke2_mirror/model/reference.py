"""Image references, registry targets and the source -> target mapping.

Pure: no I/O.  Every default (docker.io, library/, latest) lives here and only here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from rke2_mirror.model.errors import InputError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

# distribution/reference grammar, simplified but strict enough to reject garbage.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?)(?::[0-9]+)?$")


def _is_registry_component(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part.startswith("[")


@dataclass(frozen=True, order=True)
class ImageRef:
    """A normalized image reference: registry / repository [:tag] [@digest]."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ImageRef":
        s = text.strip()
        if not s or any(c.isspace() for c in s):
            raise InputError(f"invalid image reference {text!r}")
        digest = None
        if "@" in s:
            s, digest = s.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise InputError(f"invalid digest in image reference {text!r}")
        first, sep, rest = s.partition("/")
        if sep and _is_registry_component(first):
            registry, remainder = first, rest
        else:
            registry, remainder = DOCKER_HUB, s
        if registry in ("index.docker.io", DOCKER_HUB_API):
            registry = DOCKER_HUB
        if not _HOST_RE.match(registry):
            raise InputError(f"invalid registry host in image reference {text!r}")
        tag = None
        last_slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > last_slash:
            remainder, tag = remainder[:colon], remainder[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise InputError(f"invalid tag in image reference {text!r}")
        if registry == DOCKER_HUB and "/" not in remainder:
            remainder = "library/" + remainder
        if not _REPO_RE.match(remainder):
            raise InputError(f"invalid repository name in image reference {text!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, remainder, tag, digest)

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str | None, keep_tag: bool = True) -> "ImageRef":
        return ImageRef(self.registry, self.repository, self.tag if keep_tag else None, digest)

    def with_tag(self, tag: str | None) -> "ImageRef":
        return ImageRef(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _without_userinfo(url: str) -> str:
    """The URL as it may be shown: a `user:password@` typed into it is masked, never printed."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)?[^/@]*@", lambda m: (m.group(1) or "") + "***@", url)


@dataclass(frozen=True)
class RegistryURL:
    """`[https://|http://]HOST[:PORT][/PREFIX]`: a registry endpoint with an optional repository prefix."""

    scheme: str
    host: str  # host[:port], as written (lower-cased)
    prefix: str = ""  # repository path prefix, no leading/trailing slash

    @classmethod
    def parse(cls, text: str, what: str = "registry") -> "RegistryURL":
        raw = text.strip()
        if not raw:
            raise InputError(f"empty {what} URL")
        shown = _without_userinfo(raw)
        if any(c.isspace() or ord(c) < 32 for c in raw):  # urlsplit would silently drop tabs and newlines
            raise InputError(f"{what} {shown!r}: whitespace or control characters in a URL")
        if "://" not in raw:
            raw = "https://" + raw
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InputError(f"{what} {shown!r}: scheme must be http:// or https://")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise InputError(
                f"{what} {shown!r}: only [http(s)://]HOST[:PORT][/PREFIX] is accepted"
                " (credentials go in RKE2_MIRROR_USERNAME/RKE2_MIRROR_PASSWORD or a docker config)"
            )
        host = (parts.netloc or "").lower()
        if not host or not _HOST_RE.match(host):
            raise InputError(f"{what} {shown!r}: invalid host")
        try:
            parts.port
        except ValueError:
            raise InputError(f"{what} {shown!r}: invalid port") from None
        prefix = parts.path.strip("/")
        if prefix and not _REPO_RE.match(prefix):
            raise InputError(f"{what} {shown!r}: invalid repository prefix {prefix!r}")
        return cls(scheme, host, prefix)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def hostname(self) -> str:
        return urlsplit(self.base_url).hostname or self.host

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port or (443 if self.scheme == "https" else 80)

    def repository(self, repo: str) -> str:
        return f"{self.prefix}/{repo}" if self.prefix else repo

    def __str__(self) -> str:
        out = self.base_url
        if self.prefix:
            out += "/" + self.prefix
        return out


def target_ref(src: ImageRef, target: RegistryURL) -> ImageRef:
    """The one mapping: where `src` lands in `target`.

    `docker.io/rancher/x:t` -> `HOST[:PORT][/PREFIX]/rancher/x:t`.  The source registry name is
    dropped (as rancher-load-images.sh and RKE2's system-default-registry do), so images of other
    registries keep only their repository path.
    """
    return ImageRef(target.host, target.repository(src.repository), src.tag, src.digest)


BAD_LINES_SHOWN = 3  # bad lines of a list named in its error, with file:line
_BAD_LINE_CHARS = 160  # characters of one bad line's message


def parse_image_lines(text: str, origin: str = "<input>") -> list[ImageRef]:
    """Parse a list file: one reference per line, `#` comments and blanks ignored, duplicates collapsed.
    Bad lines are one InputError: the first `BAD_LINES_SHOWN` with ``origin:line`` and how many in all."""
    seen: set[ImageRef] = set()
    out: list[ImageRef] = []
    bad: list[str] = []
    nbad = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not content:
            continue
        try:
            ref = ImageRef.parse(content)
        except InputError as exc:
            nbad += 1
            if len(bad) < BAD_LINES_SHOWN:
                msg = str(exc)
                bad.append(f"{origin}:{lineno}: " + (msg if len(msg) <= _BAD_LINE_CHARS else msg[:_BAD_LINE_CHARS] + "..."))
            continue
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    if nbad == 1:
        raise InputError(bad[0])
    if nbad:
        more = f"; and {nbad - len(bad)} more" if nbad > len(bad) else ""
        raise InputError(f"{'; '.join(bad)}{more} ({nbad} lines of {origin} are not image references)")
    return out


def merge_refs(*lists: list[ImageRef]) -> list[ImageRef]:
    """Merge reference lists, de-duplicated, first occurrence order kept."""
    seen: set[ImageRef] = set()
    out: list[ImageRef] = []
    for refs in lists:
        for r in refs:
            if r not in seen:
                seen.add(r)
                out.append(r)
    return out


def shard(refs: list[ImageRef], index: int, count: int) -> list[ImageRef]:
    """The part `index` (0-based) of `count` disjoint parts of `refs`, chosen by a hash of each reference,
    so N workers given 0/N .. N-1/N copy every image exactly once whatever order their lists are in."""
    import hashlib

    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count}: expected 0 <= I < N")
    return [r for r in refs if int.from_bytes(hashlib.sha256(str(r).encode()).digest()[:8], "big") % count == index]
