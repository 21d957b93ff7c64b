"""Deployment files: the Dockerfile, .dockerignore and the systemd unit.

There is no Docker engine here, so the Dockerfile is parsed and checked, its
HEALTHCHECK script is run against real listeners, and its ENTRYPOINT is run
outside a container in a directory laid out like /opt/gateway. The systemd
unit goes through ``systemd-analyze verify`` (skipped only without the tool).
"""

from __future__ import annotations

import fnmatch
import glob
import http.server
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner_gateway.settings import ServerSettings
from runner_gateway.testing.process import stop_process
from tests import certs

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
UNIT = REPO / "deploy" / "systemd" / "runner-gateway.service"
ENTRYPOINT = ["twistd", "-n", "--pidfile=", "runner-gateway"]
# After a clean shutdown on SIGTERM, twistd re-raises the signal so the exit
# status tells why it stopped; systemd counts that as a clean stop.
CLEAN_STOP = (0, -signal.SIGTERM)


# ------------------------------------------------------------ Dockerfile model


@dataclass
class Instruction:
    stage: int
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their stage index; continuations joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may also sit inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = pending + stripped
        pending = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        assert stage >= 0, f"line {start}: {keyword} before FROM"
        instructions.append(Instruction(stage, keyword, args.strip(), start))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def _stages(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """(image, name) per FROM."""
    stages = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append((words[0], name))
    return stages


def _final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last and i.keyword == keyword]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_parser_handles_continuations_and_comments() -> None:
    parsed = parse_dockerfile("# c\nFROM a AS b\nRUN x \\\n # inner\n && y\nFROM c\nUSER u\n")
    assert [(i.stage, i.keyword, i.args) for i in parsed] == [
        (0, "FROM", "a AS b"),
        (0, "RUN", "x  && y"),
        (1, "FROM", "c"),
        (1, "USER", "u"),
    ]


def test_multi_stage_slim_runtime(dockerfile: list[Instruction]) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    assert stages[-1][0] == "python:3.11-slim"
    builders = {name for _, name in stages[:-1]}
    copies_from = [
        word.split("=", 1)[1]
        for ins in _final(dockerfile, "COPY")
        for word in ins.args.split()
        if word.startswith("--from=")
    ]
    assert copies_from and set(copies_from) <= builders  # the runtime takes the built venv


def test_runtime_user_workdir_port_entrypoint(dockerfile: list[Instruction]) -> None:
    users = _final(dockerfile, "USER")
    assert users, "the runtime stage must switch to a non-root user"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0", "")
    # everything after the USER line runs as that user, including the entrypoint
    assert users[-1].line > max(i.line for i in _final(dockerfile, "RUN"))
    assert [i.args for i in _final(dockerfile, "WORKDIR")][-1] == "/opt/gateway"
    assert "8443" in " ".join(i.args for i in _final(dockerfile, "EXPOSE")).split()
    assert _exec_form(_final(dockerfile, "ENTRYPOINT")[-1].args) == ENTRYPOINT
    assert not _final(dockerfile, "CMD")  # extra `docker run` args go to twistd's plugin


def test_settings_baked_in_and_venv_on_path(dockerfile: list[Instruction]) -> None:
    copies = [i.args.split() for i in _final(dockerfile, "COPY")]
    assert ["settings/", "/opt/gateway/settings/"] in copies
    env = " ".join(i.args for i in _final(dockerfile, "ENV"))
    assert "PATH=/opt/gateway/.venv/bin:" in env  # `twistd` in ENTRYPOINT is the venv's


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_every_copy_source_exists_and_is_in_the_context(dockerfile: list[Instruction]) -> None:
    patterns = _dockerignore()
    checked = 0
    for ins in dockerfile:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        if any(w.startswith("--from=") for w in ins.args.split()):
            continue
        sources, matched = words[:-1], 0
        for source in sources:
            hits = glob.glob(source, root_dir=REPO)
            if not any(c in source for c in "*?["):
                assert hits, f"line {ins.line}: COPY source {source} does not exist"
            for hit in hits:
                assert not _ignored(hit, patterns), f"{hit} is excluded by .dockerignore"
            matched += len(hits)
            checked += 1
        assert matched, f"line {ins.line}: nothing to copy"
    assert checked >= 4


