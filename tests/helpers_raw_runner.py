"""A runner that misbehaves on purpose, written on raw sockets, for tests/test_hostile_proxy.py.

It answers with exact bytes (a bare CR in a status line, NUL in a header value,
a response that is not HTTP), records every request it gets as it got it, and
routes on the percent-decoded path, as Go's ``net/http`` and Gin do (so a
path the gateway forwards encoded reaches the endpoint it decodes to).

Paths (after decoding; the query is ignored):

- ``/api/tags``: an Ollama listing with ``llama3.2:1b`` and ``secret-model:7b``.
- ``/v1/models``: llama.cpp's answer, with an Ollama-style ``models`` array
  beside OpenAI's ``data`` (both naming ``tiny-llama``).
- ``/api/generate``: 200 with usage for ``llama3.2:1b``, 404 for any other model.
- ``/echo``: the request's headers as JSON (name, value pairs).
- ``/bad-status``: ``HTTP/1.1 200 OK\\rSet-Cookie: evil=1``.
- ``/nul-header``: header values with NUL and VT, and one clean header.
- ``/bad-length``: a Content-Length value with a VT in it.
- ``/garbage``: not HTTP at all.
- anything else: 200 ``{"ok": true}``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

LISTING = {
    "models": [
        {"name": "llama3.2:1b", "model": "llama3.2:1b", "size": 1},
        {"name": "secret-model:7b", "model": "secret-model:7b", "size": 2},
    ]
}
LLAMA_CPP_MODELS = {
    "models": [{"name": "tiny-llama", "model": "tiny-llama", "type": "model"}],
    "object": "list",
    "data": [{"id": "tiny-llama", "object": "model", "owned_by": "llamacpp"}],
}


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def _answer(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + b"Content-Type: "
        + content_type
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


@dataclass
class RawRunner:
    host: str = "127.0.0.1"
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    @property
    def requests(self) -> list[Seen]:
        """What was seen of clients' requests: without the gateway's own (its
        start-up probe, health checks and model inventory), which carry no
        request id."""
        return [s for s in list(self.seen) if s.header(b"x-request-id")]

    def paths(self) -> list[bytes]:
        return [s.target.split(b"?")[0] for s in self.requests]

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # The gateway may reset a connection (it aborts what it gives up on).
        with contextlib.suppress(OSError):
            self._exchange(conn)

    def _exchange(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers.append((name.strip(), value.strip()))
                length = 0
                for name, value in headers:
                    if name.lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                seen = Seen(method, target, headers, body)
                self.seen.append(seen)
                reply, keep = self._reply(seen)
                conn.sendall(reply)
                if not keep:
                    return

    def _reply(self, seen: Seen) -> tuple[bytes, bool]:
        path = unquote_to_bytes(seen.target.split(b"?")[0])  # as Go decodes it
        head = seen.method == b"HEAD"

        def ok(payload: object, content_type: bytes = b"application/json") -> tuple[bytes, bool]:
            data = _answer("200 OK", json.dumps(payload).encode(), content_type)
            if head:
                data = data.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            return data, True

        if path == b"/api/tags":
            return ok(LISTING)
        if path == b"/v1/models":
            return ok(LLAMA_CPP_MODELS)
        if path == b"/api/generate":
            model = json.loads(seen.body or b"{}").get("model")
            if model != "llama3.2:1b":
                body = json.dumps({"error": f"model {model!r} not found"}).encode()
                return _answer("404 Not Found", body), True
            line = {"model": model, "done": True, "prompt_eval_count": 3, "eval_count": 5}
            return ok(line, b"application/x-ndjson")
        if path == b"/echo":
            pairs = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in seen.headers]
            return ok({"headers": pairs, "target": seen.target.decode("latin-1")})
        if path == b"/bad-status":
            return b"HTTP/1.1 200 OK\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok", True
        if path == b"/nul-header":
            return (
                b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nX-Vt: a\x0bb\r\nX-Del: a\x7fb\r\n"
                b"X-Fine: yes\r\nContent-Length: 2\r\n\r\nok",
                True,
            )
        if path == b"/bad-length":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\x0b\r\n\r\nok", False
        if path == b"/garbage":
            return b"HTPT/1.1 200 OK\r\n\r\nnot http", False
        return ok({"ok": True})
