"""A lean HTTP/1.1 client for the proxy's upstream exchange, with a keep-alive pool.

``twisted.web.client.Agent`` cost about a third of the gateway's CPU per
request (Deferred chains, ``Headers`` objects, the ResponseDone machinery,
see docs/benchmarks.md). The proxy needs much less: write a request it has
already framed, parse one response, hand each body piece to a callback at
once, and keep the connection for the next request. This module does that
on a plain :class:`Protocol`:

* the request line and headers go out in one write, with the body's first
  64 KiB when there is one; larger bodies follow in 64 KiB pieces under the
  transport's flow control (a streaming producer);
* the status line and headers are parsed incrementally; 1xx answers other
  than 101 are skipped; bodies are framed by Content-Length, chunked coding
  or the connection's close (RFC 9112 section 6.3);
* nothing with a control character is passed on: a header value holding one
  (NUL, a bare CR, VT, DEL...) is dropped and counted; one in a header name,
  or in a framing header's value (Content-Length, Transfer-Encoding,
  Connection), makes the response invalid (:class:`UpstreamProtocolError`);
* a connection goes back to its :class:`UpstreamPool` only after a complete
  response that allows it (HTTP/1.1, no ``Connection: close``, not framed by
  close) and only if the request body was written completely;
* an idle pooled connection the runner has closed (or sent anything on) is
  found before a byte of the next request is written to it (a non-blocking
  peek at its socket) and replaced: that request is retried on another
  connection. One that closes as the request arrives, before a byte of the
  answer (the runner's idle timeout racing the request), is sent again on a
  fresh connection when the caller allows it (``retry_stale``: requests with
  no side effects). A request whose fresh connection fails is not retried.

Callers get their answers through an :class:`ResponseHandler`; nothing here
knows about the gateway's request objects.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import IO, Any
from typing import Protocol as TypingProtocol

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from runner_gateway.edge.fastpath import write_now

__all__ = [
    "ResponseHandler",
    "UpstreamCall",
    "UpstreamClient",
    "UpstreamPool",
    "UpstreamProtocolError",
]

CHUNK = 64 * 1024
# Generous limits on what a runner may send before its body: a response head
# bigger than this is not one we want to buffer.
_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
_NO_BODY_CODES = frozenset({204, 304})
_METHODS_WITH_LENGTH = frozenset({b"POST", b"PUT"})  # Content-Length: 0 when empty, as Agent
_ClosedOK = (net_error.ConnectionDone,)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class UpstreamProtocolError(Exception):
    """The runner's response is not valid HTTP/1.1 (or not one we accept)."""


class ResponseHandler(TypingProtocol):
    """What a caller of :meth:`UpstreamClient.request` implements.

    ``request_failed`` comes instead of ``response_head`` when no response
    head arrived (connect, TLS, reset, protocol errors); after the head,
    ``response_body`` comes once per piece and ``response_end`` once, with
    None for a complete body or the reason it was cut short.
    """

    def response_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        dropped: int,
    ) -> None:
        """``dropped``: how many header values were left out for holding a control character."""

    def response_body(self, data: bytes) -> None: ...

    def response_end(self, reason: Failure | None) -> None: ...

    def request_failed(self, reason: Failure) -> None: ...

    def hold(self) -> None:
        """A read from the runner is about to be parsed (its callbacks follow)."""

    def release(self) -> None:
        """The read is parsed: flush what the callbacks produced."""


# Parser states.
_STATUS, _HEADERS, _BODY_LENGTH, _BODY_CHUNK_SIZE, _BODY_CHUNK_DATA = 0, 1, 2, 3, 4
_BODY_CHUNK_CRLF, _BODY_TRAILER, _BODY_CLOSE, _DONE = 5, 6, 7, 8


