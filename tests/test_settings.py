"""Settings: layering, strict validation, and error messages that name file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner_gateway.settings import (
    Address,
    HealthCheckSettings,
    LimitsSettings,
    SettingsError,
    TierLimits,
    load_settings,
    parse_duration,
    parse_hostport,
    parse_size,
)

BASE = """
logging:
  level: info
paseto:
  version: v4
  expiration: 8766h
runners:
  - name: ollama
    host: 127.0.0.1:11434
    path: /
    scheme: http
server:
  address: :8443
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    write(tmp_path, "settings.yaml", BASE)
    return tmp_path


def test_defaults_without_any_file(tmp_path: Path) -> None:
    s = load_settings(tmp_path, environ={})
    assert s.paseto.version == "v4"
    assert s.paseto.expiration == 8766 * 3600
    assert s.server.address == Address("", 8443)
    assert [(r.name, r.host, r.port, r.path) for r in s.runners] == [
        ("ollama", "127.0.0.1", 11434, "/")
    ]
    # A model load can take minutes before the first header: the default must allow it.
    assert s.runners[0].first_byte_timeout >= 300
    assert s.runners[0].total_timeout == 0


def test_shipped_settings_file_loads() -> None:
    shipped = Path(__file__).resolve().parent.parent / "settings"
    s = load_settings(shipped, environ={})
    assert s.paseto.key_path == "./settings/paseto.key"
    assert s.paseto.public_path == "./settings/paseto.pub"


def test_env_overlay_merges_mappings_and_replaces_lists(sdir: Path) -> None:
    write(
        sdir,
        "my-domain.yaml",
        """
logging: {level: debug}
runners:
  - {name: a, host: "127.0.0.1:1", path: /local-ollama}
  - {name: b, host: "other.host:11434", path: /corp-ollama, scheme: https}
""",
    )
    s = load_settings(sdir, env="my-domain", environ={})
    assert s.logging.level == "debug"
    assert s.paseto.version == "v4"  # untouched keys survive the merge
    assert [r.path for r in s.runners] == ["/local-ollama", "/corp-ollama"]
    assert s.runners[1].base_url == "https://other.host:11434"
    assert s.sources[-1].endswith("my-domain.yaml")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"GO_ENV": "a"}, "debug"),
        ({"RUNNER_GATEWAY_ENV": "b", "GO_ENV": "a"}, "warn"),
        ({}, "info"),
    ],
)
def test_env_name_falls_back_to_variables(
    sdir: Path, environ: dict[str, str], expected: str
) -> None:
    write(sdir, "a.yaml", "logging: {level: debug}\n")
    write(sdir, "b.yaml", "logging: {level: warn}\n")
    assert load_settings(sdir, environ=environ).logging.level == expected


def test_flag_beats_variables(sdir: Path) -> None:
    write(sdir, "a.yaml", "logging: {level: debug}\n")
    write(sdir, "b.yaml", "logging: {level: warn}\n")
    s = load_settings(sdir, env="a", environ={"RUNNER_GATEWAY_ENV": "b"})
    assert s.logging.level == "debug"


def test_environment_variables_override_files(sdir: Path) -> None:
    environ = {
        "LOGGING_LEVEL": "error",
        "PASETO_SECRET_KEY": "ab" * 32,
        "SERVER_ADDRESS": "127.0.0.1:9443",
        "SERVER_CERTIFICATE_PATH": "/c.pem",
        "SERVER_KEY_PATH": "/k.pem",
    }
    s = load_settings(sdir, environ=environ, logging_level=None)
    assert s.logging.level == "error"
    assert s.paseto.secret_key == "ab" * 32
    assert s.server.address == Address("127.0.0.1", 9443)
    assert (s.server.certificate_path, s.server.key_path) == ("/c.pem", "/k.pem")
    assert s.server.tls


def test_command_line_level_wins(sdir: Path) -> None:
    s = load_settings(sdir, environ={"LOGGING_LEVEL": "error"}, logging_level="trace")
    assert s.logging.level == "trace"


