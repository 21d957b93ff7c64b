"""paseto-tool's token lifecycle: the issuance ledger, -action=revoke/revocations/issued."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from runner_gateway.paseto import build_verifier, parse_rfc3339
from runner_gateway.revocation import parse
from runner_gateway.settings import load_settings
from runner_gateway.tool import main


class Tool:
    def __init__(self, root: Path, extra: str = "") -> None:
        self.root = root
        self.settings = root / "settings"
        self.settings.mkdir()
        (self.settings / "settings.yaml").write_text(
            f"paseto:\n  keyPath: {self.settings}/paseto.key\n"
            f"  publicPath: {self.settings}/paseto.pub\n  expiration: 1h\n"
            f"  leeway: 60s\n{extra}"
            "runners:\n  - name: ollama\n    host: 127.0.0.1:11434\n    path: /\n"
        )
        assert self("-action=asymmetric")[0] == 0

    def __call__(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main([*args, f"-settings={self.settings}"], stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def mint(self, *args: str) -> str:
        status, out, err = self("-action=public", *args)
        assert status == 0, err
        return out.strip()

    def claims(self, token: str) -> dict[str, Any]:
        settings = load_settings(self.settings, environ={})
        return dict(build_verifier(settings.paseto).verify(token).claims)

    def lines(self, *args: str) -> list[dict[str, Any]]:
        status, out, err = self(*args)
        assert status == 0, err
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def tool(tmp_path: Path) -> Tool:
    return Tool(
        tmp_path,
        f"  revocationPath: {tmp_path}/revoked.jsonl\n  ledgerPath: {tmp_path}/ledger.jsonl\n",
    )


def test_minting_records_the_ledger_never_the_token(tool: Tool) -> None:
    token = tool.mint("-sub=alice", "-scope=inference", "-models=llama*", "-tier=gold", "-kid")
    claims = tool.claims(token)
    assert len(claims["jti"]) == 32 and int(claims["jti"], 16) >= 0  # 128 random bits
    assert claims["tier"] == "gold"
    assert "." in claims["iat"]  # microseconds
    ledger = tool.root / "ledger.jsonl"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    text = ledger.read_text()
    assert token not in text and token.split(".")[2][:20] not in text
    (record,) = [json.loads(line) for line in text.splitlines()]
    settings = load_settings(tool.settings, environ={})
    kid = build_verifier(settings.paseto).key_ids[0]
    assert record == {
        "jti": claims["jti"],
        "sub": "alice",
        "scope": "inference",
        "models": ["llama*"],
        "tier": "gold",
        "iat": claims["iat"],
        "exp": claims["exp"],
        "kid": kid,
    }
    # O_APPEND: a second token is a second line; the mode stays 0600.
    tool.mint("-sub=bob")
    assert len(ledger.read_text().splitlines()) == 2


def test_minting_without_sub_warns_and_unknown_runners_are_refused(tool: Tool) -> None:
    status, out, err = tool("-action=public")
    assert status == 0 and out.startswith("v4.public.")
    assert "warning: the token has no sub" in err
    status, out, err = tool("-action=public", "-sub=a", "-runners=ollama,corp")
    assert (status, out) == (1, "")
    assert "no runner named 'corp'" in err
    assert len((tool.root / "ledger.jsonl").read_text().splitlines()) == 1  # nothing minted
    token = tool.mint("-sub=a", "-runners=ollama,corp", "-force")
    assert tool.claims(token)["runners"] == ["ollama", "corp"]
    status, _, err = tool("-action=public", "-kid=k4.pid.x")
    assert status == 2 and "-kid takes no value when minting" in err


def test_revoke_each_kind_and_list(tool: Tool) -> None:
    token = tool.mint("-sub=alice")
    jti = tool.claims(token)["jti"]
    (entry,) = tool.lines("-action=revoke", f"-jti={jti}", "-reason=laptop lost")
    assert entry["jti"] == jti and entry["reason"] == "laptop lost"
    # Found in the ledger: the entry may go once that token has expired (plus the leeway).
    exp = parse_rfc3339(tool.claims(token)["exp"])
    assert parse_rfc3339(entry["expires"]) == exp + 60
    (sub,) = tool.lines("-action=revoke", "-sub=bob")
    assert sub["before"] == sub["at"] and "expires" not in sub  # tokens from elsewhere may match
    (kid,) = tool.lines("-action=revoke", "-kid=k4.pid.retired", "-exp=2h")
    assert parse_rfc3339(kid["expires"]) >= parse_rfc3339(kid["at"]) + 7200 + 60 - 1
    listed = tool.lines("-action=revocations")
    assert [(e["source"], e.get("jti") or e.get("sub") or e.get("kid")) for e in listed] == [
        ("file", jti),
        ("file", "bob"),
        ("file", "k4.pid.retired"),
    ]
    assert len(parse((tool.root / "revoked.jsonl").read_text())) == 3
    # No temporary file is left behind.
    assert sorted(os.listdir(tool.root)) == [
        "ledger.jsonl",
        "revoked.jsonl",
        "revoked.jsonl.lock",
        "settings",
    ]


def test_issued_marks_revoked_and_expired(tool: Tool) -> None:
    alive = tool.claims(tool.mint("-sub=alice"))["jti"]
    gone = tool.claims(tool.mint("-sub=alice"))["jti"]
    tool.mint("-sub=carol", "-exp=-1h")  # the verifier refuses it: read its jti from the ledger
    old = json.loads((tool.root / "ledger.jsonl").read_text().splitlines()[-1])["jti"]
    tool.lines("-action=revoke", f"-jti={gone}")
    by_jti = {r["jti"]: r["status"] for r in tool.lines("-action=issued")}
    assert by_jti == {alive: "valid", gone: "revoked", old: "expired"}
    assert [r["jti"] for r in tool.lines("-action=issued", "-sub=carol")] == [old]
    tool.lines("-action=revoke", "-sub=alice")
    after = tool.claims(tool.mint("-sub=alice"))["jti"]
    by_jti = {r["jti"]: r["status"] for r in tool.lines("-action=issued", "-sub=alice")}
    assert by_jti == {alive: "revoked", gone: "revoked", after: "valid"}


def test_yaml_revocation_file(tmp_path: Path) -> None:
    tool = Tool(tmp_path, f"  revocationPath: {tmp_path}/revoked.yaml\n")
    tool.lines("-action=revoke", "-jti=a")
    tool.lines("-action=revoke", "-jti=b")
    text = (tmp_path / "revoked.yaml").read_text()
    assert text.startswith("- at: ")
    assert [e.value for e in parse(text)] == ["a", "b"]


def test_lifecycle_errors(tmp_path: Path) -> None:
    tool = Tool(tmp_path)
    status, _, err = tool("-action=revoke", "-jti=a")
    assert status == 1 and "set paseto.revocationPath or redis.url" in err
    status, _, err = tool("-action=revoke", "-jti=a", "-sub=b")
    assert status == 2 and "exactly one of" in err
    status, _, err = tool("-action=revoke", "-kid")
    assert status == 2
    status, _, err = tool("-action=issued")
    assert status == 1 and "set paseto.ledgerPath" in err
    status, out, _ = tool("-action=revocations")
    assert (status, out) == (0, "")
