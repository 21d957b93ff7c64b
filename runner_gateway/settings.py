"""Layered settings: defaults, settings.yaml, <env>.yaml, environment, flags.

Pure logic, no Twisted (it reads the YAML files and the one key file
``paseto.secretKeyPath`` names). Everything is parsed once into frozen
dataclasses; anything unknown or ill-typed raises :class:`SettingsError`,
which names the source (file, environment variable or flag) and the dotted
key, one readable line per problem; a load reports all it finds at once
(:class:`SettingsErrors`).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner_gateway.cpus import usable_cpus
from runner_gateway.forwarding import TrustedProxies, parse_trusted_proxies

__all__ = [
    "LEVELS",
    "SCOPES",
    "Address",
    "AuthorizationSettings",
    "EndpointRule",
    "HealthCheckSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "PasetoSettings",
    "RedisSettings",
    "RunnerSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "SettingsErrors",
    "TierLimits",
    "load_settings",
    "parse_duration",
    "parse_size",
    "restart_needed",
]

LEVELS = ("trace", "debug", "info", "warn", "error")
# Headers not forwarded to runners unless a runner's forwardHeaders names them.
FORWARDABLE_HEADERS = ("cookie", "x-api-key", "api-key")
SCOPES = ("inference", "models:read", "models:manage", "admin", "introspect")
ENV_OVERRIDES = {
    "LOGGING_LEVEL": ("logging", "level"),
    "PASETO_SECRET_KEY": ("paseto", "secretKey"),
    "SERVER_ADDRESS": ("server", "address"),
    "SERVER_CERTIFICATE_PATH": ("server", "certificatePath"),
    "SERVER_KEY_PATH": ("server", "keyPath"),
}


class SettingsError(Exception):
    """A settings problem, located by source (file or variable) and key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


MAX_ERRORS = 20  # reported from one load; more are counted


