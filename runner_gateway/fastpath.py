"""Hot-path fixes found by profiling (docs/benchmarks.md), installed once per process.

Each fix replaces something Twisted does on every request with an
equivalent that gives the same result for less work:

* ``content-type``: ``twisted.web.http._parseContentType`` builds an
  ``email.message.EmailMessage`` for every POST to find the media type, and
  the email package's header registry creates a new *class* on each header
  lookup. A POST's Content-Type is almost always one of a few values, so the
  parsed media type is cached by the raw header value (bounded; the function
  is pure: bytes in, bytes out).
* ``send-now``: a write to a Twisted TCP transport is only queued; the
  ``send()`` happens on the reactor's next turn, after an epoll call to
  watch for writability and before another to stop. :func:`write_now` hands
  the bytes to the kernel at once when nothing is queued on a plain (not
  TLS) TCP connection, as asyncio's transports do; what the kernel does not
  take, and every other transport, goes through ``transport.write``, so
  ordering and flow control are Twisted's. The proxy uses it for the request
  to the runner and for each batch of response bytes to the client.
* ``whole-head``: Twisted's HTTPChannel parses a request head one line at a
  time (a LineReceiver pass, ``lineReceived`` and ``headerReceived`` per
  line). When a read holds the whole head and it is in the plain form (CRLF
  lines, token names, no folding, under Twisted's size and count limits),
  ``GatewayChannel`` takes it in one pass with Twisted's own checks and
  leaves Twisted's parser state as its parser would; a Content-Length body
  that came whole in the same read is handed over at once, as Twisted's
  decoder would. Every other head goes line by line, as before.
* ``date``: ``twisted.web.server.Request.process`` formats the Date header
  anew for every request (``time.gmtime`` and string formatting, ~3 µs, and
  tens of µs when the process has been idle and its caches are cold). The
  value only changes once a second, so it is kept for the second it names.
* ``accept`` (:func:`install_accept`, on the service's plain TCP listening
  ports only): Twisted's ``Port.doRead`` wraps each accept in a log-buffering
  context (a new ``Logger``), converts the socket's family and type to enums
  (six calls), builds an address object the Site ignores and goes through
  three ``buildProtocol`` layers. The replacement keeps Twisted's accept
  budget and transport class, builds the channel and (on an epoll reactor)
  the ``tcp.Server`` each in one step, and sets TCP_NODELAY
  once on the listening socket (Linux copies it to every accepted one)
  instead of once per connection. Any accept error other than "nothing
  waiting" goes back to Twisted's own ``doRead``, which handles and logs it
  (EMFILE and the like).
* ``dispatch`` (:func:`install_dispatch`, on the service's running epoll
  reactor only): Twisted's ``doPoll`` calls each ready connection through
  ``log.callWithLogger``, which sets the legacy log "system" context (four
  calls and a dict per event; our log lines do not show it) and logs what
  escapes the handler. The replacement calls the handler directly and keeps
  the catch-and-log.

* ``loop`` (:func:`install_loop`, on the service's epoll reactor only):
  Twisted's ``mainLoop`` goes through a failure-logging context manager,
  ``runUntilCurrent`` and ``timeout`` (with two looks at new timed calls) on
  every turn. The replacement files new timed calls and works out the poll
  timeout inline, and calls ``runUntilCurrent`` only on a turn with
  something for it to do (a call due, a call from a thread, a clean-up, a
  stop); what it does then is Twisted's own.

The gateway's own classes (site.py) register more fixes here, each a set of
copies of Twisted methods installed on GatewayChannel, GatewayRequest and
GatewaySite only while the fix is on: ``channel`` (requestDone,
allHeadersReceived, connectionMade, the keep-alive timer, peer and host
addresses, the Site's buildProtocol), ``request`` (Request.__init__, process,
write, gotLength, isSecure, the Site's getResourceFor: the header-table
shortcuts), ``hold`` (the response batched per read from the runner) and
``whole-head`` (which needs ``channel``).

``RUNNER_GATEWAY_FASTPATH=off`` (or a comma-separated list of fix names to
leave out) keeps Twisted's own code: the benchmark suite uses it to measure
each fix's effect in the same run, and CI runs the test suite once that way.

A fix whose Twisted internals are missing or changed on the installed
Twisted (runner_gateway/reaches.py lists them) is left off: Twisted's own
code serves, one warning says which fix and why, and
``runner_gateway_fastpath_info{fix,state}`` (metrics.py) shows it.
"""

from __future__ import annotations

import functools
import heapq
import os
import select
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import address, tcp
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http_headers

_dispatch_log = Logger(namespace="runner_gateway.fastpath")
_log = _dispatch_log

