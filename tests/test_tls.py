"""TLS: real handshakes on loopback against ReloadingServerTLS, upstream policy, redirects.

The servers run on a private Twisted reactor in a daemon thread (not the
global one, so no other test module is affected and nothing needs restarting);
clients are Python's blocking ``ssl`` module with short socket timeouts.
Certificates are made per test by tests/certs.py.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogPublisher
from twisted.protocols import tls as twisted_tls
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from runner_gateway import tls as tls_module
from runner_gateway.settings import RunnerSettings
from runner_gateway.tls import (
    TLS12_CIPHERS,
    RedirectResource,
    ReloadingServerTLS,
    TLSConfigError,
    upstream_tls_policy,
)
from tests import certs

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
PKI = dict[str, certs.Issued]
Logs = list[dict[str, Any]]
Serve = Callable[..., int]


# ------------------------------------------------------------------- fixtures


class ReactorThread:
    """A private reactor running in a daemon thread."""

    def __init__(self) -> None:
        self.reactor = SelectReactor()
        self.thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )

    def call(self, f: Callable[..., T], *args: Any) -> T:
        """Run ``f`` in the reactor thread; wait for it (and for a Deferred it returns)."""
        return blockingCallFromThread(self.reactor, f, *args)


@pytest.fixture(scope="module")
def rx() -> Iterator[ReactorThread]:
    rt = ReactorThread()
    with pytest.MonkeyPatch.context() as mp:
        # TLSMemoryBIOFactory schedules its write flushes on the *global*
        # reactor unless told otherwise (Agent does not tell it); this is the
        # hook Twisted provides for tests.
        mp.setattr(twisted_tls, "_get_default_clock", lambda: rt.reactor)
        rt.thread.start()
        yield rt
        rt.reactor.callFromThread(rt.reactor.stop)
        rt.thread.join(5)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello over tls"


@pytest.fixture
def serve(rx: ReactorThread) -> Iterator[Callable[..., int]]:
    """serve(resource_or_None, tls_or_None) -> port on 127.0.0.1."""
    ports: list[Any] = []

    def start(tls: ReloadingServerTLS | None, resource: Resource | None = None) -> int:
        def listen() -> int:
            site = Site(resource or Hello(), reactor=rx.reactor)
            factory: Any = site
            if tls is not None:
                factory = TLSMemoryBIOFactory(tls.creator(), False, site, clock=rx.reactor)
            port = rx.reactor.listenTCP(0, factory, interface="127.0.0.1")
            ports.append(port)
            return int(port.getHost().port)

        return rx.call(listen)

    yield start
    for port in ports:
        rx.call(port.stopListening)


@pytest.fixture
def pki() -> PKI:
    root = certs.make_ca()
    return {"root": root, "inter": certs.make_intermediate(root)}


@pytest.fixture
def tls_logs() -> Iterator[Logs]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "runner_gateway.tls":
            events.append(event)

    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield events
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def _errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["log_level"].name in ("error", "critical")]


# -------------------------------------------------------------------- clients


def client_context(root: certs.Issued | None, files_dir: Path) -> ssl.SSLContext:
    """A verifying client that trusts only ``root`` (or nothing, if None)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if root is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ca = files_dir / "client-trust.pem"
        ca.write_bytes(root.cert_pem())
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def connect(port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=hostname)
    except BaseException:
        raw.close()
        raise


