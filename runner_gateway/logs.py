"""Log output: twisted.logger with a level filter, text or JSON lines, to stdout.

``trace`` is finer than Twisted's ``debug``: it maps onto debug and turns on
the per-request detail lines. Whatever the level, a last-line scrubber masks
anything shaped like a PASETO token or a bearer credential, in case a future
log call slips one in: the rule is never to log them at all.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider

__all__ = [
    "ACCESS_FORMAT",
    "ACCESS_NAMESPACE",
    "access_line",
    "logs_access",
    "make_observer",
    "scrub",
    "twisted_level",
]

ACCESS_NAMESPACE = "runner_gateway.access"
# The access event's format: its "access" key holds access_message(fields).
ACCESS_FORMAT = "{access}"

_LEVELS: dict[str, LogLevel] = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def _encodable(text: str) -> bytes:
    """A pattern for ``text`` with any character written as it is or
    percent-encoded (once, or twice: ``%252E``), hex in either case."""
    parts = []
    for ch in text:
        code = ord(ch)
        hex_ = rb"%%(?:25)?%X%s" % (code >> 4, _hex_digit(code & 15))
        parts.append(rb"(?:" + re.escape(ch.encode()) + rb"|" + hex_ + rb")")
    return b"".join(parts)


def _hex_digit(value: int) -> bytes:
    upper = b"%X" % value
    return upper if upper.isdigit() else b"[" + upper + upper.lower() + b"]"


def _either(*options: str) -> bytes:
    return rb"(?:" + rb"|".join(_encodable(o) for o in options) + rb")"


def _base64_forms(text: bytes) -> list[bytes]:
    """The base64 characters that ``text`` always encodes to, whichever of the
    three positions in a 3-byte group it starts at."""
    forms = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + text).rstrip(b"=")
        forms.append(encoded[math.ceil(8 * offset / 6) : 8 * (offset + len(text)) // 6])
    return forms


# A token (PASETO) or key (PASERK): header, then its base64url body, each
# character literal or percent-encoded (the way a query string or a logged
# URL carries it).
_B64_CHAR = rb"(?:[A-Za-z0-9_\-.~]|%(?:25)?[0-9A-Fa-f]{2})"
_ENCODED_TOKEN = (
    _encodable("v")
    + _either("1", "2", "3", "4")
    + _encodable(".")
    + _either("local", "public")
    + _encodable(".")
    + _B64_CHAR
    + rb"{8,}"
)
_ENCODED_KEY = (
    _encodable("k")
    + _either("1", "2", "3", "4")
    + _encodable(".")
    + _either("local", "secret")
    + _encodable(".")
    + _B64_CHAR
    + rb"{8,}"
)
# The same inside base64 (a Basic credential, a cookie, a JSON blob encoded):
# a base64 run that holds a token's ".local." or ".public." encoded, at any of
# the three positions in a 3-byte group (scrub() spells these out).
_BASE64_MARKS = tuple(
    form.decode() for mark in (b".local.", b".public.") for form in _base64_forms(mark)
)
assert _BASE64_MARKS == (
    "LmxvY2FsL",
    "5sb2NhbC",
    "ubG9jYWwu",
    "LnB1YmxpYy",
    "5wdWJsaWMu",
    "ucHVibGljL",
)
assert all(any(c in mark for c in "YCWV") for mark in _BASE64_MARKS)  # scrub's gate
_IN_BASE64 = (
    rb"[A-Za-z0-9+/_\-]*(?:"
    + rb"|".join(m.encode() for m in _BASE64_MARKS)
    + rb")[A-Za-z0-9+/_\-]*=*"
)
# A query parameter (or form field) that by its name holds a credential
# (looked for after a "?" or "&"; percent-encoded forms whenever a line holds
# a "%").
_CREDENTIAL_PARAM = (
    rb"(?i:(?<![A-Za-z0-9])"
    rb"(?:access_token|refresh_token|id_token|token|api[_-]?key|apikey|password|secret)"
    rb"(?:=|%3d))[^&\s\"'<>;,]+"
)
_SECRETS = re.compile(
    _ENCODED_TOKEN
    + rb"|"
    + _ENCODED_KEY
    + rb"|((?i:bearer)(?:\s|%20|\+)+[A-Za-z0-9\-._~+/%]{8,}=*)"
    + rb"|"
    + _IN_BASE64
)
_PARAMS = re.compile(_CREDENTIAL_PARAM)


def _mask_param(match: re.Match[bytes]) -> bytes:
    text = match.group(0)
    lower = text.lower()
    cut = lower.index(b"=") + 1 if b"=" in lower else lower.index(b"%3d") + 3
    return text[:cut] + b"[redacted]"


def twisted_level(level: str) -> LogLevel:
    return _LEVELS[level]


def logs_access(level: str) -> bool:
    """Whether ``level`` lets the (info) access lines through."""
    return bool(_LEVELS[level] <= LogLevel.info)


def scrub(text: str) -> str:
    """Mask token-, bearer- and secret-key-shaped substrings, however encoded
    (literal, percent-encoded, inside base64), and the values of query
    parameters named for credentials (``access_token=``, ``api_key=``...)."""
    # Each pattern needs ".local.", ".public.", ".secret.", "bearer" (any
    # case), a "%", one of the base64 marks, or a "?" or "&" before a
    # credential parameter's name: lines without them (nearly all, access
    # lines included) skip the regular expressions, which cost ~20 us on an
    # access line. One-character tests are the cheapest (memchr), so they
    # come first; the base64 marks are spelled out, as a loop over them costs
    # half as much again.
    lower = text.lower()
    encoded = "%" in text
    secrets_ = (
        encoded
        or ".local." in text
        or ".public." in text
        or ".secret." in text
        or "bearer" in lower
        # Each mark holds a "Y", "C", "W" or "V", rare in log lines.
        or (
            ("Y" in text or "C" in text or "W" in text or "V" in text)
            and (
                "LmxvY2FsL" in text
                or "5sb2NhbC" in text
                or "ubG9jYWwu" in text
                or "LnB1YmxpYy" in text
                or "5wdWJsaWMu" in text
                or "ucHVibGljL" in text
            )
        )
    )
    params = encoded or (
        ("?" in text or "&" in text)
        and ("token=" in lower or "key=" in lower or "password=" in lower or "secret=" in lower)
    )
    if not secrets_ and not params:
        return text
    data = text.encode("utf-8", "surrogateescape")
    if params:
        data = _PARAMS.sub(_mask_param, data)
    if secrets_:
        data = _SECRETS.sub(b"[redacted]", data)
    return data.decode("utf-8", "surrogateescape")


def _message(event: dict[str, Any]) -> str:
    """formatEvent, faster: str.format_map gives the same text for formats without
    Twisted's "{callable()}" syntax (formatEvent costs ~25 us on an access line)."""
    fmt = event.get("log_format")
    if type(fmt) is str and "(" not in fmt:
        # On any error formatEvent says "Unable to format event" its own way.
        with contextlib.suppress(Exception):
            return fmt.format_map(event)
    return formatEvent(event)


