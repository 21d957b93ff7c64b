"""TLS for the gateway: a server context that reloads itself, upstream policy, redirects.

``ReloadingServerTLS`` builds a pyOpenSSL context from a certificate chain and
key (acme.sh's ``fullchain.cer`` and ``<domain>.key``) and checks the files
every ``interval`` seconds and on :meth:`ReloadingServerTLS.reload` (SIGHUP).
A new, valid pair is swapped in for the next handshakes; connections already
open keep the context they were made with. A bad pair (unreadable, cut short,
garbage, key not matching) is refused: the old pair keeps serving, one error
is logged per distinct bad state, and :attr:`ReloadingServerTLS.error` says why
(for /readyz).

Only ``http/1.1`` is offered by ALPN: Twisted's HTTP/2 path would need its own
streaming and back-pressure verification before we could claim it works.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IPolicyForHTTPS, IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from runner_gateway.settings import RunnerSettings

__all__ = [
    "ALPN_PROTOCOLS",
    "TLS12_CIPHERS",
    "RedirectResource",
    "ReloadingServerTLS",
    "TLSConfigError",
    "UpstreamTLSPolicy",
    "upstream_tls_policy",
]

_log = Logger(namespace="runner_gateway.tls")

# Mozilla "intermediate": ECDHE key exchange with AEAD ciphers only, for TLS
# 1.2. TLS 1.3 suites are all AEAD and stay at OpenSSL's defaults.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
ALPN_PROTOCOLS = (b"http/1.1",)

# A certificate chain or key is a few KiB; refusing big files protects against
# a path pointing at something that is not a certificate (a log, /dev/zero).
_MAX_FILE = 1024 * 1024
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_PEM_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]+-----")


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


# ------------------------------------------------------------------ file parsing


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise TLSConfigError(f"{what} {path}: larger than {_MAX_FILE} bytes, not a PEM file")
    return data


def _pem_blocks(data: bytes, path: str, what: str) -> list[tuple[bytes, bytes]]:
    """(type, whole block) for each PEM block; a block cut short is an error."""
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    # Every BEGIN must be closed: acme.sh rewrites in place, so a read in the
    # middle of a write sees a file whose last block has no END line.
    if len(_PEM_BEGIN.findall(data)) != len(blocks):
        raise TLSConfigError(f"{what} {path}: a PEM block is cut short (file being written?)")
    if not blocks:
        raise TLSConfigError(f"{what} {path}: no PEM data")
    return blocks


def load_certificates(path: str, what: str = "certificate") -> list[x509.Certificate]:
    """All certificates of a PEM file, in file order (leaf first for a fullchain)."""
    data = _read(path, what)
    certs = []
    for kind, block in _pem_blocks(data, path, what):
        if kind != b"CERTIFICATE":
            continue  # e.g. a key bundled in the same file is allowed and skipped
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise TLSConfigError(f"{what} {path}: a certificate cannot be parsed") from None
    if not certs:
        raise TLSConfigError(f"{what} {path}: no CERTIFICATE block")
    return certs


_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def load_private_key(path: str, what: str = "key") -> _PrivateKey:
    """The single private key of a PEM file (PKCS#8, PKCS#1 or SEC1), unencrypted.

    Messages never quote the file's contents: it is key material.
    """
    data = _read(path, what)
    keys = [b for k, b in _pem_blocks(data, path, what) if k.endswith(b"PRIVATE KEY")]
    if len(keys) != 1:
        found = "no" if not keys else "more than one"
        raise TLSConfigError(f"{what} {path}: {found} PRIVATE KEY block")
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise TLSConfigError(
            f"{what} {path}: the key is encrypted (no passphrase support)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"{what} {path}: the private key cannot be parsed") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TLSConfigError(f"{what} {path}: only RSA and ECDSA keys are supported")
    return key


# ------------------------------------------------------------- server contexts


@dataclass(frozen=True)
class _Loaded:
    context: SSL.Context
    leaf: x509.Certificate
    fingerprint: bytes


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # No overlap: go on without ALPN rather than fail; HTTP/1.1 is assumed.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _renegotiation_option() -> int:
    return int(getattr(SSL, "OP_NO_RENEGOTIATION", 0))


def build_server_context(
    chain: list[x509.Certificate],
    key: _PrivateKey,
    client_cas: list[x509.Certificate] | None = None,
    certificate_path: str = "certificate",
    key_path: str = "",
) -> SSL.Context:
    """A fresh server context for ``chain`` (leaf first) and ``key``.

    Raises TLSConfigError when the key does not belong to the leaf.
    """
    if chain[0].public_key() != key.public_key():
        raise TLSConfigError(
            f"key {key_path}: does not match the first (leaf) certificate of {certificate_path}"
        )
    try:
        return _server_context(chain, key, client_cas)
    except SSL.Error as exc:
        # e.g. a key too small for OpenSSL's security level; reason text only
        reasons = "; ".join(str(e[-1]) for e in exc.args[0]) if exc.args else str(exc)
        raise TLSConfigError(
            f"certificate {certificate_path}: refused by OpenSSL: {reasons}"
        ) from None


def _server_context(
    chain: list[x509.Certificate], key: _PrivateKey, client_cas: list[x509.Certificate] | None
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | _renegotiation_option()
        | SSL.OP_SINGLE_ECDH_USE
    )
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    # Session resumption needs an id context once client certificates are
    # requested; it is harmless without them.
    ctx.set_session_id(b"runner-gateway")
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_select_alpn)
    if client_cas:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            ctx.add_client_ca(ca)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        ctx.set_verify_depth(4)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentContextCreator:
    """Creates each new server connection from whatever context is current."""

    def __init__(self, owner: ReloadingServerTLS) -> None:
        self._owner = owner

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._owner.context, None)

    def getContext(self) -> SSL.Context:  # IOpenSSLContextFactory, for old callers
        return self._owner.context


class ReloadingServerTLS:
    """Server TLS context that re-reads certificate + key when the files change."""

    def __init__(
        self,
        certificate_path: str,
        key_path: str,
        client_ca_path: str = "",
        reactor: IReactorTime | None = None,
        interval: float = 60.0,
        labels: tuple[str, str, str] = ("certificate", "key", "client CA"),
    ) -> None:
        # How errors name the three files: service.py passes the settings key
        # and its source, e.g. "settings/my.yaml: server.certificatePath".
        self.labels = labels
        self.certificate_path = certificate_path
        self.key_path = key_path
        self.client_ca_path = client_ca_path
        self.interval = interval
        self.error: str | None = None
        self.not_after: datetime.datetime | None = None
        self._reactor = reactor
        self._loop: LoopingCall | None = None
        self._failed: bytes | None = None  # fingerprint of the bad files last reported
        self._current = self._load()  # TLSConfigError on a bad first load: no fallback yet
        self._apply(self._current)
        _log.info("TLS certificate loaded: {summary}", summary=self._summary(self._current.leaf))

    # -- public API

    @property
    def context(self) -> SSL.Context:
        """The context new handshakes use."""
        return self._current.context

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate being served."""
        return self._current.leaf

    def creator(self) -> IOpenSSLServerConnectionCreator:
        """For SSL4ServerEndpoint / listenSSL; each handshake takes the current pair."""
        return _CurrentContextCreator(self)

    def start(self) -> None:
        """Check the files every ``interval`` seconds (no-op when interval <= 0)."""
        if self._loop is not None or self.interval <= 0:
            return
        self._loop = LoopingCall(self._check)
        if self._reactor is not None:
            self._loop.clock = self._reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def reload(self) -> bool:
        """Check the files now; True if a new pair was swapped in."""
        fingerprint = self._fingerprint()
        if fingerprint == self._current.fingerprint:
            if self.error is not None:
                _log.info("TLS files are back to the certificate being served; error cleared")
                self.error = None
                self._failed = None
            return False
        if fingerprint == self._failed:
            return False  # same bad files as last time: already reported
        try:
            loaded = self._load()
        except TLSConfigError as exc:
            # Fingerprint of what was read, so a file that is still changing
            # is retried and a stable bad state is reported only once.
            self._failed = fingerprint
            self.error = str(exc)
            _log.error(
                "TLS reload refused, still serving the previous certificate: {problem}",
                problem=self.error,
            )
            return False
        had_error = self.error is not None
        self._current = loaded
        self._apply(loaded)
        self.error = None
        self._failed = None
        _log.info(
            "TLS certificate reloaded{fixed}: {summary}",
            fixed=" (previous error cleared)" if had_error else "",
            summary=self._summary(loaded.leaf),
        )
        return True

    # -- internals

    def _check(self) -> None:
        try:
            self.reload()
        except Exception:  # a LoopingCall that raises stops for good
            _log.failure("TLS reload check failed")

    def _paths(self) -> list[tuple[str, str]]:
        paths = [(self.labels[0], self.certificate_path), (self.labels[1], self.key_path)]
        if self.client_ca_path:
            paths.append((self.labels[2], self.client_ca_path))
        return paths

    def _fingerprint(self) -> bytes:
        """Digest of the files' bytes (or of why one cannot be read).

        Contents rather than (mtime, size, inode): a renewal can keep the
        size, a rewrite in place keeps the inode, and coarse timestamps or
        ``cp -p`` can keep the mtime. The files are a few KiB, read once a
        minute. An unreadable file hashes its error, so it is reported once.
        """
        digest = hashlib.sha256()
        for what, path in self._paths():
            try:
                data = b"ok" + _read(path, what)
            except TLSConfigError as exc:
                data = b"error" + str(exc).encode()
            digest.update(len(data).to_bytes(8, "big") + data)
        return digest.digest()

    def _load(self) -> _Loaded:
        fingerprint = self._fingerprint()
        chain = load_certificates(self.certificate_path, self.labels[0])
        key = load_private_key(self.key_path, self.labels[1])
        client_cas = None
        if self.client_ca_path:
            client_cas = load_certificates(self.client_ca_path, self.labels[2])
        context = build_server_context(chain, key, client_cas, self.certificate_path, self.key_path)
        # A file changed between the digest and the parse: do not record a
        # fingerprint that does not describe what was loaded.
        if fingerprint != self._fingerprint():
            raise TLSConfigError(
                f"certificate {self.certificate_path}: files changed while reading"
            )
        return _Loaded(context, chain[0], fingerprint)

    def _apply(self, loaded: _Loaded) -> None:
        self.not_after = loaded.leaf.not_valid_after_utc

    @staticmethod
    def _summary(leaf: x509.Certificate) -> str:
        return (
            f"subject {leaf.subject.rfc4514_string()}, serial {leaf.serial_number:x}, "
            f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
        )


# ------------------------------------------------------------------ upstream TLS


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """TLS client options for one https runner: CA, hostname check, client cert."""

    def __init__(
        self,
        trust_root: Any,
        client_certificate: twisted_ssl.PrivateCertificate | None = None,
        extra_chain: list[Any] | None = None,
    ) -> None:
        self._trust_root = trust_root
        self._client_certificate = client_certificate
        self._extra_chain = extra_chain or []

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        extra: dict[str, Any] = {"raiseMinimumTo": twisted_ssl.TLSVersion.TLSv1_2}
        if self._extra_chain:
            extra["extraCertChain"] = self._extra_chain
        # optionsForClientTLS verifies the chain against trustRoot and the
        # name (DNS or IP) with service-identity; failures abort the handshake.
        return twisted_ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
            acceptableProtocols=list(ALPN_PROTOCOLS),
            extraCertificateOptions=extra,
        )


