"""The benchmark suite: ``python -m bench.run`` (full) or ``python -m bench.run --smoke``.

One run, one machine, one fast upstream (nginx answering a fixed Ollama
``/api/chat`` JSON), load from wrk:

* HTTP: the upstream directly, nginx reverse proxy, Caddy reverse_proxy,
  LiteLLM proxy and runner-gateway (2 workers and 1 worker), authenticated
  POST chat requests at concurrency 1 and 32: requests/s, p50, p99 and the
  ratios to Caddy and to direct;
* streaming: time to first byte and the gaps between chunks, through the
  gateway and direct, in front of the stand-in runner streaming N chunks at
  a fixed interval;
* capacity: the gateway's resident memory with 1,000 and 10,000 open streams;
* auth: a cached token check, uncached v4.public and v4.local verification
  and a bare PyNaCl Ed25519 verification;
* instructions: CPU instructions per request (callgrind) of a 1-worker
  gateway, with each hot-path fix switched off in turn: unlike CPU time,
  the count does not move with the machine's load.

The Python targets (the gateway, LiteLLM, the bare twisted.web floor) run on
the production-like interpreter when the machine has one: Debian's
python3.11, built with PGO and LTO as the python:3.11-slim image the
Dockerfile ships on is (venvs bench/.venv-gateway, an editable install of
this tree, and bench/.venv-litellm). The dev venv's interpreter may be a
plain build (pyenv's default: no PGO, no LTO); the HTTP stage measures the
gateway on it as well ("gateway-2w-dev"), and the instructions stage counts
on it, as earlier rounds did.

The full run installs what it misses (apt: nginx caddy wrk valgrind; the two venvs;
matplotlib into this venv) and
writes bench/results/latest.json, docs/benchmarks.md (between the results
markers) and docs/benchmarks.png. ``--smoke`` runs every stage with tiny
durations and counts, installs nothing, skips what is not installed (and
LiteLLM, whose start alone takes ~10 s), writes into ``--out`` (default
bench/results/tmp/smoke/, git-ignored) and never touches docs/.

The code: common.py (paths, bodies, the plan, processes), targets.py (the
servers measured), stages.py (the stages), report.py (the report and its
chart); this module runs them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import BENCH, CHART, DOCS, Plan, Run
from bench.report import chart, machine, markdown, targets_met, write_docs
from bench.stages import auth_stage, capacity_stage, http_stage, instructions_stage, streaming_stage
from bench.targets import install_missing, raise_nofile

# -------------------------------------------------------------------- main


STAGES: dict[str, Callable[[Run], dict[str, Any]]] = {
    "http": http_stage,
    "streaming": streaming_stage,
    "capacity": capacity_stage,
    "auth": auth_stage,
    "instructions": instructions_stage,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the suite")
    parser.add_argument(
        "--out", type=Path, help="results directory (smoke: bench/results/tmp/smoke)"
    )
    parser.add_argument("--stage", action="append", choices=list(STAGES), help="only these stages")
    parser.add_argument("--no-install", action="store_true", help="full run: install nothing")
    args = parser.parse_args(argv)
    plan = Plan.make(args.smoke)
    out = args.out or (BENCH / "results" / ("tmp/smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    run = Run(plan, Path(tempfile.mkdtemp(prefix="rg-bench-")))
    if not args.smoke and not args.no_install:
        install_missing(run)
    raise_nofile()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "machine": machine(),
    }
    failed = []
    try:
        for name in args.stage or list(STAGES):
            started = time.monotonic()
            try:
                results[name] = STAGES[name](run)
            except Exception as exc:  # one broken stage must not hide the others' numbers
                failed.append(name)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"bench: stage {name} FAILED: {exc}", file=sys.stderr, flush=True)
            finally:
                run.stop_all()
            print(f"bench: stage {name} took {time.monotonic() - started:.1f}s", flush=True)
    finally:
        run.stop_all()
    results["targets"] = targets_met(results)
    results["notes"] = run.notes
    (out / ("smoke.json" if args.smoke else "latest.json")).write_text(
        json.dumps(results, indent=2) + "\n"
    )
    if args.smoke:
        chart(results, out / "smoke.png")
        (out / "smoke.md").write_text(markdown(results, "smoke.png") + "\n")
    else:
        made = chart(results, CHART)
        write_docs(results, DOCS, CHART.name if made else None)
    for name, t in results["targets"].items():
        print(
            f"bench: target {name}: {t['value']} ({t['target']}) {'met' if t['met'] else 'MISSED'}"
        )
    if failed:
        print(f"bench: failed stages: {', '.join(failed)}", file=sys.stderr)
        return 1
    shutil.rmtree(run.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
