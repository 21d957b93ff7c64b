"""What a new operator runs after `make install`, from a new shell.

Each command the README and `make demo` print is run as pasted, through
``env -i`` (PATH=/usr/bin:/bin and HOME only: no activated venv, no
PYTHONPATH), from a directory laid out like the checkout. And the demo
stops everything it started on SIGTERM, SIGINT and SIGHUP.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home)}


def _shell(
    command: str, cwd: Path, home: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in _clean_env(home).items()),
            "bash",
            "-c",
            command,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory that looks like the checkout after `make install`."""
    if not (ROOT / ".venv" / "bin" / "twistd").exists():
        pytest.skip("needs `make install` (the checkout's .venv)")
    work = tmp_path / "checkout"
    work.mkdir()
    for name in (".venv", "bin", "Makefile", "setup.cfg", "setup.py"):
        (work / name).symlink_to(ROOT / name)
    (work / "settings").mkdir()
    return work


def _readme_commands(prefix: str) -> list[str]:
    """The README's shell lines (in ```bash blocks) that start with ``prefix``."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if line.startswith(prefix):
                found.append(line.split("  #")[0].strip())
    return found


def test_readme_runs_twistd_from_the_venv_without_a_pid_file() -> None:
    lines = [line for line in README.splitlines() if re.search(r"\btwistd -n\b", line)]
    assert lines
    for line in lines:
        assert ".venv/bin/twistd -n --pidfile= runner-gateway" in line, line


def test_paseto_tool_and_make_token_work_from_a_clean_shell(checkout: Path) -> None:
    commands = _readme_commands("bin/paseto-tool -action=")
    assert "bin/paseto-tool -action=asymmetric" in commands
    assert "bin/paseto-tool -action=public -sub=alice" in commands
    for command in (
        "bin/paseto-tool -action=asymmetric",
        "bin/paseto-tool -action=public -sub=alice",
    ):
        done = _shell(command, checkout, checkout)
        assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("v4.public.")
    assert "make token SUB=alice" in README
    # -o: never re-make the venv from here, even when setup.cfg is newer.
    done = _shell("make -o .venv/bin/twistd token SUB=alice", checkout, checkout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith("v4.public."), done.stdout
    validated = _shell(
        f"bin/paseto-tool -action=validate -token={done.stdout.strip()}", checkout, checkout
    )
    assert validated.returncode == 0, validated.stderr
    assert '"sub": "alice"' in validated.stdout or "alice" in validated.stdout


def _readme_twistd() -> str:
    commands = _readme_commands(".venv/bin/twistd ")
    assert commands, "the README shows no .venv/bin/twistd command"
    return commands[0]


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> tuple[str, str]:
    """Read ``proc``'s stdout until a line matches; returns (that line, all read).

    Reads the pipe's bytes directly: a text stream's buffer would hide lines
    already read from select()."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            seen += data
            for line in seen.decode(errors="replace").splitlines():
                if re.search(pattern, line):
                    return line, seen.decode(errors="replace")
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{seen.decode()}")


def test_readme_twistd_command_serves_and_leaves_no_pid_file(checkout: Path) -> None:
    port = _free_port()
    settings = checkout / "settings"
    done = _shell("bin/paseto-tool -action=asymmetric", checkout, checkout)
    assert done.returncode == 0, done.stderr
    (settings / "settings.yaml").write_text(
        f"server:\n  address: 127.0.0.1:{port}\n  workers: 1\n"
        f"runners:\n  - {{name: r, host: '127.0.0.1:{_free_port()}', path: /}}\n"
    )
    (settings / "my-domain.yaml").write_text("logging:\n  level: info\n")
    command = _readme_twistd()
    assert "--env my-domain" in command
    proc = subprocess.Popen(
        [
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in _clean_env(checkout).items()),
            "bash",
            "-c",
            f"exec {command}",
        ],
        cwd=checkout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_line(proc, rf"listening on http://127\.0\.0\.1:{port}", 60)
        assert not (checkout / "twistd.pid").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    assert not (checkout / "twistd.pid").exists()


