"""Hostile input at the edge (issue 16, findings 1, 2 and 9), against the real
``twistd -n runner-gateway`` over loopback: what anonymous or refused clients
can make the gateway read, keep and wait for."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.timeout(120)

_BIG = 60 * 1024 * 1024
_SENT_FIRST = 1024 * 1024


def _settings(make_settings: Callable[[str], GatewaySettings], standin: StandIn) -> GatewaySettings:
    return make_settings(
        "runners:\n"
        f"  - name: r0\n    host: {standin.address}\n    path: /\n    maxBodySize: 64MiB\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
    )


@pytest.fixture
def gateway(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> Iterator[tuple[GatewayProcess, GatewaySettings]]:
    settings = _settings(make_settings, standin)
    with start_gateway(settings.directory) as gw:
        yield gw, settings


@contextmanager
def _connect(gw: GatewayProcess) -> Iterator[socket.socket]:
    parts = urlsplit(gw.url)
    with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=10) as sock:
        yield sock


def _read_head(sock: socket.socket, deadline: float = 10.0) -> bytes:
    """Bytes up to the end of the first response head (raises on timeout)."""
    sock.settimeout(deadline)
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            break
        data += got
    return data


def _spooled_files(pid: int) -> list[str]:
    """The process's open regular files that are deleted temp files (Twisted
    spools a body over 100 kB into one) or live under the temp directory."""
    found = []
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/") and ("(deleted)" in target or target.startswith("/tmp")):
            found.append(target)
    return found


def _healthz(gw: GatewayProcess) -> bytes:
    with _connect(gw) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        return _read_head(sock, 5.0)


@pytest.mark.parametrize(
    "content_type",
    [b"multipart/form-data; boundary=zz", b"application/x-www-form-urlencoded"],
)
def test_an_anonymous_60_mb_upload_is_answered_401_before_it_is_sent(
    gateway: tuple[GatewayProcess, GatewaySettings], content_type: bytes
) -> None:
    """Finding 1/2: the 401 arrives while the client is still uploading, no
    body is spooled to disk, /healthz answers meanwhile, and the rest of the
    upload is read and dropped (the client meets no reset)."""
    gw, _ = gateway
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (content_type, _BIG)
    )
    with _connect(gw) as sock:
        sock.sendall(head + b"a" * _SENT_FIRST)
        answer = _read_head(sock)
        sent = _SENT_FIRST
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert sent < _BIG  # the answer came before the body did
        assert b"\r\nConnection: close\r\n" in answer
        assert b"WWW-Authenticate: Bearer" in answer
        assert _spooled_files(gw.proc.pid) == []
        assert _healthz(gw).startswith(b"HTTP/1.1 200 ")
        # What the client still sends is read and dropped, not refused.
        sock.settimeout(30)
        chunk = b"b" * (1024 * 1024)
        while sent < _BIG:
            sock.sendall(chunk)
            sent += len(chunk)
        assert _spooled_files(gw.proc.pid) == []
        rest = b""
        while True:  # the error body, then the gateway's end of the connection
            got = sock.recv(65536)
            if not got:
                break
            rest += got
    assert b"authentication required" in answer + rest


def test_expect_100_continue_without_a_token_gets_401_and_no_100(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, _ = gateway
    with _connect(gw) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = _read_head(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"100 Continue" not in answer


def test_expect_100_continue_with_a_good_token_gets_100(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, settings = gateway
    token = settings.token()
    body = b'{"model": "m", "messages": []}'
    with _connect(gw) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
            b"Authorization: Bearer %s\r\nExpect: 100-continue\r\n\r\n"
            % (len(body), token.encode())
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        answer = _read_head(sock)
    assert b"\r\nServer: runner-gateway\r\n" not in answer  # the runner's answer, not ours


@pytest.mark.parametrize(
    ("path", "claims", "status"),
    [
        (b"/api/pull", {"scope": "inference"}, b"403"),  # scope, from method and path
        (b"/api/chat", {"runners": ["elsewhere"]}, b"403"),  # runner
        (b"/api/chat", {"scope": 7}, b"403"),  # claims that cannot be read
    ],
)
def test_a_refusal_decided_on_the_head_comes_before_the_body(
    gateway: tuple[GatewayProcess, GatewaySettings],
    path: bytes,
    claims: dict[str, Any],
    status: bytes,
) -> None:
    gw, settings = gateway
    token = settings.token(**claims)
    with _connect(gw) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
            b"Authorization: Bearer %s\r\n\r\n" % (path, _BIG, token.encode()) + b"{" * _SENT_FIRST
        )
        answer = _read_head(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
    assert b"\r\nConnection: close\r\n" in answer


def test_a_body_over_the_cap_is_answered_413_at_once(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, settings = gateway
    with _connect(gw) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
            b"Authorization: Bearer %s\r\n\r\n"
            % (65 * 1024 * 1024, settings.token().encode())
            + b"x" * _SENT_FIRST
        )
        answer = _read_head(sock)  # before the body: it never comes
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]


def test_a_body_slower_than_body_min_rate_gets_408(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    """Finding 2: a trickled body (here after a 1 s grace) ends with 408 and the
    connection closed, instead of holding it as long as a byte comes now and then."""
    settings = make_settings(
        "runners:\n"
        f"  - name: r0\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
        "  bodyMinRate: 1KiB\n  bodyMinRateGrace: 1s\n"
    )
    with start_gateway(settings.directory) as gw, _connect(gw) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer %s\r\n\r\n{" % settings.token().encode()
        )
        answer = _read_head(sock, 15)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        rest = answer
        while got := sock.recv(65536):
            rest += got
    assert b'"code": "request_timeout"' in rest  # the OpenAI shape on /v1


def test_a_body_sent_to_healthz_is_not_read(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, _ = gateway
    with _connect(gw) as sock:
        sock.sendall(
            b"POST /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % _BIG
            + b"x" * _SENT_FIRST
        )
        answer = _read_head(sock)
    assert answer.startswith(b"HTTP/1.1 405 "), answer[:300]


# ------------------------------------ server.maxConnections / maxConnectionsPerClient


def _from(gw: GatewayProcess, source: str) -> socket.socket:
    parts = urlsplit(gw.url)
    return socket.create_connection(
        (parts.hostname or "", parts.port or 0), timeout=10, source_address=(source, 0)
    )


_PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n"


def _holding(gw: GatewayProcess, source: str) -> socket.socket:
    """A connection the gateway has taken and holds: it has sent part of a
    head (the listener defers a connection until its client sends), and
    ``sock.sendall(b"\\r\\n")`` completes the request."""
    sock = _from(gw, source)
    sock.sendall(_PARTIAL_HEAD)
    return sock


def _try_from(gw: GatewayProcess, source: str) -> socket.socket | None:
    """A connection that may be refused at accept: None when the gateway's
    reset came before connect() returned (on loopback it can)."""
    try:
        return _from(gw, source)
    except ConnectionResetError:
        return None


def _refused(sock: socket.socket | None) -> bool:
    """Whether the gateway closed the connection without a word."""
    if sock is None:
        return True
    sock.settimeout(10)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _health_from(gw: GatewayProcess, source: str) -> bytes:
    with _from(gw, source) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        try:
            return _read_head(sock, 5.0)
        except ConnectionResetError:
            return b""


def _capped(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, caps: str
) -> GatewaySettings:
    return make_settings(
        "runners:\n"
        f"  - name: r0\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 1\n" + caps
    )


def test_connections_past_the_per_client_cap_are_closed_at_accept(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    """Finding 2: one client cannot hold every descriptor. Past
    maxConnectionsPerClient its new connections are closed unread; the ones it
    holds still work, and another client's /healthz is answered."""
    settings = _capped(make_settings, standin, "  maxConnectionsPerClient: 5\n")
    with start_gateway(settings.directory) as gw:
        held = [_holding(gw, "127.0.0.2") for _ in range(5)]
        try:
            assert _health_from(gw, "127.0.0.3").startswith(b"HTTP/1.1 200 ")
            extra = [_try_from(gw, "127.0.0.2") for _ in range(3)]
            assert all(_refused(sock) for sock in extra)
            for sock in filter(None, extra):
                sock.close()
            assert _health_from(gw, "127.0.0.3").startswith(b"HTTP/1.1 200 ")
            for sock in held:  # the client's own connections are served
                sock.sendall(b"\r\n")
                assert _read_head(sock).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()


