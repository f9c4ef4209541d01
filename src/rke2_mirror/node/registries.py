"""`registries.yaml` as RKE2 reads it, parsed and validated: `mirrors` (endpoints, rewrites) and
`configs` (TLS, auth) per registry host.  Pure: the CLI reads the file.

The YAML itself is parsed by `rke2_mirror.yamlsafe` (bounded size, depth and alias expansion); every
value is type-checked here, and no error quotes a value (the file holds passwords) or lets a key break
the one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rke2_mirror import yamlsafe
from rke2_mirror.endpoints.auth import Credentials
from rke2_mirror.model.errors import InputError

WILDCARD = "*"


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)  # base64 user:password
    identity_token: str = field(default="", repr=False)

    def credentials(self) -> Credentials:
        user, pw = self.username, self.password
        if self.auth and not (user or pw):
            import base64
            try:
                user, _, pw = base64.b64decode(self.auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InputError("registries.yaml: an auth.auth value is not base64 user:password") from None
        return Credentials(user, pw, self.identity_token)


@dataclass(frozen=True)
class RegistryConfig:
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None


@dataclass(frozen=True)
class Mirror:
    endpoints: tuple[str, ...] = ()
    rewrites: tuple[tuple[str, str], ...] = ()


TOP_LEVEL_KEYS = ("mirrors", "configs")  # all RKE2 (k3s `registries.Registry`) reads of the file


@dataclass(frozen=True)
class Registries:
    mirrors: Mapping[str, Mirror] = field(default_factory=dict)
    configs: Mapping[str, RegistryConfig] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # top-level keys RKE2 does not read (as messages show them)

    @classmethod
    def from_dict(cls, doc: Mapping | None, origin: str = "registries.yaml") -> "Registries":
        """Validate the document as RKE2 reads it (unknown keys are ignored, as RKE2 does; the top-level ones
        are kept in `ignored`, for `ignored_warning`)."""
        doc = doc or {}
        if not isinstance(doc, Mapping):
            raise InputError(f"{origin}: expected a mapping with `mirrors` and `configs`")
        mirrors = {str(k): _parse_mirror(v, f"{origin}: mirrors.{show_key(k)}") for k, v in _mapping(doc.get("mirrors"), origin, "mirrors").items()}
        configs = {str(k): _parse_config(v, f"{origin}: configs.{show_key(k)}") for k, v in _mapping(doc.get("configs"), origin, "configs").items()}
        return cls(mirrors, configs, unknown_top_level_keys(doc))

    @classmethod
    def parse(cls, text: str | bytes, origin: str = "registries.yaml") -> "Registries":
        return cls.from_dict(load_yaml_mapping(text, origin), origin)

    def ignored_warning(self, origin: str = "registries.yaml") -> str | None:
        """What to tell the user about top-level keys RKE2 ignores (a misspelled `mirrors:`), or None."""
        return ignored_keys_warning(self.ignored, origin)


def unknown_top_level_keys(doc: Mapping) -> tuple[str, ...]:
    return tuple(show_key(k) for k in list(doc)[:1000] if k not in TOP_LEVEL_KEYS)


def ignored_keys_warning(keys: tuple[str, ...], origin: str = "registries.yaml") -> str | None:
    if not keys:
        return None
    import difflib

    hints = []
    for k in keys[:10]:
        close = difflib.get_close_matches(str(k).lower(), TOP_LEVEL_KEYS, n=1, cutoff=0.6)
        hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    plural = "s" if len(keys) > 1 else ""
    return (f"{origin}: unknown top-level key{plural} {', '.join(hints)}{more}: RKE2 reads only 'mirrors' and "
            "'configs' and ignores the rest")


show_key = yamlsafe.shown  # a key as a message shows it (short, one line)


def _text(value, where: str) -> str:
    """A string field (a scalar written unquoted, e.g. a number, is read as its text); never a mapping, list
    or binary.  The message names the field, never the value."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # bool included, as before
        return str(value)
    raise InputError(f"{where}: must be a string")


def _path(value, where: str) -> str | None:
    if not value:  # unset, empty (or false, as before)
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: must be a path (a string)")
    return value


def _mapping(value, origin: str, what: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{origin}: `{what}` must be a mapping")
    return value


def _parse_mirror(value, where: str) -> Mirror:
    value = value or {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: must be a mapping with `endpoint`")
    eps = value.get("endpoint") or []
    if isinstance(eps, str) or not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
        raise InputError(f"{where}.endpoint: must be a list of URLs")
    rw = value.get("rewrite") or {}
    if not isinstance(rw, Mapping) or not all(isinstance(x, (str, int, float)) for kv in rw.items() for x in kv):
        raise InputError(f"{where}.rewrite: must be a mapping of pattern: replacement")
    return Mirror(tuple(eps), tuple((str(k), str(v)) for k, v in rw.items()))


def _parse_config(value, where: str) -> RegistryConfig:
    value = value or {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: must be a mapping with `auth` and/or `tls`")
    tls = auth = None
    if value.get("tls") is not None:
        t = value["tls"]
        if not isinstance(t, Mapping):
            raise InputError(f"{where}.tls: must be a mapping")
        insecure = t.get("insecure_skip_verify", False)
        if not isinstance(insecure, bool):
            raise InputError(f"{where}.tls.insecure_skip_verify: must be true or false")
        ca, cert, key = (_path(t.get(f), f"{where}.tls.{f}") for f in ("ca_file", "cert_file", "key_file"))
        tls = TLSConfig(ca, insecure, cert, key)
    if value.get("auth") is not None:
        a = value["auth"]
        if not isinstance(a, Mapping):
            raise InputError(f"{where}.auth: must be a mapping")
        token_key = "identity_token" if a.get("identity_token") else "identitytoken"
        auth = AuthConfig(*(_text(a.get(f) or None, f"{where}.auth.{f}") for f in ("username", "password", "auth")),
                          _text(a.get(token_key) or None, f"{where}.auth.{token_key}"))
    return RegistryConfig(tls, auth)


def load_yaml_mapping(text: str | bytes, origin: str) -> dict:
    """A YAML document that must be a mapping (empty -> {}), parsed within `yamlsafe`'s bounds (size,
    depth, alias expansion); every failure is one InputError naming `origin` and the line where known,
    never echoing the content."""
    try:
        doc = yamlsafe.load(text)
    except yamlsafe.YAMLRefused as exc:
        where = f" (line {exc.line})" if exc.line else ""
        raise InputError(f"{origin}: not valid YAML{where}" if exc.syntax else f"{origin}: {exc.reason}{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{origin}: expected a YAML mapping at the top level")
    return doc

