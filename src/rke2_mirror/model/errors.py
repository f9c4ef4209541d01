"""One exception tree.  `temporary` marks what may be retried; `exit_code` what the CLI returns."""

from __future__ import annotations


class MirrorError(Exception):
    """Base of every error rke2-mirror raises on purpose.  str(e) is one line for the user."""

    temporary = False
    exit_code = 1


class InputError(MirrorError):
    """Bad input or configuration: exit 2, one line, nothing copied."""

    exit_code = 2


class RegistryError(MirrorError):
    """An error talking to a registry."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TemporaryError(RegistryError):
    """Connection errors, 408, 429, 5xx: retried with backoff."""

    temporary = True


class NotFound(RegistryError):
    pass


class AuthError(RegistryError):
    """401/403: credentials missing, wrong, or lacking a permission."""


class TokenError(AuthError):
    """The token service refused the credentials."""


class TLSError(RegistryError):
    """Certificate verification failed."""

    exit_code = 2


class UnreachableError(RegistryError):
    """Connection refused / DNS failure after retries."""

    exit_code = 2


class DigestMismatch(MirrorError):
    """Content does not hash to the digest (or size) that names it."""


class UnsupportedManifest(MirrorError):
    pass


class ArchiveError(MirrorError):
    """A corrupt, truncated or hostile archive."""

    exit_code = 2


class WorkDirError(MirrorError):
    """A work directory (save's OCI layout) could not be written (disk full, file too large, permissions)."""

    exit_code = 2
