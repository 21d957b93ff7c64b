"""Every place the gateway goes beneath Twisted's public API, in one list.

:data:`COPIES` names each Twisted function or method we copy or replace
(our version does its work, or part of it, in its own code), with the
fingerprint of the Twisted source it was reviewed against, per Twisted
release. :data:`PRIVATE` names each private Twisted name we read or write.
Each entry names the fastpath fix (fastpath.py) that switches our side off,
where there is one; ``RUNNER_GATEWAY_FASTPATH=off`` switches them all.

tests/test_reaches.py fingerprints the installed Twisted's originals: when
one differs from every fingerprint here, the test fails naming our copy to
review. Once reviewed (and our copy brought in line), add the new
fingerprint under the new release (``python -m runner_gateway.edge.reaches``
prints them all for the installed Twisted).

To add a reviewed Twisted release: add it to :data:`REVIEWED`, install it,
compare each changed original with our copy, and add the printed
fingerprints to the entries whose original changed.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COPIES",
    "FINGERPRINTS",
    "PRIVATE",
    "REVIEWED",
    "Copy",
    "Private",
    "fingerprint",
    "resolve",
]

# The Twisted releases every entry below was reviewed against.
REVIEWED = ("26.4.0", "26.10.0")


@dataclass(frozen=True)
class Copy:
    """A Twisted function or method (``original``) whose work ``ours`` does in
    its own code: when the original changes, ours may need to change too."""

    original: str  # "module:qualified.name"
    ours: str  # "module:qualified.name" (or a module-level name)
    fix: str  # the fastpath fix that switches ours off

    def reviewed(self) -> dict[str, str]:
        """The original's fingerprint in each reviewed release."""
        return {
            release: table[self.original]
            for release, table in FINGERPRINTS.items()
            if self.original in table
        }


@dataclass(frozen=True)
class Private:
    """A private Twisted name we read or write (``how``), and where."""

    name: str  # "module:qualified.name"; an instance attribute as "Class().attribute"
    how: str  # read, write, call, import
    where: str  # our module(s)
    fix: str | None  # the fix that switches the use off; None: always used (see note)
    note: str = ""


