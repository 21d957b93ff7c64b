"""``make demo``: the gateway in front of the stand-in runner, with a fresh token.

Everything lives under ``.demo/`` in the working directory (settings, keys),
so the demo never touches ``settings/``. It runs the same command an operator
would (``twistd -n runner-gateway``), prints what to paste, and stops both
processes on Ctrl-C, SIGTERM or SIGHUP. ``--check`` makes a few requests
through the gateway and exits (a quick self-test of the whole chain).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from runner_gateway.paseto import V4SecretKey, issue, public_key_pem, rfc3339, secret_key_pem
from runner_gateway.testing.process import die_with_parent, start_standin, stop_process

TWISTD = str(Path(sys.executable).parent / "twistd")


# "listening on http://127.0.0.1:8080 (2 runner(s)..." or, with workers,
# "... listening on http://127.0.0.1:8080, starting 2 workers".
_LISTENING = re.compile(r"listening on (https?://[^\s,]+)")


def write_settings(root: Path, runner_port: int, port: int) -> Path:
    settings = root / "settings"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "settings.yaml").write_text(
        f"""# Written by `make demo`: two prefixes, one stand-in runner.
logging:
  level: info
paseto:
  keyPath: {settings}/paseto.key
  publicPath: {settings}/paseto.pub
runners:
  - name: local-ollama
    host: 127.0.0.1:{runner_port}
    path: /local-ollama
  - name: corp-ollama
    host: 127.0.0.1:{runner_port}
    path: /corp-ollama
server:
  address: 127.0.0.1:{port}
"""
    )
    key = V4SecretKey.generate()
    key_path = settings / "paseto.key"
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret_key_pem(key))
    (settings / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
    return settings


def mint(settings: Path, scope: str, hours: float = 24) -> str:
    from runner_gateway.paseto import load_secret_key

    key = load_secret_key((settings / "paseto.key").read_text(), "v4")
    now = time.time()
    claims = {
        "sub": "demo",
        "scope": scope,
        "iat": rfc3339(now),
        "nbf": rfc3339(now),
        "exp": rfc3339(now + hours * 3600),
    }
    return issue(key, claims)


def _python() -> str:
    """This interpreter as a new shell in the working directory reaches it:
    ``.venv/bin/python`` in a checkout, rather than a ``python`` on PATH that
    may lack the clients (or be missing)."""
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


def _clients_note() -> str:
    try:
        import ollama  # noqa: F401
        import openai  # noqa: F401
    except ImportError:
        return f"{_python()} -m pip install ollama openai"
    return "installed here by make install"


def instructions(url: str, token: str) -> str:
    python = _python()
    return f"""
runner-gateway demo is up: {url} -> stand-in runner (no Ollama needed)

A token (sub=demo, scope="inference models:read", 24h):
  export TOKEN={token}

Try it:
  curl -s {url}/local-ollama/api/tags -H "Authorization: Bearer $TOKEN"
  curl -N {url}/local-ollama/api/chat -H "Authorization: Bearer $TOKEN" \\
       -d '{{"model": "llama3.2:1b", "messages": [{{"role": "user", "content": "hello there"}}]}}'
  curl -s {url}/local-ollama/api/tags          # no token: 401
  curl -s {url}/local-ollama/api/pull -H "Authorization: Bearer $TOKEN" -d '{{"model": "x"}}'  # 403

With the official clients ({_clients_note()}):
  {python} -c 'import ollama, os; c = ollama.Client(host="{url}/corp-ollama", \\
    headers={{"Authorization": "Bearer " + os.environ["TOKEN"]}}); print(c.list())'
  {python} -c 'import openai, os; c = openai.OpenAI(base_url="{url}/corp-ollama/v1", \\
    api_key=os.environ["TOKEN"]); print([m.id for m in c.models.list()])'

Ctrl-C stops the gateway and the stand-in runner.
"""


class _Stop(Exception):
    """SIGTERM or SIGHUP: leave like Ctrl-C, through every ``finally``."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 - our own loopback URL
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(url: str, token: str) -> list[str]:
    """A few requests through the gateway; returns what went wrong."""
    problems = []
    status, body = _get(f"{url}/local-ollama/api/tags", token)
    if status != 200 or not json.loads(body).get("models"):
        problems.append(f"GET /local-ollama/api/tags with the token: {status} {body[:200]!r}")
    status, _ = _get(f"{url}/local-ollama/api/tags", None)
    if status != 401:
        problems.append(f"GET /local-ollama/api/tags without a token: {status}, expected 401")
    status, _ = _get(f"{url}/healthz", None)
    if status != 200:
        problems.append(f"/healthz: {status}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8080")))
    parser.add_argument("--dir", default=".demo", help="where the demo's settings and keys go")
    parser.add_argument("--check", action="store_true", help="self-test, then exit")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    # SIGINT too, explicitly: a process started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler for it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        return _run(args, root)
    except (KeyboardInterrupt, _Stop):
        return 0


def _run(args: argparse.Namespace, root: Path) -> int:
    with start_standin(["--quiet"], preexec_fn=die_with_parent) as (_host, runner_port, _proc):
        settings = write_settings(root, runner_port, args.port)
        token = mint(settings, "inference models:read")
        gateway = subprocess.Popen(  # noqa: S603 - our own twistd
            [TWISTD, "-n", "--pidfile=", "runner-gateway", "--settings", str(settings)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent,  # never outlives the demo, even on SIGKILL
        )
        try:
            assert gateway.stdout is not None
            url = None
            for line in gateway.stdout:
                sys.stdout.write(line)
                found = _LISTENING.search(line)
                if found:
                    url = found.group(1)
                    break
            if url is None:
                print("demo: the gateway did not start (see above)", file=sys.stderr)
                return 1
            if args.check:
                problems = check(url, token)
                for problem in problems:
                    print(f"demo check failed: {problem}", file=sys.stderr)
                print("demo check: ok" if not problems else "demo check: FAILED")
                return 1 if problems else 0
            print(instructions(url, token), flush=True)
            for line in gateway.stdout:
                sys.stdout.write(line)
            return gateway.wait()
        finally:
            # Also on Ctrl-C, SIGTERM and SIGHUP (_Stop): a second signal
            # while stopping must not cut the clean-up short.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            stop_process(gateway)


if __name__ == "__main__":
    sys.exit(main())