# ------------------------------------------------------------------- the demo


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    """``python -m runner_gateway.demo`` from the checkout, up and printing."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner_gateway.demo",
            "--port",
            str(port),
            "--dir",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _, printed = _wait_for_line(proc, r"^Ctrl-C stops", 90)
        yield proc, port, printed
    finally:
        if proc.poll() is None:  # a failed test: stop it as an operator would
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _stop_demo(proc: subprocess.Popen[str], port: int, signum: int) -> None:
    children = _descendants(proc.pid)
    assert children, "the demo started no processes?"
    proc.send_signal(signum)
    assert proc.stdout is not None
    proc.stdout.read()  # drain, so the demo never blocks on a full pipe
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        any(_alive(p) for p in children) or not _port_free(port)
    ):
        time.sleep(0.05)
    assert not [p for p in children if _alive(p)], "a process the demo started survived"
    assert _port_free(port), "the demo port is still served"


def _pasted_commands(printed: str) -> tuple[str, list[str]]:
    """The export line and each command (continuations joined) the demo printed."""
    export = re.search(r"^  (export TOKEN=\S+)$", printed, re.M)
    assert export is not None, printed
    commands: list[str] = []
    current = ""
    for line in printed.splitlines():
        if not current and not re.match(r"^  (curl|\S*python\S*) ", line):
            continue
        current += line.strip() + "\n"
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return export.group(1), commands


@pytest.mark.timeout(240)
def test_demo_commands_work_as_pasted_and_sigterm_stops_everything(
    demo: tuple[subprocess.Popen[str], int, str], tmp_path: Path
) -> None:
    proc, port, printed = demo
    export, commands = _pasted_commands(printed)
    assert len([c for c in commands if c.startswith("curl")]) == 4
    pythons = [c for c in commands if not c.startswith("curl")]
    assert len(pythons) == 2
    for command in commands:
        done = _shell(f"{export}\n{command}", ROOT, tmp_path)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert done.stdout.strip(), command
    assert "llama3.2:1b" in _shell(f"{export}\n{pythons[1]}", ROOT, tmp_path).stdout
    _stop_demo(proc, port, signal.SIGTERM)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_demo_stops_everything_on_sigint_and_sighup(
    demo: tuple[subprocess.Popen[str], int, str], signum: int
) -> None:
    proc, port, _ = demo
    _stop_demo(proc, port, signum)


def test_secret_key_file_as_the_readme_makes_it(checkout: Path) -> None:
    [make_key] = [
        line.strip()
        for line in README.splitlines()
        if "paseto-tool -action=symmetric" in line and line.startswith("(umask")
    ]
    done = _shell(make_key, checkout, checkout)
    assert done.returncode == 0, done.stderr
    key_file = checkout / "settings" / "paseto-local.key"
    assert key_file.stat().st_mode & 0o077 == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", key_file.read_text())
    assert "secretKeyPath: settings/paseto-local.key" in README
    (checkout / "settings" / "my-domain.yaml").write_text(
        "paseto:\n  secretKeyPath: settings/paseto-local.key\n"
    )
    minted = _shell("bin/paseto-tool -action=private -sub=alice -env=my-domain", checkout, checkout)
    assert minted.returncode == 0, minted.stderr
    assert minted.stdout.startswith("v4.local.")


@pytest.mark.parametrize(
    "path",
    [
        "settings/my-domain.yaml",
        "settings/paseto.key",
        "settings/paseto.pub",
        "settings/paseto-local.key",
        "twistd.pid",
    ],
)
def test_gitignore_covers_what_the_readme_has_you_create(path: str) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert path in README or path == "twistd.pid" or path.endswith(".pub")
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False)
    assert done.returncode == 0, f"{path} is not ignored"
    kept = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", "settings/settings.yaml"], cwd=ROOT, check=False
    )
    assert kept.returncode == 1


def test_every_paseto_tool_line_of_the_readme_works(checkout: Path) -> None:
    """In the README's order, with the settings its Settings section shows."""
    [example] = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "secretKeyPath" in b]
    (checkout / "settings" / "my-domain.yaml").write_text(example)
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if "bin/paseto-tool" in line
    ]
    assert len(lines) >= 10
    token = ""
    for line in lines:
        if "-action=validate" in line:
            assert token
            line = re.sub(r"-token=\S+", f"-token={token}", line)
        done = _shell(line, checkout, checkout)
        assert done.returncode == 0, (line, done.stderr)
        if "-action=public -sub=alice" in line:
            token = done.stdout.strip()
        if line.startswith("(umask"):  # the key file made: now name it, as the README does
            (checkout / "settings" / "settings.yaml").write_text(
                "paseto:\n  secretKeyPath: settings/paseto-local.key\n"
            )