@pytest.mark.parametrize(
    ("overlay", "key", "fragment"),
    [
        ("paseto: {secretkey: x}\n", "paseto.secretkey", "unknown key"),
        ("pasteo: {}\n", "pasteo", "unknown key"),
        (
            "runners: [{name: a, host: 'h:1', path: /, shceme: http}]\n",
            "runners[0].shceme",
            "unknown",
        ),
        ("logging: {level: loud}\n", "logging.level", "unknown level"),
        ("paseto: {version: v3}\n", "paseto.version", "unsupported PASETO version"),
        ("paseto: {expiration: 1year}\n", "paseto.expiration", "invalid duration"),
        ("paseto: {expiration: 10}\n", "paseto.expiration", "expected a duration"),
        ("server: {address: '8443'}\n", "server.address", "invalid address"),
        ("server: {address: ':99999'}\n", "server.address", "invalid port"),
        ("paseto: {requireExpiration: 'no'}\n", "paseto.requireExpiration", "true or false"),
        ("runners: [{name: a, host: 'h:1', path: /x, scheme: ftp}]\n", "runners[0].scheme", "ftp"),
        ("runners: [{name: a, host: 'h:1', path: x}]\n", "runners[0].path", "start with '/'"),
        ("runners: [{name: a, host: 'h:1'}]\n", "runners[0].path", "required"),
        ("runners: []\n", "runners", "at least one runner"),
        (
            "runners: [{name: a, host: 'h:1', path: /c}, {name: b, host: 'h:2', path: /c/}]\n",
            "runners[1].path",
            "duplicate path '/c'",
        ),
        ("runners: [{name: a, host: 'h:1', path: /, maxBodySize: lots}]\n", "maxBodySize", "size"),
        ("authorization: {defaultScopes: [everything]}\n", "defaultScopes", "unknown scope"),
        ("server: {corsOrigins: [example.com]}\n", "server.corsOrigins", "invalid origin"),
        ("server: {certificatePath: /c.pem}\n", "server.certificatePath", "together"),
        ("server: {trustedProxies: [10.0.0.1/8]}\n", "server.trustedProxies", "host bits"),
        ("server: {trustedProxies: [lb.example]}\n", "server.trustedProxies", "invalid network"),
        ("server: {trustedProxies: 10.0.0.0/8}\n", "server.trustedProxies", "list"),
        ("server: {trustedProxies: [8]}\n", "server.trustedProxies", "expected a network"),
        (
            "runners: [{name: a, host: 'h:1', path: /, forwardHeaders: [Authorization]}]\n",
            "runners[0].forwardHeaders",
            "cannot be named",
        ),
    ],
)
def test_bad_values_name_file_and_key(sdir: Path, overlay: str, key: str, fragment: str) -> None:
    write(sdir, "bad.yaml", overlay)
    with pytest.raises(SettingsError) as info:
        load_settings(sdir, env="bad", environ={})
    message = str(info.value)
    assert key in message
    assert fragment in message
    assert "bad.yaml" in message
    assert "\n" not in message


def test_missing_env_file(sdir: Path) -> None:
    with pytest.raises(SettingsError, match=r"nope\.yaml: file not found"):
        load_settings(sdir, env="nope", environ={})


def test_invalid_yaml_names_line(sdir: Path) -> None:
    write(sdir, "broken.yaml", "logging:\n  level: [info\n")
    with pytest.raises(SettingsError, match=r"broken\.yaml: invalid YAML \(line \d+\)"):
        load_settings(sdir, env="broken", environ={})


def test_duplicate_yaml_keys_are_refused(sdir: Path) -> None:
    # A second "secretKey" must not silently replace the first.
    write(sdir, "dup.yaml", "paseto:\n  secretKey: a\n  secretKey: b\n")
    with pytest.raises(SettingsError, match="duplicate key 'secretKey'"):
        load_settings(sdir, env="dup", environ={})


def test_env_name_cannot_escape_the_directory(sdir: Path) -> None:
    with pytest.raises(SettingsError, match="invalid settings name"):
        load_settings(sdir, env="../etc/passwd", environ={})


def test_error_from_environment_variable_names_it(sdir: Path) -> None:
    expected = r"environment variable SERVER_ADDRESS: server\.address"
    with pytest.raises(SettingsError, match=expected):
        load_settings(sdir, environ={"SERVER_ADDRESS": "nonsense"})


