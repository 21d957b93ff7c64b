"""The differential check of the whole-head path (fastpath "whole-head")
against Twisted's own line-by-line parser, shared by tests/test_differential.py
(hypothesis, in every CI run) and bench/differential.py (a million heads).

:func:`build` makes a request head, valid or not, and what follows it, from
choices it asks ``choose`` for; :class:`Pair` feeds the same bytes, in the
same pieces, to a plain twisted.web Site's channel and to the gateway's with
the whole-head path on, and :meth:`Pair.outcome` is what each made of them:
the requests that reached the resource (method, target, version, headers,
body), the status codes sent back, and whether the connection is closing.

The gateway is stricter than Twisted (RFC 9112 framing: Host, Transfer-Encoding,
obs-fold, the target's bytes, 414/431 for long lines, a bare LF), so
:func:`check` asks that the gateway's two paths agree exactly, and that each
differs from Twisted only by refusing, by one of those rules
(:func:`assert_stricter`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import Request, Site

from runner_gateway.edge.site import GatewayChannel, GatewaySite

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]

# Over Twisted's limits (16 KiB a head, a line; 500 headers): built once.
_LONG = b"v" * 17_000
_TOO_MANY = b"".join(b"X-N: %d\r\n" % n for n in range(501))

# Each part of a head: the plain form first (what clients send), then the
# odd and the invalid (what a fast parser might get wrong). A part is odd one
# time in twelve, so about a third of the heads are plain throughout.
METHODS = (
    (b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"M-SEARCH", b"get"),
    (
        b"G@T",
        b"",
        b"GE T",
        b"GET\x00",
        b"\xc3\xa9",
        b"GET\x7f",
    ),
)
TARGETS = (
    (b"/", b"/api/chat", b"/a?b=1&c=%20", b"*", b"http://gw/x", b"/%zz", b"/\xb0"),
    (
        b"/x y",
        b"/\x7f",
        b"/\x80",
        b"/\xb1",
        b"/\xff",
        b"/\x01",
        b"/\t",
        b"",
        b"/" + b"p" * 9000,
    ),
)
VERSIONS = (
    (b"HTTP/1.1", b"HTTP/1.0"),
    (
        b"HTTP/2.0",
        b"HTTP/0.9",
        b"http/1.1",
        b"HTTP/1.1 ",
        b"HTTP/1.",
        b"HTTP/1.10",
        b"",
    ),
)
SPACES = (b" ",), (b"  ", b"\t", b"")
ENDINGS = (b"\r\n",), (b"\n", b"\r\r\n", b"\r")
FOLDS = (b"",), (b" folded", b"\tfolded", b" ", b"\t")
LEADS = (b"",), (b"\r\n", b"\n", b"\r\n\r\n", b" ")
SEPARATORS = (b": ", b":"), (b" :", b": \t", b":\t\t", b"")
BLANK = (b"\r\n",), (b"\n", b"", b"\r\r\n")
# Header names and, for each, its values: plain, then odd.
_ANY = (
    (b"gw", b"", b"abc", b"a=1; b=2", b"\tspaced \t", b"\xe9\xff", b"a\x01b", b"a\x7fb"),
    (
        b"a\x00b",
        b"a\rb",
        b"a\nb",
        _LONG,
        b"x" * 8000,
    ),
)
_LENGTH = (
    (b"0", b"2", b"4", b"5"),
    (
        b" 2 ",
        b"+2",
        b"-1",
        b"2, 2",
        b"02",
        b"2 2",
        b"0x2",
        b"\xef\xbc\x92",
        b"",
        b"99999999999999999999",
    ),
)
_CODING = (
    (b"chunked",),
    (
        b"Chunked",
        b"CHUNKED",
        b" chunked",
        b"identity",
        b"gzip",
        b"chunked, chunked",
        b"gzip, chunked",
        b"chunked;q=1",
        b"",
        b"chunked\x00",
    ),
)
HEADERS: dict[bytes, tuple[Sequence[bytes], Sequence[bytes]]] = {
    b"Host": ((b"gw", b"gw:8080"), (b"", b"a b", b"gw, other")),
    b"host": ((b"gw",), (b"",)),
    b"Content-Length": _LENGTH,
    b"content-length": _LENGTH,
    b"Transfer-Encoding": _CODING,
    b"transfer-encoding": _CODING,
    b"Connection": ((b"close", b"keep-alive", b"Keep-Alive, close"), (b"", b"upgrade")),
    b"Expect": ((b"100-continue",), (b"100-Continue", b"nothing")),
    b"X-Request-Id": ((b"abc", b"x" * 128), (b"a b", b"")),
    b"Cookie": ((b"a=1", b"a=1; b=2"), (b"", b";;")),
    b"Authorization": ((b"Bearer v4.public.x",), (b"Bearer", b"")),
    b"Content-Type": (
        (b"application/json", b"application/x-www-form-urlencoded"),
        (b"multipart/form-data; boundary=zz", b""),
    ),
    b"X-A": _ANY,
    b"x-a": _ANY,
}
ODD_NAMES = (b"Bad Name", b"Bad\x00Name", b"", b"N\xe9", b"X-A ", b" X-A", b"Tab\tName", b"X(A)")
BODIES = (
    (b"", b"ok", b"okok", b"2\r\nok\r\n0\r\n\r\n", b"0\r\n\r\n", b"a=1&b=2"),
    (
        b"zz\r\n",
        b"2\r\nok",
        b"--zz\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--zz--\r\n",
        b"2\r\nok\r\n0\r\nTrailer: x\r\n\r\n",
    ),
)
THEN = (
    (b"", b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n"),
    (
        b"GET /part",
        b"\r\n",
        b"POST /n HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        b"BAD\r\n\r\n",
    ),
)


def build(choose: Choose[Any], count: Callable[[int], int]) -> bytes:
    """A request head, valid or not, and what follows it: ``choose(options)``
    picks one option, ``count(n)`` a number from 0 to n."""

    def pick(options: tuple[Sequence[bytes], Sequence[bytes]]) -> bytes:
        plain, odd = options
        return bytes(choose(odd) if count(11) == 0 else choose(plain))

    line = pick(METHODS) + pick(SPACES) + pick(TARGETS) + pick(SPACES) + pick(VERSIONS)
    head = pick(LEADS) + line + pick(ENDINGS)
    names = list(HEADERS)
    if count(3):
        head += b"Host: gw" + pick(ENDINGS)  # most have a Host; some none, some two
    for _ in range(count(5)):
        name = bytes(choose(ODD_NAMES)) if count(15) == 0 else bytes(choose(names))
        value = pick(HEADERS.get(name, _ANY))
        head += name + pick(SEPARATORS) + value + pick(ENDINGS) + pick(FOLDS)
        if head.endswith((b" ", b"\t", b"folded")):
            head += pick(ENDINGS)
    if count(60) == 0:
        head += _TOO_MANY
    return head + pick(BLANK) + pick(BODIES) + pick(THEN)


def split(raw: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``raw`` in pieces, cut at ``cuts`` (offsets, any order, repeats dropped)."""
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