class SettingsErrors(SettingsError):
    """Several problems in one load, each on its own line (``errors`` has them all)."""

    def __init__(self, errors: list[SettingsError]) -> None:
        first = errors[0]
        super().__init__(first.source, first.key, first.message)
        self.errors = tuple(errors)
        lines = [f"  {error}" for error in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
        self.args = (f"{len(errors)} settings errors:\n" + "\n".join(lines),)


class _Errors:
    """What one load found wrong, so that all of it is reported at once."""

    def __init__(self) -> None:
        self.found: list[SettingsError] = []

    def add(self, source: str, key: str, message: str) -> None:
        self.found.append(SettingsError(source, key, message))

    def check(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise SettingsErrors(self.found)


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Address:
    """A listening or dialling address; ``host`` is "" for all interfaces."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EndpointRule:
    """One row of a runner's own endpoint table (overrides the built-in one).

    ``path`` is exact, or ends in ``/*`` to match that prefix and below.
    """

    methods: tuple[str, ...]
    path: str
    scope: str


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class PasetoSettings:
    version: str = "v4"
    expiration: float = 8766 * 3600.0
    key_path: str = "./settings/paseto.key"
    public_path: str = "./settings/paseto.pub"
    secret_key: str = ""  # from secretKey, or read from secretKeyPath
    secret_key_path: str = ""
    issuer: str = ""
    audience: str = ""
    leeway: float = 60.0
    require_expiration: bool = True
    implicit_assertion: str = ""
    public_keys: tuple[str, ...] = ()
    secret_keys: tuple[str, ...] = ()
    cache_size: int = 10000
    revocation_path: str = ""  # revocation.py; "" for none
    ledger_path: str = ""  # paseto-tool's issuance ledger; "" for none


@dataclass(frozen=True)
class AuthorizationSettings:
    default_scopes: tuple[str, ...] = ("inference", "models:read")


BALANCES = ("model-aware", "least-outstanding", "round-robin")


@dataclass(frozen=True)
class HealthCheckSettings:
    """A runner pool's active health check (``interval`` 0: no checks, no ejection)."""

    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2
    healthy_after: int = 1


@dataclass(frozen=True)
class RunnerSettings:
    name: str
    host: str  # the first of ``hosts``
    port: int
    path: str
    scheme: str = "http"
    connect_timeout: float = 10.0
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    total_timeout: float = 0.0  # 0: no limit, streams may run as long as they like
    max_body_size: int = 64 * 1024 * 1024
    ca_path: str = ""
    client_certificate_path: str = ""
    client_key_path: str = ""
    endpoints: tuple[EndpointRule, ...] = ()
    # Ask an OpenAI-compatible runner for usage in streams (limits.md).
    request_usage: bool = True
    hosts: tuple[Address, ...] = ()  # the pool; () means just host:port
    balance: str = "least-outstanding"
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    max_concurrent: int = 0  # per host; 0: unlimited
    max_queue: int = 64
    queue_timeout: float = 60.0
    keep_alive: float = 4.0  # idle pooled connections close after this (uvicorn: 5 s)
    strict_models: bool = True
    # Credential headers (lower case) this runner is sent; by default none.
    forward_headers: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[Address, ...]:
        """The pool's hosts (one for ``host:``)."""
        return self.hosts or (Address(self.host, self.port),)

    @property
    def netloc(self) -> str:
        """host[:port] as the runner expects it in ``Host``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True)
class ServerSettings:
    address: Address = Address("", 8443)
    certificate_path: str = ""
    key_path: str = ""
    client_ca_path: str = ""
    certificate_reload_interval: float = 60.0
    redirect_address: Address | None = None
    public_port: int = 0  # port clients reach TLS on, for redirects (0: the listening port)
    header_timeout: float = 30.0
    keep_alive_timeout: float = 75.0
    # A request body must arrive within body_min_rate_grace seconds plus one
    # second per body_min_rate bytes received (mod_reqtimeout's MinRate); 0: off.
    body_min_rate: int = 1024
    body_min_rate_grace: float = 30.0
    # Client connections per process (0: sized from the descriptor limit,
    # connections.default_max_connections) and per peer address (0: no cap).
    max_connections: int = 0
    max_connections_per_client: int = 256
    drain_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    public_url: str = ""  # how clients reach the gateway, for the OAuth metadata (oauth.py)
    ready_when: str = "any"  # /readyz: ready when any (or all) runners have a healthy host
    # One worker process per CPU this process may use (cpus.py: affinity and the
    # cgroup quota, not the host's count); 1 serves from the twistd process itself.
    workers: int = field(default_factory=lambda: usable_cpus())

    @property
    def tls(self) -> bool:
        return bool(self.certificate_path)


@dataclass(frozen=True)
class MetricsSettings:
    address: Address | None = None
    per_subject: bool = False
    subjects_max: int = 10000


@dataclass(frozen=True)
class TierLimits:
    """One tier's limits; 0 is unlimited."""

    requests_per_minute: int = 0
    concurrent_requests: int = 0
    tokens_per_day: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.concurrent_requests or self.tokens_per_day)


@dataclass(frozen=True)
class LimitsSettings:
    backend: str = "local"
    on_backend_error: str = "allow"
    default: TierLimits = TierLimits()
    tiers: tuple[tuple[str, TierLimits], ...] = ()  # (name, limits), sorted by name

    @property
    def enabled(self) -> bool:
        """False when nothing is limited: no tier, and an unlimited default."""
        return bool(self.tiers) or not self.default.unlimited


@dataclass(frozen=True)
class RedisSettings:
    """Shared state (shared_state.py). ``url`` "" means none; the password is
    never part of ``display_url``, which is what logs show."""

    url: str = field(default="", repr=False)
    key_prefix: str = "runner-gateway:"
    ca_path: str = ""
    command_timeout: float = 1.0
    host: str = ""
    port: int = 6379
    tls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    database: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def display_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class Settings:
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    paseto: PasetoSettings = field(default_factory=PasetoSettings)
    authorization: AuthorizationSettings = field(default_factory=AuthorizationSettings)
    runners: tuple[RunnerSettings, ...] = ()
    server: ServerSettings = field(default_factory=ServerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    sources: tuple[str, ...] = ()  # files and variables read, in order
    # Where some keys came from (a file, "environment variable X", "defaults"),
    # for errors found outside this module: see source_of.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def source_of(self, key: str) -> str:
        """Where a dotted key's value came from, for an error message."""
        return self.origins.get(key, "settings")


# ------------------------------------------------------------ scalar parsers

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SIZE = re.compile(r"^(\d+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``8766h``, ``1h30m``, ``500ms``, ``0``) to seconds."""
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    if not text:
        raise ValueError("empty duration")
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (use Go's form: 90s, 1h30m, 500ms)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def parse_size(value: int | str) -> int:
    """Parse a byte count: an integer or ``64MiB``, ``10MB``, ``512KiB``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"invalid size {value!r} (use bytes or 10MB, 64MiB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


def _parse_host(host: str) -> str:
    if host == "":
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ValueError(f"invalid host {host!r}")
    return host


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, ``:port`` (and bare host when a default is given)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest == "" and default_port is not None:
            port_text = str(default_port)
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"invalid address {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {text!r}: bad IPv6 literal") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        host = _parse_host(host)
    elif ":" not in text and default_port is not None:
        host, port_text = _parse_host(text), str(default_port)
    else:
        raise ValueError(f"invalid address {text!r} (use :8443, 127.0.0.1:8443 or [::1]:8443)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port in {text!r}")
    return host, int(port_text)


# ---------------------------------------------------------------- the schema
#
# Each section maps YAML key -> (dataclass field, kind). The kinds are the
# parsers below; keeping the whole schema in one table is what makes unknown
# keys detectable and the settings reference easy to check against code.

_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "logging": {"level": ("level", "level"), "format": ("format", "logformat")},
    "paseto": {
        "version": ("version", "version"),
        "expiration": ("expiration", "duration"),
        "keyPath": ("key_path", "str"),
        "publicPath": ("public_path", "str"),
        "secretKey": ("secret_key", "str"),
        "secretKeyPath": ("secret_key_path", "str"),
        "issuer": ("issuer", "str"),
        "audience": ("audience", "str"),
        "leeway": ("leeway", "duration"),
        "requireExpiration": ("require_expiration", "bool"),
        "implicitAssertion": ("implicit_assertion", "str"),
        "publicKeys": ("public_keys", "strlist"),
        "secretKeys": ("secret_keys", "strlist"),
        "cacheSize": ("cache_size", "count"),
        "revocationPath": ("revocation_path", "str"),
        "ledgerPath": ("ledger_path", "str"),
    },
    "authorization": {"defaultScopes": ("default_scopes", "scopes")},
    "runner": {
        "name": ("name", "str"),
        "host": ("host", "str"),
        "path": ("path", "str"),
        "scheme": ("scheme", "scheme"),
        "connectTimeout": ("connect_timeout", "duration"),
        "firstByteTimeout": ("first_byte_timeout", "duration"),
        "idleTimeout": ("idle_timeout", "duration"),
        "totalTimeout": ("total_timeout", "duration"),
        "maxBodySize": ("max_body_size", "size"),
        "caPath": ("ca_path", "str"),
        "clientCertificatePath": ("client_certificate_path", "str"),
        "clientKeyPath": ("client_key_path", "str"),
        "endpoints": ("endpoints", "endpoints"),
        "requestUsage": ("request_usage", "bool"),
        "hosts": ("hosts", "hostlist"),
        "balance": ("balance", "balance"),
        "healthCheck": ("health_check", "healthcheck"),
        "maxConcurrent": ("max_concurrent", "count"),
        "maxQueue": ("max_queue", "count"),
        "queueTimeout": ("queue_timeout", "duration"),
        "keepAlive": ("keep_alive", "duration"),
        "strictModels": ("strict_models", "bool"),
        "forwardHeaders": ("forward_headers", "forwardheaders"),
    },
    "server": {
        "address": ("address", "address"),
        "certificatePath": ("certificate_path", "str"),
        "keyPath": ("key_path", "str"),
        "clientCAPath": ("client_ca_path", "str"),
        "certificateReloadInterval": ("certificate_reload_interval", "duration"),
        "redirectAddress": ("redirect_address", "optaddress"),
        "publicPort": ("public_port", "port"),
        "headerTimeout": ("header_timeout", "duration"),
        "keepAliveTimeout": ("keep_alive_timeout", "duration"),
        "bodyMinRate": ("body_min_rate", "size"),
        "bodyMinRateGrace": ("body_min_rate_grace", "duration"),
        "maxConnections": ("max_connections", "count"),
        "maxConnectionsPerClient": ("max_connections_per_client", "count"),
        "drainTimeout": ("drain_timeout", "duration"),
        "corsOrigins": ("cors_origins", "origins"),
        "publicUrl": ("public_url", "publicurl"),
        "readyWhen": ("ready_when", "readywhen"),
        "trustedProxies": ("trusted_proxies", "networks"),
        "workers": ("workers", "workers"),
    },
    "metrics": {
        "address": ("address", "optaddress"),
        "perSubject": ("per_subject", "bool"),
        "subjectsMax": ("subjects_max", "count"),
    },
    "limits": {
        "backend": ("backend", "limitsbackend"),
        "onBackendError": ("on_backend_error", "onerror"),
        "default": ("default", "tier"),
        "tiers": ("tiers", "tiers"),
    },
    "redis": {
        "url": ("url", "redisurl"),
        "keyPrefix": ("key_prefix", "keyprefix"),
        "caPath": ("ca_path", "str"),
        "commandTimeout": ("command_timeout", "duration"),
    },
}
_TOP = (
    "logging",
    "paseto",
    "authorization",
    "runners",
    "server",
    "metrics",
    "limits",
    "redis",
)
_TIER_KEYS = {
    "requestsPerMinute": "requests_per_minute",
    "concurrentRequests": "concurrent_requests",
    "tokensPerDay": "tokens_per_day",
}
_TIER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_SECTION_CLASSES: dict[str, type[Any]] = {
    "logging": LoggingSettings,
    "paseto": PasetoSettings,
    "authorization": AuthorizationSettings,
    "server": ServerSettings,
    "metrics": MetricsSettings,
    "limits": LimitsSettings,
    "redis": RedisSettings,
}
_DEFAULT_RUNNERS: list[dict[str, Any]] = [
    {"name": "ollama", "host": "127.0.0.1:11434", "path": "/", "scheme": "http"}
]


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise ValueError(f"expected {what}, got {type(value).__name__}")
    return value


def _parse_endpoints(value: object) -> tuple[EndpointRule, ...]:
    rules = []
    for i, item in enumerate(_expect(value, list, "a list of endpoint rules")):
        item = _expect(item, dict, f"endpoints[{i}] to be a mapping")
        unknown = set(item) - {"methods", "path", "scope"}
        if unknown:
            raise ValueError(f"endpoints[{i}]: unknown key {sorted(unknown)[0]!r}")
        methods = item.get("methods", [])
        if isinstance(methods, str):
            methods = [methods]
        methods = [str(_expect(m, str, "an HTTP method")).upper() for m in methods]
        if not methods or not all(re.fullmatch(r"[A-Z]+", m) for m in methods):
            raise ValueError(f"endpoints[{i}].methods: expected HTTP methods such as [POST]")
        path = _expect(item.get("path"), str, f"endpoints[{i}].path to be a string")
        if not path.startswith("/"):
            raise ValueError(f"endpoints[{i}].path must start with '/'")
        scope = item.get("scope")
        if scope not in SCOPES:
            raise ValueError(f"endpoints[{i}].scope must be one of {', '.join(SCOPES)}")
        rules.append(EndpointRule(tuple(methods), path, scope))
    return tuple(rules)


def _parse_tier(value: object) -> TierLimits:
    if value is None:
        return TierLimits()
    raw = _expect(value, dict, "a mapping of limits")
    kwargs = {}
    for key, item in raw.items():
        attr = _TIER_KEYS.get(key)
        if attr is None:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(_TIER_KEYS)})")
        if item is None:
            continue  # absent and null both mean unlimited
        n = _expect(item, int, f"{key} to be a whole number")
        if n < 0:
            raise ValueError(f"{key} must not be negative (0 is unlimited)")
        kwargs[attr] = n
    return TierLimits(**kwargs)


def _parse_tiers(value: object) -> tuple[tuple[str, TierLimits], ...]:
    if value is None:
        return ()
    tiers = []
    for name, limits in _expect(value, dict, "a mapping of tier names to limits").items():
        if not isinstance(name, str) or not _TIER_NAME.fullmatch(name):
            raise ValueError(f"invalid tier name {name!r} (letters, digits, _.:-; up to 64)")
        if name == "default":
            raise ValueError("'default' is the limits.default section, not a tier name")
        try:
            tiers.append((name, _parse_tier(limits)))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return tuple(sorted(tiers))


_HEALTH_KEYS = {
    "path": ("path", "str"),
    "interval": ("interval", "duration"),
    "timeout": ("timeout", "duration"),
    "unhealthyAfter": ("unhealthy_after", "count"),
    "healthyAfter": ("healthy_after", "count"),
}


def _parse_health_check(value: object) -> HealthCheckSettings:
    raw = _expect(value, dict, "a mapping (path, interval, timeout, unhealthyAfter, healthyAfter)")
    kwargs: dict[str, Any] = {}
    for key, item in raw.items():
        if key not in _HEALTH_KEYS:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(_HEALTH_KEYS)})")
        attr, kind = _HEALTH_KEYS[key]
        try:
            kwargs[attr] = _convert(kind, item)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    check = HealthCheckSettings(**kwargs)
    path = check.path
    if not path.startswith("/") or not path.isascii() or any(c in path for c in " \t\r\n#"):
        raise ValueError(f"path: must be a path starting with '/', not {check.path!r}")
    if check.unhealthy_after < 1 or check.healthy_after < 1:
        raise ValueError("unhealthyAfter and healthyAfter must be at least 1")
    if check.interval and not 0 < check.timeout <= check.interval:
        raise ValueError("timeout must be more than 0 and at most the interval")
    return check


def _convert(kind: str, value: object) -> Any:
    """Turn one raw YAML value into its typed form, or raise ValueError."""
    if kind == "str":
        if value is None:
            return ""
        return _expect(value, str, "a string")
    if kind == "bool":
        return _expect(value, bool, "true or false")
    if kind == "count":
        n = _expect(value, int, "a whole number")
        if n < 0:
            raise ValueError("must not be negative")
        return n
    if kind == "duration":
        if isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return 0.0
        return parse_duration(_expect(value, str, "a duration such as 90s"))
    if kind == "size":
        return parse_size(_expect(value, (int, str), "a size such as 64MiB"))
    if kind == "level":
        text = _expect(value, str, "a level").lower()
        if text == "warning":
            text = "warn"
        if text not in LEVELS:
            raise ValueError(f"unknown level {value!r} (one of {', '.join(LEVELS)})")
        return text
    if kind == "logformat":
        if value not in ("text", "json"):
            raise ValueError("must be text or json")
        return value
    if kind == "version":
        if value not in ("v4", "v2"):
            raise ValueError(f"unsupported PASETO version {value!r} (v4 or v2)")
        return value
    if kind == "scheme":
        if value not in ("http", "https"):
            raise ValueError(f"unsupported scheme {value!r} (http or https)")
        return value
    if kind == "strlist":
        if value is None:
            return ()
        items = _expect(value, list, "a list of strings")
        return tuple(_expect(v, str, "a string") for v in items)
    if kind == "scopes":
        scopes = _convert("strlist", value)
        for scope in scopes:
            if scope not in SCOPES:
                raise ValueError(f"unknown scope {scope!r} (one of {', '.join(SCOPES)})")
        return scopes
    if kind == "origins":
        origins = _convert("strlist", value)
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"invalid origin {origin!r} (scheme://host[:port] or *)")
        return origins
    if kind == "address":
        host, port = parse_hostport(_expect(value, str, "an address such as :8443"))
        return Address(host, port)
    if kind == "optaddress":
        if value in (None, ""):
            return None
        return _convert("address", value)
    if kind == "port":
        n = _expect(value, int, "a port number")
        if not 0 <= n <= 65535:
            raise ValueError("must be a port number (0 to 65535)")
        return n
    if kind == "workers":
        if value == "auto":
            return usable_cpus()
        n = _expect(value, int, "a number of worker processes or 'auto'")
        if n < 1:
            raise ValueError("must be at least 1")
        return n
    if kind == "endpoints":
        return _parse_endpoints(value)
    if kind == "networks":
        if value is None:
            return TrustedProxies()
        return parse_trusted_proxies(_expect(value, list, "a list of networks (CIDR)"))
    if kind == "forwardheaders":
        names = []
        for name in _convert("strlist", value):
            lower = name.lower()
            if lower not in FORWARDABLE_HEADERS:
                raise ValueError(
                    f"{name!r} cannot be named here (only {', '.join(FORWARDABLE_HEADERS)}: "
                    "the credential headers the gateway drops by default)"
                )
            names.append(lower)
        return tuple(dict.fromkeys(names))
    if kind == "limitsbackend":
        if value not in ("local", "redis"):
            raise ValueError(f"unknown backend {value!r} (local or redis)")
        return value
    if kind == "onerror":
        if value not in ("allow", "deny"):
            raise ValueError("must be allow or deny")
        return value
    if kind == "tier":
        return _parse_tier(value)
    if kind == "tiers":
        return _parse_tiers(value)
    if kind == "publicurl":
        return _parse_public_url(_convert("str", value))
    if kind == "redisurl":
        text = _convert("str", value)
        if text:
            parse_redis_url(text)  # validated here, split in _redis_section
        return text
    if kind == "keyprefix":
        text = _expect(value, str, "a string")
        if len(text) > 100 or not re.fullmatch(r"[A-Za-z0-9:_.-]*", text):
            raise ValueError("use at most 100 of A-Z a-z 0-9 : _ . -")
        return text
    if kind == "hostlist":
        items = _expect(value, list, "a list of host:port")
        if not items:
            raise ValueError("expected at least one host:port")
        return tuple(_expect(v, str, "host:port") for v in items)  # parsed with the scheme
    if kind == "balance":
        if value not in BALANCES:
            raise ValueError(f"unknown balance {value!r} (one of {', '.join(BALANCES)})")
        return value
    if kind == "healthcheck":
        return _parse_health_check(value)
    if kind == "readywhen":
        if value not in ("any", "all"):
            raise ValueError("must be any or all")
        return value
    raise AssertionError(kind)  # pragma: no cover - schema typo


def _parse_public_url(text: str) -> str:
    if not text:
        return text
    # An origin only: RFC 9728 puts the well-known path right after the host,
    # so a path here would name documents outside what the gateway serves.
    match = re.fullmatch(r"(https?)://([^/?#\s@]+)/?", text)
    if match is None:
        raise ValueError("expected the gateway's origin: https://host[:port], no path")
    try:
        parse_hostport(match.group(2), 443)
    except ValueError as exc:
        raise ValueError(f"invalid host in URL: {exc}") from None
    return text.rstrip("/")


def parse_redis_url(text: str) -> dict[str, Any]:
    """``redis://[user[:password]@]host[:port][/db]``, or ``rediss://`` for TLS."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("expected a redis:// or rediss:// URL")
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment allowed")
    host = parts.hostname or ""
    if not host:
        raise ValueError("the URL needs a host")
    _parse_host(host)
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError("the path must be a database number, e.g. /0")
    return {
        "host": host,
        "port": port or 6379,
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": int(database or 0),
    }


def _redis_section(section: RedisSettings, environ: Mapping[str, str]) -> RedisSettings:
    if not section.url:
        return section
    fields = parse_redis_url(section.url)
    if not fields["password"]:
        fields["password"] = environ.get("REDIS_PASSWORD", "")
    return dataclasses.replace(section, **fields)


# ------------------------------------------------------------------- loading


class _Tree:
    """Merged raw settings plus where each key last came from."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[str, str] = {}

    def overlay(self, raw: Mapping[str, Any], source: str, errors: _Errors) -> None:
        self._merge(self.data, _check_keys(raw, source, errors), source, "")

    def _merge(
        self, into: dict[str, Any], raw: Mapping[str, Any], source: str, prefix: str
    ) -> None:
        for key, value in raw.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                # Key by key, so that each one's origin is recorded: a later
                # layer setting a sibling must not claim this key's errors.
                if not isinstance(into.get(key), dict):
                    into[key] = {}
                self._merge(into[key], value, source, dotted + ".")
            else:
                into[key] = copy.deepcopy(value)  # lists replace, as the original did
            self.origin[dotted] = source

    def source_of(self, dotted: str) -> str:
        while dotted:
            if dotted in self.origin:
                return self.origin[dotted]
            dotted = dotted.rpartition(".")[0].split("[")[0] if "." in dotted else ""
        return "defaults"


def _check_keys(raw: Mapping[str, Any], source: str, errors: _Errors) -> dict[str, Any]:
    """Refuse unknown keys per file, so the error names the file that has the typo;
    returns ``raw`` without them, so the rest is still checked."""
    kept: dict[str, Any] = {}
    for top, section in raw.items():
        if top not in _TOP:
            errors.add(source, str(top), f"unknown key (known: {', '.join(_TOP)})")
            continue
        if section is None:
            errors.add(source, top, "empty section")
            continue
        if top == "runners":
            if not isinstance(section, list):
                errors.add(source, top, "expected a list of runners")
                continue
            runners = []
            for i, runner in enumerate(section):
                if not isinstance(runner, dict):
                    errors.add(source, f"runners[{i}]", "expected a mapping")
                    runner = {}
                for key in runner:
                    if key not in _SCHEMA["runner"]:
                        errors.add(source, f"runners[{i}].{key}", "unknown key")
                runners.append({k: v for k, v in runner.items() if k in _SCHEMA["runner"]})
            kept[top] = runners
            continue
        if not isinstance(section, dict):
            errors.add(source, top, "expected a mapping")
            continue
        for key in section:
            if key not in _SCHEMA[top]:
                errors.add(source, f"{top}.{key}", "unknown key")
        kept[top] = {k: v for k, v in section.items() if k in _SCHEMA[top]}
    return kept


def _read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(source, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(source, "", f"cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(source, "", f"invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(source, "", "expected a mapping at the top level")
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _build_section(tree: _Tree, name: str, errors: _Errors) -> Any:
    raw = tree.data.get(name, {})
    kwargs = {}
    for key, (attr, kind) in _SCHEMA[name].items():
        if key in raw:
            try:
                kwargs[attr] = _convert(kind, raw[key])
            except ValueError as exc:
                dotted = f"{name}.{key}"
                errors.add(tree.source_of(dotted), dotted, str(exc))
    return _SECTION_CLASSES[name](**kwargs)


def _normalise_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError("must start with '/'")
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments) or any(c in path for c in "?#% \t"):
        raise ValueError(f"invalid path {path!r}")
    return "/" + "/".join(segments)


def _build_runners(tree: _Tree, errors: _Errors) -> tuple[RunnerSettings, ...]:
    raw_runners = tree.data.get("runners", _DEFAULT_RUNNERS)
    source = tree.source_of("runners")
    if not raw_runners:
        errors.add(source, "runners", "at least one runner is required")
    runners: list[RunnerSettings] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_runners):
        before = len(errors.found)

        def bad(key: str, message: str, i: int = i) -> None:
            errors.add(source, f"runners[{i}].{key}", message)

        kwargs: dict[str, Any] = {}
        for key, (attr, kind) in _SCHEMA["runner"].items():
            if key in raw:
                try:
                    kwargs[attr] = _convert(kind, raw[key])
                except ValueError as exc:
                    bad(key, str(exc))
        if "hosts" in kwargs and "host" in kwargs:
            bad("hosts", "set host or hosts, not both")
        for required in ("name", "path"):
            # (a value that did not convert is reported already)
            if not kwargs.get(required) and not (required in raw and required not in kwargs):
                bad(required, "required")
        unconverted = any(k in raw and k not in kwargs for k in ("host", "hosts"))
        if not kwargs.get("host") and not kwargs.get("hosts") and not unconverted:
            bad("host", "required (or hosts)")
        if len(errors.found) > before:
            continue
        try:
            kwargs["path"] = _normalise_path(kwargs["path"])
        except ValueError as exc:
            bad("path", str(exc))
            continue
        scheme = kwargs.get("scheme", "http")
        default_port = 443 if scheme == "https" else 80
        if "hosts" in kwargs:
            addresses: list[Address] = []
            for j, text in enumerate(kwargs["hosts"]):
                where = f"hosts[{j}]"
                try:
                    host, port = parse_hostport(text, default_port)
                except ValueError as exc:
                    bad(where, str(exc))
                    continue
                if not host:
                    bad(where, "a host name or address is required")
                elif Address(host, port) in addresses:
                    bad(where, f"duplicate host {text!r}")
                else:
                    addresses.append(Address(host, port))
            if len(errors.found) > before:
                continue
            kwargs["hosts"] = tuple(addresses)
            kwargs["host"], kwargs["port"] = addresses[0].host, addresses[0].port
        else:
            try:
                host, port = parse_hostport(kwargs["host"], default_port)
            except ValueError as exc:
                bad("host", str(exc))
                continue
            if not host:
                bad("host", "a host name or address is required")
                continue
            kwargs["host"], kwargs["port"] = host, port
        if "balance" not in kwargs:
            # The built-in endpoint table is Ollama's (policy.py reads names Ollama's
            # way there); a runner with its own table is of a kind we cannot tell.
            kwargs["balance"] = "least-outstanding" if kwargs.get("endpoints") else "model-aware"
        if kwargs["path"] in seen:
            bad("path", f"duplicate path {kwargs['path']!r} (also runners[{seen[kwargs['path']]}])")
            continue
        seen[kwargs["path"]] = i
        if bool(kwargs.get("client_certificate_path")) != bool(kwargs.get("client_key_path")):
            bad("clientCertificatePath", "clientCertificatePath and clientKeyPath go together")
            continue
        runners.append(RunnerSettings(**kwargs))
    return tuple(runners)


def _env_overlay(environ: Mapping[str, str]) -> list[tuple[dict[str, Any], str]]:
    layers = []
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ:
            layers.append(({section: {key: environ[var]}}, f"environment variable {var}"))
    return layers


def resolve_env_name(env: str | None, environ: Mapping[str, str]) -> str | None:
    """The settings overlay name: the flag, else RUNNER_GATEWAY_ENV, else GO_ENV."""
    for candidate in (env, environ.get("RUNNER_GATEWAY_ENV"), environ.get("GO_ENV")):
        if candidate:
            return candidate
    return None


def load_settings(
    directory: str | os.PathLike[str] = "settings",
    env: str | None = None,
    environ: Mapping[str, str] | None = None,
    logging_level: str | None = None,
) -> Settings:
    """Read and validate the layered settings; raise SettingsError on any problem.

    ``env`` names ``<directory>/<env>.yaml``; when None it falls back to the
    RUNNER_GATEWAY_ENV and GO_ENV variables. ``settings.yaml`` is optional (the
    built-in defaults match the shipped one); a named env file must exist.
    """
    environ = os.environ if environ is None else environ
    directory = Path(directory)
    errors = _Errors()
    tree = _Tree()
    sources = []

    def read(path: Path) -> None:
        try:
            raw = _read_yaml(path)
        except SettingsError as exc:
            errors.found.append(exc)
            return
        tree.overlay(raw, str(path), errors)
        sources.append(str(path))

    base = directory / "settings.yaml"
    if base.exists():
        read(base)
    name = resolve_env_name(env, environ)
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
            # Say where the name came from: the flag, or which variable.
            origin = (
                "--env"
                if env
                else next(
                    (
                        f"environment variable {v}"
                        for v in ("RUNNER_GATEWAY_ENV", "GO_ENV")
                        if environ.get(v)
                    ),
                    "--env",
                )
            )
            errors.add(origin, "", f"invalid settings name {name!r}")
        else:
            read(directory / f"{name}.yaml")
    for layer, source in _env_overlay(environ):
        tree.overlay(layer, source, errors)
        sources.append(source)
    if logging_level is not None:
        tree.overlay({"logging": {"level": logging_level}}, "--logging-level", errors)
    sections = {name: _build_section(tree, name, errors) for name in _SECTION_CLASSES}
    runners = _build_runners(tree, errors)
    server: ServerSettings = sections["server"]
    if bool(server.certificate_path) != bool(server.key_path):
        errors.add(
            tree.source_of("server.certificatePath"),
            "server.certificatePath",
            "certificatePath and keyPath must be set together (both empty: plain HTTP)",
        )
    if server.client_ca_path and not server.tls:
        errors.add(tree.source_of("server.clientCAPath"), "server.clientCAPath", "needs TLS")
    if server.redirect_address is not None and not server.tls:
        errors.add(tree.source_of("server.redirectAddress"), "server.redirectAddress", "needs TLS")
    sections["paseto"] = _secret_key(sections["paseto"], tree, errors)
    # The URL was validated with its key; here it is split and the password
    # taken from REDIS_PASSWORD when the URL has none.
    sections["redis"] = _redis_section(sections["redis"], environ)
    if sections["redis"].ca_path and not sections["redis"].tls:
        errors.add(tree.source_of("redis.caPath"), "redis.caPath", "needs rediss://")
    if sections["limits"].backend == "redis" and not sections["redis"].enabled:
        errors.add(
            tree.source_of("limits.backend"),
            "limits.backend",
            "redis needs redis.url (the top-level redis: section)",
        )
    errors.check()
    origins = {key: tree.source_of(key) for key in _SOURCE_KEYS}
    return Settings(runners=runners, sources=tuple(sources), origins=origins, **sections)


# Keys whose source service.py names in its own errors (files it opens).
_SOURCE_KEYS = (
    "server.certificatePath",
    "server.keyPath",
    "server.clientCAPath",
    "paseto.publicPath",
    "paseto.secretKey",
    "paseto.secretKeyPath",
    "paseto.publicKeys",
    "paseto.secretKeys",
    "paseto.implicitAssertion",
)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _secret_key(paseto: PasetoSettings, tree: _Tree, errors: _Errors) -> PasetoSettings:
    """paseto.secretKey, or the key in the file paseto.secretKeyPath names (as
    Docker and Kubernetes mount secrets): checked for shape here, where the
    error can name its source; the verifier decodes it."""
    k = "k4" if paseto.version == "v4" else "k2"
    key_source = tree.source_of("paseto.secretKey")
    path = paseto.secret_key_path
    text = paseto.secret_key
    where = (key_source, "paseto.secretKey")
    if path:
        path_source = tree.source_of("paseto.secretKeyPath")
        if text:
            errors.add(
                path_source,
                "paseto.secretKeyPath",
                f"set together with paseto.secretKey (from {key_source}); use one",
            )
            return paseto
        try:
            text = _read_secret(path)
        except ValueError as exc:
            errors.add(path_source, "paseto.secretKeyPath", f"{path}: {exc}")
            return paseto
        where = (path_source, f"paseto.secretKeyPath ({path})")
    if text and not (_HEX64.fullmatch(text.strip()) or text.strip().startswith(f"{k}.local.")):
        errors.add(*where, f"expected 64 hex digits or a {k}.local. PASERK")
    return dataclasses.replace(paseto, secret_key=text.strip())


def _read_secret(path: str) -> str:
    """A key file's text; refused when others could change it (see docs/settings.md)."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read(4096)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read ({type(exc).__name__})") from None
    if info.st_mode & 0o022:
        raise ValueError(
            f"writable by group or others (mode {info.st_mode & 0o777:o}): anyone could"
            " replace the key; chmod 600 or 400"
        )
    if not text.strip():
        raise ValueError("empty")
    return text


# Applied by a reload (service.py builds the resource tree from them).
_LIVE = frozenset({"server.corsOrigins", "server.readyWhen", "server.trustedProxies"})


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The dotted keys changed from ``old`` to ``new`` that a SIGHUP reload
    cannot apply: the listeners and what is built with them at start (server.*,
    metrics.*), the Redis connection (redis.*) and the log format."""
    changed = []
    for section in ("server", "metrics", "redis"):
        before, after = getattr(old, section), getattr(new, section)
        for key, (attr, _) in _SCHEMA[section].items():
            dotted = f"{section}.{key}"
            if dotted not in _LIVE and getattr(before, attr) != getattr(after, attr):
                changed.append(dotted)
    if old.logging.format != new.logging.format:
        changed.append("logging.format")
    return changed
