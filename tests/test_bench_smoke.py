"""The benchmark suite still works: ``python -m bench.run --smoke`` (seconds, installs nothing).

The numbers come from the full run (``make bench``); this only checks that
every stage runs and reports the fields docs/benchmarks.md is made from.
Stages whose external tools (nginx, wrk, Caddy) are missing are skipped by the
suite itself and reported as skipped here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def test_smoke_run_reports_every_stage(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["smoke"] is True
    assert results["machine"]["cpus"] >= 1

    auth = results["auth"]
    for key in ("cached_us", "uncached_v4_public_us", "uncached_v4_local_us"):
        assert auth[key] > 0, key
    # Signature checks cost far more than a cache hit: the cache is doing its job.
    assert auth["uncached_v4_public_us"] > auth["cached_us"]

    stream = results["streaming"]
    for side in ("direct", "gateway"):
        assert stream[side]["ttfb_p50_ms"] > 0
        # Chunks come about an interval apart, through the gateway too (not all at the end).
        assert stream[side]["gap_p50_ms"] >= stream["interval_ms"] * 0.5

    levels = results["capacity"]["levels"]
    assert set(levels) == {"20", "50"}
    assert all(level["rss_bytes"] > 0 for level in levels.values())

    instructions = results["instructions"]
    if shutil.which("nginx") is None or shutil.which("valgrind") is None:
        assert "skipped" in instructions
    else:
        assert instructions["variants"]["all fixes on"] > 100_000  # a request's worth

    http = results["http"]
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        assert "skipped" in http
        pytest.skip("nginx or wrk not installed: HTTP stage skipped (the rest ran)")
    for name in ("direct", "nginx", "twisted-web-2p", "gateway-2w", "gateway-1w"):
        for c in ("1", "4"):
            row = http["targets"][name][c]
            assert row["requests"] > 0 and row["errors"] == 0, (name, c, row)
    assert "rps_vs_direct" in http["ratios"]["gateway-2w"]["1"]
    if shutil.which("caddy") is not None:
        # The throughput target is read from the alternating turns, not the one-shot table.
        pair = http["paired"]
        assert len(pair["turns"]) == 2 and all(t["ratio"] > 0 for t in pair["turns"])
        assert results["targets"]["gateway_2w_vs_caddy_rps"]["value"] == pair["ratio_median"]
    assert set(results["targets"]) >= {"p50_added_c1_ms", "cached_token_us"}
    assert (tmp_path / "smoke.md").read_text().startswith("Run of")


def test_python_targets_use_the_bench_venv_only_once_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import common, targets

    venv = tmp_path / "venv"
    monkeypatch.setattr(common, "GATEWAY_VENV", venv)
    assert common.target_python() == sys.executable  # not made: the dev interpreter
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert common.target_python() == str(venv / "bin" / "python")
    assert common.target_twistd() == str(venv / "bin" / "twistd")
    python = Path(sys.executable)
    assert not targets._venv_of(venv, python)  # no pyvenv.cfg: remade
    (venv / "pyvenv.cfg").write_text(f"home = /somewhere\nexecutable = {python}\n")
    assert targets._venv_of(venv, python)
    assert not targets._venv_of(venv, tmp_path / "another-python")
