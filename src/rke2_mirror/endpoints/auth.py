"""Credentials lookup and an httpx.Auth for Basic and Bearer-token registry challenges.

Tokens are attached before a request is sent once the registry's challenge is known, so streamed request
bodies never need replaying; a token is reused for every request its scopes cover, and one token request names
a batch of the repositories the run planned (`RegistryAuth.plan`) and the mount sources seen so far, within a
bound that keeps the token under the header size a proxy in front of the registry accepts (MAX_ACCESS_BYTES):
a run asks a token or two per batch of repositories, not one per repository and mount source.

Credentials go only where they belong: never to another host a request is redirected to (storage,
a CDN), and to a Bearer challenge's token service (its `realm`) on another host than the registry's, or
over plain http for an https registry, only with a warning (once per realm), or not at all with
`strict_realm` (`--strict-auth-realm`: `AuthRealmRefused`, exit 2).  Anonymous token requests go anywhere.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from rke2_mirror.model import jsondoc
from rke2_mirror.model.errors import AuthError, InputError, RegistryError, TokenError

ENV_USERNAME = "RKE2_MIRROR_USERNAME"
ENV_PASSWORD = "RKE2_MIRROR_PASSWORD"

_DOCKER_HUB_KEYS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# Token services known to live on another host than their registry: credentials go there without a warning.
KNOWN_TOKEN_HOSTS: dict[str, frozenset[str]] = {"registry-1.docker.io": frozenset({"auth.docker.io"})}


class AuthRealmRefused(InputError):
    """--strict-auth-realm: a registry's token service is where its credentials do not belong (exit 2)."""


def realm_concern(registry_scheme: str, registry_host: str, realm: str) -> str | None:
    """Why sending credentials for `registry_host` (host[:port]) to the token service at `realm` is doubtful,
    or None when it is not: another host name (any port of the registry's own host is its own; Docker Hub's
    auth.docker.io is known), or plain http when the registry is https."""
    r = urlsplit(realm)
    registry_name = (urlsplit(f"//{registry_host}").hostname or "").lower()
    realm_name = (r.hostname or "").lower()
    why = []
    if realm_name != registry_name and realm_name not in KNOWN_TOKEN_HOSTS.get(registry_name, frozenset()):
        why.append("another host")
    if registry_scheme.lower() == "https" and r.scheme.lower() != "https":
        why.append(f"plain {r.scheme or 'http'} while the registry is https")
    return " and ".join(why) or None


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:  # never show a secret, even in a traceback
        return f"Credentials(username={self.username!r}, password=***)"

    __str__ = __repr__


def _normalize_host(key: str) -> str:
    k = key.strip()
    if "://" in k:
        k = urlsplit(k).netloc
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in _DOCKER_HUB_KEYS else k


MAX_CREDENTIALS_FILE = 4 * 1024 * 1024  # a docker config.json with many registries is a few KiB


