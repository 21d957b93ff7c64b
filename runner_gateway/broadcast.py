"""A ``models:manage`` request sent to every healthy host of a pool, one after another.

A pull, push, create, copy or delete changes one host's models; in a pool
every host should have the same ones. :class:`Broadcast` sends the request
to each healthy host in turn (the next once the previous has answered in
full) and answers the client once:

* streamed (pull, push and create unless ``"stream": false``): 200 with
  ``application/x-ndjson``; each host's progress lines pass through as they
  come, host after host; a host that fails (an error status, or an
  ``{"error": ...}`` line, which is not passed on: clients stop at one) adds
  ``{"status": "host H failed: ..."}``; the last line is
  ``{"status": "success", "hosts": {...}}`` when every host succeeded, else
  ``{"error": "... failed on H", "hosts": {...}}``;
* not streamed (copy, delete, ``"stream": false``): one JSON object, the
  same final object, with 200 when every host succeeded, else the first
  failing host's status.

``hosts`` maps each host (``host:port``) to ``"success"`` or its error.
The hosts' own error messages are kept (they are the runner's words, not
the gateway's); a connection failure gets the gateway's fixed wording.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.server import Request

from runner_gateway.context import RequestContext
from runner_gateway.pool import PoolHost
from runner_gateway.upstream import UpstreamCall

__all__ = ["BROADCAST_ROUTES", "Broadcast", "streamed"]

# policy.py's route labels of the requests that go to every host.
BROADCAST_ROUTES = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
_STREAMING = frozenset({"/api/pull", "/api/push", "/api/create"})
_ERROR_LIMIT = 64 * 1024  # of a failing host's body, kept for its message


def streamed(route: str, body: bytes) -> bool:
    """Whether Ollama streams this request's answer (``stream`` defaults to true)."""
    if route not in _STREAMING:
        return False
    try:
        payload = json.loads(body) if body.strip() else {}
    except ValueError:
        return True
    return not (isinstance(payload, dict) and payload.get("stream") is False)


def _message(code: int | None, body: bytes) -> str:
    if code is None:
        return "the runner did not answer"
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])[:500]
    return f"HTTP {code}"


class Broadcast:
    """One client request sent to ``hosts`` in turn (each host's ResponseHandler)."""

    def __init__(
        self,
        request: Request,
        ctx: RequestContext,
        hosts: list[PoolHost],
        head_for: Callable[[PoolHost], bytes],
        content: IO[bytes] | None,
        length: int,
        stream: bool,
        timeout: float,
        reactor: Any,
        done: Callable[[PoolHost], None],
    ) -> None:
        self.request = request
        self.ctx = ctx
        self.hosts = hosts
        self.head_for = head_for
        self.content = content
        self.length = length
        self.stream = stream
        self.timeout = timeout
        self.reactor = reactor
        self.done = done  # a host's part ended (its inventory changed)
        self.results: dict[str, str] = {}
        self.failed: tuple[int, str] | None = None  # the first failure's status and host
        self.call: UpstreamCall | None = None
        self.timer: IDelayedCall | None = None
        self.stopped = False
        self._index = -1
        self._code: int | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._partial = b""  # a streamed line not complete yet
        self._error: str | None = None  # an {"error": ...} line in a host's stream

    # ------------------------------------------------------------ driving

    def start(self) -> None:
        if self.stream:
            request = self.request
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/x-ndjson"])
            self.ctx.status = 200
            self.ctx.response_started("application/x-ndjson")
            request.write(b"")  # headers now: the client shows progress as it comes
        self._next()

    def stop(self) -> None:
        """The client left: drop the host's request in flight."""
        self.stopped = True
        self._cancel_timer()
        call, self.call = self.call, None
        if call is not None:
            call.abort()

    def _next(self) -> None:
        self._index += 1
        if self._index == len(self.hosts):
            self._finish()
            return
        host = self.hosts[self._index]
        self._code, self._body, self._size = None, [], 0
        self._partial, self._error = b"", None
        if self.timeout > 0:
            self.timer = self.reactor.callLater(self.timeout, self._timed_out)
        self.call = host.client.request(
            self.head_for(host), self.content, self.length, False, self, False
        )

    def _host_done(self, error: str | None) -> None:
        self._cancel_timer()
        self.call = None
        host = self.hosts[self._index]
        self.results[host.label] = "success" if error is None else error
        if error is not None:
            if self.failed is None:
                self.failed = (self._code if self._code and self._code >= 400 else 502, host.label)
            if self.stream:
                self._line({"status": f"host {host.label} failed: {error}"})
        self.done(host)
        if not self.stopped:
            self._next()

    def _timed_out(self) -> None:
        self.timer = None
        call, self.call = self.call, None
        if call is not None:
            call.abort()
        self._host_done(f"no answer within {self.timeout:g}s")

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # ------------------------------------------------------------ answers

    def response_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        dropped: int,
    ) -> None:
        self._code = code
        self._cancel_timer()  # a first-byte deadline: a pull may then take as long as it needs

    def response_body(self, data: bytes) -> None:
        if self.stopped:
            return
        if self._code == 200 and self.stream:
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            self._relay(lines)
        elif self._size < _ERROR_LIMIT:
            self._body.append(data)
        self._size += len(data)

    def response_end(self, reason: Failure | None) -> None:
        if self.stopped or self.call is None:
            return
        body = b"".join(self._body)
        if reason is not None:
            self._host_done("the runner ended the response early")
        elif self._code == 200:
            if self._partial:
                self._relay([self._partial])
            self._host_done(self._error)
        else:
            self._host_done(_message(self._code, body))

    def request_failed(self, reason: Failure) -> None:
        if self.stopped or self.call is None:
            return
        self._host_done(_message(None, b""))

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    # ------------------------------------------------------------ the client

    def _relay(self, lines: list[bytes]) -> None:
        """Pass a host's complete progress lines on, all but its error lines."""
        out = []
        for line in lines:
            if b'"error"' in line:
                try:
                    payload = json.loads(line)
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and "error" in payload:
                    self._error = str(payload["error"])[:500]
                    continue
            if line.strip():
                out.append(line + b"\n")
        self._write(b"".join(out))

    def _write(self, data: bytes) -> None:
        if data:
            self.request.write(data)
            self.ctx.bytes_sent += len(data)
            if self.ctx.first_byte is None:
                self.ctx.first_byte = self.reactor.seconds()

    def _line(self, payload: dict[str, object]) -> None:
        self._write(json.dumps(payload).encode() + b"\n")

    def _finish(self) -> None:
        if self.failed is None:
            final: dict[str, object] = {"status": "success", "hosts": self.results}
        else:
            bad = [h for h, r in self.results.items() if r != "success"]
            final = {"error": f"failed on {', '.join(bad)}", "hosts": self.results}
        request = self.request
        if self.stream:
            self._line(final)
        else:
            status = 200 if self.failed is None else self.failed[0]
            body = json.dumps(final).encode() + b"\n"
            self.ctx.status = status
            request.setResponseCode(status)
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            self.ctx.response_started("application/json")
            self._write(body)
        request.finish()