# twisted.web's cache of canonical header names, read without a method call:
# ``cached_header_name(name) or canonical_name(name)`` is the name encoder's
# answer. (An empty dict, never a hit, in a Twisted without that cache.)
cached_header_name: Callable[[bytes], bytes | None] = getattr(
    getattr(http_headers, "_nameEncoder", None), "_canonicalHeaderCache", {}
).get


def _public_canonical_name(name: bytes) -> bytes:
    """A header name as twisted.web's Headers spells it, through its public API."""
    headers = http_headers.Headers()
    headers.addRawHeader(name, b"")
    return next(iter(headers.getAllRawHeaders()))[0]


# Twisted's header-name encoder when it has one (a private name), else the same
# answer through Headers' public API.
canonical_name: Callable[[bytes], bytes] = getattr(
    getattr(http_headers, "_nameEncoder", None), "encode", _public_canonical_name
)

__all__ = [
    "FIXES",
    "STATES",
    "Unavailable",
    "cached_header_name",
    "canonical_name",
    "install",
    "install_accept",
    "install_dispatch",
    "install_loop",
    "installed",
    "register",
    "states",
    "write_now",
]


class Unavailable(Exception):
    """A fix cannot be installed on this Twisted: what it relies on is missing
    or behaves differently. The message says what."""


# What runner_gateway_fastpath_info's state label can say.
STATES = ("on", "switched-off", "unavailable", "not-applicable")
_installed: set[str] = set()
_states: dict[str, str] = {}
_warned: set[str] = set()


def _mark(name: str, state: str, why: str = "") -> None:
    """Record a fix's state; say once why a fix is off on this Twisted."""
    if state == "on":
        _installed.add(name)
    if _states.get(name) == "on":
        return  # on for one reactor or port is on
    _states[name] = state
    if state == "unavailable" and name not in _warned:
        _warned.add(name)
        _log.warn(
            "fastpath fix {fix} is off, Twisted's own code serves instead: {why}",
            fix=name,
            why=why,
        )


def states() -> dict[str, str]:
    """Every fix's state so far (see STATES); a fix never tried is not listed."""
    return dict(_states)


def _content_type() -> None:
    from twisted.web import http

    original: Callable[[bytes], bytes] = http._parseContentType
    if getattr(original, "cache_info", None) is not None:
        return
    http._parseContentType = functools.lru_cache(maxsize=256)(original)


_TCP_TRANSPORTS: tuple[type, ...] = ()  # empty until send-now is installed


def _send_now() -> None:
    global _TCP_TRANSPORTS
    from twisted.internet import abstract

    # write_now reads these; a Twisted without them raises AttributeError here
    # (install() then keeps plain transport.write).
    probe = abstract.FileDescriptor(reactor=object())  # type: ignore[arg-type]
    _ = (probe._tempDataBuffer, probe._writeDisconnected, probe.dataBuffer, tcp.Server.TLS)
    _TCP_TRANSPORTS = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when the transport has nothing queued."""
    if (
        type(transport) in _TCP_TRANSPORTS
        and not transport.TLS  # startTLS() on a TCP transport: bytes must go through TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and data
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error transport.write's own send will meet and report
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


def _date() -> None:
    from twisted.web import server

    original: Callable[..., bytes] = server.datetimeToString  # type: ignore[attr-defined]
    if getattr(original, "per_second", False):
        return
    second, value = -1, b""

    def per_second(msSinceEpoch: float | None = None) -> bytes:  # Twisted's argument name
        nonlocal second, value
        if msSinceEpoch is not None:
            return original(msSinceEpoch)
        now = int(time.time())
        if now != second:
            # Formatting the whole second gives the same text as any instant in it.
            value, second = original(now), now
        return value

    per_second.per_second = True  # type: ignore[attr-defined]
    server.datetimeToString = per_second  # type: ignore[attr-defined]


# Installed on a reactor or a port by the service, not by install().
_PER_OBJECT = ("dispatch", "accept", "loop")

# Each fix's installer: it raises AttributeError, ImportError or Unavailable,
# having changed nothing, when this Twisted lacks what the fix relies on.
# site.py adds its own (register) when it is imported.
FIXES: dict[str, Callable[[], None]] = {
    "send-now": _send_now,
    "content-type": _content_type,
    "date": _date,
}
# Fixes that only make sense on top of another.
_NEEDS: dict[str, str] = {}


def register(name: str, installer: Callable[[], None], needs: str | None = None) -> None:
    """Add a fix that install() puts in unless RUNNER_GATEWAY_FASTPATH leaves it out."""
    FIXES[name] = installer
    if needs is not None:
        _NEEDS[name] = needs


def installed() -> frozenset[str]:
    return frozenset(_installed)


def _skipped(environ: Mapping[str, str] | None) -> set[str]:
    env = os.environ if environ is None else environ
    setting = env.get("RUNNER_GATEWAY_FASTPATH", "").strip().lower()
    if setting == "off":
        return {*FIXES, *_PER_OBJECT}
    return {s.strip() for s in setting.split(",") if s}


def install(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Install every fix not switched off by RUNNER_GATEWAY_FASTPATH; idempotent."""
    skip = _skipped(environ)
    for name, fix in FIXES.items():
        if name in _installed:
            continue
        if name in skip:
            _mark(name, "switched-off")
            continue
        needs = _NEEDS.get(name)
        if needs is not None and needs not in _installed:
            _mark(name, "not-applicable" if needs in skip else "unavailable", f"needs {needs}")
            continue
        try:
            fix()
        except (AttributeError, ImportError, Unavailable) as exc:
            # A Twisted release without (or with a changed) internal this fix
            # relies on: keep Twisted's own code rather than fail to answer.
            _mark(name, "unavailable", f"{type(exc).__name__}: {exc}")
            continue
        _mark(name, "on")
    return installed()