def _twisted_cert(cert: x509.Certificate) -> twisted_ssl.Certificate:
    return twisted_ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))


def upstream_tls_policy(runner: RunnerSettings) -> IPolicyForHTTPS:
    """The TLS policy for an https runner; files are read now (TLSConfigError if bad).

    Trust is the system's CAs unless ``caPath`` names a PEM bundle, which then
    replaces them. Verification is never skipped.
    """
    where = f"runner {runner.name}"
    if runner.ca_path:
        cas = load_certificates(runner.ca_path, f"{where} caPath")
        trust_root: Any = twisted_ssl.trustRootFromCertificates([_twisted_cert(c) for c in cas])
    else:
        trust_root = twisted_ssl.platformTrust()
    client = None
    extra_chain: list[Any] = []
    if runner.client_certificate_path:
        chain = load_certificates(runner.client_certificate_path, f"{where} clientCertificatePath")
        key = load_private_key(runner.client_key_path, f"{where} clientKeyPath")
        if chain[0].public_key() != key.public_key():
            raise TLSConfigError(
                f"{where} clientKeyPath {runner.client_key_path}: "
                "does not match clientCertificatePath"
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        client = twisted_ssl.PrivateCertificate.loadPEM(
            chain[0].public_bytes(serialization.Encoding.PEM) + key_pem
        )
        extra_chain = [_twisted_cert(c).original for c in chain[1:]]
    return UpstreamTLSPolicy(trust_root, client, extra_chain)


# ---------------------------------------------------------------- redirects

_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::\d{1,5})?$")


