"""The floor under runner-gateway's HTTP serving: bare twisted.web, no gateway.

``python -m bench.floor_server PORT REPLY_FILE`` serves every request with
the contents of REPLY_FILE as application/json from a plain
``twisted.web.server.Site``: no upstream, no token, no policy, no access
log. Run two of them on one port (SO_REUSEPORT, as the gateway's workers
share theirs) and the benchmark has the requests/s that twisted.web's
HTTP/1.1 server alone reaches on the machine, the ceiling for anything
built on it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.web import resource, server
from twisted.web.server import Request


class _Fixed(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        if request.content is not None:
            request.content.read()
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return self.body


def main(argv: list[str]) -> None:
    port, reply = int(argv[0]), Path(argv[1]).read_bytes()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, server.Site(_Fixed(reply)))  # type: ignore[attr-defined]
    sock.close()  # the reactor holds its own copy
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
