"""Hot-path fixes found by profiling (docs/benchmarks.md), installed once per process.

Each fix replaces something Twisted does on every request with an
equivalent that gives the same result for less work:

* ``content-type``: ``twisted.web.http._parseContentType`` builds an
  ``email.message.EmailMessage`` for every POST to find the media type, and
  the email package's header registry creates a new *class* on each header
  lookup. A POST's Content-Type is almost always one of a few values, so the
  parsed media type is cached by the raw header value (bounded; the function
  is pure: bytes in, bytes out).
* ``agent-endpoint``: ``twisted.web.client.Agent`` builds a new
  ``HostnameEndpoint`` (IDNA-encoding the host each time) for every request,
  even when the pool then hands out a kept-alive connection. Endpoints are
  reusable descriptions of where to connect, so each Agent keeps the one it
  built per (scheme, host, port). A new settings generation builds new
  Agents, so upstream TLS settings changes still take effect.
* ``send-now``: a write to a Twisted TCP transport is only queued; the
  ``send()`` happens on the reactor's next turn, after an epoll call to
  watch for writability and before another to stop. :func:`write_now` hands
  the bytes to the kernel at once when nothing is queued on a plain (not
  TLS) TCP connection, as asyncio's transports do; what the kernel does not
  take, and every other transport, goes through ``transport.write``, so
  ordering and flow control are Twisted's. The proxy uses it for the request
  to the runner and for each batch of response bytes to the client.

``RUNNER_GATEWAY_FASTPATH=off`` (or a comma-separated list of fix names to
leave out) keeps Twisted's own code: the benchmark suite uses it to measure
each fix's effect in the same run. No other use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

__all__ = ["FIXES", "install", "installed", "write_now"]

_installed: set[str] = set()


def _content_type() -> None:
    from twisted.web import http

    original: Callable[[bytes], bytes] = http._parseContentType
    if getattr(original, "cache_info", None) is not None:
        return
    http._parseContentType = functools.lru_cache(maxsize=256)(original)


_ENDPOINTS_MAX = 64  # per Agent; one runner needs one


def _agent_endpoint() -> None:
    from twisted.web.client import Agent

    original = Agent._getEndpoint
    if getattr(original, "_runner_gateway_cached", False):
        return

    def _getEndpoint(self: Agent, uri: Any) -> Any:
        cache: dict[tuple[bytes, bytes, int], Any] = self.__dict__.setdefault(
            "_runner_gateway_endpoints", {}
        )
        key = (uri.scheme, uri.host, uri.port)
        endpoint = cache.get(key)
        if endpoint is None:
            if len(cache) >= _ENDPOINTS_MAX:
                cache.clear()
            endpoint = cache[key] = original(self, uri)
        return endpoint

    _getEndpoint._runner_gateway_cached = True  # type: ignore[attr-defined]
    Agent._getEndpoint = _getEndpoint  # type: ignore[method-assign]


_TCP_TRANSPORTS: tuple[type, ...] = ()  # empty until send-now is installed


def _send_now() -> None:
    global _TCP_TRANSPORTS
    from twisted.internet import abstract, tcp

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


FIXES: dict[str, Callable[[], None]] = {
    "send-now": _send_now,
    "content-type": _content_type,
    "agent-endpoint": _agent_endpoint,
}


def installed() -> frozenset[str]:
    return frozenset(_installed)


def install(environ: dict[str, str] | None = None) -> frozenset[str]:
    """Install every fix not switched off by RUNNER_GATEWAY_FASTPATH; idempotent."""
    env = os.environ if environ is None else environ
    setting = env.get("RUNNER_GATEWAY_FASTPATH", "").strip().lower()
    skip = set(FIXES) if setting == "off" else {s.strip() for s in setting.split(",") if s}
    for name, fix in FIXES.items():
        if name not in skip and name not in _installed:
            try:
                fix()
            except AttributeError:
                # A Twisted release without the internal this fix wraps:
                # keep Twisted's own code rather than fail to start.
                continue
            _installed.add(name)
    return installed()