def test_past_max_connections_a_local_probe_is_still_answered(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    """Past maxConnections every new connection is closed at accept, but for
    a small reserve kept for local probes (127.0.0.1, ::1) and exempt peers."""
    settings = _capped(make_settings, standin, "  maxConnections: 8\n")
    with start_gateway(settings.directory) as gw:
        held = [_holding(gw, f"127.0.0.{2 + i % 3}") for i in range(8)]
        try:
            assert _health_from(gw, "127.0.0.1").startswith(b"HTTP/1.1 200 ")
            sock = _try_from(gw, "127.0.0.9")
            assert _refused(sock)
            if sock is not None:
                sock.close()
            assert _health_from(gw, "127.0.0.1").startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()


# ------------------------------------------------------ strict framing (finding 9)

_SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # Transfer-Encoding identity: the body must not be read as a second request.
        (
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: identity\r\n\r\n"
            + _SMUGGLED,
            b"400",
        ),
        (
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"400",
        ),
        (b"GET /api/tags HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GET /api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),  # two
        (
            b"GET /api/tags HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer\r\n v4.public.x\r\n\r\n",
            b"400",
        ),
        (b"GET /api/\x80tags HTTP/1.1\r\nHost: gw\r\n\r\n", b"400"),
        (b"GET /api/\x7ftags HTTP/1.1\r\nHost: gw\r\n\r\n", b"400"),
        (b"GET /api/tags HTTP/1.1\nHost: gw\n\n", b"400"),  # bare LF: at once
        (b"GET /api/tags HTTP/1.1\r\nHost: gw\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (
            b"GET /api/tags HTTP/1.1\r\nHost: gw\r\n"
            + (b"X-A: " + b"a" * 95 + b"\r\n") * 200
            + b"\r\n",
            b"431",
        ),
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", b"414"),
    ],
    ids=[
        "te-identity",
        "te-gzip-chunked",
        "no-host",
        "two-hosts",
        "obs-fold",
        "target-0x80",
        "target-0x7f",
        "bare-lf",
        "long-header-line",
        "long-head",
        "long-url",
    ],
)
def test_framing_the_gateway_refuses(
    gateway: tuple[GatewayProcess, GatewaySettings], raw: bytes, status: bytes
) -> None:
    gw, _ = gateway
    with _connect(gw) as sock:
        sock.sendall(raw)
        sock.settimeout(5)  # well under headerTimeout: the answer comes at once
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    # Answered, and the connection closed (recv saw its end within 5 s).
    assert got.startswith(b"HTTP/1.1 " + status + b" "), got[:300]
    # Nothing smuggled behind it was answered.
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.1 \d\d\d ", got)) == 1, got[:600]


def test_a_trusted_proxy_is_exempt_from_the_per_client_cap(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    """Behind a load balancer every connection comes from it: a peer in
    server.trustedProxies is not held to maxConnectionsPerClient."""
    settings = _capped(
        make_settings,
        standin,
        "  maxConnectionsPerClient: 2\n  trustedProxies: [127.0.0.2/32]\n",
    )
    with start_gateway(settings.directory) as gw:
        held = [_holding(gw, "127.0.0.2") for _ in range(6)]
        try:
            for sock in held:
                sock.sendall(b"\r\n")
                assert _read_head(sock).startswith(b"HTTP/1.1 200 ")
            extra = [_try_from(gw, "127.0.0.3") for _ in range(3)]
            assert [_refused(sock) for sock in extra] == [False, False, True]
            for sock in filter(None, extra):
                sock.close()
        finally:
            for sock in held:
                sock.close()