class RedirectResource(Resource):
    """Plain-HTTP listener: every request gets 308 to the same path on https.

    The host comes from ``host`` when given, else from the request's Host
    header (validated, port dropped) and ``tls_port`` is added unless it is 443.
    """

    isLeaf = True

    def __init__(self, tls_port: int = 443, host: str = "") -> None:
        super().__init__()
        self.tls_port = tls_port
        self.host = host

    def render(self, request: IRequest) -> bytes:
        host = self.host or self._request_host(request)
        if not host:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"missing or invalid Host header\n"
        port = "" if self.tls_port == 443 else f":{self.tls_port}"
        target: bytes = request.uri
        if not target.startswith(b"/"):
            # absolute-form (proxy style) request: keep only path and query
            target = b"/" + target.split(b"://", 1)[-1].partition(b"/")[2]
        location = f"https://{host}{port}".encode("ascii") + target
        request.setResponseCode(308)
        request.setHeader(b"location", location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if request.method == b"HEAD":
            return b""
        return b"use " + location + b"\n"

    @staticmethod
    def _request_host(request: IRequest) -> str:
        raw = request.getHeader(b"host")
        if raw is None:
            return ""
        try:
            text: str = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return ""
        if not _HOST.fullmatch(text):
            return ""
        if text.startswith("["):
            return text[: text.index("]") + 1]
        return text.rsplit(":", 1)[0] if ":" in text else text
