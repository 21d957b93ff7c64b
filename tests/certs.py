"""Test PKI: root CAs, intermediates, RSA and ECDSA leaves, written as PEM files.

Only for tests. Keys are small-but-valid (RSA 2048, P-256) so a whole test
module makes its certificates in well under a second.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str = "ecdsa") -> PrivateKey:
    """A fresh private key: "ecdsa" (P-256) or "rsa" (2048 bits)."""
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "runner-gateway tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass
class Issued:
    """A certificate with its key (and, for CAs, what can sign with it)."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _build(
    subject: str,
    key: PrivateKey,
    issuer: Issued | None,
    *,
    ca: bool,
    path_length: int | None = None,
    sans: tuple[str, ...] = (),
    client: bool = False,
    serial: int | None = None,
    days: int = 30,
) -> Issued:
    now = datetime.datetime.now(datetime.UTC)
    signer_key = key if issuer is None else issuer.key
    issuer_name = _name(subject) if issuer is None else issuer.cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
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
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    return Issued(cert, key)


def make_ca(name: str = "Test Root CA", kind: str = "ecdsa") -> Issued:
    return _build(name, new_key(kind), None, ca=True, days=365)


def make_intermediate(root: Issued, name: str = "Test Intermediate CA") -> Issued:
    return _build(name, new_key("ecdsa"), root, ca=True, path_length=0, days=180)


def make_leaf(
    issuer: Issued,
    kind: str = "ecdsa",
    sans: tuple[str, ...] = ("localhost", "127.0.0.1"),
    serial: int | None = None,
    key: PrivateKey | None = None,
) -> Issued:
    """A server certificate for ``sans`` (the first one is also the CN)."""
    return _build(
        sans[0], key or new_key(kind), issuer, ca=False, sans=sans, serial=serial, days=60
    )


def make_client(issuer: Issued, name: str = "test client") -> Issued:
    return _build(name, new_key("ecdsa"), issuer, ca=False, client=True)


@dataclass
class ServerFiles:
    """PEM files as acme.sh lays them out: fullchain (leaf first), key, CA."""

    fullchain: Path
    key: Path
    root: Path


def write_server_files(
    directory: Path,
    leaf: Issued,
    chain: tuple[Issued, ...] = (),
    root: Issued | None = None,
    atomic: bool = False,
) -> ServerFiles:
    """Write leaf + chain and key; ``atomic`` replaces by rename, else in place."""
    directory.mkdir(parents=True, exist_ok=True)
    files = ServerFiles(directory / "fullchain.cer", directory / "server.key", directory / "ca.cer")
    fullchain = leaf.cert_pem() + b"".join(c.cert_pem() for c in chain)
    write(files.key, leaf.key_pem(), atomic)
    write(files.fullchain, fullchain, atomic)
    if root is not None:
        write(files.root, root.cert_pem(), atomic)
    return files


def write(path: Path, data: bytes, atomic: bool = False) -> None:
    """Write in place (same inode, as ``cat > file`` does) or by rename."""
    if atomic:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    else:
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.write(data)
            f.truncate()
