"""Hot-path fixes (fastpath.py, logs.py): same results as the code they replace."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.web import http

from runner_gateway import fastpath
from runner_gateway.logs import (
    ACCESS_FORMAT,
    ACCESS_NAMESPACE,
    _encode,
    _json_line,
    _LevelFilter,
    _message,
    _text_line,
    _when,
    access_line,
    access_message,
    scrub,
    twisted_level,
)
from runner_gateway.service import _LevelControl
from runner_gateway.workers import _WorkerLogControl

_PROBE = (
    "from runner_gateway import fastpath; from twisted.web import http; "
    "print(sorted(fastpath.install()), hasattr(http._parseContentType, 'cache_info'))"
)


@pytest.mark.parametrize(
    ("switch", "expected"),
    [
        ("off", "[] False"),
        ("content-type", "['date', 'send-now', 'whole-head'] False"),
        ("send-now", "['content-type', 'date', 'whole-head'] True"),
        ("whole-head", "['content-type', 'date', 'send-now'] True"),
        ("date", "['content-type', 'send-now', 'whole-head'] True"),
        ("", "['content-type', 'date', 'send-now', 'whole-head'] True"),
    ],
)
def test_switch_leaves_fixes_out(switch: str, expected: str) -> None:
    """In a fresh interpreter: what RUNNER_GATEWAY_FASTPATH names is not installed."""
    env = {**os.environ, "RUNNER_GATEWAY_FASTPATH": switch}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


def test_install_is_idempotent() -> None:
    installed = fastpath.install({})
    assert installed == frozenset(fastpath.FIXES)
    assert fastpath.install({}) == installed  # a second call patches nothing twice
    assert hasattr(http._parseContentType, "cache_info")


@pytest.mark.parametrize(
    ("raw", "media_type"),
    [
        (b"application/json", b"application/json"),
        (b"Application/JSON; charset=utf-8", b"application/json"),
        (b"multipart/form-data; boundary=xyz", b"multipart/form-data"),
        (b"application/x-www-form-urlencoded", b"application/x-www-form-urlencoded"),
        (b"nonsense", b"text/plain"),
    ],
)
def test_cached_content_type_parses_like_twisted(raw: bytes, media_type: bytes) -> None:
    fastpath.install({})
    original = http._parseContentType.__wrapped__  # type: ignore[attr-defined]
    assert http._parseContentType(raw) == original(raw) == media_type
    assert http._parseContentType(raw) == media_type  # and from the cache


def test_date_is_formatted_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date header Request.process sets: Twisted's text for the current second."""
    from twisted.web import server

    fastpath.install({})
    original = http.datetimeToString
    cached = server.datetimeToString  # type: ignore[attr-defined]
    assert cached is not original
    now = [1_800_000_000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    first = cached()
    assert first == original(1_800_000_000.25) == b"Fri, 15 Jan 2027 08:00:00 GMT"
    now[0] = 1_800_000_000.9
    assert cached() == first  # the same second: the same text
    now[0] = 1_800_000_001.0
    assert cached() == original(1_800_000_001) == b"Fri, 15 Jan 2027 08:00:01 GMT"
    assert cached(86400.0) == original(86400.0)  # an explicit time is formatted as asked


def _event(fmt: Any, **fields: Any) -> dict[str, Any]:
    return {
        "log_format": fmt,
        "log_level": LogLevel.info,
        "log_namespace": "t",
        "log_time": time.time(),
        **fields,
    }


@pytest.mark.parametrize(
    "event",
    [
        _event("{method} {path} {status} {bytes}B", method="POST", path="/x", status=200, bytes=3),
        _event("{a!r} {b:>5} {c[0]} {d.real}", a="q", b="r", c=[1], d=2),
        _event("n={n} ({n} runner(s))", n=2),  # "(": Twisted's own code path
        _event("{missing}"),
        _event(None),
        _event("{{literal}} {x}", x=b"\xff"),
    ],
)
def test_message_matches_format_event(event: dict[str, Any]) -> None:
    assert _message(event) == formatEvent(event)


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("GET /api/tags 200 17B 0.5ms runner=r0 sub=alice", None),
        ("Authorization: Bearer abcdefgh12345678", "Authorization: [redacted]"),
        ("BeArEr abcdefgh12345678", "[redacted]"),  # no "." anywhere: was missed before
        ("token v4.public.eyJzdWIiOiJib2IifQ rest", "token [redacted] rest"),
        ("k4.secret.AAAAAAAAAAAAAAAAAAAA", "[redacted]"),
        ("k4.local.AAAAAAAAAAAAAAAAAAAA", "[redacted]"),
    ],
)
def test_scrub(text: str, scrubbed: str | None) -> None:
    assert scrub(text) == (text if scrubbed is None else scrubbed)