def fingerprint(obj: Any) -> str:
    """A short hash of ``obj``'s source: dedented, trailing spaces and blank
    lines dropped (so re-indenting is not a change), everything else kept."""
    source = textwrap.dedent(inspect.getsource(obj))
    lines = [line.rstrip() for line in source.splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def resolve(path: str) -> Any:
    """The object ``module:qualified.name`` names."""
    module, _, qualified = path.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualified.split("."):
        # A module by getattr (twisted.web.http is a deprecation proxy), a
        # class's own attribute as stored (not a bound or wrapped one).
        found = (
            getattr(found, part)
            if inspect.ismodule(found) or not inspect.isclass(found)
            else inspect.getattr_static(found, part)
        )
        if isinstance(found, (staticmethod, classmethod)):
            found = found.__func__
    return found


_CH = "runner_gateway.edge.site:_ChannelCopies."
_WH = "runner_gateway.edge.site:_WholeHeadCopies."
_RQ = "runner_gateway.edge.site:_RequestCopies."
_SC = "runner_gateway.edge.site:_SiteCopies."
_FP = "runner_gateway.edge.fastpath:"

COPIES: tuple[Copy, ...] = (
    # -- fix "request": twisted.web's Request
    Copy("twisted.web.server:Request.__init__", _RQ + "__init__", "request"),
    Copy("twisted.web.http:Request.__init__", _RQ + "__init__", "request"),
    Copy("twisted.python.components:Componentized.__init__", _RQ + "__init__", "request"),
    Copy("twisted.web.http:Request.setHost", _RQ + "host", "request"),
    Copy("twisted.web.http:Request.__hash__", _RQ + "__hash__", "request"),
    Copy("twisted.web.server:Request.gotLength", _RQ + "gotLength", "request"),
    Copy("twisted.web.http:Request.gotLength", _RQ + "gotLength", "request"),
    Copy("twisted.web.http:Request.handleContentChunk", _RQ + "handleContentChunk", "request"),
    Copy("twisted.web.server:Request.process", _RQ + "process", "request"),
    Copy("twisted.web.server:Request.write", _RQ + "write", "request"),
    Copy("twisted.web.http:Request.write", _RQ + "write", "request"),
    Copy("twisted.web.http:Request.isSecure", _RQ + "isSecure", "request"),
    Copy("twisted.web.server:Site.getResourceFor", _SC + "getResourceFor", "request"),
    # -- fix "channel": twisted.web's HTTPChannel, Site and the timeout mixin
    Copy("twisted.web.server:Site.buildProtocol", _SC + "buildProtocol", "channel"),
    Copy("twisted.web.http:HTTPFactory.buildProtocol", _SC + "buildProtocol", "channel"),
    Copy("twisted.internet.protocol:Factory.buildProtocol", _SC + "buildProtocol", "channel"),
    Copy("twisted.web.http:HTTPChannel.requestDone", _CH + "requestDone", "channel"),
    Copy("twisted.web.http:HTTPChannel.allHeadersReceived", _CH + "allHeadersReceived", "channel"),
    Copy("twisted.web.http:HTTPChannel.connectionMade", _CH + "connectionMade", "channel"),
    Copy("twisted.web.http:HTTPChannel.getHost", _CH + "getHost", "channel"),
    Copy("twisted.web.http:HTTPChannel.getPeer", _CH + "getPeer", "channel"),
    Copy("twisted.internet.tcp:Server.getPeer", _CH + "getPeer", "channel"),
    Copy("twisted.protocols.policies:TimeoutMixin.setTimeout", _CH + "setTimeout", "channel"),
    Copy("twisted.protocols.policies:TimeoutMixin.resetTimeout", _CH + "resetTimeout", "channel"),
    Copy(
        "twisted.internet.abstract:FileDescriptor.registerProducer",
        _CH + "connectionMade",
        "channel",
    ),
    # -- fix "whole-head": HTTPChannel's line-by-line parser, taken in one pass
    Copy("twisted.web.http:HTTPChannel.lineReceived", _WH + "_take_head", "whole-head"),
    Copy("twisted.web.http:HTTPChannel.headerReceived", _WH + "_take_head", "whole-head"),
    Copy(
        "twisted.web.http:HTTPChannel.allContentReceived",
        _WH + "_all_content_received",
        "whole-head",
    ),
    Copy("twisted.web.http:HTTPChannel.dataReceived", _WH + "dataReceived", "whole-head"),
    Copy("twisted.web.http:HTTPChannel.rawDataReceived", _WH + "_take_head", "whole-head"),
    Copy("twisted.web.http:HTTPChannel._finishRequestBody", _WH + "_take_head", "whole-head"),
    Copy(
        "twisted.web.http:_IdentityTransferDecoder.dataReceived", _WH + "_take_head", "whole-head"
    ),
    Copy("twisted.protocols.basic:LineReceiver.dataReceived", _WH + "_take_head", "whole-head"),
    Copy(
        "twisted.web.http:_parseRequestLine", "runner_gateway.edge.site:_WHOLE_HEAD", "whole-head"
    ),
    Copy(
        "twisted.web.http_headers:_NameEncoder.encode",
        "runner_gateway.edge.site:_WHOLE_HEAD",
        "whole-head",
    ),
    # -- fix "hold": the response head written into the held pieces
    Copy(
        "twisted.web.http:HTTPChannel.writeHeaders",
        "runner_gateway.edge.site:_HoldCopies.writeHeaders",
        "hold",
    ),
    # -- fix "send-now": a write sent at once when nothing is queued
    Copy("twisted.internet.abstract:FileDescriptor.write", _FP + "write_now", "send-now"),
    # -- fix "date": Twisted's Date text, kept for the second it names
    Copy("twisted.web.http:datetimeToString", _FP + "_date", "date"),
    # -- fix "content-type": the media type cached by the raw header value
    Copy("twisted.web.http:_parseContentType", _FP + "_content_type", "content-type"),
    # -- fix "linger-drain": a lingering connection's reads dropped by the kernel,
    # put on the tcp.Server instance (its public doRead) for the lingering close only
    Copy(
        "twisted.internet.tcp:Connection.doRead",
        "runner_gateway.edge.site:_Drain.__call__",
        "linger-drain",
    ),
    Copy(
        "twisted.internet.tcp:Connection._dataReceived",
        "runner_gateway.edge.site:_Drain.__call__",
        "linger-drain",
    ),
)

PRIVATE: tuple[Private, ...] = (
    Private(
        "twisted.web.http_headers:_nameEncoder",
        "call",
        "fastpath",
        None,
        "its encode and _canonicalHeaderCache when present; else Headers' public API",
    ),
    Private(
        "twisted.web.http_headers:Headers._rawHeaders",
        "read, write",
        "site, auth, tree, proxy",
        "request",
        "auth, tree and proxy read it always (checked to be keyed by canonical name)",
    ),
    Private("twisted.web.http:_parseRequestLine", "call", "site", "whole-head"),
    Private("twisted.web.http:_IdentityTransferDecoder", "read, write", "site", "whole-head"),
    Private("twisted.web.http:_getContentFile", "call", "site", "request"),
    Private("twisted.web.http:_parseContentType", "write", "fastpath", "content-type"),
    Private("twisted.web.http:HTTPChannel().__first_line", "read, write", "site", "whole-head"),
    Private(
        "twisted.web.http:HTTPChannel()._receivedHeaderSize", "read, write", "site", "whole-head"
    ),
    Private(
        "twisted.web.http:HTTPChannel()._receivedHeaderSize",
        "read",
        "site",
        None,
        "GatewayChannel.lineReceived: 431 for a head over totalHeadersSize (absent: Twisted's 400)",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._handlingRequest",
        "read",
        "site",
        None,
        "GatewayChannel._watch_head: a body still coming, for server.bodyMinRate "
        "(absent: no rate check)",
    ),
    Private(
        "twisted.protocols.basic:LineReceiver._busyReceiving",
        "read",
        "site",
        None,
        "the bare-LF check waits while LineReceiver's loop runs (absent: checked every read)",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._receivedHeaderCount", "read, write", "site", "whole-head"
    ),
    Private("twisted.web.http:HTTPChannel()._transferDecoder", "read, write", "site", "whole-head"),
    Private(
        "twisted.web.http:HTTPChannel._maybeChooseTransferDecoder", "call", "site", "whole-head"
    ),
    Private(
        "twisted.web.http:HTTPChannel._respondToBadRequestAndDisconnect",
        "call",
        "site",
        "whole-head",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._command/_path/_version",
        "read, write",
        "site",
        "whole-head",
        "also read by the channel fix's allHeadersReceived",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._command/_path",
        "read",
        "site",
        None,
        "the head check (GatewayChannel._check_head) reads the request line there; "
        "without them (AttributeError) it checks nothing and the render decides, as before",
    ),
    Private(
        "twisted.web.http:HTTPChannel().length",
        "read, write",
        "site",
        None,
        "a request refused on its head: length 0 makes Twisted's lineReceived (and "
        "_take_head) end the request at its head; tests/test_head_check.py checks both paths",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._dataBuffer",
        "read, write",
        "site",
        "whole-head",
        "and channel (requestDone)",
    ),
    Private(
        "twisted.web.http:HTTPChannel()._handlingRequest",
        "write",
        "site",
        "whole-head",
        "and channel (requestDone)",
    ),
    Private("twisted.web.http:HTTPChannel()._savedTimeOut", "read, write", "site", "channel"),
    Private("twisted.web.http:HTTPChannel()._networkProducer", "read, write", "site", "channel"),
    Private("twisted.web.http:HTTPChannel()._waitingForTransport", "read", "site", "channel"),
    Private("twisted.web.http:HTTPChannel._send100Continue", "call", "site", "channel"),
    Private(
        "twisted.protocols.basic:LineReceiver._buffer",
        "read, write",
        "site",
        None,
        "the header deadline reads it (a head still coming); whole-head writes it; "
        "the lingering close empties it",
    ),
    Private(
        "twisted.protocols.basic:LineReceiver._busyReceiving", "read, write", "site", "whole-head"
    ),
    Private(
        "twisted.web.server:Request._disconnected/_inFakeHead/_encoder",
        "read",
        "site",
        "request",
        "workers reads _disconnected always (its /metrics merge page)",
    ),
    Private("twisted.web.http:Request._forceSSL", "read", "site", "request"),
    Private("twisted.web.server:Request._handleStar", "call", "site", "request"),
    Private("twisted.python.components:Componentized()._adapterCache", "write", "site", "request"),
    Private(
        "twisted.web.http:Request()._parsePOSTFormSubmission",
        "write",
        "site",
        "request",
        "set False; the Site is built with parsePOSTFormSubmission=False (public)",
    ),
    Private(
        "twisted.internet.tcp:Server._addressType",
        "read, write",
        "site, fastpath",
        "channel",
    ),
    Private(
        "twisted.internet.abstract:FileDescriptor()._tempDataBuffer/_tempDataLen",
        "read, write",
        "fastpath",
        "send-now",
    ),
    Private(
        "twisted.internet.abstract:FileDescriptor()._writeDisconnected",
        "read",
        "fastpath",
        "send-now",
    ),
    Private(
        "twisted.internet.epollreactor:EPollReactor()._reads",
        "read",
        "site",
        "channel",
        "requestDone: is the connection registered for reading (if absent: Twisted's path)",
    ),
    Private(
        "twisted.web._newclient:ParseError",
        "import",
        "proxy",
        None,
        "the error Twisted's client raises on a bad response, caught by the proxy",
    ),
    Private(
        "twisted.web.client:_HTTP11ClientFactory",
        "import",
        "service",
        None,
        "the runner health probe's quiet client factory",
    ),
)

# Each reviewed release's fingerprint of every original in COPIES
# (python -m runner_gateway.edge.reaches prints this block for the installed Twisted).
FINGERPRINTS: dict[str, dict[str, str]] = {
    "26.4.0": {
        "twisted.web.server:Request.__init__": "cd00415f94b995d0",
        "twisted.web.http:Request.__init__": "065540faa28734d6",
        "twisted.python.components:Componentized.__init__": "99913be6faf5d06f",
        "twisted.web.http:Request.setHost": "11c0489f1575af71",
        "twisted.web.http:Request.__hash__": "79304f01750d3ab9",
        "twisted.web.server:Request.gotLength": "ab7d297d2d67879a",
        "twisted.web.http:Request.gotLength": "69ff5c95eb9b447c",
        "twisted.web.http:Request.handleContentChunk": "1f15638faa588612",
        "twisted.web.server:Request.process": "db18c42c7ec86beb",
        "twisted.web.server:Request.write": "fba9d046ed2fa9f3",
        "twisted.web.http:Request.write": "b351e86ed6d3c09a",
        "twisted.web.http:Request.isSecure": "1b9850e23241a229",
        "twisted.web.server:Site.getResourceFor": "732908ec17003454",
        "twisted.web.server:Site.buildProtocol": "cfcc8dce2aa0c6f1",
        "twisted.web.http:HTTPFactory.buildProtocol": "bfa352ee536498f5",
        "twisted.internet.protocol:Factory.buildProtocol": "c12a1ab947b898f1",
        "twisted.web.http:HTTPChannel.requestDone": "fc93f1ef8d7d4d05",
        "twisted.web.http:HTTPChannel.allHeadersReceived": "8afcc534b745a1c5",
        "twisted.web.http:HTTPChannel.connectionMade": "94a20e4db8deb8ac",
        "twisted.web.http:HTTPChannel.getHost": "caeb48e292bf90fe",
        "twisted.web.http:HTTPChannel.getPeer": "4b0c5d206ba54c5e",
        "twisted.internet.tcp:Server.getPeer": "dbce0841099e71b2",
        "twisted.protocols.policies:TimeoutMixin.setTimeout": "0363683592ba526f",
        "twisted.protocols.policies:TimeoutMixin.resetTimeout": "a0ee7c940598d014",
        "twisted.internet.abstract:FileDescriptor.registerProducer": "716132373cf92eca",
        "twisted.web.http:HTTPChannel.lineReceived": "3f8e3a1686d7b58e",
        "twisted.web.http:HTTPChannel.headerReceived": "54efb6efa5d63488",
        "twisted.web.http:HTTPChannel.allContentReceived": "cf65a28eee09ef85",
        "twisted.web.http:HTTPChannel.dataReceived": "3be6180306c76eeb",
        "twisted.web.http:HTTPChannel.rawDataReceived": "4d0c5b2ee7df2ad0",
        "twisted.web.http:HTTPChannel._finishRequestBody": "8a80107f2b403086",
        "twisted.web.http:_IdentityTransferDecoder.dataReceived": "ca5e71a027b7f083",
        "twisted.protocols.basic:LineReceiver.dataReceived": "3049f85c0923a862",
        "twisted.web.http:_parseRequestLine": "314777bc298487a0",
        "twisted.web.http_headers:_NameEncoder.encode": "f19a87a14bbb4abf",
        "twisted.web.http:HTTPChannel.writeHeaders": "6e56c0c151a310f4",
        "twisted.internet.abstract:FileDescriptor.write": "9e7a31e75773af52",
        "twisted.web.http:datetimeToString": "c4583cb31dce357a",
        "twisted.web.http:_parseContentType": "77abec6adf27ed61",
        "twisted.internet.tcp:Connection.doRead": "1b1152972fa10715",
        "twisted.internet.tcp:Connection._dataReceived": "19431c997e63a1fe",
    },
    "26.10.0": {
        "twisted.web.server:Request.__init__": "cd00415f94b995d0",
        "twisted.web.http:Request.__init__": "065540faa28734d6",
        "twisted.python.components:Componentized.__init__": "99913be6faf5d06f",
        "twisted.web.http:Request.setHost": "11c0489f1575af71",
        "twisted.web.http:Request.__hash__": "79304f01750d3ab9",
        "twisted.web.server:Request.gotLength": "ab7d297d2d67879a",
        "twisted.web.http:Request.gotLength": "69ff5c95eb9b447c",
        "twisted.web.http:Request.handleContentChunk": "1f15638faa588612",
        "twisted.web.server:Request.process": "db18c42c7ec86beb",
        "twisted.web.server:Request.write": "fba9d046ed2fa9f3",
        "twisted.web.http:Request.write": "b351e86ed6d3c09a",
        "twisted.web.http:Request.isSecure": "1b9850e23241a229",
        "twisted.web.server:Site.getResourceFor": "732908ec17003454",
        "twisted.web.server:Site.buildProtocol": "cfcc8dce2aa0c6f1",
        "twisted.web.http:HTTPFactory.buildProtocol": "bfa352ee536498f5",
        "twisted.internet.protocol:Factory.buildProtocol": "c12a1ab947b898f1",
        "twisted.web.http:HTTPChannel.requestDone": "fc93f1ef8d7d4d05",
        "twisted.web.http:HTTPChannel.allHeadersReceived": "8afcc534b745a1c5",
        "twisted.web.http:HTTPChannel.connectionMade": "94a20e4db8deb8ac",
        "twisted.web.http:HTTPChannel.getHost": "caeb48e292bf90fe",
        "twisted.web.http:HTTPChannel.getPeer": "4b0c5d206ba54c5e",
        "twisted.internet.tcp:Server.getPeer": "dbce0841099e71b2",
        "twisted.protocols.policies:TimeoutMixin.setTimeout": "0363683592ba526f",
        "twisted.protocols.policies:TimeoutMixin.resetTimeout": "a0ee7c940598d014",
        "twisted.internet.abstract:FileDescriptor.registerProducer": "c5bd1468e015248a",
        "twisted.web.http:HTTPChannel.lineReceived": "3f8e3a1686d7b58e",
        "twisted.web.http:HTTPChannel.headerReceived": "756f165ad5d22d51",
        "twisted.web.http:HTTPChannel.allContentReceived": "cf65a28eee09ef85",
        "twisted.web.http:HTTPChannel.dataReceived": "3be6180306c76eeb",
        "twisted.web.http:HTTPChannel.rawDataReceived": "4d0c5b2ee7df2ad0",
        "twisted.web.http:HTTPChannel._finishRequestBody": "8a80107f2b403086",
        "twisted.web.http:_IdentityTransferDecoder.dataReceived": "ca5e71a027b7f083",
        "twisted.protocols.basic:LineReceiver.dataReceived": "3049f85c0923a862",
        "twisted.web.http:_parseRequestLine": "314777bc298487a0",
        "twisted.web.http_headers:_NameEncoder.encode": "f19a87a14bbb4abf",
        "twisted.web.http:HTTPChannel.writeHeaders": "6e56c0c151a310f4",
        "twisted.internet.abstract:FileDescriptor.write": "9e7a31e75773af52",
        "twisted.web.http:datetimeToString": "c4583cb31dce357a",
        "twisted.web.http:_parseContentType": "77abec6adf27ed61",
        "twisted.internet.tcp:Connection.doRead": "d7864ba3ba2d236b",
        "twisted.internet.tcp:Connection._dataReceived": "14f89f05f87abd28",
    },
}


def main() -> None:
    """Print the installed Twisted's fingerprint of every original, for this table."""
    import twisted

    print(f'    "{twisted.__version__}": {{')
    for original in dict.fromkeys(copy.original for copy in COPIES):
        print(f'        "{original}": "{fingerprint(resolve(original))}",')
    print("    },")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