def test_dockerignore_keeps_secrets_out() -> None:
    patterns = _dockerignore()
    for path in ("settings/paseto.key", ".acme.sh/x_ecc/x.key", ".git/config", ".venv/bin/python"):
        assert _ignored(path, patterns), path
    for path in ("settings/settings.yaml", "settings/paseto.pub", "runner_gateway/tls.py"):
        assert not _ignored(path, patterns), path


# ------------------------------------------------------------------ healthcheck


def _healthcheck_script(dockerfile: list[Instruction]) -> str:
    (check,) = _final(dockerfile, "HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    compile(argv[2], "HEALTHCHECK", "exec")
    return argv[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def health_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[http.server.HTTPServer] = []

    def start(status: int, tls: bool) -> int:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = status if self.path == "/healthz" else 404
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            leaf = certs.make_leaf(certs.make_ca(), sans=("gw.example.com",))
            files = certs.write_server_files(tmp_path, leaf)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(files.fullchain), str(files.key))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _run_check(script: str, port: int) -> int:
    env = {**os.environ, "SERVER_ADDRESS": f"127.0.0.1:{port}"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=20, capture_output=True, check=False
    )
    return done.returncode


@pytest.mark.parametrize(
    "status, tls, healthy",
    [(200, True, True), (200, False, True), (503, True, False), (503, False, False)],
)
def test_healthcheck_script(
    dockerfile: list[Instruction], health_server: Any, status: int, tls: bool, healthy: bool
) -> None:
    script = _healthcheck_script(dockerfile)
    port = health_server(status, tls)  # certificate for another name: not verified on purpose
    assert (_run_check(script, port) == 0) is healthy


def test_healthcheck_script_nothing_listening(dockerfile: list[Instruction]) -> None:
    assert _run_check(_healthcheck_script(dockerfile), _free_port()) == 1


# ------------------------------------------- the entrypoint outside a container


def _layout(tmp_path: Path) -> tuple[Path, certs.Issued, Path]:
    """A directory like the image's /opt/gateway, with acme.sh-style files."""
    app = tmp_path / "opt-gateway"
    shutil.copytree(REPO / "settings", app / "settings")
    for private in (app / "settings").glob("*.key"):
        private.unlink()  # as .dockerignore does
    acme = app / ".acme.sh" / "my-domain.com_ecc"
    root = certs.make_ca()
    leaf = certs.make_leaf(root)
    files = certs.write_server_files(acme, leaf, (), root)
    (files.key).rename(acme / "my-domain.com.key")
    (app / "settings" / "my-domain.yaml").write_text(
        "server:\n"
        "  certificatePath: .acme.sh/my-domain.com_ecc/fullchain.cer\n"
        "  keyPath: .acme.sh/my-domain.com_ecc/my-domain.com.key\n"
    )
    return app, root, acme


def _serial(port: int) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    root: certs.Issued
    acme: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@contextmanager
def entrypoint(dockerfile: list[Instruction], tmp_path: Path) -> Iterator[Running]:
    """Run the image's ENTRYPOINT argv in a directory laid out like /opt/gateway."""
    app, root, acme = _layout(tmp_path)
    port = _free_port()
    argv = _exec_form(_final(dockerfile, "ENTRYPOINT")[-1].args)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RUNNER_GATEWAY_ENV", "SERVER_CERTIFICATE_PATH", "SERVER_KEY_PATH")
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # as the image's ENV PATH
        GO_ENV="my-domain",  # `docker run -e GO_ENV=my-domain`
        PASETO_SECRET_KEY="ab" * 32,
        SERVER_ADDRESS=f"127.0.0.1:{port}",
    )
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Running(proc, port, root, acme, log)
    try:
        script = _healthcheck_script(dockerfile)
        deadline = time.monotonic() + 20
        while _run_check(script, port) != 0:  # the HEALTHCHECK itself says when it is up
            assert proc.poll() is None, running.output()
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.2)
        yield running
    finally:
        assert stop_process(proc, timeout=20), "the gateway did not stop on SIGTERM"


