"""Plain HTTP on the TLS port: a 400 saying to use https, not an empty reply."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runner_gateway.httpsonly import PLAIN_HTTP_RESPONSE
from tests import certs
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import start_gateway


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the gateway did not close: {data!r}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_plain_http_on_the_tls_port_gets_400_and_tls_still_works(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    tmp_path: Path,
    workers: int,
) -> None:
    root = certs.make_ca()
    files = certs.write_server_files(tmp_path / "tls", certs.make_leaf(root), root=root)
    settings = make_settings(
        f"runners:\n  - name: r0\n    host: {standin.address}\n    path: /\n"
        f"server:\n  address: 127.0.0.1:0\n  workers: {workers}\n"
        f"  certificatePath: {files.fullchain}\n  keyPath: {files.key}\n"
    )
    context = ssl.create_default_context(cafile=str(files.root))
    with start_gateway(settings.directory) as gw:
        assert gw.url.startswith("https://")
        port = urlsplit(gw.url).port
        assert port is not None
        for _ in range(2 * workers):  # each worker answers
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                reply = _recv_all(sock)
            assert reply == PLAIN_HTTP_RESPONSE
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ")
            assert body.count(b"\n") == 1 and b"https://" in body
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        token = settings.token()
        conn.request("GET", "/api/tags", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["models"]
        conn.close()
