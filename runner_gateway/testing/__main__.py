"""``python -m runner_gateway.testing``: run the stand-in runner standalone.

The first stdout line is ``listening on HOST:PORT`` (so ``--port 0`` can be
used by scripts); one line per finished request goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from runner_gateway.testing.runner import StandInRunner, listen, stderr_log


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner_gateway.testing",
        description="Stand-in Ollama / OpenAI-compatible runner for tests and demos.",
    )
    parser.add_argument("--port", type=int, default=11434, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--chunks", type=int, default=5, help="streamed chunks per generation")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument(
        "--header-delay", type=float, default=0.0, help="seconds before a generation's headers"
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model to list (repeatable; default: the built-in four)",
    )
    parser.add_argument(
        "--loaded",
        action="append",
        default=[],
        metavar="NAME",
        help="listed model to report as loaded in /api/ps from the start (repeatable)",
    )
    parser.add_argument(
        "--allow-host", action="append", default=[], metavar="HOST", help="extra allowed Host"
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="PATTERN",
        help="extra allowed Origin pattern, * wildcards (e.g. 'https://*.example.com')",
    )
    parser.add_argument("--any-host", action="store_true", help="turn the Host check off")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    if args.interval < 0 or args.header_delay < 0:
        parser.error("--interval and --header-delay must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from twisted.internet import reactor

    runner = StandInRunner(
        args.models,
        chunks=args.chunks,
        interval=args.interval,
        header_delay=args.header_delay,
        log=None if args.quiet else stderr_log,
    )
    if args.any_host:
        runner.allowed_hosts = None
    elif runner.allowed_hosts is not None:
        runner.allowed_hosts.update(h.lower() for h in args.allow_host)
    runner.allowed_origins.extend(args.allow_origin)
    for name in args.loaded:
        model = runner.model(name)
        if model is None:
            parser_error = f"--loaded {name}: not a listed model"
            print(parser_error, file=sys.stderr)
            return 2
        runner.mark_loaded(str(model["name"]))
    port = listen(runner, reactor, port=args.port, interface=args.host)
    address = port.getHost()
    host = getattr(address, "host", args.host)
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {shown}:{getattr(address, 'port', args.port)}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
