"""Log output: twisted.logger with a level filter, text or JSON lines, to stdout.

``trace`` is finer than Twisted's ``debug``: it maps onto debug and turns on
the per-request detail lines. Whatever the level, a last-line scrubber masks
anything shaped like a PASETO token or a bearer credential, in case a future
log call slips one in: the rule is never to log them at all.
"""

from __future__ import annotations

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
# The access line's message; access_message() renders the same text faster.
ACCESS_FORMAT = (
    "{method} {path} {status} {bytes}B {duration_ms}ms"
    " runner={runner} sub={sub} id={request_id} client={client}{aborted_note}"
)

_LEVELS: dict[str, LogLevel] = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
_SECRETS = re.compile(
    rb"(v[1-4]\.(?:local|public)\.[A-Za-z0-9_\-.]{8,})"
    rb"|((?i:bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*)"
    rb"|(k[1-4]\.(?:local|secret)\.[A-Za-z0-9_\-]{8,})"
)


def twisted_level(level: str) -> LogLevel:
    return _LEVELS[level]


def logs_access(level: str) -> bool:
    """Whether ``level`` lets the (info) access lines through."""
    return bool(_LEVELS[level] <= LogLevel.info)


def scrub(text: str) -> str:
    """Mask token-, bearer- and secret-key-shaped substrings."""
    # Each pattern needs ".local.", ".public.", ".secret." or "bearer" (any
    # case): lines without them (nearly all, access lines included) skip the
    # regular expression, which costs ~20 us on an access line.
    if (
        ".local." not in text
        and ".public." not in text
        and ".secret." not in text
        and "bearer" not in text.lower()
    ):
        return text
    data = text.encode("utf-8", "surrogateescape")
    return _SECRETS.sub(b"[redacted]", data).decode("utf-8", "surrogateescape")


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
    """ACCESS_FORMAT filled in from an access record."""
    f = fields
    aborted = " aborted" if f["aborted"] else ""
    return (
        f"{f['method']} {f['path']} {f['status']} {f['bytes']}B {f['duration_ms']}ms"
        f" runner={f['runner']} sub={f['sub']} id={f['request_id']} client={f['client']}{aborted}"
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
        if event.get("log_level") in self._levels and event.get("log_namespace"):
            if "log_trace" in event:
                event["log_trace"].append((self, self._write))
            self._write(event)
