"""Plain HTTP sent to the TLS port gets a 400 saying to use https (as nginx does).

Without this, an ``http://`` URL pointed at the TLS port gets an empty reply
(OpenSSL drops what is not a TLS record). The guard is the transport's
protocol until the first bytes arrive: a TLS record (0x16, a handshake) hands
the connection to the TLS protocol for good (``transport.protocol`` is
swapped, so later reads do not pass through here); a request line (a letter,
as every HTTP method starts) gets the 400 and the connection is closed.

The TLS protocol is connected at once, as without the guard, so the HTTP
channel's timers run from the accept as before and a silent client is still
closed by them.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["PLAIN_HTTP_RESPONSE", "HTTPSOnlyEndpoint", "refuse_plain_http"]

_BODY = b"400 Bad Request: plain HTTP was sent to an HTTPS port; use https://\n"
PLAIN_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n%s" % (len(_BODY), _BODY)
)


class _Guard(Protocol):
    def __init__(self, tls: Any) -> None:
        self.tls = tls  # the TLSMemoryBIOProtocol for this connection

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        self.tls.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if data[:1].isalpha():
            transport.write(PLAIN_HTTP_RESPONSE)
            transport.loseConnection()
            return
        transport.protocol = self.tls  # the rest goes straight to TLS
        self.tls.dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.tls.connectionLost(reason)


class _GuardFactory(Factory):
    noisy = False

    def __init__(self, tls_factory: IProtocolFactory) -> None:
        self.tls_factory = tls_factory

    def doStart(self) -> None:
        self.tls_factory.doStart()

    def doStop(self) -> None:
        self.tls_factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        tls = self.tls_factory.buildProtocol(cast(IAddress, addr))  # a port always passes one
        return None if tls is None else _Guard(tls)


def refuse_plain_http(tls_factory: IProtocolFactory) -> IProtocolFactory:
    """``tls_factory`` (a TLSMemoryBIOFactory), answering plain HTTP with a 400."""
    return _GuardFactory(tls_factory)


@implementer(IStreamServerEndpoint)
class HTTPSOnlyEndpoint:
    """TLS over a TCP endpoint (as SSL4ServerEndpoint), plain HTTP refused with a 400."""

    def __init__(self, tcp: IStreamServerEndpoint, creator: Any) -> None:
        self.tcp = tcp
        self.creator = creator

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.tcp.listen(refuse_plain_http(TLSMemoryBIOFactory(self.creator, False, factory)))
