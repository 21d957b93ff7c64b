"""The TLS path of every matrix job: real twistd, real handshakes, a streamed chat.

Each job of the version matrix (make matrix: the locked set, the declared
floor, the newest releases, RUNNER_GATEWAY_FASTPATH=off) runs this module, so
a Twisted / pyOpenSSL / cryptography combination that starts but cannot
complete a handshake (Twisted 25.5 with a newer pyOpenSSL: "Context has
already been used to create a Connection") fails CI instead of shipping.

The gateway is the real ``twistd -n runner-gateway`` process serving TLS, with
one process and with the supervisor and two workers (the default on a 2-CPU
machine); the client pins the protocol version to exactly TLS 1.2 or 1.3.
"""

from __future__ import annotations

import http.client
import itertools
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import certs
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import start_gateway

pytestmark = pytest.mark.timeout(90)

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def pinned_client(cafile: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A verifying client that speaks exactly one TLS version."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = version
    context.maximum_version = version
    return context


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", list(VERSIONS))
def test_streamed_chat_over_a_pinned_tls_version(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    tmp_path: Path,
    name: str,
    workers: int,
) -> None:
    root = certs.make_ca()
    files = certs.write_server_files(tmp_path / "tls", certs.make_leaf(root), root=root)
    settings = make_settings(
        f"runners:\n  - name: r0\n    host: {standin.address}\n    path: /\n"
        f"server:\n  address: 127.0.0.1:0\n  workers: {workers}\n"
        f"  certificatePath: {files.fullchain}\n  keyPath: {files.key}\n"
    )
    body = json.dumps(
        {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "one two three"}]}
    )
    headers = {"Authorization": f"Bearer {settings.token()}", "Content-Type": "application/json"}
    with start_gateway(settings.directory) as gw:
        assert gw.url.startswith("https://"), gw.output
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            urlsplit(gw.url).port,
            timeout=30,
            context=pinned_client(files.root, VERSIONS[name]),
        )
        try:
            conn.connect()
        except (ssl.SSLError, ConnectionError) as e:
            pytest.fail(f"{name} handshake failed: {e!r}\ngateway output:\n{gw.output}")
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.sock.version() == name
        start = time.monotonic()
        conn.request("POST", "/api/chat", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type", "").startswith("application/x-ndjson")
        arrivals: list[float] = []
        lines = []
        while line := response.readline():
            arrivals.append(time.monotonic() - start)
            lines.append(json.loads(line))
        conn.close()
    # The stand-in writes 3 chunks 150 ms apart and a final summary.
    assert [line["message"]["content"] for line in lines[:-1]] == ["one", " two", " three"]
    assert lines[-1]["done"] is True
    # Buffered anywhere on the way (TLS layer included), every line would
    # arrive together at the end.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap >= 0.1) >= 2, arrivals