class _Record(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, ...]] = []

    def render(self, request: Request) -> bytes:
        content = request.content.read() if request.content is not None else None
        self.seen.append(
            (
                request.method,
                request.uri,
                request.clientproto,
                sorted(request.requestHeaders.getAllRawHeaders()),
                content,
                dict(request.args),
            )
        )
        return b"ok"


class Pair:
    """A plain twisted.web Site and the gateway's, each with a recording resource."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.twisted_answer, self.gateway_answer = _Record(), _Record()
        # Twisted's own: HTTPChannel and Request, no gateway code at all.
        self.twisted_site = Site(self.twisted_answer, reactor=self.clock)
        self.twisted_site._parsePOSTFormSubmission = False  # as the gateway's Site
        self.gateway_site = GatewaySite(self.gateway_answer, self.clock, max_body_size=1 << 20)

    def outcome(self, pieces: Sequence[bytes], whole_head: bool = True) -> tuple[Any, Any]:
        """(Twisted's outcome, the gateway's) for ``pieces``, read one by one."""
        results = []
        for site, answer, gateway in (
            (self.twisted_site, self.twisted_answer, False),
            (self.gateway_site, self.gateway_answer, True),
        ):
            answer.seen = []
            channel = site.buildProtocol(None)
            assert channel is not None
            if gateway:
                assert isinstance(channel, GatewayChannel)
                channel.whole_head = whole_head
            transport = StringTransport()
            channel.makeConnection(transport)
            for piece in pieces:
                if transport.disconnecting:
                    break  # a closing TCP transport reads no more
                channel.dataReceived(piece)
            sent = transport.value()
            # Every status line, also one right after a body ("okHTTP/1.1 200").
            codes = re.findall(rb"HTTP/1\.[01] (\d\d\d) ", sent)
            # Closing, or lingering before the close (a request refused on its head).
            closing = transport.disconnecting or getattr(channel, "_linger_calls", None) is not None
            results.append((answer.seen, codes, closing))
            channel.connectionLost(Failure(ConnectionDone()))
        return results[0], results[1]

    def took_whole(self, raw: bytes) -> bool:
        """Whether the gateway's channel would take ``raw``'s head in one pass."""
        channel: Any = self.gateway_site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        try:
            return bool(channel.whole_head and channel._whole_head_end(raw) > 0)
        finally:
            channel.connectionLost(Failure(ConnectionDone()))


def check(pair: Pair, rng: random.Random) -> bool:
    """One head from ``rng``, two thirds of the time in one read up to its end:
    the gateway must make of it what Twisted makes of it. True when the
    gateway's channel took the head in one pass."""
    raw = build(rng.choice, lambda n: rng.randint(0, n))
    end = raw.find(b"\r\n\r\n") + 4
    if rng.randrange(3):
        cuts = [rng.randint(end, len(raw)) for _ in range(rng.randint(0, 2))]
    else:
        cuts = [rng.randint(0, len(raw)) for _ in range(rng.randint(0, 4))]
    pieces = split(raw, cuts)
    twisted, gateway = pair.outcome(pieces)
    _, lines = pair.outcome(pieces, whole_head=False)
    shown = f"\n pieces:  {pieces!r}\n twisted: {twisted!r}\n gateway: {gateway!r}"
    # The gateway's two parsing paths agree exactly: the strict framing rules
    # (runner_gateway/edge/framing.py, 414/431, bare LF) apply to both.
    assert gateway == lines, shown + f"\n line by line: {lines!r}"
    assert_stricter(twisted, gateway, shown)
    return pair.took_whole(pieces[0])


STRICT_CODES = (b"400", b"414", b"431")


def assert_stricter(twisted: Any, gateway: Any, shown: str = "") -> None:
    """The gateway makes of a head what Twisted makes of it, or it refuses
    (400, 414, 431) and closes where Twisted did not, by a framing rule of its
    own: what it passed on before that, Twisted passed on the same way."""
    if gateway == twisted:
        return
    seen, codes, closing = gateway
    assert seen == twisted[0][: len(seen)], shown
    assert closing, shown
    # The same answers up to the last, a refusal: a 400/414/431 of its own,
    # or the tree's 4xx (405 for "*", say) to a request refused on its head,
    # answered at once (without a 100 Continue, where Twisted may still be
    # waiting for the body), on a connection then closed.
    ours = [code for code in codes if code != b"100"]
    theirs = [code for code in twisted[1] if code != b"100"]
    assert ours and ours[:-1] == theirs[: len(ours) - 1], shown
    assert ours[-1] in STRICT_CODES or ours[-1].startswith(b"4"), shown
