"""Settings errors name their source (file and key, variable, flag) and come
all at once; paseto.secretKeyPath reads the key from a mounted file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from runner_gateway.paseto import V4LocalKey, build_verifier
from runner_gateway.settings import (
    MAX_ERRORS,
    PasetoSettings,
    SettingsError,
    SettingsErrors,
    load_settings,
)

KEY = "ab" * 32


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    directory = tmp_path / "settings"
    directory.mkdir()
    (directory / "settings.yaml").write_text("runners: [{name: r, host: '127.0.0.1:1', path: /}]\n")
    return directory


def _error(sdir: Path, env: str | None = None, **environ: str) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(sdir, env=env, environ=environ)
    return info.value


def test_a_bad_secret_key_names_the_variable_or_the_file(sdir: Path) -> None:
    error = _error(sdir, PASETO_SECRET_KEY="not-a-key")
    assert str(error) == (
        "environment variable PASETO_SECRET_KEY: paseto.secretKey: "
        "expected 64 hex digits or a k4.local. PASERK"
    )
    (sdir / "my.yaml").write_text("paseto:\n  secretKey: not-a-key\n")
    error = _error(sdir, "my")
    assert str(error).startswith(f"{sdir / 'my.yaml'}: paseto.secretKey: expected 64 hex")
    assert "not-a-key" not in str(error)


def test_all_errors_of_a_load_come_together(sdir: Path) -> None:
    (sdir / "my.yaml").write_text(
        "logging: {level: loud}\n"
        "paseto: {expiration: 1y, secretKey: nope}\n"
        "server: {adress: ':1', workers: 0}\n"
        "runners: [{name: a, host: 'h:1', path: x}, {name: b, path: /b}]\n"
        "bogus: 1\n"
    )
    error = _error(sdir, "my", SERVER_ADDRESS="nowhere")
    assert isinstance(error, SettingsErrors)
    lines = str(error).splitlines()
    assert lines[0] == f"{len(error.errors)} settings errors:"
    my = str(sdir / "my.yaml")
    for expected in (
        f"{my}: bogus: unknown key",
        f"{my}: server.adress: unknown key",
        f"{my}: logging.level: unknown level",
        f"{my}: paseto.expiration: invalid duration",
        f"{my}: server.workers: must be at least 1",
        f"{my}: runners[0].path: must start with '/'",
        f"{my}: runners[1].host: required",
        f"{my}: paseto.secretKey: expected 64 hex digits",
        "environment variable SERVER_ADDRESS: server.address: invalid address",
    ):
        assert any(line.strip().startswith(expected) for line in lines[1:]), expected
    assert len(lines) == 1 + len(error.errors) == 10


def test_errors_are_capped(sdir: Path) -> None:
    (sdir / "many.yaml").write_text("".join(f"typo{i}: 1\n" for i in range(30)))
    error = _error(sdir, "many")
    assert isinstance(error, SettingsErrors) and len(error.errors) == 30
    lines = str(error).splitlines()
    assert len(lines) == 1 + MAX_ERRORS + 1
    assert lines[-1].strip() == f"... and {30 - MAX_ERRORS} more"


def test_one_error_stays_one_line(sdir: Path) -> None:
    (sdir / "one.yaml").write_text("server: {adress: ':1'}\n")
    error = _error(sdir, "one")
    assert not isinstance(error, SettingsErrors)
    assert str(error) == f"{sdir / 'one.yaml'}: server.adress: unknown key"


def test_an_invalid_env_name_names_the_variable(sdir: Path) -> None:
    assert str(_error(sdir, GO_ENV="../x")).startswith("environment variable GO_ENV: invalid")


def test_missing_certificate_names_the_key_and_its_source(
    sdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from runner_gateway.entry import make_service

    missing = sdir / "nope.pem"
    (sdir / "tls.yaml").write_text(
        f"server:\n  workers: 1\n  certificatePath: {missing}\n  keyPath: {missing}\n"
        f"paseto:\n  secretKey: {KEY}\n"
    )
    options: dict[str, Any] = {"settings": str(sdir), "env": "tls", "logging-level": None}
    with pytest.raises(SystemExit):
        make_service(options, reactor=MemoryReactorClock())
    err = capfd.readouterr().err
    assert f"{sdir / 'tls.yaml'}: server.certificatePath {missing}: file not found" in err


# ------------------------------------------------------------ secretKeyPath


def _key_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "paseto-secret"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o644, 0o444])
def test_secret_key_path_reads_the_key(sdir: Path, tmp_path: Path, mode: int) -> None:
    # 0444 and 0644: how Docker and Kubernetes mount secrets by default.
    path = _key_file(tmp_path, KEY + "\n", mode)
    (sdir / "my.yaml").write_text(f"paseto:\n  secretKeyPath: {path}\n")
    settings = load_settings(sdir, env="my", environ={})
    assert settings.paseto.secret_key == KEY
    assert settings.paseto.secret_key_path == str(path)


def test_secret_key_path_takes_a_paserk(sdir: Path, tmp_path: Path) -> None:
    key = V4LocalKey.generate()
    path = _key_file(tmp_path, key.paserk())
    (sdir / "my.yaml").write_text(f"paseto:\n  secretKeyPath: {path}\n")
    verifier = build_verifier(load_settings(sdir, env="my", environ={}).paseto)
    assert verifier is not None


def test_secret_key_and_path_together_are_refused(sdir: Path, tmp_path: Path) -> None:
    path = _key_file(tmp_path, KEY)
    (sdir / "my.yaml").write_text(f"paseto:\n  secretKeyPath: {path}\n")
    error = _error(sdir, "my", PASETO_SECRET_KEY=KEY)
    assert str(error) == (
        f"{sdir / 'my.yaml'}: paseto.secretKeyPath: set together with paseto.secretKey "
        "(from environment variable PASETO_SECRET_KEY); use one"
    )


@pytest.mark.parametrize(
    ("text", "mode", "fragment"),
    [
        (None, 0o600, "file not found"),
        ("", 0o600, "empty"),
        ("cafe" * 8, 0o600, "expected 64 hex digits or a k4.local. PASERK"),
        (KEY, 0o664, "writable by group or others (mode 664)"),
        (KEY, 0o606, "writable by group or others (mode 606)"),
    ],
)
def test_bad_secret_key_files_name_key_and_source(
    sdir: Path, tmp_path: Path, text: str | None, mode: int, fragment: str
) -> None:
    path = tmp_path / "paseto-secret"
    if text is not None:
        path = _key_file(tmp_path, text, mode)
    (sdir / "my.yaml").write_text(f"paseto:\n  secretKeyPath: {path}\n")
    message = str(_error(sdir, "my"))
    assert message.startswith(f"{sdir / 'my.yaml'}: paseto.secretKeyPath")
    assert fragment in message
    assert "cafe" not in message and KEY not in message


def test_verifier_errors_name_the_source() -> None:
    settings = PasetoSettings(public_keys=("k4.public.nope",))
    with pytest.raises(SettingsError) as info:
        build_verifier(settings, source_of=lambda key: f"file-for-{key}")
    assert str(info.value).startswith("file-for-paseto.publicKeys: paseto.publicKeys[0]:")