@pytest.mark.parametrize(
    "when",
    [0.0, 0.0005, 0.9999995, 0.9999994999, 1.9999999, 1764149000.9999996, 1764149000.123, -0.5],
)
def test_timestamp_matches_datetime(when: float) -> None:
    expected = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    assert _when(when) == expected.replace("+00:00", "Z")
    assert _when(when + 0.25) == (
        datetime.fromtimestamp(when + 0.25, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@given(st.floats(min_value=0, max_value=4e9))
def test_timestamp_matches_datetime_anywhere(when: float) -> None:
    expected = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    assert _when(when) == expected.replace("+00:00", "Z")


@pytest.mark.parametrize("level", ["trace", "debug", "info", "warn", "error"])
def test_level_filter_passes_what_twisted_filter_passes(level: str) -> None:
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    fast = _LevelFilter(cast(ILogObserver, ours.append), twisted_level(level))
    reference = FilteringLogObserver(
        cast(ILogObserver, theirs.append),
        [LogLevelFilterPredicate(defaultLogLevel=twisted_level(level))],
    )
    events: list[dict[str, Any]] = [
        {"log_level": lv, "log_namespace": ns}
        for lv in [*LogLevel.iterconstants(), None]
        for ns in ("runner_gateway.access", "x", "", None)
    ]
    for event in events:
        fast(dict(event))
        reference(dict(event))
    assert ours == theirs
    assert ours  # every level passes something


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(0, 1e6), st.text(max_size=20)
)


@given(
    fields=st.fixed_dictionaries(
        {
            "request_id": st.text(max_size=40),
            "client": st.text(max_size=40),
            "method": st.sampled_from(["GET", "POST", "-"]),
            "path": st.text(max_size=30),
            "runner": _FIELD_VALUES,
            "status": _FIELD_VALUES,
            "bytes": st.integers(0, 10**9),
            "duration_ms": st.floats(0, 1e6),
            "ttfb_ms": _FIELD_VALUES,
            "sub": _FIELD_VALUES,
            "model": _FIELD_VALUES,
            "aborted": st.booleans(),
        },
        optional={
            "upstream_error": st.text(max_size=10),
            "auth_failure": st.text(max_size=10),
            "prompt_tokens": _FIELD_VALUES,
            "completion_tokens": _FIELD_VALUES,
        },
    ),
    fmt=st.sampled_from(["json", "text"]),
)
def test_direct_access_line_is_the_event_line(fields: dict[str, Any], fmt: str) -> None:
    """The Site's direct access line is byte for byte what the logger event gave."""
    event = _event(ACCESS_FORMAT, fields=fields, access=access_message(fields))
    event["log_namespace"] = ACCESS_NAMESPACE
    render = _json_line if fmt == "json" else _text_line
    assert access_line(fmt, event["log_time"], ACCESS_NAMESPACE, fields) == render(event)


@pytest.mark.parametrize("worker", [False, True])
@pytest.mark.parametrize("level", ["info", "warn"])
def test_access_writer_matches_the_observer(worker: bool, level: str) -> None:
    """_LevelControl.access writes what the observer writes for the same event (workers'
    tags included), and nothing when the level hides info lines."""
    direct, via_event = io.StringIO(), io.StringIO()
    controls = []
    for stream in (direct, via_event):
        control = _WorkerLogControl(level, "json", 1) if worker else _LevelControl(level, "json")
        control.stream = stream
        control.set_level(level)
        controls.append(control)
    fields = {
        "request_id": "r1",
        "client": "192.0.2.1",
        "method": "POST",
        "path": "/api/chat",
        "runner": "ollama",
        "status": 200,
        "bytes": 10,
        "duration_ms": 1.5,
        "sub": "alice",
        "aborted": False,
    }
    controls[0].access(dict(fields))
    event = _event(ACCESS_FORMAT, fields=dict(fields), access=access_message(fields))
    event["log_namespace"] = ACCESS_NAMESPACE
    controls[1](event)
    # The timestamps differ (written a moment apart); the rest must not.
    got, want = (json.loads(s.getvalue() or "{}") for s in (direct, via_event))
    got.pop("time", None)
    want.pop("time", None)
    assert got == want
    assert bool(got) == (level == "info")
    if worker and got:
        assert got["logger"] == "runner_gateway.access/w1" and got["worker"] == 1


_RECORD_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)  # beyond 64 bits: the stdlib fallback
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None), max_size=12),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=10), _RECORD_VALUES, max_size=8))
def test_log_records_encode_as_the_stdlib_would(record: dict[str, Any]) -> None:
    """orjson (and its stdlib fallback) write the same JSON value json.dumps does."""
    line = _encode(record)
    assert "\n" not in line
    assert json.loads(line) == json.loads(json.dumps(record, default=str))


