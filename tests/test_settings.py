"""Settings: layering, strict validation, and error messages that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_gateway.settings import (
    Address,
    SettingsError,
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
