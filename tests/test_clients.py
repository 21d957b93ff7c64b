"""The official ollama and openai clients, and bin/paseto-tool, against the running gateway."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import ollama
import openai
import pytest

from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway
from tests.test_e2e import request, runners_yaml

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gateway(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> Iterator[tuple[GatewayProcess, GatewaySettings]]:
    settings = make_settings(runners_yaml(standin, "/corp"))
    with start_gateway(settings.directory) as gw:
        yield gw, settings


def test_ollama_client_lists_and_streams(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, settings = gateway
    client = ollama.Client(
        host=f"{gw.url}/corp", headers={"Authorization": f"Bearer {settings.token()}"}
    )
    names = {m.model for m in client.list().models}
    assert "llama3.2:1b" in names
    parts = list(
        client.chat(
            model="llama3.2:1b",
            messages=[{"role": "user", "content": "hello gateway"}],
            stream=True,
        )
    )
    assert len(parts) >= 2
    assert parts[-1].done
    assert parts[-1].eval_count


def test_ollama_client_with_api_key_variable(
    gateway: tuple[GatewayProcess, GatewaySettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, settings = gateway
    monkeypatch.setenv("OLLAMA_API_KEY", settings.token())
    client = ollama.Client(host=f"{gw.url}/corp")
    assert client.list().models


def test_ollama_client_bad_token_is_a_clean_401(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, settings = gateway
    bad = settings.token()[:-4] + "AAAA"
    client = ollama.Client(host=f"{gw.url}/corp", headers={"Authorization": f"Bearer {bad}"})
    with pytest.raises(ollama.ResponseError) as info:
        client.list()
    assert info.value.status_code == 401
    assert "token" in info.value.error.lower()


def test_openai_client_lists_and_streams(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, settings = gateway
    client = openai.OpenAI(base_url=f"{gw.url}/corp/v1", api_key=settings.token(), max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert "llama3.2:1b" in ids
    stream = client.chat.completions.create(
        model="llama3.2:1b",
        messages=[{"role": "user", "content": "hello gateway"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None


def test_openai_client_bad_token_is_a_clean_401(
    gateway: tuple[GatewayProcess, GatewaySettings],
) -> None:
    gw, _ = gateway
    client = openai.OpenAI(
        base_url=f"{gw.url}/corp/v1", api_key="v4.public.nonsense", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    body = info.value.body
    assert isinstance(body, dict)
    assert body["message"]  # OpenAI's error shape, so the client shows our message


def tool(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bin" / "paseto-tool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tool_round_trip_with_the_running_gateway(tmp_path: Path, standin: StandIn) -> None:
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "settings.yaml").write_text(runners_yaml(standin, "/"))
    made = tool(tmp_path, "-action=asymmetric")
    assert made.returncode == 0, made.stderr
    assert (settings / "paseto.key").stat().st_mode & 0o777 == 0o600
    minted = tool(tmp_path, "-action=public", "-sub=alice", "-scope=models:read")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.startswith("v4.public.")
    checked = tool(tmp_path, "-action=validate", f"-token={token}")
    assert checked.returncode == 0
    assert '"alice"' in checked.stdout
    with start_gateway(settings) as gw:
        assert request(gw, "GET", "/api/tags", token)[0] == 200
        # models:read only: inference is refused with the scope it needs.
        status, headers, _ = request(
            gw, "POST", "/api/chat", token, body=b'{"model": "llama3.2:1b", "messages": []}'
        )
        assert status == 403
        assert 'scope="inference"' in headers["www-authenticate"]
