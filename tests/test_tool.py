"""bin/paseto-tool: keys, tokens and validation, run as the user runs it."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from runner_gateway.paseto import build_verifier, load_local_key, load_public_key
from runner_gateway.settings import load_settings
from runner_gateway.tool import UsageError, main, parse_flags

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bin" / "paseto-tool"
_ENV_VARS = ("GO_ENV", "RUNNER_GATEWAY_ENV", "PASETO_SECRET_KEY", "LOGGING_LEVEL")


def run(
    cwd: Path, *args: str, module: bool = False, stdin: str | None = None, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    """The tool in a child process, via bin/paseto-tool or ``python -m``."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
    env.pop("PYTHONPATH", None)
    if module:
        env["PYTHONPATH"] = str(ROOT)
        command = [sys.executable, "-m", "runner_gateway.tool", *args]
    else:
        command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(umask),  # the test runs no threads
        check=False,
    )


def clean_failure(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("paseto-tool: ")
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "settings").mkdir()
    write_settings(tmp_path, "paseto:\n  version: v4\n  expiration: 1h\n")
    return tmp_path


def write_settings(workdir: Path, text: str, name: str = "settings.yaml") -> None:
    (workdir / "settings" / name).write_text(text)


def symmetric(workdir: Path, *args: str) -> dict[str, str]:
    result = run(workdir, "-action=symmetric", *args)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    return {k.strip(): v.strip() for k, v in fields.items()}


def claims_of(workdir: Path, token: str) -> dict[str, Any]:
    result = run(workdir, "-action=validate", f"-token={token}")
    assert result.returncode == 0, result.stderr
    claims: dict[str, Any] = json.loads(result.stdout)
    return claims


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------ keys


def test_asymmetric_writes_a_0600_key_and_refuses_to_overwrite(workdir: Path) -> None:
    result = run(workdir, "-action=asymmetric", umask=0)  # the mode must not depend on umask
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    key, pub = workdir / "settings" / "paseto.key", workdir / "settings" / "paseto.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    public = load_public_key(pub.read_text(), "v4")
    assert public.paserk() in result.stderr
    assert public.paserk_id() in result.stderr
    assert public.paserk_id().startswith("k4.pid.")
    before = key.read_bytes(), pub.read_bytes()

    line = clean_failure(run(workdir, "--action", "asymmetric"), 1)
    assert "already exists" in line and "-force" in line
    assert (key.read_bytes(), pub.read_bytes()) == before

    result = run(workdir, "-action=asymmetric", "-force", umask=0)
    assert result.returncode == 0, result.stderr
    assert key.read_bytes() != before[0] and pub.read_bytes() != before[1]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in (workdir / "settings").iterdir()) == [
        "paseto.key",
        "paseto.pub",
        "settings.yaml",
    ]


def test_asymmetric_refuses_when_only_the_public_key_exists(workdir: Path) -> None:
    (workdir / "settings" / "paseto.pub").write_text("old")
    clean_failure(run(workdir, "-action=asymmetric"), 1)
    assert not (workdir / "settings" / "paseto.key").exists()
    assert (workdir / "settings" / "paseto.pub").read_text() == "old"


def test_symmetric_output_parses(workdir: Path) -> None:
    fields = symmetric(workdir)
    assert set(fields) == {"hex", "paserk", "lid"}
    from_hex = load_local_key(fields["hex"], "v4")
    from_paserk = load_local_key(fields["paserk"], "v4")
    assert from_hex.raw == from_paserk.raw and len(from_hex.raw) == 32
    assert fields["paserk"].startswith("k4.local.")
    assert from_hex.paserk_id() == fields["lid"] and fields["lid"].startswith("k4.lid.")
    assert symmetric(workdir)["hex"] != fields["hex"]


# ---------------------------------------------------------------- tokens


