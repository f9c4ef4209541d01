"""Throw-away PKI for tests: a CA issuing loopback server certificates, and an RSA
key + self-signed certificate used to sign registry (JWT) tokens."""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "make_ca", "make_token_signer", "DEFAULT_HOSTS"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


@dataclass
class CA:
    """A test certificate authority (EC P-256, fast to generate)."""

    directory: Path
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    _serial: int = 1

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def issue(
        self,
        directory: Path | str,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        *,
        name: str = "server",
        days: int = 30,
    ) -> tuple[Path, Path]:
        """Issue a serverAuth certificate for ``hosts`` (IPs become IP SANs, the rest DNS SANs).

        Writes ``<name>.crt`` (leaf only) and ``<name>.key`` into ``directory``;
        returns ``(cert_path, key_path)``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hosts = list(hosts)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self._serial += 1
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path


def make_ca(directory: Path | str, *, common_name: str = "rke2-mirror test CA", days: int = 30) -> CA:
    """Create a CA in ``directory`` (``ca.crt`` / ``ca.key``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "ca.crt"
    key_path = directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return CA(directory=directory, cert_path=cert_path, key_path=key_path, cert=cert, key=key)


def make_token_signer(
    directory: Path | str, *, common_name: str = "rke2-mirror-test-token-signer", days: int = 30
) -> tuple[rsa.RSAPrivateKey, Path, bytes]:
    """RSA-2048 key + self-signed certificate for RS256 registry tokens.

    Writes ``token.key`` / ``token.crt`` into ``directory``.  The certificate file is what
    docker-registry's ``auth.token.rootcertbundle`` points at; tokens name the key by ``kid`` (its
    libtrust key ID, as Harbor's do).  Returns ``(private_key, cert_path, cert_der)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "token.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "token.key", key)
    return key, cert_path, cert.public_bytes(serialization.Encoding.DER)