_FOLD_START = (b" ", b"\t")  # a header line starting so continues the one before
# Control characters a header value may not hold (HTAB is allowed), and the
# same with LF and CR, for checking a whole head in one pass.
_CONTROL = bytes([*range(0x09), *range(0x0B, 0x20), 0x7F])
_CONTROL_OR_EOL = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def _socket_of(transport: Any) -> socket.socket | None:
    """The connection's socket (under TLS too), or None (test transports)."""
    handle_of = getattr(transport, "getHandle", None)
    if handle_of is None:
        inner = getattr(transport, "transport", None)  # TLSMemoryBIOProtocol
        handle_of = getattr(inner, "getHandle", None)
    if handle_of is None:
        return None
    try:
        sock = handle_of()
    except Exception:
        return None
    return sock if isinstance(sock, socket.socket) else None


def _peer_closed(transport: Any, sock: socket.socket | None) -> bool:
    """True when an idle connection is unusable: closed by the peer, or data waiting.

    An idle HTTP/1.1 connection never legitimately has anything to read; a
    TLS close_notify counts as closed too. Transports without a socket
    (tests) are taken as they are.
    """
    if transport.disconnecting or getattr(transport, "disconnected", False):
        return True
    if sock is None:
        return False
    try:
        sock.recv(1, _PEEK)
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK)
    return True  # b"" (EOF) or unsolicited bytes


@implementer(IPushProducer)
class _BodyWriter:
    """Writes a request body to the transport in 64 KiB pieces, under its flow control."""

    def __init__(self, connection: _Connection, content: IO[bytes], remaining: int) -> None:
        self._connection = connection
        self._content = content
        self._remaining = remaining
        self._paused = False
        self._pumping = False
        self.done = False

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self.done:
                transport = self._connection.transport
                if transport is None or self._connection.lost:
                    self.done = True
                    return
                data = self._content.read(min(CHUNK, self._remaining))
                self._remaining -= len(data)
                if data:
                    transport.write(data)
                if not data or self._remaining <= 0:
                    self.done = True
                    self._connection.body_written()
                    return
        finally:
            self._pumping = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.done = True