def test_public_token_carries_the_flags_and_validates(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(workdir, "-action=asymmetric").returncode == 0
    result = run(
        workdir,
        "--action=public",
        "-sub=alice",
        "-aud",
        "gateway",
        "--iss=issuer-1",
        "-jti=token-7",
        "-scope",
        "inference  models:read",
        "-models=llama3:*,tiny*",
        "-runners=ollama, corp",
        "-kid",
        "-force",  # corp is no runner of these settings
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # the token alone on stdout
    assert token.startswith("v4.public.")
    claims = claims_of(workdir, token)
    assert claims["sub"] == "alice" and claims["aud"] == "gateway"
    assert claims["iss"] == "issuer-1" and claims["jti"] == "token-7"
    assert claims["scope"] == "inference models:read"
    assert claims["models"] == ["llama3:*", "tiny*"]
    assert claims["runners"] == ["ollama", "corp"]
    # iat to the microsecond (for -action=revoke -sub), nbf and exp in whole seconds.
    assert epoch(claims["nbf"]) == int(epoch(claims["iat"]))
    assert epoch(claims["exp"]) - epoch(claims["nbf"]) == 3600  # paseto.expiration
    # The footer names the key, and the gateway's verifier agrees.
    settings = load_settings(workdir / "settings", environ={})
    monkeypatch.chdir(workdir)  # keyPath and publicPath are relative, as for the server
    verified = build_verifier(settings.paseto).verify(token)
    public = load_public_key((workdir / "settings" / "paseto.pub").read_text(), "v4")
    assert verified.kid == public.paserk_id()


def test_private_token_validates_via_module_and_stdin(workdir: Path) -> None:
    secret = symmetric(workdir)["paserk"]
    write_settings(workdir, f"paseto:\n  expiration: 2h\n  secretKey: {secret}\n")
    result = run(workdir, "-action=private", "-sub=bob", "-exp=30m", "-kid", module=True)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("v4.local.")
    checked = run(workdir, "-action=validate", "-token=-", module=True, stdin=token + "\n")
    assert checked.returncode == 0, checked.stderr
    claims = json.loads(checked.stdout)
    assert claims["sub"] == "bob"
    assert epoch(claims["exp"]) - epoch(claims["nbf"]) == 1800  # -exp beats the settings
    assert len(claims["jti"]) >= 16
    assert load_local_key(secret, "v4").paserk_id() in checked.stderr  # the footer's kid


def test_defaults_come_from_the_env_overlay(workdir: Path) -> None:
    write_settings(
        workdir,
        "paseto:\n  version: v2\n  issuer: corp-issuer\n  audience: corp-gw\n",
        name="corp.yaml",
    )
    assert run(workdir, "-action=asymmetric", "--env", "corp").returncode == 0
    assert "paserk: k2.local." in run(workdir, "-action=symmetric", "-env=corp").stdout
    first = run(workdir, "-action=public", "-env=corp")
    second = run(workdir, "-action=public", "-env=corp")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert token.startswith("v2.public.")
    result = run(workdir, "-action=validate", f"-token={token}", "--env=corp")
    assert result.returncode == 0, result.stderr
    claims = json.loads(result.stdout)
    assert claims["iss"] == "corp-issuer" and claims["aud"] == "corp-gw"
    assert "sub" not in claims and "scope" not in claims
    assert (
        claims["jti"]
        != json.loads(
            run(workdir, "-action=validate", "-env=corp", "-token", second.stdout.strip()).stdout
        )["jti"]
    )
    # Without the overlay the default v4 settings refuse the v2 token.
    line = clean_failure(run(workdir, "-action=validate", f"-token={token}"), 1)
    assert "wrong_version" in line


def test_expired_and_tampered_tokens_are_refused(workdir: Path) -> None:
    assert run(workdir, "-action=asymmetric").returncode == 0
    expired = run(workdir, "-action=public", "-exp=-2h")
    assert expired.returncode == 0 and "expired" in expired.stderr
    line = clean_failure(run(workdir, "-action=validate", f"-token={expired.stdout.strip()}"), 1)
    assert "expired" in line

    token = run(workdir, "-action=public", "-sub=alice").stdout.strip()
    prefix, payload = token[: len("v4.public.")], token[len("v4.public.") :]
    flipped = payload[:5] + ("A" if payload[5] != "A" else "B") + payload[6:]
    line = clean_failure(run(workdir, "-action=validate", f"-token={prefix}{flipped}"), 1)
    assert "invalid token" in line
    assert payload[:20] not in line


# ------------------------------------------------------- flags and errors


@pytest.mark.parametrize(
    "argv",
    [
        ["-action=public", "-force", "-kid=false"],
        ["--action", "public", "--force=true", "--kid=0"],
        ["-action", "public", "-force", "--", "ignored?"],
    ],
)
def test_go_flag_forms(argv: list[str]) -> None:
    if argv[-1] == "ignored?":
        with pytest.raises(UsageError):
            parse_flags(argv)
        return
    assert parse_flags(argv) == {"action": "public", "force": True, "kid": False}


def test_flag_values_may_start_with_a_dash() -> None:
    assert parse_flags(["-exp", "-1h", "-token", "-"]) == {"exp": "-1h", "token": "-"}


def in_process(workdir: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    monkeypatch.chdir(workdir)
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdin=io.StringIO(""), stdout=out, stderr=err)
    assert out.getvalue() == ""
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    return status, err.getvalue()


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        ([], 2, "missing -action"),
        (["-action=launch"], 2, "unknown action"),
        (["-action=public", "-nope"], 2, "not defined: -nope"),
        (["-action=public", "-sub"], 2, "needs an argument"),
        (["-action=public", "-exp=soon"], 2, "-exp"),
        (["-action=public", "-scope=admin everything"], 2, "unknown scope"),
        (["-action=public", "-force=maybe"], 2, "invalid boolean"),
        (["-action=validate"], 2, "needs -token"),
        (["-action=public"], 1, "paseto.keyPath"),
        (["-action=private"], 1, "paseto.secretKey is not set"),
        (["-action=public", "-env=missing"], 1, "file not found"),
    ],
)
def test_errors_are_one_clean_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], status: int, words: str
) -> None:
    code, err = in_process(workdir, monkeypatch, *argv)
    assert code == status
    assert words in err and err.startswith("paseto-tool: ")


def test_bad_secret_key_is_named_not_echoed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "Xthisshouldbeasecretkeythatis64bytestosupportpasetov4standardsXX"
    write_settings(workdir, f"paseto:\n  secretKey: {bad}\n")
    code, err = in_process(workdir, monkeypatch, "-action=private")
    assert code == 1 and "paseto.secretKey" in err and bad not in err
    code, err = in_process(workdir, monkeypatch, "-action=validate", "-token=v4.local.AAAA")
    assert code == 1 and bad not in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-help"]) == 0
    out = capsys.readouterr().out
    for flag in ("-action", "-token", "-force", "-kid", "-models", "-runners", "-env"):
        assert flag in out


def test_installed_console_script(workdir: Path) -> None:
    script = Path(sys.executable).parent / "paseto-tool"
    if not script.exists():
        pytest.skip("the package is not installed in this environment")
    result = subprocess.run(
        [str(script), "-action=symmetric"],
        cwd=workdir,
        env={k: v for k, v in os.environ.items() if k not in _ENV_VARS},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "paserk: k4.local." in result.stdout
