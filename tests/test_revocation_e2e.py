"""Revocation end to end: the real twistd supervisor with two workers, the real paseto-tool.

Each worker watches ``paseto.revocationPath`` itself; a revocation must be in
force on every worker within a second of the tool's rename, whatever the
workers have in their token caches (each cache is warmed first).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, run_twistd, start_gateway
from tests.test_workers import _served_by, _serving, _wait

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
IN_FORCE_WITHIN = 1.0
MARGIN = 0.5  # the test's own polling and a loaded machine


def tool(settings: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "paseto-tool"), f"-settings={settings}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=settings.parent,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def request(gw: GatewayProcess, token: str, request_id: str) -> tuple[int, str]:
    """One request on a new connection: the status and the WWW-Authenticate value."""
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.request(
        "GET", "/api/tags", headers={"Authorization": f"Bearer {token}", "X-Request-Id": request_id}
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, response.getheader("WWW-Authenticate") or ""


class Workers:
    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.n = 0
        _wait(gw, lambda r: len(_serving(r)) == 2, "two workers serving")
        self.pids = set(_serving([json.loads(x) for x in gw.lines if x.startswith("{")]).values())

    def answers(self, token: str) -> dict[int, int]:
        """Requests on new connections until each worker answered one: pid -> status."""
        seen: dict[int, int] = {}
        while set(seen) != self.pids:
            self.n += 1
            rid = f"q{self.n}"
            status, _ = request(self.gw, token, rid)
            seen.setdefault(_served_by(self.gw, rid), status)
            assert self.n < 100_000
        return seen

    def until_refused(self, token: str) -> float:
        """Seconds until every worker refused the token as revoked (each at least once)."""
        started = time.monotonic()
        refused: dict[int, float] = {}
        while set(refused) != self.pids:
            assert time.monotonic() - started < IN_FORCE_WITHIN + MARGIN + 5, (refused, self.pids)
            self.n += 1
            rid = f"r{self.n}"
            status, challenge = request(self.gw, token, rid)
            at = time.monotonic() - started
            if status == 401:
                assert 'error_description="token has been revoked"' in challenge
                refused.setdefault(_served_by(self.gw, rid), at)
        return max(refused.values())


def test_revocations_reach_every_worker_within_a_second(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(
        "  revocationPath: revoked.jsonl\n  ledgerPath: ledger.jsonl\n"
        "logging:\n  format: json\n"
        f"runners:\n  - name: ollama\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 2\n"
        # The test is the trusted proxy: it finds its requests by their ids.
        "  trustedProxies: [127.0.0.1/32]\n"
    )
    directory = settings.directory
    alice = tool(directory, "-action=public", "-sub=alice")
    alice_too = tool(directory, "-action=public", "-sub=alice")
    bob = tool(directory, "-action=public", "-sub=bob")
    with start_gateway(directory) as gw:
        workers = Workers(gw)
        # Every worker verifies and caches each token.
        for token in (alice, alice_too, bob):
            assert set(workers.answers(token).values()) == {200}

        jti = json.loads(tool(directory, "-action=issued", "-sub=alice").splitlines()[0])["jti"]
        tool(directory, "-action=revoke", f"-jti={jti}", "-reason=test")
        took = workers.until_refused(alice)
        print(f"jti revocation in force on both workers after {took:.3f} s")
        assert took <= IN_FORCE_WITHIN + MARGIN, took
        assert set(workers.answers(bob).values()) == {200}
        assert set(workers.answers(alice_too).values()) == {200}

        tool(directory, "-action=revoke", "-sub=alice")
        took = workers.until_refused(alice_too)
        print(f"sub revocation in force on both workers after {took:.3f} s")
        assert took <= IN_FORCE_WITHIN + MARGIN, took
        # Minted afterwards (even within the same second): alice is back.
        fresh = tool(directory, "-action=public", "-sub=alice")
        assert set(workers.answers(fresh).values()) == {200}
        assert set(workers.answers(bob).values()) == {200}
        assert set(workers.answers(alice).values()) == {401}
        refused = [r for r in map(json.loads, filter(None, gw.lines)) if r.get("status") == 401]
        assert refused and {r["auth_failure"] for r in refused} == {"revoked"}


def test_a_bad_revocation_file_is_a_bad_start(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(
        "  revocationPath: revoked.jsonl\n"
        f"runners:\n  - name: ollama\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 2\n"
    )
    (settings.directory.parent / "revoked.jsonl").write_text('{"jti": "a"}\n{"sub": "b"}\n')
    result = run_twistd(settings.directory)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "runner-gateway: cannot start: revoked.jsonl: paseto.revocationPath: "
        "line 2: a sub entry needs before (an RFC 3339 time)"
    )