# The whole-second part of the last timestamp formatted: consecutive lines
# (an access line per request) nearly always fall in the same second.
_last_second: list[Any] = [None, ""]


def _when(timestamp: float) -> str:
    """``datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`` with
    "Z" for "+00:00", without building a datetime for every line (~2 us)."""
    # Split and round to microseconds as datetime.fromtimestamp does (half even).
    frac, whole = math.modf(timestamp)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    cached = _last_second
    if cached[0] != whole:
        text = datetime.fromtimestamp(whole, UTC).isoformat(timespec="seconds")
        cached[0], cached[1] = whole, text.replace("+00:00", "")
    return f"{cached[1]}.{micros // 1000:03d}Z"


def _text_line(event: dict[str, Any]) -> str | None:
    message = _message(event)
    if not message and "log_failure" not in event:
        return None
    when = _when(event.get("log_time", 0))
    level = event.get("log_level", LogLevel.info).name
    line = f"{when} [{level}] {event.get('log_namespace', '-')}: {message}"
    failure = event.get("log_failure")
    if failure is not None:
        line += "\n" + failure.getTraceback()
    return line


# orjson encodes an access record in a twentieth of the stdlib's instructions
# (callgrind: ~53,000 for the stdlib); these options keep its output close to
# json.dumps(default=str): datetimes and dataclasses go through str() too.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)
# What orjson refuses (a lone surrogate, an integer beyond 64 bits) the stdlib
# writes, escaped to ASCII, in the same compact form.
_FALLBACK = json.JSONEncoder(default=str, separators=(",", ":"))


