"""Revocations shared through a real Redis (shared_state.py): two gateway processes.

The gateways have settings directories of their own and one Redis; a
revocation made with paseto-tool against Redis must be in force on both within
a second. Redis stopped: both keep their list and say so on /readyz; Redis back:
both catch up (a revocation published while they were not connected is read
on reconnect), and nothing crashes.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.certs import make_ca, make_leaf, write_server_files
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway
from tests.redis_server import REDIS_CLI, REDIS_SERVER, RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_revocation_e2e import IN_FORCE_WITHIN, MARGIN, ROOT, tool

pytestmark = pytest.mark.timeout(180)


def get(gw: GatewayProcess, path: str, token: str | None = None) -> tuple[int, bytes]:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out: {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def redis_detail(gw: GatewayProcess) -> str | None:
    status, body = get(gw, "/readyz")
    assert status == 200  # Redis away is no reason to stop serving
    detail: dict[str, str] = json.loads(body).get("detail", {})
    return detail.get("redis")


def two_gateways(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, redis: RedisServer
) -> tuple[Path, Path]:
    body = (
        "logging:\n  format: json\n"
        f"runners:\n  - name: ollama\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
        f'redis:\n  url: {redis.url}\n  keyPrefix: "test:"\n'
    )
    first = make_settings(body).directory
    second = first.parent / "settings-b"
    second.mkdir()
    for name in ("paseto.key", "paseto.pub"):
        shutil.copy(first / name, second / name)
    text = (first / "settings.yaml").read_text().replace(str(first), str(second))
    (second / "settings.yaml").write_text(text)
    return first, second


def test_revocations_through_redis_reach_both_gateways_and_survive_an_outage(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    first, second = two_gateways(make_settings, standin, redis_server)
    alice = tool(first, "-action=public", "-sub=alice")
    bob = tool(first, "-action=public", "-sub=bob")
    carol = tool(first, "-action=public", "-sub=carol")
    with ExitStack() as stack:
        gateways = [stack.enter_context(start_gateway(d)) for d in (first, second)]
        for gw in gateways:
            wait(lambda gw=gw: redis_detail(gw) is None, 10, "connected to Redis")  # type: ignore[misc]
            for token in (alice, bob, carol):
                assert get(gw, "/api/tags", token)[0] == 200  # cached from here on

        def refused_everywhere(token: str) -> Callable[[], bool]:
            return lambda: all(get(gw, "/api/tags", token)[0] == 401 for gw in gateways)

        jti = json.loads(tool(first, "-action=validate", f"-token={alice}"))["jti"]
        tool(first, "-action=revoke", f"-jti={jti}")
        took = wait(refused_everywhere(alice), IN_FORCE_WITHIN + MARGIN, "alice refused")
        print(f"a revocation through Redis in force on both gateways after {took:.3f} s")
        assert took <= IN_FORCE_WITHIN + MARGIN
        status, _ = get(gateways[1], "/api/tags", alice)
        assert status == 401
        assert redis_server.cli("HLEN", "test:{rg}:revocations") == "1"
        listed = tool(second, "-action=revocations").splitlines()
        assert [json.loads(line)["source"] for line in listed] == ["redis"]

        # Redis goes away: the list stays, the outage shows, requests are served.
        redis_server.stop()
        for gw in gateways:
            wait(lambda gw=gw: redis_detail(gw) is not None, 10, "outage seen")  # type: ignore[misc]
            assert get(gw, "/api/tags", alice)[0] == 401
            assert get(gw, "/api/tags", bob)[0] == 200
            gw.wait_for("Redis at redis://127.0.0.1:.* is unreachable")

        # Back (with its data): a revocation made before the gateways reconnect
        # reaches them by the full re-read on reconnect.
        redis_server.start()
        tool(first, "-action=revoke", "-sub=bob")
        wait(refused_everywhere(bob), 20, "bob refused after the reconnect")
        for gw in gateways:
            wait(lambda gw=gw: redis_detail(gw) is None, 20, "reconnected")  # type: ignore[misc]
            assert get(gw, "/api/tags", alice)[0] == 401
            assert get(gw, "/api/tags", carol)[0] == 200
            assert len([x for x in gw.lines if "is unreachable" in x]) == 1  # logged once
        # And pub/sub works again.
        jti = json.loads(tool(first, "-action=validate", f"-token={carol}"))["jti"]
        tool(second, "-action=revoke", f"-jti={jti}")
        took = wait(refused_everywhere(carol), IN_FORCE_WITHIN + MARGIN, "carol refused")
        assert took <= IN_FORCE_WITHIN + MARGIN
        for gw in gateways:
            assert gw.proc.poll() is None
            assert "Traceback" not in gw.output


def test_the_tool_says_when_redis_is_unreachable(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    first, _ = two_gateways(make_settings, standin, redis_server)
    redis_server.stop()
    script = str(ROOT / "bin" / "paseto-tool")
    result = subprocess.run(
        [sys.executable, script, f"-settings={first}", "-action=revoke", "-jti=x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("paseto-tool: cannot reach Redis at redis://127.0.0.1")


def test_a_gateway_starts_without_redis_and_connects_when_it_comes(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, tmp_path: Path
) -> None:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")  # not started yet
    first, _ = two_gateways(make_settings, standin, redis)
    text = (first / "settings.yaml").read_text()
    (first / "settings.yaml").write_text(
        text.replace("paseto:\n", "paseto:\n  revocationPath: revoked.jsonl\n", 1)
    )
    bob = tool(first, "-action=public", "-sub=bob")
    carol = tool(first, "-action=public", "-sub=carol")
    try:
        with start_gateway(first) as gw:
            assert redis_detail(gw) == "unreachable; using the last shared state (revocations)"
            assert get(gw, "/api/tags", bob)[0] == 200  # serving regardless
            gw.wait_for("Redis at redis://127.0.0.1:.* is unreachable")
            # The file still works; the tool says Redis did not get the entry.
            script = str(ROOT / "bin" / "paseto-tool")
            result = subprocess.run(
                [sys.executable, script, f"-settings={first}", "-action=revoke", "-sub=carol"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                cwd=first.parent,
            )
            assert result.returncode == 1
            assert result.stderr.startswith("paseto-tool: revoked in revoked.jsonl only: ")
            took = wait(lambda: get(gw, "/api/tags", carol)[0] == 401, 5, "carol refused")
            assert took <= IN_FORCE_WITHIN + MARGIN
            redis.start()
            wait(lambda: redis_detail(gw) is None, 20, "connected")
            gw.wait_for("Redis at redis://127.0.0.1:.* is reachable again")
            assert len([x for x in gw.lines if "is unreachable" in x]) == 1
    finally:
        redis.stop()


# Connected first, then (optionally) Redis stops answering, then a command.
_PING = """
import subprocess, sys
from runner_gateway.settings import RedisSettings
from runner_gateway.shared_state import run_tool_call
settings = RedisSettings(url="x", host="127.0.0.1", port=int(sys.argv[1]), command_timeout=0.2)
def call(shared):
    if sys.argv[2:]:
        subprocess.run(sys.argv[2:], check=True, capture_output=True)
    return shared.command("PING")
