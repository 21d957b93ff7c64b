"""Form bodies are never parsed: Twisted's Request parses a POST's
urlencoded or multipart body into request.args (all of it, before any
resource, so before the token is checked); the gateway never reads args."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import http, resource
from twisted.web.server import Request

from runner_gateway.edge.site import GatewaySite

_SIZE = 20 * 1024 * 1024


class _Args(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], int]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((dict(request.args), len(request.content.read())))
        return b"ok"


def _urlencoded() -> tuple[bytes, bytes]:
    return b"application/x-www-form-urlencoded", (b"a=1&" * (_SIZE // 4))[:_SIZE]


def _multipart() -> tuple[bytes, bytes]:
    part = b"--zz\r\nContent-Disposition: form-data; name=a\r\n\r\n" + b"x" * 1000 + b"\r\n"
    body = part * (_SIZE // len(part)) + b"--zz--\r\n"
    return b"multipart/form-data; boundary=zz", body


@pytest.mark.parametrize("make", [_urlencoded, _multipart])
@pytest.mark.parametrize("pieces", [1, 64])
def test_a_20_mb_form_body_is_not_parsed(
    monkeypatch: pytest.MonkeyPatch, make: Any, pieces: int
) -> None:
    big: list[int] = []
    for name in ("parse_qs", "_getMultiPartArgs"):
        original = getattr(http, name)

        def counting(data: bytes, *args: Any, _original: Any = original) -> Any:
            if len(data) > 1024:
                big.append(len(data))
            return _original(data, *args)

        monkeypatch.setattr(http, name, counting)
    content_type, body = make()
    answer = _Args()
    site = GatewaySite(answer, MemoryReactorClock(), max_body_size=2 * _SIZE)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    raw = (
        b"POST /api/chat?q=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (content_type, len(body))
        + body
    )
    step = len(raw) // pieces + 1
    for start in range(0, len(raw), step):
        channel.dataReceived(raw[start : start + step])
    assert answer.seen == [({b"q": [b"1"]}, len(body))]  # the query only; the body kept whole
    assert big == []
    assert transport.value().startswith(b"HTTP/1.1 200 ")
