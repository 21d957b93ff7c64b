"""Hot-path fixes (fastpath.py, logs.py): same results as the code they replace."""

from __future__ import annotations

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
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.web import http

from runner_gateway.edge import fastpath
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
from tests.helpers_site import needs_fastpath

_PROBE = (
    "from runner_gateway.edge import fastpath, site; from twisted.web import http; "
    "print(sorted(fastpath.install()), hasattr(http._parseContentType, 'cache_info'))"
)
_ALL = [
    "channel",
    "content-type",
    "date",
    "hold",
    "linger-drain",
    "read-at-accept",
    "request",
    "send-now",
    "whole-head",
]


def _without(*names: str) -> str:
    return str([name for name in _ALL if name not in names])


@pytest.mark.parametrize(
    ("switch", "expected"),
    [
        ("off", "[] False"),
        ("content-type", _without("content-type") + " False"),
        ("send-now", _without("send-now") + " True"),
        ("whole-head", _without("whole-head") + " True"),
        ("date", _without("date") + " True"),
        ("channel", _without("channel", "whole-head") + " True"),  # whole-head needs it
        ("request,hold", _without("request", "hold") + " True"),
        ("", _without() + " True"),
    ],
)
def test_switch_leaves_fixes_out(switch: str, expected: str) -> None:
    """In a fresh interpreter: what RUNNER_GATEWAY_FASTPATH names is not installed."""
    env = {**os.environ, "RUNNER_GATEWAY_FASTPATH": switch}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


@needs_fastpath
def test_install_is_idempotent() -> None:
    installed = fastpath.install({})
    assert installed == frozenset(fastpath.FIXES)
    assert fastpath.install({}) == installed  # a second call patches nothing twice
    assert hasattr(http._parseContentType, "cache_info")


@needs_fastpath
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


@needs_fastpath
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
