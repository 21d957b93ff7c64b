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
Twisted (runner_gateway/edge/reaches.py lists them) is left off: Twisted's own
code serves, one warning says which fix and why, and
``runner_gateway_fastpath_info{fix,state}`` (metrics.py) shows it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.web import http_headers

_log = Logger(namespace="runner_gateway.edge.fastpath")

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
        return set(FIXES)
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