print(run_tool_call(settings, call))
"""


def test_a_command_that_gets_no_answer_fails_at_its_deadline(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    def ping(*pause: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", _PING, str(redis_server.port), *pause],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result, time.monotonic() - started

    result, _ = ping()
    assert (result.returncode, result.stdout.strip()) == (0, "PONG"), result.stderr
    pause = 8.0
    cli = [str(REDIS_CLI), "-p", str(redis_server.port), "CLIENT", "PAUSE", str(int(pause * 1000))]
    result, took = ping(*cli, "ALL")
    assert result.returncode == 1
    assert "RevocationError: Redis did not answer PING (TimeoutError)" in result.stderr
    assert took < pause  # the deadline, not the pause's end, ended the wait


def test_the_password_comes_from_the_url_or_redis_password(tmp_path: Path) -> None:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis", password="s3cret/pw")
    redis.start()
    try:
        settings = tmp_path / "settings"
        settings.mkdir()

        def revoke(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            (settings / "settings.yaml").write_text(f"redis:\n  url: {url}\n")
            script = str(ROOT / "bin" / "paseto-tool")
            return subprocess.run(
                [sys.executable, script, f"-settings={settings}", "-action=revoke", "-jti=a"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, **env},
            )

        plain = f"redis://127.0.0.1:{redis.port}"
        assert revoke(plain, {"REDIS_PASSWORD": "s3cret/pw"}).returncode == 0
        in_url = f"redis://:s3cret%2Fpw@127.0.0.1:{redis.port}"
        assert revoke(in_url, {"REDIS_PASSWORD": "wrong"}).returncode == 0
        refused = revoke(plain, {"REDIS_PASSWORD": "wrong"})
        assert refused.returncode == 1
        assert refused.stderr.startswith("paseto-tool: cannot reach Redis at redis://127.0.0.1")
        assert "WRONGPASS" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "s3cret" not in refused.stderr and "wrong" not in refused.stderr
        assert redis.cli("HLEN", "runner-gateway:{rg}:revocations") == "1"
    finally:
        redis.stop()


def test_rediss_verifies_the_server_certificate(tmp_path: Path) -> None:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    ca = make_ca()
    files = write_server_files(tmp_path / "pem", make_leaf(ca), root=ca)
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis", tls=files)
    redis.start()
    try:
        settings = tmp_path / "settings"
        settings.mkdir()
        url = f"rediss://localhost:{redis.port}"

        def revoke(extra: str) -> subprocess.CompletedProcess[str]:
            (settings / "settings.yaml").write_text(f"redis:\n  url: {url}\n{extra}")
            script = str(ROOT / "bin" / "paseto-tool")
            return subprocess.run(
                [sys.executable, script, f"-settings={settings}", "-action=revoke", "-jti=a"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        trusted = revoke(f"  caPath: {files.root}\n")
        assert trusted.returncode == 0, trusted.stderr
        assert redis.cli("HLEN", "runner-gateway:{rg}:revocations") == "1"
        # The system's trust store does not know the test CA: no connection.
        untrusted = revoke("")
        assert untrusted.returncode == 1
        assert untrusted.stderr.startswith("paseto-tool: cannot reach Redis at rediss://localhost")
    finally:
        redis.stop()


def test_a_redis_that_stops_answering_is_noticed_by_the_heartbeat(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    first, _ = two_gateways(make_settings, standin, redis_server)
    with start_gateway(first) as gw:
        wait(lambda: redis_detail(gw) is None, 10, "connected")
        # The connections stay open; Redis just stops answering for 12 s.
        assert redis_server.cli("CLIENT", "PAUSE", "12000", "ALL") == "OK"
        wait(lambda: redis_detail(gw) is not None, 10, "the silence noticed")
        wait(lambda: redis_detail(gw) is None, 30, "reconnected after the pause")
        assert "Traceback" not in gw.output


def test_the_command_encoder_writes_what_txredisapi_writes() -> None:
    import txredisapi

    from runner_gateway.shared_state import _Protocol

    theirs, ours = txredisapi.RedisProtocol(), _Protocol()
    for args in [
        ("PING",),
        ("EVALSHA", "0" * 40, 4, "p:{rg}:k", "1800000000.25 30 0 0 5.0 172800", b"raw\r\n", 1.5),
        ("HSET", "k", "é-ü", -3, ""),
    ]:
        assert ours._build_command(*args) == theirs._build_command(*args)
