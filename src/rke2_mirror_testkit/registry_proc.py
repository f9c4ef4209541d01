"""Run a real CNCF distribution (``docker-registry``, 2.8) on a loopback port."""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import bcrypt
import httpx
import yaml

__all__ = [
    "REGISTRY_BINARY",
    "RegistryStartError",
    "RunningRegistry",
    "free_port",
    "start_registry",
    "write_htpasswd",
    "ssl_context",
]

REGISTRY_BINARY = os.environ.get("RKE2_MIRROR_TEST_REGISTRY_BINARY", "/usr/bin/docker-registry")
START_TIMEOUT = 15.0

_live: "weakref.WeakSet[RunningRegistry]" = weakref.WeakSet()


class RegistryStartError(RuntimeError):
    pass


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature: callers retry on bind errors)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssl_context(ca_file: Path | str | None) -> ssl.SSLContext | bool:
    """What to pass as httpx ``verify=``: a context trusting ``ca_file``, or True (system store)."""
    if ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(ca_file))


def write_htpasswd(path: Path, users: dict[str, str], *, rounds: int = 5) -> Path:
    """bcrypt htpasswd file (``user:$2y$...``) as distribution's htpasswd auth wants.

    A low cost factor keeps logins fast (the registry verifies bcrypt on every request)."""
    lines = []
    for user, password in users.items():
        h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
        lines.append(f"{user}:{h.replace('$2b$', '$2y$', 1)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(eq=False)
class RunningRegistry:
    url: str
    host: str
    scheme: str
    ca_file: Path | None
    root: Path
    log: Path
    process: subprocess.Popen
    config: Path
    workdir: Path
    users: dict[str, str] = field(default_factory=dict)
    auth: str | None = None

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx ``verify=`` value for this registry."""
        return ssl_context(self.ca_file)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def access_log(self) -> list[str]:
        """Access-log lines (combined log format) written so far."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [l for l in text.splitlines() if '"' in l and " HTTP/" in l and "level=" not in l]

    def stop(self, timeout: float = 5.0) -> None:
        p = self.process
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        _live.discard(self)

    def __enter__(self) -> "RunningRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _load_prctl():
    """libc prctl, resolved in the parent: the child (after fork, maybe with other threads
    around) must not import or allocate, only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # pragma: no cover
        return None


_PRCTL = _load_prctl()


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG(SIGTERM): the registry dies with the test process even on SIGKILL.
    _PRCTL(1, 15)


def _build_config(
    *,
    port: int,
    root: Path,
    tls: tuple[Path, Path] | None,
    auth: str | None,
    htpasswd: Path | None,
    token_realm: str | None,
    token_service: str,
    token_issuer: str,
    token_rootcertbundle: Path | None,
) -> dict:
    cfg: dict = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if tls:
        cfg["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    if auth == "htpasswd":
        cfg["auth"] = {"htpasswd": {"realm": "basic-realm", "path": str(htpasswd)}}
    elif auth == "token":
        if not token_realm or not token_rootcertbundle:
            raise ValueError("token auth needs token_realm and token_rootcertbundle")
        cfg["auth"] = {
            "token": {
                "realm": token_realm,
                "service": token_service,
                "issuer": token_issuer,
                "rootcertbundle": str(token_rootcertbundle),
            }
        }
    elif auth is not None:
        raise ValueError(f"unknown auth {auth!r}")
    return cfg


def start_registry(
    workdir: Path | str,
    *,
    tls: tuple[Path, Path] | None = None,
    ca_file: Path | None = None,
    auth: Literal["htpasswd", "token"] | None = None,
    users: dict[str, str] | None = None,
    token_realm: str | None = None,
    token_service: str = "rke2-mirror-test",
    token_issuer: str = "rke2-mirror-test-issuer",
    token_rootcertbundle: Path | None = None,
    timeout: float = START_TIMEOUT,
    attempts: int = 3,
) -> RunningRegistry:
    """Start ``docker-registry serve`` on a free 127.0.0.1 port and wait until ``/v2/`` answers.

    ``tls`` is ``(cert_path, key_path)``; pass ``ca_file`` (the issuing CA) so the returned
    object's ``ca_file``/``verify`` can be used by clients (also used for the readiness probe).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    users = dict(users or {})
    htpasswd = None
    if auth == "htpasswd":
        if not users:
            raise ValueError("htpasswd auth needs users")
        htpasswd = write_htpasswd(workdir / "htpasswd", users)
    scheme = "https" if tls else "http"
    last_error = ""
    for attempt in range(attempts):
        port = free_port()
        cfg = _build_config(
            port=port,
            root=root,
            tls=tls,
            auth=auth,
            htpasswd=htpasswd,
            token_realm=token_realm,
            token_service=token_service,
            token_issuer=token_issuer,
            token_rootcertbundle=token_rootcertbundle,
        )
        config = workdir / "config.yml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = workdir / "registry.log"
        with open(log, "ab") as logf:
            logf.write(f"--- start attempt {attempt + 1} port {port}\n".encode())
            logf.flush()
            use_pdeathsig = _PRCTL is not None and threading.current_thread() is threading.main_thread()
            proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(workdir),
                preexec_fn=_pdeathsig if use_pdeathsig else None,
            )
        host = f"127.0.0.1:{port}"
        reg = RunningRegistry(
            url=f"{scheme}://{host}",
            host=host,
            scheme=scheme,
            ca_file=Path(ca_file) if (tls and ca_file) else None,
            root=root,
            log=log,
            process=proc,
            config=config,
            workdir=workdir,
            users=users,
            auth=auth,
        )
        _live.add(reg)
        ok, last_error = _wait_ready(reg, timeout)
        if ok:
            return reg
        reg.stop()
        tail = reg.log_tail()
        if "address already in use" in tail.lower() and attempt + 1 < attempts:
            continue
        break
    raise RegistryStartError(f"docker-registry did not start ({last_error}); log tail:\n{reg.log_tail()}")


def _wait_ready(reg: RunningRegistry, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    verify: ssl.SSLContext | bool = True
    if reg.scheme == "https":
        verify = ssl_context(reg.ca_file) if reg.ca_file else False
    last = "timeout"
    with httpx.Client(verify=verify, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if reg.process.poll() is not None:
                return False, f"process exited with {reg.process.returncode}"
            try:
                r = client.get(reg.url + "/v2/")
                if r.status_code in (200, 401):
                    return True, ""
                last = f"GET /v2/ -> {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
    return False, last


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover
    for reg in list(_live):
        try:
            reg.stop(timeout=2)
        except Exception:
            pass