def _config_doc(path: Path) -> object | None:
    """A docker config.json / auth.json, bounded (None when absent); never its content in a message."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIALS_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read credentials file {path}: {exc.strerror or exc.__class__.__name__}") from None
    try:
        return jsondoc.loads(data, f"credentials file {path}", limit=MAX_CREDENTIALS_FILE, error=InputError)
    except InputError:
        raise InputError(f"cannot read credentials file {path}: " + (
            f"larger than {MAX_CREDENTIALS_FILE} bytes" if len(data) > MAX_CREDENTIALS_FILE else
            "not valid JSON")) from None


def credentials_from_file(path: Path, host: str) -> Credentials | None:
    """The entry for `host` in a docker config.json / containers auth.json (None if absent)."""
    doc = _config_doc(path)
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    want = _normalize_host(host)
    for key, entry in auths.items():
        if _normalize_host(key) != want or not isinstance(entry, dict):
            continue
        user, pw = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"]).decode()
            except (ValueError, UnicodeDecodeError):
                raise InputError(f"{path}: the 'auth' entry for {key} is not base64 user:password") from None
            user, _, pw = decoded.partition(":")
        token = entry.get("identitytoken", "")
        if user or pw or token:
            return Credentials(user, pw, token)
    return None


def lookup_credentials(host: str, *, target: bool = False, env: dict[str, str] | None = None,
                       auth_files: tuple[Path, ...] = (), log: Callable[[str], None] | None = None
                       ) -> Credentials | None:
    """Credentials for `host` (host[:port]): env (target only), then the `auths` entries of `auth_files` (e.g.
    from a sync config), $REGISTRY_AUTH_FILE and the docker config, then the credential helper those files
    name for the host (`credHelpers`, else `credsStore`: `credential_helper`).  `log` gets a helper's
    warning (default: the "rke2_mirror" logger)."""
    env = os.environ if env is None else env
    if target and env.get(ENV_USERNAME):
        return Credentials(env[ENV_USERNAME], env.get(ENV_PASSWORD, ""))
    paths = list(auth_files)
    if env.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(env["REGISTRY_AUTH_FILE"]))
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    paths.append(docker_dir / "config.json")
    for p in paths:
        creds = credentials_from_file(p, host)
        if creds:
            return creds
    for p in paths:
        helper = helper_for(p, host)
        if helper:
            return credential_helper(helper, host, env=env, origin=p, log=log)
    return None


# --------------------------------------------------------------------------- docker credential helpers

HELPER_TIMEOUT = 10.0  # seconds for one `docker-credential-<name> get`
HELPER_MAX_BYTES = 64 * 1024  # of its answer (a real one is ~200 bytes)
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NOT_FOUND = "credentials not found"  # docker-credential-helpers' answer (stdout, exit 1) for an unknown server
_helper_warned: set[tuple[str, str]] = set()
_helper_lock = threading.Lock()


def helper_for(path: Path, host: str) -> str | None:
    """The credential helper a docker config.json / auth.json names for `host`: its `credHelpers` entry, else
    its `credsStore` (None when neither, or the file is absent or not JSON: `credentials_from_file` reads it
    first and says so)."""
    try:
        doc = _config_doc(path)
    except InputError:
        return None
    if not isinstance(doc, dict):
        return None
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        want = _normalize_host(host)
        for key, name in helpers.items():
            if isinstance(key, str) and _normalize_host(key) == want and isinstance(name, str) and name:
                return name
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def _helper_warning(log: Callable[[str], None] | None, helper: str, host: str, problem: str) -> None:
    with _helper_lock:  # once per helper and problem: a run builds a registry client per endpoint
        if (helper, problem) in _helper_warned:
            return
        _helper_warned.add((helper, problem))
    message = f"warning: credential helper docker-credential-{helper}: {problem}; {host} is accessed anonymously"
    (log or logging.getLogger("rke2_mirror").warning)(message)


def credential_helper(helper: str, host: str, *, env: Mapping[str, str] | None = None, origin: Path | None = None,
                      log: Callable[[str], None] | None = None, timeout: float | None = None) -> Credentials | None:
    """`docker-credential-<helper> get` with the server on stdin (`https://index.docker.io/v1/` for Docker Hub,
    else host[:port]), answering ``{"Username": ..., "Secret": ...}`` (Username `<token>`: an identity token).
    None when the helper knows no credentials for it, and -- after one warning, never showing the answer --
    when the helper is not on PATH, fails, takes longer than HELPER_TIMEOUT seconds or answers more than
    HELPER_MAX_BYTES or no such JSON."""
    import shutil

    env = os.environ if env is None else env
    if not _HELPER_NAME.match(helper):
        _helper_warning(log, helper[:64], host, f"not a helper name (in {origin})")
        return None
    program = shutil.which(f"docker-credential-{helper}", path=env.get("PATH", os.defpath))
    if program is None:
        _helper_warning(log, helper, host, f"not found on PATH (named in {origin})")
        return None
    server = "https://index.docker.io/v1/" if _normalize_host(host) == "docker.io" else _normalize_host(host)
    run_env = dict(os.environ) if env is os.environ else {**os.environ, **env}
    status, out, err = _run_helper([program, "get"], server.encode(), run_env,
                                   HELPER_TIMEOUT if timeout is None else timeout)
    if status == "timeout":
        _helper_warning(log, helper, host, f"no answer within {HELPER_TIMEOUT if timeout is None else timeout:g}s")
        return None
    if status == "too-large":
        _helper_warning(log, helper, host, f"answered more than {HELPER_MAX_BYTES // 1024} KiB")
        return None
    if isinstance(status, str):  # could not be started
        _helper_warning(log, helper, host, status)
        return None
    if status != 0:
        if _NOT_FOUND in out.decode("utf-8", "replace").lower() or _NOT_FOUND in err.decode("utf-8", "replace").lower():
            return None  # the helper has nothing for this server: anonymous, as docker does
        why = " ".join(err.decode("utf-8", "replace").split())[:120]  # its own error text, never its stdout
        _helper_warning(log, helper, host, f"'get' failed (exit status {status})" + (f": {why}" if why else ""))
        return None
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        _helper_warning(log, helper, host, "its answer is not the JSON {\"Username\", \"Secret\"} expected")
        return None
    if not secret:
        return None
    if user == "<token>":
        return Credentials("", "", secret)
    return Credentials(user, secret)


def _run_helper(argv: list[str], stdin: bytes, env: Mapping[str, str], timeout: float
                ) -> tuple[int | str, bytes, bytes]:
    """(exit status, or "timeout" / "too-large"; stdout; the first 4 KiB of stderr).  The helper runs in its own
    session and is killed, with whatever it started, when it overruns either bound."""
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(env), start_new_session=True)
    except OSError as exc:
        return f"cannot start ({exc.strerror or exc.__class__.__name__})", b"", b""
    out, err = bytearray(), bytearray()
    too_large = threading.Event()

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def pump(stream, buf: bytearray, limit: int, strict: bool) -> None:
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            if len(buf) <= limit:
                buf += chunk[: limit + 1 - len(buf)]
            if strict and len(buf) > limit:
                too_large.set()
                kill()
                return

    readers = [threading.Thread(target=pump, args=(proc.stdout, out, HELPER_MAX_BYTES, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, 4096, False), daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except OSError:  # it exited without reading
        pass
    try:
        status: int | str = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill()
        proc.wait()
        status = "timeout"
    for t in readers:
        t.join(1.0)
    for stream in (proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    if too_large.is_set():
        status = "too-large"
    return status, bytes(out), bytes(err[:4096])


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict

    @classmethod
    def parse(cls, header: str | None) -> "Challenge | None":
        if not header:
            return None
        scheme, _, rest = header.strip().partition(" ")
        params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
                  for m in _CHALLENGE_PARAM.finditer(rest)}
        return cls(scheme.lower(), params)


_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")


def request_scopes(request: httpx.Request, actions: str) -> tuple[str, ...]:
    m = _REPO_PATH.match(request.url.path)
    if not m:
        return ()
    scopes = [f"repository:{m.group(1)}:{actions}"]
    mount_from = parse_qs(request.url.query.decode()).get("from")
    if mount_from:
        scopes.append(f"repository:{mount_from[0]}:pull")
    return tuple(scopes)


# --------------------------------------------------------------------------- how many scopes one token request names
#
# A token request names more than its request's scopes (`RegistryAuth._wanted`): the repositories the run said it
# will use next (`RegistryAuth.plan`, in batches) and, for a mount, the mount sources seen so far, so a run asks
# about two tokens per batch of repositories (one for mounts) instead of one per repository and mount source (every
# token request is a password check at the token service; a Harbor whose users live in LDAP binds for each).
# Each request sends the smallest token covering it (each repository a token names costs the registry 5-10 us of
# CPU on every request it comes with, measured on docker-registry 2.8).  Bounded, because the token comes
# back holding every repository it names and then travels in each request's "Authorization: Bearer" header:
# Harbor's nginx (and ingress-nginx) keep nginx's default `large_client_header_buffers 4 8k`, so a header line or a
# request line over 8 KiB is refused (400 / 414).  A Harbor token is ~0.7 KiB plus, per repository, its access
# entry base64-encoded: {"type":"repository","name":NAME,"actions":["push","scanner-pull","pull","delete","*"]}
# (Harbor grants every action the user holds, whatever was asked) = ACCESS_ENTRY_BYTES + len(NAME) bytes, x4/3.
# MAX_ACCESS_BYTES of entries make a ~4.8 KiB Harbor token (29 repositories of 20-character names), the request's
# query ~2 KiB; a token service that makes larger tokens (a certificate chain in the JWT header) is caught by
# MAX_TOKEN_HEADER: a longer answer is not used, and later requests name half as much.
ACCESS_ENTRY_BYTES = 86
MAX_ACCESS_BYTES = 3072
MAX_TOKEN_HEADER = 7 * 1024  # "Bearer <token>", well under the 8 KiB a proxy in front of the registry accepts
BATCH_SHARE = 0.5  # of MAX_ACCESS_BYTES for a planned batch; the rest is for mount sources

Scope = tuple[str, str, str]  # (type, name, action); an opaque scope string is (scope, "", "")
_ACTION_ORDER = {"pull": 0, "push": 1}


def _entry_bytes(name: str) -> int:
    return ACCESS_ENTRY_BYTES + len(name)


def scope_groups(scopes: Iterable[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """Scope strings ("type:name:action,action", several in one string space-separated) as
    {(type, name): actions}, in the order given; a string of another form is kept whole, as (scope, "")."""
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for scope in scopes:
        for one in scope.split(" "):
            if not one:
                continue
            typ, _, rest = one.partition(":")
            name, sep, actions = rest.rpartition(":")
            key, acts = ((typ, name), tuple(a for a in actions.split(",") if a)) if sep and name else ((one, ""), ())
            old = out.get(key, ())
            out[key] = old + tuple(a for a in acts if a not in old)
    return out


def _triples(groups: Mapping[tuple[str, str], tuple[str, ...]]) -> frozenset[Scope]:
    return frozenset((t, n, a) for (t, n), acts in groups.items() for a in (acts or ("",)))


def _groups_of(scopes: frozenset[Scope]) -> dict[tuple[str, str], tuple[str, ...]]:
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for t, n, a in sorted(scopes):
        out[(t, n)] = out.get((t, n), ()) + ((a,) if a else ())
    return out


def _render(groups: Mapping[tuple[str, str], tuple[str, ...]]) -> tuple[str, ...]:
    out = []
    for (t, n), acts in groups.items():
        if not n:
            out.append(t)
        else:
            acts = sorted(acts, key=lambda a: (_ACTION_ORDER.get(a, 2), a))
            out.append(f"{t}:{n}:{','.join(acts)}")
    return tuple(out)


@dataclass(eq=False)
class _Token:
    header: str
    expires: float
    scopes: frozenset[Scope] = frozenset()  # what it was asked for (a grant can be smaller: the registry says so)

    def covers(self, need: frozenset[Scope], now: float) -> bool:
        return self.expires > now and need <= self.scopes


class RegistryAuth(httpx.Auth):
    """Basic and Bearer auth for one registry endpoint; thread-safe.

    A token is reused for every request the scopes it was asked for cover (a superset), the one naming the fewest
    scopes first; a request no token covers asks for its own scopes plus, within MAX_ACCESS_BYTES, the
    repositories planned with it (`plan`) and, for a mount, the mount sources seen so far (see `_wanted`).  A
    401 despite a covering token asks for exactly the request's scopes (and drops the token when the registry
    calls it invalid).

    `fetch` is called to get tokens: fetch(url, params, basic_credentials) -> httpx.Response.  `scheme` is
    the registry's (http or https); `strict_realm` and `log` decide what happens when a token service is where
    credentials do not belong (see the module's docstring).
    """

    requires_response_body = False

    def __init__(self, credentials: Credentials | None, actions: str,
                 fetch: Callable[..., httpx.Response], host: str, *, scheme: str = "https",
                 strict_realm: bool = False, log: Callable[[str], None] | None = None):
        self.credentials = credentials
        self.actions = actions
        self._fetch = fetch
        self.host = host
        self.scheme_of_registry = scheme
        self.strict_realm = strict_realm
        self._log = log
        self._warned: set[str] = set()
        self.challenge: Challenge | None = None
        self._lock = threading.Lock()
        # (type, name) -> the live tokens asked for it, newest last; _newest: any scope (for /v2/)
        self._tokens: dict[tuple[str, str], list[_Token]] = {}
        self._newest: _Token | None = None
        self._fetch_locks: dict[object, threading.Lock] = {}
        self._batch_of: dict[str, int] = {}
        self._batches: list[tuple[str, ...]] = []
        self._origins: dict[str, int] = {}  # mount sources seen -> how many mounts named them
        self.max_access_bytes = MAX_ACCESS_BYTES  # 0: a token request names its request's scopes only
        self.token_fetches = 0

    @property
    def scheme(self) -> str | None:
        return self.challenge.scheme if self.challenge else None

    def plan(self, repositories: Iterable[str]) -> None:
        """The repositories the run will use, in the order it uses them: a token is asked for a batch of
        them at once (each with this endpoint's actions), so the next ones need no token request of their own."""
        limit = int(self.max_access_bytes * BATCH_SHARE)
        batches: list[tuple[str, ...]] = []
        cur: list[str] = []
        cost = 0
        seen: set[str] = set()
        for repo in repositories:
            if repo in seen:
                continue
            seen.add(repo)
            c = _entry_bytes(repo)
            if cur and cost + c > limit:
                batches.append(tuple(cur))
                cur, cost = [], 0
            cur.append(repo)
            cost += c
        if cur:
            batches.append(tuple(cur))
        with self._lock:
            self._batches = batches
            self._batch_of = {r: i for i, b in enumerate(batches) for r in b}

    def _basic_header(self) -> str | None:
        c = self.credentials
        if not c or not (c.username or c.password):
            return None
        return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()

    # -- the token cache
    def _cached(self, need: frozenset[Scope], key: tuple[str, str] | None) -> _Token | None:
        now = time.monotonic()
        with self._lock:
            if key is None:
                return self._newest if self._newest and self._newest.expires > now else None
            best = None  # the covering token naming the fewest scopes (the newest of those): the least to send
            for tok in self._tokens.get(key, ()):
                if tok.covers(need, now) and (best is None or len(tok.scopes) <= len(best.scopes)):
                    best = tok
        return best

    def _store(self, tok: _Token) -> None:
        now = time.monotonic()
        with self._lock:
            self._newest = tok
            for key in {(t, n) for t, n, _ in tok.scopes}:
                live = [t for t in self._tokens.get(key, ()) if t.expires > now]
                # a token the new one covers goes, unless it is the smallest (the one most requests send)
                least = min((len(t.scopes) for t in live), default=0)
                live = [t for t in live if len(t.scopes) <= least or not t.scopes <= tok.scopes]
                live.append(tok)
                self._tokens[key] = live

    def _drop(self, tok: _Token) -> None:
        with self._lock:
            if self._newest is tok:
                self._newest = None
            for key in {(t, n) for t, n, _ in tok.scopes}:
                live = self._tokens.get(key)
                if live and tok in live:
                    live.remove(tok)

    def _drop_wide(self) -> None:
        """Forget every token asked for more than one repository."""
        with self._lock:
            for key, live in self._tokens.items():
                self._tokens[key] = [t for t in live if len({(ty, n) for ty, n, _ in t.scopes}) <= 1]

    def _note_origin(self, repo: str) -> None:
        with self._lock:
            self._origins[repo] = self._origins.get(repo, 0) + 1

    def _wanted(self, groups: dict[tuple[str, str], tuple[str, ...]],
                key: tuple[str, str] | None) -> dict[tuple[str, str], tuple[str, ...]]:
        """The scopes to ask for when no token covers `groups` (a request's, its own repository first): those,
        then within `max_access_bytes` the rest of its planned batch, and for a mount (a request naming another
        repository) what the newest token for the request's repository held (so a growing set replaces it) and
        the mount sources seen, most used first.  Requests pick the smallest token that covers them
        (`_cached`), so the mount sources travel with mounts only: every repository a token names costs the
        registry time on each request it comes with."""
        want = dict(groups)
        if key is None or key[0] != "repository" or self.max_access_bytes <= 0:
            return want
        cost = sum(_entry_bytes(n) for (t, n) in want if t == "repository")
        limit = self.max_access_bytes

        def add(k: tuple[str, str], acts: tuple[str, ...]) -> None:
            nonlocal cost
            if k in want:
                want[k] = want[k] + tuple(a for a in acts if a not in want[k])
                return
            c = _entry_bytes(k[1])
            if cost + c <= limit:
                want[k] = acts
                cost += c

        own = frozenset((key[0], key[1], a) for a in groups[key])
        now = time.monotonic()
        with self._lock:
            prev = next((t for t in reversed(self._tokens.get(key, ())) if t.covers(own, now)), None)
            batch_no = self._batch_of.get(key[1])
            batch = self._batches[batch_no] if batch_no is not None else ()
            origins = sorted(self._origins.items(), key=lambda kv: -kv[1])
        mine = tuple(a for a in self.actions.split(",") if a)
        for repo in batch:
            add(("repository", repo), mine)
        if len(groups) > 1:  # a mount: the sources go into a token of their own, sent with mounts only
            if prev is not None:  # a growing set replaces the token it grows from
                for k, acts in sorted(_groups_of(prev.scopes).items(), key=lambda kv: kv[1] == ("pull",)):
                    add(k, acts)
            for repo, _ in origins:
                add(("repository", repo), ("pull",))
        return want

    def _header_for(self, scopes: tuple[str, ...], *, exact: bool = False) -> tuple[str | None, _Token | None]:
        """(Authorization header, the token in it) for a request needing `scopes`; `exact`: a new token for
        exactly these scopes (a 401 came back despite a token that should have done)."""
        ch = self.challenge
        if ch is None:
            return None, None
        if ch.scheme == "basic":
            return self._basic_header(), None
        if ch.scheme != "bearer":
            return None, None
        groups = scope_groups(scopes)
        need = _triples(groups)
        key = next(iter(groups), None)
        if not exact:
            tok = self._cached(need, key)
            if tok is not None:
                return tok.header, tok
        batch_no = self._batch_of.get(key[1]) if key else None
        group = ("batch", batch_no) if batch_no is not None else ("scope", key)
        with self._lock:
            lock = self._fetch_locks.setdefault(group, threading.Lock())
        with lock:  # one token request at a time per batch (or repository): the others wait and reuse it
            if not exact:
                tok = self._cached(need, key)
                if tok is not None:
                    return tok.header, tok
            want = groups if exact else self._wanted(groups, key)
            tok = self._fetch_wanted(ch, groups, want)
            self._store(tok)
            return tok.header, tok

    def _fetch_wanted(self, ch: Challenge, groups: dict, want: dict) -> _Token:
        """A token for `want`; when that names more than the request's `groups` and the token service refuses
        it or answers a token too large to send, the request's scopes alone (the credentials are then judged by
        that answer)."""
        if want == groups:
            return self._fetch_token(ch, _render(want), _triples(want))
        try:
            tok = self._fetch_token(ch, _render(want), _triples(want))
        except RegistryError:  # e.g. a scope the service cannot parse or refuses, a request line too long
            self.max_access_bytes = 0
            return self._fetch_token(ch, _render(groups), _triples(groups))
        if len(tok.header) > MAX_TOKEN_HEADER:
            self.max_access_bytes //= 2
            return self._fetch_token(ch, _render(groups), _triples(groups))
        return tok

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...], asked: frozenset[Scope] = frozenset()) -> _Token:
        realm = ch.params.get("realm")
        if not realm:
            raise AuthError(f"{self.host}: bearer challenge without a realm")
        service = ch.params.get("service")
        params = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
        c = self.credentials
        if c and (c.username or c.password or c.identity_token):
            self._check_realm(realm)
        self.token_fetches += 1
        if c and c.identity_token:  # OAuth2 refresh-token grant (docker config "identitytoken")
            form = {"grant_type": "refresh_token", "refresh_token": c.identity_token, "client_id": "rke2-mirror",
                    "scope": " ".join(scopes), **({"service": service} if service else {})}
            resp = self._fetch(realm, None, None, data=form)
        else:
            basic = (c.username, c.password) if c and (c.username or c.password) else None
            resp = self._fetch(realm, params, basic)
        if resp.status_code in (401, 403):
            who = f"user {c.username!r}" if c and c.username else "anonymous access"
            raise TokenError(f"{self.host}: the token service at {realm} refused {who} (HTTP {resp.status_code});"
                             " check the credentials", status=resp.status_code)
        if resp.status_code >= 400:
            from rke2_mirror.endpoints.registry import status_error  # local import: registry imports auth
            raise status_error(resp, f"token service {realm}")
        if resp.status_code >= 300:  # redirects are not followed: credentials stay where the challenge said
            raise TokenError(f"{self.host}: the token service at {realm} redirects (HTTP {resp.status_code}) "
                            f"to {resp.headers.get('location', '?')[:200]}; not followed")
        try:
            doc = resp.json()
            token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"{self.host}: the token service at {realm} answered without a token") from None
        expires_in = doc.get("expires_in") or 60
        try:
            expires_in = max(int(expires_in), 10)
        except (TypeError, ValueError):
            expires_in = 60
        # refresh a little early; a token is never used past 90% of its life
        return _Token(f"Bearer {token}", time.monotonic() + expires_in * 0.9, asked)

    def _check_realm(self, realm: str) -> None:
        """Before credentials go to `realm`: refuse (strict) or warn once when they do not belong there."""
        concern = realm_concern(self.scheme_of_registry, self.host, realm)
        if concern is None:
            return
        r = urlsplit(realm)
        where = f"{r.scheme}://{r.netloc}"
        if self.strict_realm:
            raise AuthRealmRefused(f"the registry {self.host} names the token service {where} ({concern}): "
                                   "its credentials are not sent there (--strict-auth-realm)")
        with self._lock:
            if realm in self._warned:
                return
            self._warned.add(realm)
        message = (f"warning: the registry {self.host} names the token service {where} ({concern}): "
                   "its credentials are sent there; --strict-auth-realm refuses that")
        if self._log is not None:
            self._log(message)
        else:
            logging.getLogger("rke2_mirror").warning(message)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if request.url.netloc.decode("ascii") != self.host:
            yield request  # a redirect to storage/CDN: never send the registry's credentials there
            return
        scopes = request_scopes(request, self.actions)
        for _typ, origin in list(scope_groups(scopes[1:])):  # a mount's source: later tokens name it up front
            self._note_origin(origin)
        header, used = self._header_for(scopes)
        if header:
            request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401:
            return
        ch = Challenge.parse(response.headers.get("www-authenticate"))
        if ch is None or ch.scheme not in ("bearer", "basic"):
            return
        if ch.scheme == "bearer" and ch.params.get("scope"):
            extra = tuple(s for s in ch.params["scope"].split(" ") if s and s not in scopes)
            scopes = scopes + extra
        old = self.challenge
        first_time = old is None or (old.scheme, old.params.get("realm"), old.params.get("service")) != (
            ch.scheme, ch.params.get("realm"), ch.params.get("service"))
        if first_time:
            self.challenge = Challenge(ch.scheme, {k: v for k, v in ch.params.items() if k != "scope"})
        elif used is not None and ch.params.get("error") == "invalid_token":
            self._drop(used)  # expired or revoked early: no other request is sent with it
        new_header, _ = self._header_for(scopes, exact=not first_time)
        if not new_header or new_header == header:
            return  # nothing new to try: the 401 stands
        if request.stream is not None and not isinstance(request.stream, httpx.ByteStream):
            return  # a streamed body cannot be replayed: the caller retries the whole operation
        request.headers["Authorization"] = new_header
        response = yield request
        if (response.status_code != 401 and used is not None and ch.params.get("error") != "invalid_token"
                and {(t, n) for t, n, _ in used.scopes} - set(scope_groups(scopes))):
            # the token named more, and did not grant what the request's scopes alone did: this token service
            # grants the first scope of a request only (or the like): ask for the request's scopes from now on
            self.max_access_bytes = 0
            self._drop_wide()
