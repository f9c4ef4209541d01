"""Credentials lookup and an httpx.Auth for Basic and Bearer-token registry challenges.

Tokens are cached per scope and attached before a request is sent once the registry's challenge
is known, so streamed request bodies never need replaying and a run fetches one token per
repository (not one per request).

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
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from rke2_mirror.model.errors import AuthError, InputError, TokenError

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


def credentials_from_file(path: Path, host: str) -> Credentials | None:
    """The entry for `host` in a docker config.json / containers auth.json (None if absent)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read credentials file {path}: {exc.__class__.__name__}") from None
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
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
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


@dataclass
class _Token:
    header: str
    expires: float


class RegistryAuth(httpx.Auth):
    """Basic and Bearer auth for one registry endpoint; thread-safe; token cache per scope set.

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
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._lock = threading.Lock()
        self._scope_locks: dict[tuple[str, ...], threading.Lock] = {}
        self.token_fetches = 0

    @property
    def scheme(self) -> str | None:
        return self.challenge.scheme if self.challenge else None

    def _basic_header(self) -> str | None:
        c = self.credentials
        if not c or not (c.username or c.password):
            return None
        return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()

    def _header_for(self, scopes: tuple[str, ...], force: bool = False) -> str | None:
        ch = self.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self._basic_header()
        if ch.scheme != "bearer":
            return None
        with self._lock:
            lock = self._scope_locks.setdefault(scopes, threading.Lock())
        with lock:
            tok = self._tokens.get(scopes)
            if tok and not force and tok.expires > time.monotonic():
                return tok.header
            tok = self._fetch_token(ch, scopes)
            self._tokens[scopes] = tok
            return tok.header

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...]) -> _Token:
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
        return _Token(f"Bearer {token}", time.monotonic() + expires_in * 0.9)

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
        header = self._header_for(scopes)
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
        new_header = self._header_for(scopes, force=not first_time)
        if not new_header or new_header == header:
            return  # nothing new to try: the 401 stands
        if request.stream is not None and not isinstance(request.stream, httpx.ByteStream):
            return  # a streamed body cannot be replayed: the caller retries the whole operation
        request.headers["Authorization"] = new_header
        yield request