class _Connection(Protocol):
    """One upstream HTTP/1.1 connection: one request at a time, then back to the pool."""

    def __init__(self, pool: UpstreamPool, key: object) -> None:
        self.pool = pool
        self.key = key
        self.handler: ResponseHandler | None = None
        self.call: UpstreamCall | None = None  # set when reused, for a stale retry
        self.lost = False
        self.reused = False
        self.paused = False
        self.sock: socket.socket | None = None
        self.idle_since = 0.0
        self._buf = b""
        self._state = _DONE
        self._head_request = False
        self._remaining = 0
        self._keep_alive = False
        self._code = 0
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._dropped = 0
        self._got_head = False
        self._body: _BodyWriter | None = None
        self._closed_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.sock = sock = _socket_of(self.transport)  # looked up once, peeked at on every reuse
        if sock is not None:
            # As the client side does (Twisted's HTTPChannel): a request written in
            # pieces (a large body) must not wait on Nagle for the runner's ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ------------------------------------------------------------ sending

    def send(
        self,
        head: bytes,
        content: IO[bytes] | None,
        length: int,
        method_head: bool,
        handler: ResponseHandler,
    ) -> None:
        self.handler = handler
        self._head_request = method_head
        self._state = _STATUS
        self._buf = b""
        self._got_head = False
        self._headers = []
        transport: Any = self.transport
        if content is None or length == 0:
            self._body = None
            write_now(transport, head)
            return
        content.seek(0)
        first = content.read(CHUNK)
        if len(first) >= length:
            self._body = None
            write_now(transport, head + first)
            return
        # Registered before the first write, so a full buffer pauses it at once.
        writer = self._body = _BodyWriter(self, content, length - len(first))
        transport.registerProducer(writer, True)
        transport.write(head + first)
        writer.pump()

    def body_written(self) -> None:
        transport: Any = self.transport
        if self._body is not None and transport is not None and not self.lost:
            transport.unregisterProducer()
        self._body = None

    # ------------------------------------------------------------ flow control

    def pause(self) -> None:
        if self.transport is not None and not self.lost:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Drop the handler and close with a RST: the runner notices at once, even over TLS."""
        self.handler = None
        if self.lost or self.transport is None:
            return
        transport: Any = self.transport
        abort = getattr(transport, "abortConnection", None)
        if callable(abort):
            abort()
        else:
            transport.loseConnection()

    def close(self) -> Deferred[None]:
        """Close gracefully (pool eviction); fires when the connection is gone."""
        if self.lost or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        self.transport.loseConnection()
        return d

    # ------------------------------------------------------------ receiving

    def dataReceived(self, data: bytes) -> None:
        if self.handler is None:
            # Nothing asked for: a pooled connection must stay silent.
            if self._state == _DONE:
                self.pool.discard(self)
                self.abort()
            return
        buf = self._buf + data if self._buf else data
        self._buf = b""
        handler = self.handler
        handler.hold()
        try:
            self._parse(buf)
        except UpstreamProtocolError:
            self._fail(Failure())
        finally:
            handler.release()

    def _parse(self, buf: bytes) -> None:
        while buf and self.handler is not None:
            state = self._state
            if state == _BODY_LENGTH:
                if len(buf) < self._remaining:
                    self._remaining -= len(buf)
                    self.handler.response_body(buf)
                    return
                piece, buf = buf[: self._remaining], buf[self._remaining :]
                self._remaining = 0
                if piece:
                    self.handler.response_body(piece)
                self._complete(buf)
                return
            if state == _BODY_CLOSE:
                self.handler.response_body(buf)
                return
            if state == _BODY_CHUNK_DATA:
                if len(buf) <= self._remaining:
                    self._remaining -= len(buf)
                    if self._remaining == 0:
                        self._state = _BODY_CHUNK_CRLF
                    self.handler.response_body(buf)
                    return
                piece, buf = buf[: self._remaining], buf[self._remaining :]
                self._remaining = 0
                self._state = _BODY_CHUNK_CRLF
                self.handler.response_body(piece)
                continue
            if state == _BODY_CHUNK_CRLF:
                if len(buf) < 2:
                    if buf != b"\r"[: len(buf)]:
                        raise UpstreamProtocolError("chunk not followed by CRLF")
                    self._buf = buf
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("chunk not followed by CRLF")
                buf = buf[2:]
                self._state = _BODY_CHUNK_SIZE
                continue
            if state == _DONE:
                # Bytes after a complete response: the connection is not reusable.
                self._keep_alive = False
                return
            if state == _STATUS:
                # The usual case: the whole head in this read, lines ending in
                # CRLF. One split instead of a pass through this loop per line;
                # anything else (a bare LF, a head split across reads) goes
                # line by line below, with the same checks.
                end = buf.find(b"\r\n\r\n")
                if 0 < end <= _MAX_HEAD:
                    lines = buf[:end].split(b"\r\n")
                    # Every LF and CR in a pair between lines, and no other
                    # control character: else the checks line by line below.
                    if len(buf[:end].translate(None, _CONTROL_OR_EOL)) == end - 2 * (
                        len(lines) - 1
                    ):
                        self._status_line(lines[0])
                        header_line = self._header_line
                        headers = self._headers
                        for line in lines[1:]:
                            # _header_line's plain case inline (the head is
                            # under _MAX_HEAD as a whole, so no size check);
                            # folding and errors go through it.
                            name, sep, value = line.partition(b":")
                            if (
                                sep
                                and name
                                and line[:1] not in _FOLD_START
                                and name == name.strip()
                                and b" " not in name
                            ):
                                self._head_size += len(line)
                                headers.append((name, value.strip()))
                            else:
                                header_line(line)
                        buf = self._end_of_head(buf[end + 4 :])
                        continue
            # Line-based states: status, headers, chunk size, trailer.
            end = buf.find(b"\n")
            if end < 0:
                limit = _MAX_CHUNK_LINE if state == _BODY_CHUNK_SIZE else _MAX_HEAD
                if len(buf) > limit:
                    raise UpstreamProtocolError("line too long")
                self._buf = buf
                return
            line = buf[:end]
            buf = buf[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == _STATUS:
                self._status_line(line)
                if len(line.translate(None, _CONTROL)) != len(line):
                    self._phrase = b""  # never passed on (one read whole has none)
            elif state == _HEADERS:
                if line:
                    self._header_line(line)
                else:
                    buf = self._end_of_head(buf)
            elif state == _BODY_CHUNK_SIZE:
                size_text = line.split(b";", 1)[0].strip()
                # int() alone would take "0x1", "-1" and "1_0".
                if not size_text or size_text.translate(None, _HEX_DIGITS):
                    raise UpstreamProtocolError("bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = _BODY_TRAILER
                else:
                    self._remaining = size
                    self._state = _BODY_CHUNK_DATA
            else:  # _BODY_TRAILER: trailers are dropped
                if not line:
                    self._complete(buf)
                    return

    def _status_line(self, line: bytes) -> None:
        parts = line.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise UpstreamProtocolError("bad status line")
        code_text = parts[1]
        if len(code_text) != 3 or not code_text.isdigit():
            raise UpstreamProtocolError("bad status code")
        self._code = int(code_text)
        if self._code < 100:
            raise UpstreamProtocolError("bad status code")
        self._phrase = parts[2] if len(parts) == 3 else b""
        self._keep_alive = parts[0] == b"HTTP/1.1"
        self._headers = []
        self._dropped = 0
        self._head_size = len(line)
        self._state = _HEADERS

    def _header_line(self, line: bytes) -> None:
        self._head_size += len(line)
        if self._head_size > _MAX_HEAD:
            raise UpstreamProtocolError("response head too large")
        if line[:1] in _FOLD_START:
            # Obsolete line folding: part of the previous header's value.
            if not self._headers:
                raise UpstreamProtocolError("folded first header")
            name, value = self._headers[-1]
            folded = line.strip(b" \t")
            if len(folded.translate(None, _CONTROL)) != len(folded):
                raise UpstreamProtocolError("control character in a folded header")
            self._headers[-1] = (name, value + b" " + folded)
            return
        name, sep, value = line.partition(b":")
        if (
            not sep
            or not name
            or name != name.strip()
            or b" " in name
            or len(name.translate(None, _CONTROL)) != len(name)
        ):
            raise UpstreamProtocolError("bad header line")
        value = value.strip(b" \t")
        if len(value.translate(None, _CONTROL)) != len(value):
            if name.lower() in _FRAMING:
                raise UpstreamProtocolError("control character in a framing header")
            self._dropped += 1  # never relayed: it could split or end the client's head
            return
        self._headers.append((name, value))

    def _end_of_head(self, buf: bytes) -> bytes:
        code = self._code
        if 100 <= code < 200:
            if code == 101:
                raise UpstreamProtocolError("unexpected protocol switch")
            self._state = _STATUS  # 100 Continue and friends: the real answer follows
            return buf
        chunked = False
        length: int | None = None
        has_te = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                has_te = True
                codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
                chunked = bool(codings) and codings[-1] == b"chunked"
            elif lower == b"content-length":
                for text in value.split(b","):
                    text = text.strip()
                    if not text.isdigit():
                        raise UpstreamProtocolError("bad content-length")
                    if length is not None and int(text) != length:
                        raise UpstreamProtocolError("conflicting content-length")
                    length = int(text)
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    self._keep_alive = False
                elif b"keep-alive" in tokens and not self._keep_alive:
                    self._keep_alive = True  # HTTP/1.0 with keep-alive
        no_body = self._head_request or code in _NO_BODY_CODES
        if has_te:
            if length is not None:
                self._keep_alive = False  # RFC 9112 6.3: TE wins, and the connection goes
            length = None
        handler = self.handler
        assert handler is not None
        self._got_head = True
        if no_body:
            handler.response_head(code, self._phrase, self._headers, length, self._dropped)
            self._complete(buf)
            return b""
        if chunked:
            self._state = _BODY_CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _BODY_LENGTH
        else:
            self._keep_alive = False
            self._state = _BODY_CLOSE
        handler.response_head(code, self._phrase, self._headers, length, self._dropped)
        if self._state == _BODY_LENGTH and length == 0 and self.handler is not None:
            self._complete(buf)
            return b""
        return buf

    def _complete(self, rest: bytes) -> None:
        handler, self.handler = self.handler, None
        self.call = None  # an idle connection must not keep the request (and its body)
        self._state = _DONE
        if rest or self._body is not None:
            self._keep_alive = False  # unsolicited bytes, or the body is still going out
        if self._keep_alive:
            if self.paused:
                # The caller paused us while the rest of the response sat in
                # the same read: the next request must find the socket read.
                self.resume()
            self.pool.release(self)
        else:
            self.pool.discard(self)
            if self.transport is not None:
                self.transport.loseConnection()
        if handler is not None:
            handler.response_end(None)

    def _fail(self, reason: Failure) -> None:
        handler = self.handler
        self.pool.discard(self)
        self.abort()
        if handler is None:
            return
        if self._got_head:
            handler.response_end(reason)
        else:
            handler.request_failed(reason)

    def connectionLost(self, reason: Failure = Failure(net_error.ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        self.pool.discard(self)
        if self._body is not None:
            self._body.done = True
            self._body = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        call = self.call
        if (
            call is not None
            and call.handler is handler
            and call.retry_stale
            and self._state == _STATUS
            and not self._buf
        ):
            # A reused connection closed before a byte of the answer: the
            # runner closed it as idle while the request was on its way.
            self.call = None
            call.resend()
            return
        if self._state == _BODY_CLOSE and reason.check(*_ClosedOK):
            self._state = _DONE
            handler.response_end(None)
        elif self._got_head:
            handler.response_end(reason)
        else:
            handler.request_failed(reason)


class _ConnectionFactory(Factory):
    noisy = False  # a "Starting factory" line per upstream connection is noise

    def __init__(self, pool: UpstreamPool, key: object) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.pool, self.key)


class UpstreamPool:
    """Idle keep-alive connections per key, at most ``max_idle_per_key`` each.

    The most recently used connection is handed out first, so under light
    load the others age out after ``idle_timeout`` seconds. One timer serves
    the whole pool.
    """

    def __init__(self, reactor: Any, max_idle_per_key: int = 32, idle_timeout: float = 60.0):
        self.reactor = reactor
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout
        self.timeouts: dict[object, float] = {}  # per key, where not idle_timeout
        self._idle: dict[object, list[_Connection]] = {}
        self._sweep_at = 0.0  # when the sweep runs, while there is one
        self._sweep: IDelayedCall | None = None

    def take(self, key: object) -> _Connection | None:
        """An idle connection for ``key`` that is still usable, or None."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.lost or _peer_closed(connection.transport, connection.sock):
                # Closed by the runner while idle: nothing was written to it.
                connection.abort()
                continue
            connection.reused = True
            return connection
        return None

    def _timeout(self, key: object) -> float:
        return self.timeouts.get(key, self.idle_timeout)

    def release(self, connection: _Connection) -> None:
        if connection.lost:
            return
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle_per_key:
            oldest = idle.pop(0)
            oldest.close()
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        timeout = self.timeouts.get(connection.key, self.idle_timeout)
        if timeout > 0:
            due = connection.idle_since + timeout
            if self._sweep is None:
                self._sweep = self.reactor.callLater(timeout, self._expire)
                self._sweep_at = due
            elif self._sweep_at > due:  # a key with a shorter timeout than the sweep's
                self._sweep.reset(timeout)
                self._sweep_at = due

    def discard(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def idle_count(self, key: object | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def _expire(self) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        oldest: float | None = None
        for key in list(self._idle):
            timeout = self._timeout(key)
            keep = []
            for connection in self._idle[key]:
                if timeout > 0 and now - connection.idle_since >= timeout:
                    connection.close()
                else:
                    keep.append(connection)
                    if timeout > 0 and (oldest is None or connection.idle_since + timeout < oldest):
                        oldest = connection.idle_since + timeout
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if oldest is not None:
            self._sweep_at = max(oldest, now + 0.001)
            self._sweep = self.reactor.callLater(self._sweep_at - now, self._expire)

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; fires when they are all gone."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        closing = [c.close() for idle in self._idle.values() for c in idle]
        self._idle.clear()
        done: Deferred[None] = DeferredList(closing).addCallback(lambda _: None)
        return done


class UpstreamCall:
    """One request in flight: its connection once there is one, or the connect attempt.

    Once the response is complete the connection belongs to the pool (and
    maybe to the next request): the call then no longer touches it.
    """

    def __init__(self, handler: ResponseHandler) -> None:
        self.handler = handler
        self.connection: _Connection | None = None
        self._connecting: Deferred[Any] | None = None
        self.cancelled = False
        self.retry_stale = False
        self.client: UpstreamClient | None = None
        self.sent: _SendArgs | None = None

    def resend(self) -> None:
        """Send again on a fresh connection (the reused one died before answering)."""
        self.connection = None
        assert self.client is not None and self.sent is not None
        self.client._connect(self, self.sent)

    def _ours(self) -> _Connection | None:
        connection = self.connection
        if connection is not None and connection.handler is self.handler:
            return connection
        return None

    def pause(self) -> None:
        connection = self._ours()
        if connection is not None:
            connection.pause()

    def resume(self) -> None:
        connection = self._ours()
        if connection is not None:
            connection.resume()

    def abort(self) -> None:
        """Stop: no more callbacks; the connection (or the attempt) is dropped."""
        self.cancelled = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        connection = self._ours()
        self.connection = None
        if connection is not None:
            connection.pool.discard(connection)
            connection.abort()


# _Connection.send's arguments: head, body, length, HEAD request, handler.
_SendArgs = tuple[bytes, IO[bytes] | None, int, bool, ResponseHandler]


class UpstreamClient:
    """Requests to one origin (scheme, host, port and, for https, TLS policy) through a pool."""

    def __init__(
        self,
        reactor: Any,
        pool: UpstreamPool,
        *,
        scheme: str,
        host: str,
        port: int,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
        tag: object = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.key = (scheme, host, port, tag)
        if idle_timeout is not None:
            pool.timeouts[self.key] = idle_timeout
        kwargs: dict[str, Any] = {}
        if connect_timeout > 0:
            kwargs["timeout"] = connect_timeout
        # Settings allow ASCII host names only; one endpoint serves every connection.
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            reactor, host.encode("ascii"), port, **kwargs
        )
        if scheme == "https":
            if tls_policy is None:
                raise ValueError("an https origin needs a TLS policy")
            creator = tls_policy.creatorForNetloc(host.encode("ascii"), port)
            endpoint = wrapClientTLS(creator, endpoint)
        self.endpoint = endpoint
        self._factory = _ConnectionFactory(pool, self.key)

    def request(
        self,
        head: bytes,
        content: IO[bytes] | None,
        length: int,
        method_head: bool,
        handler: ResponseHandler,
        retry_stale: bool = True,
    ) -> UpstreamCall:
        """Send ``head`` (request line, headers) and the body; answers go to ``handler``.

        ``retry_stale``: when a reused connection closes before a byte of the
        answer, send the request again on a fresh one (for requests that may
        be repeated).
        """
        call = UpstreamCall(handler)
        sent: _SendArgs = (head, content, length, method_head, handler)
        connection = self.pool.take(self.key)
        if connection is not None:
            call.connection = connection
            if retry_stale:
                call.retry_stale = True
                call.client = self
                call.sent = sent
                connection.call = call
            else:
                connection.call = None
            connection.send(*sent)
        else:
            self._connect(call, sent)
        return call

    def _connect(self, call: UpstreamCall, sent: _SendArgs) -> None:
        # Apart from request(): its closures would be built for every pooled request too.
        def connected(connection: _Connection) -> None:
            call._connecting = None
            if call.cancelled:
                connection.abort()
                return
            call.connection = connection
            connection.send(*sent)

        def failed(reason: Failure) -> None:
            call._connecting = None
            if not call.cancelled:
                call.handler.request_failed(reason)

        d = self.endpoint.connect(self._factory)
        call._connecting = d
        d.addCallbacks(connected, failed)


def request_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], length: int
) -> bytes:
    """The request line and header block; Content-Length from ``length`` (as Agent frames it)."""
    if b" " in target or b"\r" in target or b"\n" in target:
        raise ValueError("request target with whitespace")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    if length or method in _METHODS_WITH_LENGTH:
        lines.append(b"Content-Length: %d\r\n" % length)
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
