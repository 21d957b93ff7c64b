"""The fastpath switches: RUNNER_GATEWAY_FASTPATH=off leaves Twisted's own
methods in place, and a fix whose Twisted internals are missing is left off
(logged once, shown in runner_gateway_fastpath_info) while the gateway still
answers. Each case runs in a fresh interpreter: fixes are installed once per
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

_OFF_PROBE = """
import json
from twisted.internet import epollreactor
from twisted.web import http, server
from runner_gateway.edge import fastpath, site
from runner_gateway.tree import CorsPolicy, GatewayRoot

reactor = epollreactor.EPollReactor()
gateway = site.GatewaySite(GatewayRoot([], CorsPolicy(()), list), reactor, max_body_size=1024)
port = reactor.listenTCP(0, gateway, interface="127.0.0.1")
ours = []
for fix, target, copies, names in site.COPIES:
    ours += [f"{target.__name__}.{n}" for n in names if target.__dict__.get(n) is vars(copies)[n]]
# allHeadersReceived and loseConnection are the gateway's own wrappers around
# Twisted's (the head check and the lingering close), as dataReceived is: the
# copies of them are checked absent by "ours" above.
resolved = {
    name: getattr(site.GatewayChannel, name) is getattr(http.HTTPChannel, name)
    for name in ("requestDone", "connectionMade", "getHost", "getPeer",
                 "setTimeout", "resetTimeout", "writeHeaders", "write", "writeSequence")
}
resolved.update({
    "Request." + name: getattr(site.GatewayRequest, name) is getattr(server.Request, name)
    for name in ("write", "isSecure", "__hash__")
})
# GatewaySite.buildProtocol is the gateway's own (connection limits at
# accept) around Twisted's Site.buildProtocol; its copy is checked absent above.
channel = gateway.buildProtocol(None)
resolved["whole_head"] = not channel.whole_head
port.stopListening()
print(json.dumps({"ours": ours, "resolved": resolved,
                  "installed": sorted(fastpath.installed()), "states": fastpath.states()}))
"""


def _run(script: str, *args: str, fastpath: str = "") -> dict[str, Any]:
    env = {**os.environ, "RUNNER_GATEWAY_FASTPATH": fastpath}
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_off_installs_none_of_our_copies() -> None:
    """RUNNER_GATEWAY_FASTPATH=off: every copy of a Twisted method is left out
    and the gateway's classes resolve to Twisted's own methods."""
    got = _run(_OFF_PROBE, fastpath="off")
    assert got["ours"] == []
    assert got["installed"] == []
    resolved = got["resolved"]
    assert isinstance(resolved, dict)
    assert [name for name, twisted in resolved.items() if not twisted] == []
    states = got["states"]
    assert isinstance(states, dict)
    assert set(states.values()) == {"switched-off"}
    assert set(states) == {"channel", "request", "hold", "whole-head", "send-now", "date"} | {
        "content-type",
        "linger-drain",
        "read-at-accept",
    }


def test_on_installs_every_copy() -> None:
    """The same probe with every fix on: it sees our copies (so it can see them)."""
    got = _run(_OFF_PROBE)
    resolved = got["resolved"]
    assert isinstance(resolved, dict)
    assert not any(resolved.values())
    ours = got["ours"]
    assert isinstance(ours, list)
    assert "GatewayRequest.__init__" in ours and "GatewayChannel._take_head" in ours


# A gateway on a real loopback socket, on the epoll reactor with every
# reactor-level fix the service installs, after a Twisted name is deleted.
_MISSING_PROBE = """
import json, socket, sys, threading
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor

import twisted.web.server  # Twisted itself imports what is deleted below
where, name = sys.argv[1], sys.argv[2]
module, _, attribute = where.partition(":")
__import__(module, fromlist=["x"])
owner = object.__getattribute__(sys.modules[module], "_module") \\
    if type(sys.modules[module]).__name__ == "_ModuleProxy" else sys.modules[module]
for part in filter(None, attribute.split(".")):
    owner = getattr(owner, part)
delattr(owner, name)

from twisted.logger import formatEvent, globalLogPublisher
warnings = []
globalLogPublisher.addObserver(
    lambda e: warnings.append(formatEvent(e))
    if e.get("log_namespace") == "runner_gateway.edge.fastpath" and e["log_level"].name == "warn"
    else None
)
from prometheus_client import generate_latest
from runner_gateway.edge import fastpath
from runner_gateway.metrics import Metrics
from runner_gateway.settings import MetricsSettings
from runner_gateway.edge.site import GatewaySite
from runner_gateway.tree import CorsPolicy, GatewayRoot

site = GatewaySite(GatewayRoot([], CorsPolicy(()), list), reactor, max_body_size=1 << 20)
GatewaySite(GatewayRoot([], CorsPolicy(()), list), reactor, max_body_size=1)  # installs again
port = reactor.listenTCP(0, site, interface="127.0.0.1")
answers = []

def client():
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=20) as s:
            for _ in range(2):  # no body: Twisted's own parser may need the deleted name for one
                s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: gw\\r\\n\\r\\n")
                got = b""
                while b'"ok"}' not in got:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    got += piece
                answers.append(got.split(b"\\r\\n", 1)[0].decode())
    finally:
        reactor.callFromThread(reactor.stop)

reactor.callWhenRunning(threading.Thread(target=client, daemon=True).start)
reactor.run()
text = generate_latest(Metrics(MetricsSettings(), reactor.seconds).registry).decode()
info = sorted(l for l in text.splitlines() if l.startswith("runner_gateway_fastpath_info{"))
print(json.dumps({"answers": answers, "states": fastpath.states(), "warnings": warnings,
                  "info": info}))
"""


@pytest.mark.parametrize(
    ("where", "name", "off"),
    [
        # The channel's copies call it for Expect: 100-continue; a GET never does.
        ("twisted.web.http:HTTPChannel", "_send100Continue", {"channel", "whole-head"}),
        ("twisted.web.http", "_IdentityTransferDecoder", {"whole-head"}),
        ("twisted.web.server:Request", "_handleStar", {"request"}),
    ],
)
def test_a_missing_twisted_name_turns_its_fix_off_and_the_gateway_answers(
    where: str, name: str, off: set[str]
) -> None:
    got = _run(_MISSING_PROBE, where, name)
    assert got["answers"] == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"]
    states = got["states"]
    assert isinstance(states, dict)
    assert {fix for fix, state in states.items() if state != "on"} == off
    warnings = got["warnings"]
    assert isinstance(warnings, list)
    assert len(warnings) == len(off)  # once per fix, though installed twice
    for fix in off:
        assert f'runner_gateway_fastpath_info{{fix="{fix}",state="unavailable"}} 0.0' in got["info"]
        assert any(f"fix {fix} is off" in line for line in warnings)
    assert 'runner_gateway_fastpath_info{fix="send-now",state="on"} 1.0' in got["info"]