def _encode(record: dict[str, Any]) -> str:
    """One log record as compact JSON."""
    try:
        return orjson.dumps(record, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return _FALLBACK.encode(record)


def _json_line(event: dict[str, Any]) -> str | None:
    record: dict[str, Any] = {
        "time": _when(event.get("log_time", 0)),
        "level": event.get("log_level", LogLevel.info).name,
        "logger": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    fields = event.get("fields")
    if isinstance(fields, dict):
        record.update(fields)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return _encode(record)


def access_message(fields: dict[str, Any]) -> str:
    """The access line's text: what the JSON record has, compactly, e.g.
    ``POST /api/chat 200 512B 812.4ms ttfb=40.2ms runner=ollama sub=alice
    model=llama3.2:1b tokens=12/40 id=... aborted``. A part with nothing to
    say (no first byte, no model, no usage) is left out; ``tokens`` is
    prompt/completion."""
    f = fields
    ttfb = f.get("ttfb_ms")
    model = f.get("model")
    prompt = f.get("prompt_tokens")
    completion = f.get("completion_tokens")
    error = f.get("upstream_error")
    auth = f.get("auth_failure")
    host = f.get("host")
    queue = f.get("queue_ms")
    # One f-string: this runs for every request.
    return (
        f"{f['method']} {f['path']} {f['status']} {f['bytes']}B {f['duration_ms']}ms"
        f"{'' if ttfb is None else f' ttfb={ttfb}ms'}"
        f" runner={f['runner']} sub={f['sub']}"
        f"{'' if model is None else f' model={model}'}"
        f"{'' if prompt is None else f' tokens={prompt}/{completion}'}"
        f" id={f['request_id']} client={f['client']}"
        f"{'' if error is None else f' upstream_error={error}'}"
        f"{'' if auth is None else f' auth_failure={auth}'}"
        f"{' aborted' if f['aborted'] else ''}"
        f"{f' host={host}' if host is not None else ''}"
        f"{f' queue_ms={queue}' if queue is not None else ''}"
    )


def access_line(fmt: str, timestamp: float, namespace: str, fields: dict[str, Any]) -> str:
    """The line an info event in ``namespace`` with ``fields`` would give, without the
    event: the access log is written straight from the Site (see _LevelControl.access)."""
    message = access_message(fields)
    if fmt == "json":
        record: dict[str, Any] = {
            "time": _when(timestamp),
            "level": "info",
            "logger": namespace,
            "message": message,
        }
        record.update(fields)
        return _encode(record)
    return f"{_when(timestamp)} [info] {namespace}: {message}"


def write_line(out: IO[str], line: str) -> None:
    try:
        out.write(scrub(line) + "\n")
        out.flush()
    except (OSError, ValueError):
        pass  # stdout gone (closed pipe): logging must never take the process down


def make_observer(
    level: str = "info", fmt: str = "text", stream: IO[str] | None = None
) -> ILogObserver:
    """An observer writing scrubbed lines at ``level`` and above to ``stream`` (stdout)."""
    out = sys.stdout if stream is None else stream
    render: Callable[[dict[str, Any]], str | None] = _json_line if fmt == "json" else _text_line

    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        line = render(event)
        if line is not None:
            write_line(out, line)

    return _LevelFilter(write, twisted_level(level))


# twisted.internet.protocol.Factory's doStart/doStop lines (info): one pair
# per client connection for factories that do not set noisy = False.
_FACTORY_CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


class _LevelFilter(FilteringLogObserver):
    """FilteringLogObserver with one LogLevelFilterPredicate(defaultLogLevel=level),
    decided by a set lookup: the predicate compares LogLevel constants (slow in
    ``constantly``) and splits the namespace on every event (~5 us a line)."""

    def __init__(self, observer: ILogObserver, level: LogLevel) -> None:
        super().__init__(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])
        self._write = observer
        self._levels = frozenset(lv for lv in LogLevel.iterconstants() if lv >= level)

    def __call__(self, event: dict[str, Any]) -> None:
        # As the predicate: no level or no namespace, or a lower level: dropped.
        # Twisted's factory start/stop chatter goes too, from any factory.
        if (
            event.get("log_level") in self._levels
            and event.get("log_namespace")
            and event.get("log_format") not in _FACTORY_CHATTER
        ):
            if "log_trace" in event:
                event["log_trace"].append((self, self._write))
            self._write(event)