def test_top_level_must_be_mapping(sdir: Path) -> None:
    write(sdir, "list.yaml", "- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping at the top level"):
        load_settings(sdir, env="list", environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("8766h", 8766 * 3600),
        ("90s", 90),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("0", 0),
        ("2h45m10s", 9910),
        ("100us", 0.0001),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1d", "h", "1h 30m", "-1s", "1.2.3s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (1024, 1024), ("64MiB", 64 * 2**20), ("10MB", 10**7), ("1GiB", 2**30), ("5", 5)],
)
def test_sizes(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8443", ("", 8443)),
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("gw.example.com:443", ("gw.example.com", 443)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["8443", "::1:8443", "[::1", "[nothex]:1", "a b:1", "h:port"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_hostport(text)


def test_runner_host_defaults_port_by_scheme(sdir: Path) -> None:
    write(
        sdir,
        "r.yaml",
        "runners: [{name: a, host: api.example.com, path: /a, scheme: https},"
        " {name: b, host: '[::1]:11434', path: /b}]\n",
    )
    s = load_settings(sdir, env="r", environ={})
    assert (s.runners[0].port, s.runners[0].netloc) == (443, "api.example.com")
    assert s.runners[1].netloc == "[::1]:11434"


def test_endpoint_rules(sdir: Path) -> None:
    write(
        sdir,
        "e.yaml",
        "runners: [{name: a, host: 'h:1', path: /, endpoints: "
        "[{methods: [post], path: /completion, scope: inference}, "
        "{methods: GET, path: /props/*, scope: 'models:read'}]}]\n",
    )
    rules = load_settings(sdir, env="e", environ={}).runners[0].endpoints
    assert [(r.methods, r.path, r.scope) for r in rules] == [
        (("POST",), "/completion", "inference"),
        (("GET",), "/props/*", "models:read"),
    ]


def test_trusted_proxies_and_forward_headers(sdir: Path) -> None:
    settings = load_settings(sdir, environ={})
    assert not settings.server.trusted_proxies  # nobody by default
    assert settings.runners[0].forward_headers == ()
    write(
        sdir,
        "lb.yaml",
        "server:\n  trustedProxies: [10.0.0.0/8, '::1']\n"
        "runners:\n  - {name: a, host: 'h:1', path: /, forwardHeaders: [Cookie, X-Api-Key]}\n",
    )
    settings = load_settings(sdir, env="lb", environ={})
    assert settings.server.trusted_proxies.is_trusted("10.2.3.4")
    assert settings.server.trusted_proxies.is_trusted("::1")
    assert not settings.server.trusted_proxies.is_trusted("127.0.0.1")
    assert settings.runners[0].forward_headers == ("cookie", "x-api-key")


# ------------------------------------------------------------------ limits


def test_limits_as_the_issue_shows_them(sdir: Path) -> None:
    write(
        sdir,
        "limited.yaml",
        "limits:\n"
        "  backend: local\n"
        "  onBackendError: deny\n"
        "  default:\n"
        "    requestsPerMinute: 0\n"
        "    concurrentRequests: 0\n"
        "    tokensPerDay: 0\n"
        "  tiers:\n"
        "    trial: {requestsPerMinute: 20, concurrentRequests: 2, tokensPerDay: 50000}\n"
        "    team:  {requestsPerMinute: 600, concurrentRequests: 16, tokensPerDay: 0}\n"
        "runners: [{name: a, host: 'h:1', path: /, requestUsage: false}]\n",
    )
    limits = load_settings(sdir, env="limited", environ={}).limits
    assert limits.backend == "local"
    assert limits.on_backend_error == "deny"
    assert limits.default == TierLimits()
    assert limits.tiers == (
        ("team", TierLimits(600, 16, 0)),
        ("trial", TierLimits(20, 2, 50000)),
    )
    assert limits.enabled
    assert load_settings(sdir, env="limited", environ={}).runners[0].request_usage is False


def test_limits_off_by_default_and_absent_means_unlimited(sdir: Path) -> None:
    settings = load_settings(sdir, environ={})
    assert settings.limits == LimitsSettings()
    assert not settings.limits.enabled
    assert settings.runners[0].request_usage is True
    write(sdir, "partial.yaml", "limits:\n  default: {requestsPerMinute: 5}\n")
    limits = load_settings(sdir, env="partial", environ={}).limits
    assert limits.default == TierLimits(requests_per_minute=5)
    assert limits.enabled


def test_limits_backend_redis_with_redis_url(sdir: Path) -> None:
    write(sdir, "r.yaml", "limits: {backend: redis}\nredis: {url: redis://cache}\n")
    settings = load_settings(sdir, env="r", environ={})
    assert settings.limits.backend == "redis"
    assert settings.redis.enabled


@pytest.mark.parametrize(
    ("overlay", "key", "fragment"),
    [
        (
            "limits: {backend: redis}\n",
            "limits.backend",
            "redis needs redis.url (the top-level redis: section)",
        ),
        ("limits: {backend: memcached}\n", "limits.backend", "unknown backend"),
        ("limits: {onBackendError: maybe}\n", "limits.onBackendError", "allow or deny"),
        ("limits: {rpm: 3}\n", "limits.rpm", "unknown key"),
        ("limits: {default: {requestPerMinute: 3}}\n", "limits.default", "requestPerMinute"),
        ("limits: {default: {tokensPerDay: -1}}\n", "limits.default", "must not be negative"),
        ("limits: {default: {tokensPerDay: 1.5}}\n", "limits.default", "whole number"),
        ("limits: {default: 5}\n", "limits.default", "a mapping of limits"),
        ("limits: {tiers: {trial: {burst: 1}}}\n", "limits.tiers", "trial: unknown key 'burst'"),
        ("limits: {tiers: {'bad tier': {}}}\n", "limits.tiers", "invalid tier name"),
        ("limits: {tiers: {default: {}}}\n", "limits.tiers", "'default' is the limits.default"),
        ("limits: {tiers: [trial]}\n", "limits.tiers", "a mapping of tier names"),
        (
            "runners: [{name: a, host: 'h:1', path: /, requestUsage: 'no'}]\n",
            "runners[0].requestUsage",
            "true or false",
        ),
    ],
)
def test_bad_limits_name_file_and_key(sdir: Path, overlay: str, key: str, fragment: str) -> None:
    write(sdir, "bad.yaml", overlay)
    with pytest.raises(SettingsError) as info:
        load_settings(sdir, env="bad", environ={})
    message = str(info.value)
    assert key in message
    assert fragment in message
    assert "bad.yaml" in message


# ------------------------------------------------- token lifecycle (issue 18)


def test_lifecycle_paths_and_public_url(sdir: Path) -> None:
    write(
        sdir,
        "dev.yaml",
        "server:\n  publicUrl: https://gw.example.com:8443/\n"
        "paseto:\n  revocationPath: /var/lib/gw/revoked.jsonl\n  ledgerPath: ledger.jsonl\n",
    )
    settings = load_settings(sdir, env="dev", environ={})
    assert settings.paseto.revocation_path == "/var/lib/gw/revoked.jsonl"
    assert settings.paseto.ledger_path == "ledger.jsonl"
    assert settings.server.public_url == "https://gw.example.com:8443"  # no trailing /
    defaults = load_settings(sdir / "nowhere", environ={})
    assert (defaults.paseto.revocation_path, defaults.paseto.ledger_path) == ("", "")
    assert defaults.server.public_url == "" and not defaults.redis.enabled


@pytest.mark.parametrize(
    "url",
    [
        "gw.example.com",
        "ftp://gw",
        "https://gw/x?y=1",
        "https://gw/#f",
        "https://a b/",
        "https://gw/ai",
    ],
)
def test_bad_public_urls(sdir: Path, url: str) -> None:
    write(sdir, "settings.yaml", f"server:\n  publicUrl: '{url}'\n")
    with pytest.raises(SettingsError, match=r"server\.publicUrl: "):
        load_settings(sdir, environ={})


def test_redis_section(sdir: Path) -> None:
    write(
        sdir,
        "settings.yaml",
        "redis:\n  url: rediss://user:s%40cret@cache.example:6380/3\n"
        "  keyPrefix: 'gw:'\n  caPath: /etc/ca.pem\n  commandTimeout: 500ms\n",
    )
    redis = load_settings(sdir, environ={"REDIS_PASSWORD": "ignored"}).redis
    assert (redis.host, redis.port, redis.tls, redis.database) == ("cache.example", 6380, True, 3)
    assert (redis.username, redis.password) == ("user", "s@cret")  # the URL's beats the variable
    assert (redis.key_prefix, redis.ca_path, redis.command_timeout) == ("gw:", "/etc/ca.pem", 0.5)
    # The password is never in what could be logged.
    assert "cret" not in repr(redis) and "cret" not in redis.display_url
    assert redis.display_url == "rediss://cache.example:6380/3"
    write(sdir, "settings.yaml", "redis:\n  url: redis://cache\n")
    redis = load_settings(sdir, environ={"REDIS_PASSWORD": "pw"}).redis
    assert (redis.password, redis.port, redis.tls, redis.key_prefix) == (
        "pw",
        6379,
        False,
        "runner-gateway:",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("redis:\n  url: http://cache\n", "redis.url: expected a redis:// or rediss://"),
        ("redis:\n  url: redis://\n", "redis.url: the URL needs a host"),
        ("redis:\n  url: redis://cache/x\n", "redis.url: the path must be a database number"),
        ("redis:\n  url: redis://cache?x=1\n", "redis.url: no query"),
        ("redis:\n  url: redis://cache:99999\n", "redis.url: invalid URL"),
        ("redis:\n  url: redis://a_b c\n", "redis.url"),
        ('redis:\n  keyPrefix: "a b"\n', "redis.keyPrefix: use at most 100"),
        ("redis:\n  commandTimeout: soon\n", "redis.commandTimeout"),
        ("redis:\n  url: redis://cache\n  caPath: /ca.pem\n", "redis.caPath: needs rediss://"),
        ("redis:\n  colour: red\n", "redis.colour: unknown key"),
        ("redis:\n", "redis: empty section"),
    ],
)
def test_bad_redis_settings(sdir: Path, body: str, message: str) -> None:
    write(sdir, "settings.yaml", body)
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(sdir, environ={})


# ------------------------------------------------------------- runner pools


def test_host_is_a_pool_of_one_with_the_pool_defaults(sdir: Path) -> None:
    runner = load_settings(sdir, environ={}).runners[0]
    assert runner.addresses == (Address("127.0.0.1", 11434),)
    assert runner.balance == "model-aware"  # the built-in (Ollama) endpoint table
    assert runner.health_check == HealthCheckSettings("/", 5.0, 2.0, 2, 1)
    assert (runner.max_concurrent, runner.max_queue, runner.queue_timeout) == (0, 64, 60.0)
    assert 0 < runner.keep_alive < 5  # below uvicorn's 5 s idle timeout
    assert runner.strict_models is True
    assert load_settings(sdir, environ={}).server.ready_when == "any"


def test_a_pool_of_hosts(sdir: Path) -> None:
    write(
        sdir,
        "p.yaml",
        "runners:\n"
        "  - name: gpu\n"
        "    path: /gpu\n"
        "    scheme: https\n"
        "    hosts: [10.0.0.5:11434, gpu6.example.com, '[::1]:8080']\n"
        "    balance: round-robin\n"
        "    healthCheck: {path: /api/version, interval: 10s, timeout: 1s,"
        " unhealthyAfter: 3, healthyAfter: 2}\n"
        "    maxConcurrent: 4\n"
        "    maxQueue: 8\n"
        "    queueTimeout: 2m\n"
        "    keepAlive: 2s\n"
        "    strictModels: false\n"
        "server: {readyWhen: all}\n",
    )
    s = load_settings(sdir, env="p", environ={})
    runner = s.runners[0]
    assert runner.addresses == (
        Address("10.0.0.5", 11434),
        Address("gpu6.example.com", 443),
        Address("::1", 8080),
    )
    assert (runner.host, runner.port) == ("10.0.0.5", 11434)
    assert runner.balance == "round-robin"
    assert runner.health_check == HealthCheckSettings("/api/version", 10.0, 1.0, 3, 2)
    assert (runner.max_concurrent, runner.max_queue, runner.queue_timeout) == (4, 8, 120.0)
    assert (runner.keep_alive, runner.strict_models) == (2.0, False)
    assert s.server.ready_when == "all"


def test_own_endpoint_table_balances_by_outstanding_requests(sdir: Path) -> None:
    write(
        sdir,
        "e.yaml",
        "runners: [{name: a, host: 'h:1', path: /, endpoints: "
        "[{methods: [post], path: /completion, scope: inference}]}]\n",
    )
    assert load_settings(sdir, env="e", environ={}).runners[0].balance == "least-outstanding"


def test_health_checks_can_be_off(sdir: Path) -> None:
    write(
        sdir, "h.yaml", "runners: [{name: a, host: 'h:1', path: /, healthCheck: {interval: 0}}]\n"
    )
    assert load_settings(sdir, env="h", environ={}).runners[0].health_check.interval == 0


@pytest.mark.parametrize(
    ("runner", "key", "fragment"),
    [
        ("hosts: ['h:1'], host: 'h:2'", "runners[0].hosts", "not both"),
        ("hosts: []", "runners[0].hosts", "at least one"),
        ("hosts: 'h:1'", "runners[0].hosts", "a list"),
        ("hosts: ['h:1', 'h:x']", "runners[0].hosts[1]", "invalid port"),
        ("hosts: ['h:1', 'h:1']", "runners[0].hosts[1]", "duplicate host"),
        ("hosts: [':1']", "runners[0].hosts[0]", "host name or address is required"),
        ("host: 'h:1', balance: random", "runners[0].balance", "unknown balance"),
        ("host: 'h:1', healthCheck: {path: /, every: 5s}", "healthCheck", "unknown key 'every'"),
        ("host: 'h:1', healthCheck: {path: health}", "healthCheck", "starting with '/'"),
        ("host: 'h:1', healthCheck: {interval: 5}", "healthCheck", "interval: expected a duration"),
        ("host: 'h:1', healthCheck: {unhealthyAfter: 0}", "healthCheck", "at least 1"),
        ("host: 'h:1', healthCheck: {interval: 1s, timeout: 2s}", "healthCheck", "at most"),
        ("host: 'h:1', healthCheck: [1]", "healthCheck", "a mapping"),
        ("host: 'h:1', maxConcurrent: -1", "runners[0].maxConcurrent", "negative"),
        ("host: 'h:1', maxQueue: many", "runners[0].maxQueue", "whole number"),
        ("host: 'h:1', queueTimeout: soon", "runners[0].queueTimeout", "invalid duration"),
        ("host: 'h:1', keepAlive: 4", "runners[0].keepAlive", "a duration"),
        ("host: 'h:1', strictModels: 'yes'", "runners[0].strictModels", "true or false"),
        ("path: /x", "runners[0].host", "required (or hosts)"),
    ],
)
def test_bad_pool_settings(sdir: Path, runner: str, key: str, fragment: str) -> None:
    if "path:" not in runner:
        runner += ", path: /"
    write(sdir, "bad.yaml", f"runners: [{{name: a, {runner}}}]\n")
    with pytest.raises(SettingsError) as info:
        load_settings(sdir, env="bad", environ={})
    message = str(info.value)
    assert key in message and fragment in message and "bad.yaml" in message


def test_ready_when_is_any_or_all(sdir: Path) -> None:
    write(sdir, "bad.yaml", "server: {readyWhen: most}\n")
    with pytest.raises(SettingsError, match=r"server\.readyWhen: must be any or all"):
        load_settings(sdir, env="bad", environ={})


def test_body_min_rate_defaults_and_values(sdir: Path) -> None:
    server = load_settings(sdir, environ={}).server
    assert (server.body_min_rate, server.body_min_rate_grace) == (1024, 30.0)
    write(sdir, "slow.yaml", "server: {bodyMinRate: 0, bodyMinRateGrace: 5s}\n")
    server = load_settings(sdir, env="slow", environ={}).server
    assert (server.body_min_rate, server.body_min_rate_grace) == (0, 5.0)


@pytest.mark.parametrize(
    ("overlay", "key", "fragment"),
    [
        ("server: {bodyMinRate: fast}\n", "server.bodyMinRate", "invalid size"),
        ("server: {bodyMinRate: -1}\n", "server.bodyMinRate", "negative"),
        ("server: {bodyMinRateGrace: 30}\n", "server.bodyMinRateGrace", "a duration"),
    ],
)
def test_body_min_rate_bad_values(sdir: Path, overlay: str, key: str, fragment: str) -> None:
    write(sdir, "bad.yaml", overlay)
    with pytest.raises(SettingsError) as info:
        load_settings(sdir, env="bad", environ={})
    assert key in str(info.value) and fragment in str(info.value)


def test_connection_caps(sdir: Path) -> None:
    server = load_settings(sdir, environ={}).server
    assert (server.max_connections, server.max_connections_per_client) == (0, 256)
    write(sdir, "caps.yaml", "server: {maxConnections: 5000, maxConnectionsPerClient: 0}\n")
    server = load_settings(sdir, env="caps", environ={}).server
    assert (server.max_connections, server.max_connections_per_client) == (5000, 0)
    write(sdir, "bad.yaml", "server: {maxConnections: -1}\n")
    with pytest.raises(SettingsError, match=r"server\.maxConnections.*negative"):
        load_settings(sdir, env="bad", environ={})