def get(sock: ssl.SSLSocket, path: str = "/") -> bytes:
    """One keep-alive HTTP/1.1 request on an open TLS socket; returns the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    while len(body) < length:
        body += sock.recv(4096)
    return body


def served_serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def make_server(
    tmp_path: Path, pki: PKI, kind: str = "ecdsa", **kw: Any
) -> tuple[ReloadingServerTLS, certs.ServerFiles, certs.Issued]:
    leaf = certs.make_leaf(pki["inter"], kind)
    files = certs.write_server_files(tmp_path / "srv", leaf, (pki["inter"],), pki["root"])
    tls = ReloadingServerTLS(str(files.fullchain), str(files.key), **kw)
    return tls, files, leaf


# ------------------------------------------------------------ loading errors


def test_context_options(tmp_path: Path, pki: PKI) -> None:
    tls, _, leaf = make_server(tmp_path, pki)
    options = tls.context.set_options(0)  # returns the current bit mask
    for name in ("OP_NO_COMPRESSION", "OP_CIPHER_SERVER_PREFERENCE", "OP_NO_RENEGOTIATION"):
        assert options & getattr(SSL, name), name
    assert tls.certificate.serial_number == leaf.serial
    assert tls.not_after == leaf.cert.not_valid_after_utc
    assert tls.error is None


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "file not found"),
        ("garbage", "no PEM data"),
        ("cut", "cut short"),
        ("mismatch", "does not match"),
        ("encrypted", "encrypted"),
        ("bad-base64", "cannot be parsed"),
    ],
)
def test_first_load_failure_names_the_file(
    tmp_path: Path, pki: PKI, damage: str, message: str, tls_logs: Logs
) -> None:
    leaf = certs.make_leaf(pki["inter"])
    files = certs.write_server_files(tmp_path, leaf, (pki["inter"],))
    bad = files.fullchain
    if damage == "missing":
        bad.unlink()
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01 not a certificate at all")
    elif damage == "cut":
        bad.write_bytes(bad.read_bytes()[:-200])
    elif damage == "mismatch":
        bad = files.key
        bad.write_bytes(certs.make_leaf(pki["inter"]).key_pem())
    elif damage == "encrypted":
        from cryptography.hazmat.primitives import serialization as ser

        bad = files.key
        bad.write_bytes(
            leaf.key.private_bytes(
                ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw")
            )
        )
    elif damage == "bad-base64":
        pem = bad.read_bytes().replace(b"MII", b"!!!", 1).replace(b"\nM", b"\n!", 1)
        bad.write_bytes(pem)
    with pytest.raises(TLSConfigError) as info:
        ReloadingServerTLS(str(files.fullchain), str(files.key))
    text = str(info.value)
    assert message in text
    assert str(bad) in text
    assert "\n" not in text
    assert isinstance(info.value, ValueError)
    # key material is never part of a message
    assert b"PRIVATE" not in text.encode() or "PRIVATE KEY block" in text


# ----------------------------------------------------------------- handshakes


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_tls13_with_served_chain(tmp_path: Path, pki: PKI, serve: Serve, kind: str) -> None:
    tls, _, leaf = make_server(tmp_path, pki, kind)
    port = serve(tls)
    ctx = client_context(pki["root"], tmp_path)  # trusts the root only
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with connect(port, ctx) as sock:
        assert sock.version() == "TLSv1.3"
        assert sock.selected_alpn_protocol() == "http/1.1"  # h2 is not offered
        assert served_serial(sock) == leaf.serial
        assert get(sock) == b"hello over tls"


def test_leaf_without_intermediate_fails_verification(
    tmp_path: Path, pki: PKI, serve: Serve
) -> None:
    """Control for the chain test: without the intermediate the same client fails."""
    leaf = certs.make_leaf(pki["inter"])
    files = certs.write_server_files(tmp_path / "srv", leaf, ())
    port = serve(ReloadingServerTLS(str(files.fullchain), str(files.key)))
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(port, client_context(pki["root"], tmp_path))


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_tls12_uses_modern_aead_cipher(tmp_path: Path, pki: PKI, serve: Serve, kind: str) -> None:
    tls, _, _ = make_server(tmp_path, pki, kind)
    port = serve(tls)
    ctx = client_context(pki["root"], tmp_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(port, ctx) as sock:
        assert sock.version() == "TLSv1.2"
        cipher = sock.cipher()
        assert cipher is not None
        assert cipher[0] in TLS12_CIPHERS.split(":")
        assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]
        assert sock.compression() is None
        assert get(sock) == b"hello over tls"


def test_tls12_cbc_only_client_refused(tmp_path: Path, pki: PKI, serve: Serve) -> None:
    tls, _, _ = make_server(tmp_path, pki, "rsa")
    port = serve(tls)
    ctx = client_context(pki["root"], tmp_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-SHA:AES128-SHA")  # CBC, non-AEAD
    with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|handshake failure"):
        connect(port, ctx)


def _legacy_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 hides TLS 1.1 above level 0
    return ctx


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_refused(tmp_path: Path, pki: PKI, serve: Serve) -> None:
    tls, files, _ = make_server(tmp_path, pki, "rsa")
    # Control: prove this client really speaks TLS 1.1 here, against a
    # Python server that allows it; otherwise a refusal would prove nothing.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_ctx.load_cert_chain(str(files.fullchain), str(files.key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    seen: list[str | None] = []

    def accept_one() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                seen.append(s.version())
        except (ssl.SSLError, OSError):
            seen.append(None)

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    with connect(listener.getsockname()[1], _legacy_client()) as sock:
        assert sock.version() == "TLSv1.1"
    thread.join(5)
    listener.close()
    assert seen == ["TLSv1.1"]

    port = serve(tls)
    with pytest.raises(ssl.SSLError) as info:
        connect(port, _legacy_client())
    assert "PROTOCOL_VERSION" in str(info.value).upper().replace(" ", "_")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_refused_by_our_floor_not_only_by_seclevel(
    tmp_path: Path, pki: PKI, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL 3's default security level alone refuses TLS 1.1; a system with a
    lower level (openssl.cnf) and a TLS 1.1 cipher available must still be refused."""
    permissive = tls_module.TLS12_CIPHERS + ":ECDHE-RSA-AES128-SHA:@SECLEVEL=0"
    monkeypatch.setattr(tls_module, "TLS12_CIPHERS", permissive)
    tls, _, _ = make_server(tmp_path, pki, "rsa")
    port = serve(tls)
    with pytest.raises(ssl.SSLError) as info:
        connect(port, _legacy_client())
    assert "PROTOCOL_VERSION" in str(info.value).upper().replace(" ", "_")
    # control: the permissive server itself still works at TLS 1.2
    ctx = client_context(None, tmp_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(port, ctx) as sock:
        assert sock.version() == "TLSv1.2"


# -------------------------------------------------------------------- renewal


@pytest.mark.parametrize("atomic", [False, True], ids=["in-place", "rename"])
def test_renewal_without_restart(
    tmp_path: Path, pki: PKI, serve: Serve, atomic: bool, tls_logs: Logs
) -> None:
    tls, files, old = make_server(tmp_path, pki)
    port = serve(tls)
    ctx = client_context(pki["root"], tmp_path)
    with connect(port, ctx) as kept:
        assert served_serial(kept) == old.serial
        assert get(kept) == b"hello over tls"
        assert tls.reload() is False  # nothing changed yet

        # Renew with a new key, same size class: the serial is what tells.
        new = certs.make_leaf(pki["inter"])
        certs.write_server_files(files.fullchain.parent, new, (pki["inter"],), atomic=atomic)
        assert tls.reload() is True
        assert tls.reload() is False
        assert tls.certificate.serial_number == new.serial

        with connect(port, ctx) as fresh:
            assert served_serial(fresh) == new.serial
            assert get(fresh) == b"hello over tls"
        # the connection opened before the renewal carries on
        assert get(kept) == b"hello over tls"
        assert served_serial(kept) == old.serial
    assert not _errors(tls_logs)
    assert any("reloaded" in e["log_format"] for e in tls_logs)


def test_same_size_same_inode_rewrite_detected(tmp_path: Path, pki: PKI) -> None:
    """Same key, new serial of the same length, in place: stat alone could miss it."""
    tls, files, old = make_server(tmp_path, pki)
    new = certs.make_leaf(pki["inter"], key=old.key, serial=old.serial + 1)
    before = files.fullchain.stat()
    certs.write_server_files(files.fullchain.parent, new, (pki["inter"],))
    after = files.fullchain.stat()
    assert before.st_ino == after.st_ino
    assert tls.reload() is True
    assert tls.certificate.serial_number == old.serial + 1


@pytest.mark.parametrize("damage", ["garbage", "cut", "mismatch", "unreadable"])
def test_bad_files_keep_the_old_pair(
    tmp_path: Path, pki: PKI, serve: Serve, damage: str, tls_logs: Logs
) -> None:
    tls, files, old = make_server(tmp_path, pki)
    port = serve(tls)
    ctx = client_context(pki["root"], tmp_path)
    good_chain, good_key = files.fullchain.read_bytes(), files.key.read_bytes()

    if damage == "garbage":
        files.fullchain.write_bytes(b"<html>502 Bad Gateway</html>\n")
    elif damage == "cut":
        new = certs.make_leaf(pki["inter"])
        files.key.write_bytes(new.key_pem())
        files.fullchain.write_bytes((new.cert_pem() + pki["inter"].cert_pem())[:-300])
    elif damage == "mismatch":
        files.key.write_bytes(certs.make_leaf(pki["inter"]).key_pem())
    elif damage == "unreadable":
        files.key.unlink()
        files.key.mkdir()  # reading a directory fails even as root

    assert tls.reload() is False
    assert tls.error is not None
    assert tls.reload() is False  # same bad state: reported once
    errors = _errors(tls_logs)
    assert len(errors) == 1
    logged = errors[0]["problem"]
    assert logged == tls.error
    assert good_key.decode() not in logged and "PRIVATE KEY-----" not in logged
    with connect(port, ctx) as sock:
        assert served_serial(sock) == old.serial
        assert get(sock) == b"hello over tls"

    # a different bad state is a new error
    files.fullchain.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
    if damage == "unreadable":
        files.key.rmdir()
        files.key.write_bytes(good_key)
    assert tls.reload() is False
    assert len(_errors(tls_logs)) == 2

    # fixed with a new pair: swapped in, error cleared, info logged
    fixed = certs.make_leaf(pki["inter"], "rsa")
    certs.write_server_files(files.fullchain.parent, fixed, (pki["inter"],), atomic=True)
    assert tls.reload() is True
    assert tls.error is None
    with connect(port, ctx) as sock:
        assert served_serial(sock) == fixed.serial
    last = tls_logs[-1]
    assert last["log_level"].name == "info" and "previous error cleared" in last["fixed"]
    # and going back to the exact files being served is healthy too
    files.fullchain.write_bytes(good_chain)
    files.key.write_bytes(good_key)
    assert tls.reload() is True
    assert tls.certificate.serial_number == old.serial


def test_back_to_served_files_clears_error(tmp_path: Path, pki: PKI) -> None:
    tls, files, _ = make_server(tmp_path, pki)
    good = files.fullchain.read_bytes()
    files.fullchain.write_bytes(b"junk")
    assert tls.reload() is False and tls.error
    files.fullchain.write_bytes(good)
    assert tls.reload() is False  # nothing new to load ...
    assert tls.error is None  # ... but healthy again


def test_periodic_check_with_clock(tmp_path: Path, pki: PKI) -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    tls, files, old = make_server(tmp_path, pki, reactor=clock, interval=60.0)
    tls.start()
    new = certs.make_leaf(pki["inter"])
    certs.write_server_files(files.fullchain.parent, new, (pki["inter"],))
    clock.advance(59)
    assert tls.certificate.serial_number == old.serial
    clock.advance(1)
    assert tls.certificate.serial_number == new.serial
    # a check that raises must not end the loop
    files.fullchain.write_bytes(b"junk")
    clock.advance(60)
    assert tls.error is not None
    tls.stop()
    assert not clock.getDelayedCalls()


# ----------------------------------------------------------------------- mTLS


def test_mutual_tls(tmp_path: Path, pki: PKI, serve: Serve) -> None:
    client_ca = certs.make_ca("Client CA")
    ca_file = tmp_path / "client-ca.pem"
    ca_file.write_bytes(client_ca.cert_pem())
    tls, _, _ = make_server(tmp_path, pki, client_ca_path=str(ca_file))
    port = serve(tls)

    def attempt(client: certs.Issued | None) -> bytes:
        ctx = client_context(pki["root"], tmp_path)
        if client is not None:
            cert, key = tmp_path / "c.pem", tmp_path / "c.key"
            cert.write_bytes(client.cert_pem())
            key.write_bytes(client.key_pem())
            ctx.load_cert_chain(str(cert), str(key))
        with connect(port, ctx) as sock:
            return get(sock)

    assert attempt(certs.make_client(client_ca)) == b"hello over tls"
    # TLS 1.3 reports a refused client certificate after the client's
    # handshake ends, so the failure can show at the first read.
    for refused in (None, certs.make_client(certs.make_ca("Other CA"))):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            attempt(refused)


# ------------------------------------------------------------------ redirects


def _redirect(
    resource: RedirectResource, host: bytes | None, uri: bytes, method: bytes = b"GET"
) -> tuple[int, list[bytes] | None, bytes]:
    request: Any = DummyRequest([])
    request.uri = uri
    request.method = method
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    body = resource.render(request)
    return request.responseCode, request.responseHeaders.getRawHeaders(b"location"), body


@pytest.mark.parametrize(
    "host, uri, location",
    [
        (b"gw.example.com", b"/api/chat?x=1&y=2", b"https://gw.example.com:8443/api/chat?x=1&y=2"),
        (b"gw.example.com:80", b"/", b"https://gw.example.com:8443/"),
        (b"[::1]:8080", b"/v1/models", b"https://[::1]:8443/v1/models"),
        (b"10.0.0.1", b"http://10.0.0.1/p?q", b"https://10.0.0.1:8443/p?q"),
    ],
)
def test_redirect_locations(host: bytes | None, uri: bytes, location: bytes) -> None:
    code, locations, _ = _redirect(RedirectResource(8443), host, uri)
    assert (code, locations) == (308, [location])


def test_redirect_default_port_and_fixed_host() -> None:
    assert _redirect(RedirectResource(443), b"a.example", b"/x")[1] == [b"https://a.example/x"]
    fixed = RedirectResource(443, host="gw.example.com")
    assert _redirect(fixed, b"evil.example", b"/x")[1] == [b"https://gw.example.com/x"]


@pytest.mark.parametrize("host", [None, b"", b"a b", b"x\xff", b"h/evil", b"a.example,b.example"])
def test_redirect_refuses_bad_host(host: bytes | None) -> None:
    code, locations, _ = _redirect(RedirectResource(8443), host, b"/")
    assert code == 400 and locations is None


def test_redirect_listener_on_a_socket(serve: Serve) -> None:
    port = serve(None, RedirectResource(8443))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/api/generate?stream=true", body=b"{}", headers={"Host": "gw.test"})
    response = conn.getresponse()
    assert response.status == 308
    assert response.getheader("location") == "https://gw.test:8443/api/generate?stream=true"
    response.read()
    conn.request("HEAD", "/", headers={"Host": "gw.test:80"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (308, b"")
    conn.close()


# --------------------------------------------------------------- upstream TLS


def _runner(port: int, host: str = "localhost", **kw: Any) -> RunnerSettings:
    return RunnerSettings(name="up", host=host, port=port, path="/up", scheme="https", **kw)


def _fetch(rx: ReactorThread, runner: RunnerSettings) -> bytes:
    policy = upstream_tls_policy(runner)

    def go() -> Any:
        agent = Agent(rx.reactor, contextFactory=policy)
        d = agent.request(b"GET", f"{runner.base_url}/".encode())
        return d.addCallback(readBody)

    body: bytes = rx.call(go)
    return body


def _upstream(
    tmp_path: Path,
    pki: PKI,
    serve: Serve,
    sans: tuple[str, ...] = ("localhost", "127.0.0.1"),
    **kw: Any,
) -> tuple[int, certs.ServerFiles]:
    leaf = certs.make_leaf(pki["inter"], sans=sans)
    files = certs.write_server_files(tmp_path / "up", leaf, (pki["inter"],), pki["root"])
    return serve(ReloadingServerTLS(str(files.fullchain), str(files.key), **kw)), files


def test_upstream_with_runner_ca(rx: ReactorThread, tmp_path: Path, pki: PKI, serve: Serve) -> None:
    port, files = _upstream(tmp_path, pki, serve)
    assert _fetch(rx, _runner(port, ca_path=str(files.root))) == b"hello over tls"
    assert _fetch(rx, _runner(port, "127.0.0.1", ca_path=str(files.root))) == b"hello over tls"


def _failure_text(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", [])
    return " ".join(str(r.value) for r in reasons) or str(exc)


def test_upstream_refused_with_system_cas(
    rx: ReactorThread, tmp_path: Path, pki: PKI, serve: Serve
) -> None:
    port, _ = _upstream(tmp_path, pki, serve)
    with pytest.raises(Exception) as info:
        _fetch(rx, _runner(port))
    assert "certificate verify failed" in _failure_text(info.value)


def test_upstream_wrong_hostname(rx: ReactorThread, tmp_path: Path, pki: PKI, serve: Serve) -> None:
    port, files = _upstream(tmp_path, pki, serve, sans=("other.example",))
    with pytest.raises(Exception) as info:
        _fetch(rx, _runner(port, ca_path=str(files.root)))
    text = _failure_text(info.value)
    assert "localhost" in text or "hostname" in text.lower() or "mismatch" in text.lower()


def test_upstream_client_certificate(
    rx: ReactorThread, tmp_path: Path, pki: PKI, serve: Serve
) -> None:
    client_ca = certs.make_ca("Runner client CA")
    (tmp_path / "cca.pem").write_bytes(client_ca.cert_pem())
    port, files = _upstream(tmp_path, pki, serve, client_ca_path=str(tmp_path / "cca.pem"))
    client = certs.make_client(client_ca, "gateway")
    (tmp_path / "gw.pem").write_bytes(client.cert_pem())
    (tmp_path / "gw.key").write_bytes(client.key_pem())
    with_cert = _runner(
        port,
        ca_path=str(files.root),
        client_certificate_path=str(tmp_path / "gw.pem"),
        client_key_path=str(tmp_path / "gw.key"),
    )
    assert _fetch(rx, with_cert) == b"hello over tls"
    with pytest.raises(Exception):  # noqa: B017 - any failure; the success above is the control
        _fetch(rx, _runner(port, ca_path=str(files.root)))


def test_upstream_bad_files_fail_early(tmp_path: Path, pki: PKI) -> None:
    (tmp_path / "ca.pem").write_bytes(b"nope")
    with pytest.raises(TLSConfigError, match="caPath"):
        upstream_tls_policy(_runner(1, ca_path=str(tmp_path / "ca.pem")))
    a, b = certs.make_client(pki["inter"]), certs.make_client(pki["inter"])
    (tmp_path / "a.pem").write_bytes(a.cert_pem())
    (tmp_path / "b.key").write_bytes(b.key_pem())
    with pytest.raises(TLSConfigError, match="does not match"):
        upstream_tls_policy(
            _runner(
                1,
                client_certificate_path=str(tmp_path / "a.pem"),
                client_key_path=str(tmp_path / "b.key"),
            )
        )