def _poll(reactor: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` without ``log.callWithLogger`` around each event."""
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
    except InterruptedError:
        return
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # What callWithLogger did: log it, and serve the other events.
                _dispatch_log.failure("unhandled error in an I/O event")


def install_dispatch(reactor: Any, environ: Mapping[str, str] | None = None) -> bool:
    """The ``dispatch`` fix on ``reactor``: an epoll reactor's own ``doIteration``
    (the instance's, not the class's). False when switched off or not applicable."""
    from twisted.internet.epollreactor import EPollReactor

    if "dispatch" in _skipped(environ):
        _mark("dispatch", "switched-off")
        return False
    if type(reactor) is not EPollReactor:
        _mark("dispatch", "not-applicable")
        return False
    if isinstance(reactor.__dict__.get("doIteration"), functools.partial):
        return True
    try:
        _ = (reactor._poller.poll, reactor._selectables, reactor._doReadOrWrite)
    except AttributeError as exc:  # a Twisted without them: keep its doPoll
        _mark("dispatch", "unavailable", f"AttributeError: {exc}")
        return False
    reactor.doIteration = functools.partial(_poll, reactor)  # type: ignore[method-assign]
    _mark("dispatch", "on")
    return True


def install_loop(reactor: Any, environ: Mapping[str, str] | None = None) -> bool:
    """The ``loop`` fix: ``reactor.mainLoop`` is :func:`_main_loop`, for an epoll
    reactor not running yet. False when switched off or not applicable."""
    from twisted.internet.epollreactor import EPollReactor

    if "loop" in _skipped(environ):
        _mark("loop", "switched-off")
        return False
    if type(reactor) is not EPollReactor:
        _mark("loop", "not-applicable")
        return False
    if isinstance(reactor.__dict__.get("mainLoop"), functools.partial):
        return True
    try:
        _ = (
            reactor._started,
            reactor.running,
            reactor.threadCallQueue,
            reactor._justStopped,
            reactor._cancellations,
            reactor._pendingTimedCalls,
            reactor._newTimedCalls,
            reactor.runUntilCurrent,
            reactor.timeout,
        )
    except AttributeError as exc:  # a Twisted without them: keep its mainLoop
        _mark("loop", "unavailable", f"AttributeError: {exc}")
        return False
    owner: Any = reactor  # an instance attribute, as doIteration's
    owner.mainLoop = functools.partial(_main_loop, reactor)
    _mark("loop", "on")
    return True


def _main_loop(reactor: Any) -> None:
    """``ReactorBase.mainLoop``: each turn, run what is due, then poll until
    the next timed call. See the module's ``loop``."""
    seconds = reactor.seconds
    while reactor._started:
        try:
            while reactor._started:
                new = reactor._newTimedCalls
                if new:  # as _insertNewDelayedCalls
                    reactor._newTimedCalls = []
                    pending = reactor._pendingTimedCalls
                    for call in new:
                        if call.cancelled:
                            reactor._cancellations -= 1
                        else:
                            call.activate_delay()
                            heapq.heappush(pending, call)
                pending = reactor._pendingTimedCalls
                cancellations = reactor._cancellations
                if (
                    reactor.threadCallQueue
                    or reactor._justStopped
                    or (pending and pending[0].time <= seconds())
                    or (cancellations > 50 and cancellations > len(pending) >> 1)
                ):
                    reactor.runUntilCurrent()
                    timeout = reactor.timeout()
                elif pending:  # as timeout()
                    timeout = max(0, min(2147483, pending[0].time - seconds()))
                else:
                    timeout = None
                reactor.doIteration(reactor.running and timeout)
        except BaseException:
            # What Twisted's loop does: log it and go on.
            _dispatch_log.failure("Unexpected error in main loop")
    _dispatch_log.info("Main loop terminated.")


def install_accept(port: Any, environ: Mapping[str, str] | None = None) -> bool:
    """The ``accept`` fix on a listening plain-TCP ``port`` whose factory builds
    its protocol without looking at the address (``GatewaySite``). False when
    switched off or not applicable."""
    if "accept" in _skipped(environ):
        _mark("accept", "switched-off")
        return False
    listener: Any = port  # the internals below are not in tcp.Port's annotations
    if type(port) is not tcp.Port or not getattr(listener.factory, "address_unused", False):
        _mark("accept", "not-applicable")
        return False
    try:
        _ = (listener.socket._accept, listener.numberAccepts, listener.sessionno)
    except AttributeError as exc:  # a Twisted without them: keep its doRead
        _mark("accept", "unavailable", f"AttributeError: {exc}")
        return False
    listener.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The transport is built in one step (_server) only where it is Twisted's
    # own tcp.Server on an epoll reactor, the case _server reproduces.
    build = _server if _builds_servers(listener) else None
    listener.doRead = functools.partial(_accept, listener, build)
    _mark("accept", "on")
    return True


def _builds_servers(port: Any) -> bool:
    from twisted.internet.epollreactor import EPollReactor

    reactor = port.reactor
    if port.transport is not tcp.Server or type(reactor) is not EPollReactor:
        return False
    try:
        _ = (reactor._poller.register, reactor._reads, reactor._writes, reactor._selectables)
        _ = port._realPortNumber
    except AttributeError:
        return False
    return True


def _server(port: Any, skt: socket.socket, protocol: Any, addr: Any, session: int) -> Any:
    """``tcp.Server(skt, protocol, addr, port, session, reactor)``, reading for
    events, in one step: the same attributes (tests/test_fastpath.py compares
    them) without its chain of five initialisers, two log-prefix look-ups
    and three calls to register with epoll."""
    reactor = port.reactor
    skt.setblocking(False)
    transport = object.__new__(tcp.Server)
    kind = type(protocol)
    if kind.logPrefix is Protocol.logPrefix:
        prefix = kind.__name__  # what _getLogPrefix answers, without its two calls
    else:
        prefix = transport._getLogPrefix(protocol)
    state = vars(transport)
    state.update(
        reactor=reactor,
        _tempDataBuffer=[],
        _tempDataLen=0,
        socket=skt,
        fileno=skt.fileno,
        protocol=protocol,
        server=port,
        client=addr,
        sessionno=session,
        hostname=addr[0],
        logstr=f"{prefix},{session},{addr[0]}",
        repstr=f"<{type(protocol).__name__} #{session} on {port._realPortNumber}>",
    )
    if len(addr) != 2:
        state["_addressType"] = address.IPv6Address
    fd = skt.fileno()
    if fd in reactor._reads or fd in reactor._writes:
        transport.startReading()  # a descriptor the reactor still knows: its own rules
    else:
        # startReading() for a descriptor epoll has not seen: EPollReactor._add.
        reactor._poller.register(fd, select.EPOLLIN)
        reactor._reads.add(fd)
        reactor._selectables[fd] = transport
    state["connected"] = 1
    return transport


def _accept(port: Any, build: Callable[..., Any] | None) -> None:
    """``tcp.Port.doRead`` for the common case: see the module's ``accept``."""
    listening = port.socket
    family = port.addressFamily
    kind = port.socketType
    factory = port.factory
    budget = port.numberAccepts
    accepted = 0
    while accepted < budget:
        try:
            fd, addr = listening._accept()
        except BlockingIOError:
            break
        except OSError:
            # EMFILE, ENOBUFS, ECONNABORTED...: Twisted's doRead meets the same
            # condition again and deals with it as it always has.
            type(port).doRead(port)
            return
        accepted += 1
        skt = socket.socket(family, kind, 0, fd)
        if len(addr) == 4:
            # IPv6: the scope id in the host, as Twisted's doRead gives it.
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = (host[0], *addr[1:])
        transport = None
        try:
            protocol = factory.buildProtocol(None)
            if protocol is None:  # the factory refuses the connection
                skt.close()
                continue
            session = port.sessionno
            port.sessionno = session + 1
            if build is not None:
                transport = build(port, skt, protocol, addr, session)
            else:
                transport = port.transport(skt, protocol, addr, port, session, port.reactor)
            transport.nodelay_set = True  # inherited from the listening socket
            protocol.makeConnection(transport)
        except Exception:
            # Logged, as Twisted's doRead does; a transport, once made, owns the socket.
            _dispatch_log.failure("could not set up an accepted connection")
            if transport is None:
                skt.close()
    # As Twisted's: a full budget means more may be waiting next time.
    port.numberAccepts = budget + 20 if accepted == budget else max(1, accepted)