def test_entrypoint_runs_from_workdir_with_go_env(
    dockerfile: list[Instruction], tmp_path: Path
) -> None:
    with entrypoint(dockerfile, tmp_path) as gw:
        # GO_ENV picked settings/my-domain.yaml, whose relative certificate
        # paths resolve against WORKDIR, as in the image
        assert _serial(gw.port) > 0
        gw.proc.send_signal(signal.SIGTERM)  # `docker stop`
        assert gw.proc.wait(timeout=20) in CLEAN_STOP, gw.output()
        assert "Server Shut Down" in gw.output()
    assert "PRIVATE KEY" not in gw.output()


def test_entrypoint_renewal_on_sighup_then_clean_stop(
    dockerfile: list[Instruction], tmp_path: Path
) -> None:
    with entrypoint(dockerfile, tmp_path) as gw:
        first = _serial(gw.port)
        # acme.sh renews in place, then `docker kill -s HUP` / `systemctl reload`
        renewed = certs.make_leaf(gw.root)
        certs.write(gw.acme / "fullchain.cer", renewed.cert_pem())
        certs.write(gw.acme / "my-domain.com.key", renewed.key_pem())
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (serial := _serial(gw.port)) == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert serial == renewed.serial
        assert "settings reloaded" in _wait_for(gw, "settings reloaded"), gw.output()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=20) in CLEAN_STOP, gw.output()
        assert "Server Shut Down" in gw.output()


def _wait_for(gw: Running, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in (output := gw.output()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return output


# ---------------------------------------------------------------- systemd unit


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def test_unit_settings() -> None:
    unit = _unit()

    def one(key: str) -> str:
        assert len(unit.get(key, [])) == 1, key
        return unit[key][0]

    assert one("Service.User") == "runner-gateway"
    assert one("Service.DynamicUser") == "no"
    assert one("Service.WorkingDirectory") == "/opt/gateway"
    exec_start = shlex.split(one("Service.ExecStart"))
    assert exec_start[0] == "/opt/gateway/.venv/bin/twistd"
    assert exec_start[1:] == ENTRYPOINT[1:]  # the same command line as the container
    assert one("Service.EnvironmentFile") == "-/etc/default/runner-gateway"
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.KillSignal") == "SIGTERM"
    assert one("Service.Restart") == "on-failure"
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadOnlyPaths", "/opt/gateway/settings"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
    ]:
        assert one(f"Service.{key}") == value, key
    stop = one("Service.TimeoutStopSec")
    assert stop.isdigit() and int(stop) > ServerSettings().drain_timeout


def _verify(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "runner-gateway.service"
    path.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart's binary exists; /opt/gateway/.venv is
    # not installed here, so the copy points at this checkout's twistd (the
    # same program) and everything else is verified as written.
    text = UNIT.read_text()
    assert "ExecStart=/opt/gateway/.venv/bin/twistd " in text
    local = text.replace(
        "ExecStart=/opt/gateway/.venv/bin/twistd ", f"ExecStart={VENV_BIN}/twistd "
    )
    done = _verify(local, tmp_path)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr
    )
    # control: verify does report a broken unit (it warns with status 0, so
    # the test above also requires silence)
    broken = _verify(local.replace("Restart=on-failure", "Restart=sometimes"), tmp_path)
    assert "sometimes" in broken.stdout + broken.stderr