def test_log_record_fallback_and_other_types() -> None:
    assert json.loads(_encode({"s": "\ud800", "n": 2**70})) == {"s": "\ud800", "n": 2**70}
    when = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert json.loads(_encode({"t": when, "b": b"x"})) == {"t": str(when), "b": "b'x'"}


def test_dispatch_serves_and_logs_what_escapes_a_handler() -> None:
    """On a real epoll reactor of its own: bytes still flow both ways, and an
    exception that escapes an I/O handler is logged, not fatal (as Twisted's
    callWithLogger did)."""
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure

    reactor = EPollReactor()
    assert not fastpath.install_dispatch(reactor, {"RUNNER_GATEWAY_FASTPATH": "dispatch"})
    assert fastpath.install_dispatch(reactor, {})
    assert fastpath.install_dispatch(reactor, {})  # once is enough
    assert not fastpath.install_dispatch(MemoryReactorClock(), {})
    got: list[bytes] = []
    logged: list[dict[str, Any]] = []

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(data)

    class Client(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"ping")

        def dataReceived(self, data: bytes) -> None:
            got.append(data)
            assert self.transport is not None
            self.transport.loseConnection()

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            reactor.callLater(0.05, reactor.stop)  # the loop must still be running then
            raise RuntimeError("a buggy connectionLost")

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "runner_gateway.fastpath":
            logged.append(event)

    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    reactor.connectTCP(
        "127.0.0.1", port.getHost().port, cast(Any, ClientFactory.forProtocol(Client))
    )
    guard = reactor.callLater(10, reactor.stop)
    globalLogPublisher.addObserver(cast(ILogObserver, observe))
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observe))
    assert guard.active()  # stopped by the client's callLater, not the guard
    guard.cancel()
    assert got == [b"ping"]
    assert len(logged) == 1 and "a buggy connectionLost" in str(logged[0]["log_failure"].value)


def _accepting_site(reactor: Any) -> Any:
    from twisted.web import resource

    from runner_gateway.site import GatewaySite

    class Hello(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"hello"

    return GatewaySite(Hello(), reactor, max_body_size=1024)


def _pump_until(reactor: Any, done: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "the reactor did not get there in time"
        reactor.iterate(0.01)


def test_accept_serves_waiting_connections_with_nodelay() -> None:
    """On a real epoll reactor and loopback port: connections waiting together
    are all served, their sockets have TCP_NODELAY (inherited from the listening
    socket), and the accept budget grows as Twisted's does."""
    import socket

    from twisted.internet.epollreactor import EPollReactor
    from twisted.web.server import Site

    reactor = EPollReactor()
    site = _accepting_site(reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        assert not fastpath.install_accept(port, {"RUNNER_GATEWAY_FASTPATH": "accept"})
        assert not fastpath.install_accept(port, {"RUNNER_GATEWAY_FASTPATH": "off"})
        plain = reactor.listenTCP(0, Site(site.resource), interface="127.0.0.1")
        assert not fastpath.install_accept(plain, {})  # a factory that may read the address
        plain.stopListening()
        assert fastpath.install_accept(port, {})
        assert port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        address = port.getHost()
        clients = [socket.create_connection((address.host, address.port)) for _ in range(3)]
        for client in clients:
            client.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        port.numberAccepts = 3
        _pump_until(reactor, lambda: port.sessionno >= 3)
        assert port.numberAccepts == 23  # a full budget: try more next time
        answers = [b""] * len(clients)
        for client in clients:
            client.setblocking(False)

        def answered() -> bool:
            for i, client in enumerate(clients):
                with contextlib.suppress(BlockingIOError):
                    answers[i] += client.recv(4096)
            return all(a.endswith(b"hello") for a in answers)

        _pump_until(reactor, answered)
        assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(b"hello") for a in answers)
        # One more connection against a budget of 23: the budget drops back to 1.
        late = socket.create_connection((address.host, address.port))
        _pump_until(reactor, lambda: port.sessionno >= 4)
        assert port.numberAccepts == 1
        served = [t for t in reactor.getReaders() if getattr(t, "sessionno", None) is not None]
        assert served and all(
            t.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for t in served
        )
        for client in [*clients, late]:
            client.close()
    finally:
        port.stopListening()
        for reader in reactor.getReaders():
            reactor.removeReader(reader)


def test_accept_leaves_errors_to_twisted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An accept error other than "nothing waiting" goes to Twisted's doRead,
    which handles it (EMFILE and the like) as it always has."""
    import errno

    from twisted.internet import tcp
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    port = reactor.listenTCP(0, _accepting_site(reactor), interface="127.0.0.1")
    try:
        assert fastpath.install_accept(port, {})
        real = port.socket

        class Failing:
            def _accept(self) -> Any:
                raise OSError(errno.EMFILE, "Too many open files")

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        calls: list[Any] = []
        monkeypatch.setattr(tcp.Port, "doRead", lambda self: calls.append(self))
        port.socket = Failing()
        port.doRead()
        assert calls == [port]
        port.socket = real
    finally:
        port.stopListening()


def test_accept_on_ipv6_gives_twisteds_address() -> None:
    import socket

    from twisted.internet.epollreactor import EPollReactor

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    reactor = EPollReactor()
    try:
        port = reactor.listenTCP(0, _accepting_site(reactor), interface="::1")
    except Exception:
        pytest.skip("no IPv6 loopback")
    try:
        assert fastpath.install_accept(port, {})
        client = socket.create_connection(("::1", port.getHost().port))
        _pump_until(reactor, lambda: port.sessionno >= 1)
        (transport,) = [t for t in reactor.getReaders() if getattr(t, "sessionno", None) == 0]
        peer = transport.getPeer()
        assert (peer.type, peer.host, peer.port) == ("TCP", "::1", client.getsockname()[1])
        client.close()
    finally:
        port.stopListening()
        for reader in reactor.getReaders():
            reactor.removeReader(reader)


def test_accept_survives_a_factory_that_fails_or_refuses() -> None:
    """A factory that raises is logged and its socket closed; one that returns
    None has its connection closed (as Twisted's doRead); the port goes on."""
    import socket

    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import globalLogPublisher

    reactor = EPollReactor()
    site = _accepting_site(reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    logged: list[dict[str, Any]] = []
    observer = cast(ILogObserver, logged.append)
    globalLogPublisher.addObserver(observer)
    real = site.buildProtocol
    try:
        assert fastpath.install_accept(port, {})
        address = port.getHost()
        for answer in ("raise", "none"):

            def build(addr: Any, answer: str = answer) -> Any:
                if answer == "raise":
                    raise RuntimeError("a buggy factory")
                return None

            site.buildProtocol = build
            client = socket.create_connection((address.host, address.port))
            client.settimeout(5)
            _pump_until(reactor, functools.partial(_closed, client))
            client.close()
        assert any(
            "could not set up an accepted connection" in str(e.get("log_format", ""))
            for e in logged
        )
        site.buildProtocol = real
        client = socket.create_connection((address.host, address.port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        client.setblocking(False)
        got = [b""]

        def answered() -> bool:
            with contextlib.suppress(BlockingIOError):
                got[0] += client.recv(4096)
            return got[0].endswith(b"hello")

        _pump_until(reactor, answered)
        client.close()
    finally:
        globalLogPublisher.removeObserver(observer)
        port.stopListening()
        for reader in reactor.getReaders():
            reactor.removeReader(reader)


def _closed(client: Any) -> bool:
    """True once the server side has closed ``client``'s connection."""
    import select

    readable, _, _ = select.select([client], [], [], 0)
    if not readable:
        return False
    try:
        data: bytes = client.recv(1)
    except ConnectionResetError:
        return True
    return data == b""


@pytest.mark.parametrize("known", [False, True])
@pytest.mark.parametrize("peer", [("127.0.0.1", 40000), ("::1", 40000, 0, 0)])
def test_accept_builds_the_transport_twisted_would(peer: tuple[Any, ...], known: bool) -> None:
    """_server gives a tcp.Server with the attributes Twisted's __init__ gives
    (the address type for IPv6 included), reading on the reactor as
    startReading() leaves it, also for a descriptor number the reactor
    still has in its read set."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.epollreactor import EPollReactor

    from runner_gateway.site import GatewayChannel

    reactor = EPollReactor()
    port = reactor.listenTCP(0, _accepting_site(reactor), interface="127.0.0.1")
    try:
        assert fastpath._builds_servers(port)
        made = []
        for build in ("twisted", "fastpath"):
            skt = socket.socket()
            protocol = GatewayChannel()
            fd = skt.fileno()
            if known:
                reactor._reads.add(fd)
            if build == "twisted":
                transport = tcp.Server(skt, protocol, peer, port, 7, reactor)
            else:
                transport = fastpath._server(port, skt, protocol, peer, 7)
            assert type(transport) is tcp.Server
            assert not skt.getblocking()
            assert fd in reactor._reads and fd not in reactor._writes
            registered = reactor._selectables.get(fd) is transport
            assert registered is not known
            state = dict(vars(transport))
            assert state.pop("socket") is skt and state.pop("fileno")() == fd
            assert state.pop("protocol") is protocol
            made.append((state, transport.logPrefix(), repr(transport), transport.getPeer()))
            if registered:
                reactor.removeReader(transport)
            reactor._reads.discard(fd)
            skt.close()
        assert made[0] == made[1]
        assert set(made[0][0]) >= {"logstr", "repstr", "hostname", "connected"}
    finally:
        port.stopListening()


def test_accept_keeps_twisteds_transport_where_it_cannot_build_it() -> None:
    from twisted.internet import tcp
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.pollreactor import PollReactor

    epoll = EPollReactor()
    port = epoll.listenTCP(0, _accepting_site(epoll), interface="127.0.0.1")
    try:

        class Custom(tcp.Server):
            pass

        port.transport = Custom
        assert not fastpath._builds_servers(port)
    finally:
        port.stopListening()
    poll = PollReactor()
    other = poll.listenTCP(0, _accepting_site(poll), interface="127.0.0.1")
    try:
        assert not fastpath._builds_servers(other)
    finally:
        other.stopListening()


# What one reactor turn does, for the loop comparison: schedule, cancel, reset
# or delay a timed call (by index into those made so far), call from a
# thread, make a timed call that raises, or raise from the poll itself.
_loop_steps = st.lists(
    st.one_of(
        st.tuples(st.just("later"), st.sampled_from([0.0, 0.001, 0.5, 2.0, 61.0])),
        st.tuples(st.just("later-delayed"), st.sampled_from([0.0, 1.0]), st.sampled_from([0.5])),
        st.tuples(st.just("cancel"), st.integers(0, 7)),
        st.tuples(st.just("reset"), st.integers(0, 7), st.sampled_from([0.0, 0.3, 5.0])),
        st.tuples(st.just("delay"), st.integers(0, 7), st.sampled_from([0.2, 3.0])),
        st.tuples(st.just("thread"), st.just(0)),
        st.tuples(st.just("boom"), st.sampled_from([0.0, 1.0])),
        st.tuples(st.just("poll-raises"), st.just(0)),
    ),
    max_size=25,
)


def _run_loop(steps: list[tuple[Any, ...]], ours: bool, advance: list[float]) -> list[Any]:
    """Run a real EPollReactor whose clock and poll are the script's; what
    happened, in order (polls with their timeouts, calls fired, errors logged)."""
    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import globalLogPublisher

    reactor = EPollReactor()
    now = [1000.0]
    reactor.seconds = lambda: now[0]
    happened: list[Any] = []
    made: list[Any] = []
    stopping: list[bool] = []
    script = iter(list(enumerate(steps)))

    def fire(label: Any) -> None:
        happened.append(("fired", label))
        if label[0] == "boom":
            raise RuntimeError("a timed call that fails")

    def iteration(timeout: float | None) -> None:
        happened.append(("poll", timeout))
        turn = next(script, None)
        if turn is None:
            if not stopping:
                stopping.append(True)
                reactor.stop()
            return
        index, (kind, arg, *more) = turn
        now[0] += advance[index % len(advance)]
        live = [c for c in made if c.active()]
        if kind == "later":
            made.append(reactor.callLater(arg, fire, ("later", index)))
        elif kind == "later-delayed":  # put off before the loop has filed it
            made.append(reactor.callLater(arg, fire, ("later", index)))
            made[-1].delay(more[0])
        elif kind == "boom":
            made.append(reactor.callLater(arg, fire, ("boom", index)))
        elif kind == "thread":
            reactor.callFromThread(happened.append, ("thread", index))
        elif kind == "poll-raises":
            raise RuntimeError("a poll that fails")
        elif live:
            call = live[arg % len(live)]
            if kind == "cancel":
                call.cancel()
            elif kind == "reset":
                call.reset(more[0])
            else:
                call.delay(more[0])

    reactor.doIteration = iteration  # type: ignore[method-assign]
    if ours:
        assert fastpath.install_loop(reactor, {})
    else:
        assert not fastpath.install_loop(reactor, {"RUNNER_GATEWAY_FASTPATH": "loop"})

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            happened.append(("logged", str(event["log_failure"].value)))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(observer)
    return happened


@given(
    steps=_loop_steps,
    advance=st.lists(st.sampled_from([0.0, 0.001, 0.4, 1.5, 70.0]), min_size=1, max_size=4),
)
def test_loop_turns_as_twisteds_main_loop(
    steps: list[tuple[Any, ...]], advance: list[float]
) -> None:
    """The same script on Twisted's mainLoop and on the fastpath loop: the same
    polls with the same timeouts, the same calls fired in the same order, the
    same failures logged, and both stop."""
    theirs = _run_loop(steps, ours=False, advance=advance)
    ours = _run_loop(steps, ours=True, advance=advance)
    assert ours == theirs


def test_loop_is_installed_once_and_only_on_epoll() -> None:
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    assert not fastpath.install_loop(reactor, {"RUNNER_GATEWAY_FASTPATH": "off"})
    assert fastpath.install_loop(reactor, {})
    assert fastpath.install_loop(reactor, {})
    assert not fastpath.install_loop(MemoryReactorClock(), {})


@pytest.mark.parametrize("ours", [False, True])
def test_loop_clears_cancelled_calls_as_twisted_does(ours: bool) -> None:
    """Many cancelled timed calls are swept out of the heap on the next turn."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    sizes: list[int] = []

    def iteration(timeout: float | None) -> None:
        sizes.append(len(reactor._pendingTimedCalls))
        if len(sizes) == 1:
            for call in calls:
                call.cancel()
        elif len(sizes) == 3:
            reactor.stop()

    calls = [reactor.callLater(60 + i, lambda: None) for i in range(80)]
    reactor.doIteration = iteration  # type: ignore[method-assign]
    assert (
        fastpath.install_loop(reactor, {} if ours else {"RUNNER_GATEWAY_FASTPATH": "loop"}) is ours
    )
    reactor.run(installSignalHandlers=False)
    assert sizes[:2] == [80, 0]
