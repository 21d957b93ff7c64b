"""The benchmark report: the machine, the targets met, docs/benchmarks.md and its chart."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.common import BEGIN, END, LITELLM_VENV, target_python
from bench.targets import have

# -------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "unknown"

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_targets": version(
            [target_python(), "-c", "import sys; print(sys.version.split()[0], sys.executable)"]
        ),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "nginx": version(["nginx", "-v"]),
        "caddy": version(["caddy", "version"]),
        "wrk": version(["wrk", "--version"]),
        "litellm": version(
            [
                str(LITELLM_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ]
        )
        if have("litellm")
        else "not installed",
    }


def targets_met(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 7's targets, each with the measured value and whether it is met."""
    out: dict[str, Any] = {}
    http_ = results.get("http", {})
    ratio = http_.get("ratios", {})
    hi = str(max(int(c) for c in http_["targets"]["direct"])) if "targets" in http_ else None
    if "paired" in http_:
        value = http_["paired"]["ratio_median"]
        out["gateway_2w_vs_caddy_rps"] = {"target": ">= 0.5", "value": value, "met": value >= 0.5}
    elif hi and "caddy" in http_["targets"] and "gateway-2w" in http_["targets"]:
        value = ratio["gateway-2w"][hi]["rps_vs_caddy"]
        out["gateway_2w_vs_caddy_rps"] = {"target": ">= 0.5", "value": value, "met": value >= 0.5}
    if "targets" in http_:
        value = ratio["gateway-2w"]["1"]["p50_added_ms"]
        out["p50_added_c1_ms"] = {"target": "<= 0.5", "value": value, "met": value <= 0.5}
    stream = results.get("streaming", {})
    if "ttfb_overhead_ms" in stream:
        value = stream["ttfb_overhead_ms"]
        out["ttfb_overhead_ms"] = {"target": "<= 1", "value": value, "met": value <= 1.0}
        value = stream["gap_added_p50_ms"]
        out["gap_added_ms"] = {"target": "<= 0.5", "value": value, "met": value <= 0.5}
    levels = results.get("capacity", {}).get("levels", {})
    if levels:
        top = max(levels, key=int)
        value = round(levels[top]["bytes_per_stream"] / 1000, 1)
        out[f"kb_per_stream_at_{top}"] = {"target": "<= 50", "value": value, "met": value <= 50}
    auth = results.get("auth", {})
    if "cached_us" in auth:
        value = auth["cached_us"]
        out["cached_token_us"] = {"target": "<= 5", "value": value, "met": value <= 5}
    return out


def markdown(results: dict[str, Any], chart: str | None) -> str:
    m = results["machine"]
    lines = [
        f"Run of {results['date']} on {m['cpus']} x {m['cpu']}, "
        f"{m['memory_bytes'] // 2**30} GiB, Linux {m['kernel']}, Python targets on "
        f"{m.get('python_targets', m['python'])}, harness and gateway-2w-dev on Python "
        f"{m['python']} (load average at start {m['load_average_at_start']}); {m['nginx']}, "
        f"Caddy {m['caddy']}, {m['wrk'].split(' [')[0]}, LiteLLM "
        f"{m['litellm']}. Raw numbers: `bench/results/latest.json`.",
        "",
    ]
    if chart:
        lines += [f"![requests/s and p50 latency]({chart})", ""]
    lines += [
        "### Targets (issue 7)",
        "",
        "| target | wanted | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
        )
    http_ = results.get("http", {})
    if "targets" in http_:
        lines += [
            "",
            "### Authenticated small chat (POST /api/chat; LiteLLM: /chat/completions)",
            "",
            "| target | c | req/s | p50 ms | p99 ms | errors | vs Caddy | vs direct "
            "| p50 added ms | gateway CPU µs/request |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, by_c in http_["targets"].items():
            for c, r in by_c.items():
                q = http_["ratios"][name][c]
                lines.append(
                    f"| {name} | {c} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                    f"{r['errors']} | {q.get('rps_vs_caddy', '-')} | {q.get('rps_vs_direct', '-')} "
                    f"| {q.get('p50_added_ms', '-')} | {r.get('cpu_us_per_request', '-')} |"
                )
    pair = http_.get("paired")
    if pair:
        ref, name = pair["ref"], pair["name"]
        lines += [
            "",
            f"### {name} against {ref} in alternating turns (c={pair['concurrency']}, "
            f"{pair['seconds']} s each, ABBA)",
            "",
            f"Median ratio {pair['ratio_median']}, lowest {pair['ratio_min']} "
            "(the target's value is the median).",
            "",
            f"| turn | {ref} req/s | {name} req/s | ratio | {name} CPU µs/request "
            f"| {name} CPU s while idle in {ref}'s turn |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {n + 1} | {t[f'{ref}_rps']:.0f} | {t[f'{name}_rps']:.0f} | {t['ratio']} "
            f"| {t[f'{name}_cpu_us_per_request']} | {t[f'{name}_idle_cpu_seconds']} |"
            for n, t in enumerate(pair["turns"])
        ]
    opt = http_.get("optimisations", {})
    if opt:
        lines += [
            "",
            "### Hot-path fixes, same run (gateway, 1 worker, c=1, 5 turns of 2 s)",
            "",
            "| variant | req/s | p50 ms | CPU µs/request (median) | (min: least disturbed) |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['cpu_us_per_request']} "
            f"| {r['cpu_us_per_request_min']} |"
            for label, r in opt.items()
        ]
    ins = results.get("instructions", {})
    if "variants" in ins:
        off = ins["variants"].get("all fixes off")
        lines += [
            "",
            f"### Instructions per request, same run (callgrind, 1 worker, {ins['requests']} "
            "keep-alive POSTs one after another)",
            "",
            "| variant | instructions/request | vs all fixes off |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {label} | {count:,} | {f'{(count - off) / off:+.1%}' if off else '-'} |"
            for label, count in ins["variants"].items()
        ]
    s = results.get("streaming", {})
    if "direct" in s:
        lines += [
            "",
            f"### Streaming ({s['requests']} streams each way, {s['chunks']} chunks "
            f"{s['interval_ms']:.0f} ms apart, stand-in runner, gateway with 1 worker)",
            "",
            "| path | TTFB p50 ms | TTFB p99 ms | gap p50 ms | gap p99 ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("direct", "gateway"):
            r = s[name]
            lines.append(
                f"| {name} | {r['ttfb_p50_ms']} | {r['ttfb_p99_ms']} | {r['gap_p50_ms']} "
                f"| {r['gap_p99_ms']} |"
            )
        lines += [
            "",
            f"TTFB overhead (p50): {s['ttfb_overhead_ms']} ms; added gap p50 "
            f"{s['gap_added_p50_ms']} ms, p99 {s['gap_added_p99_ms']} ms.",
        ]
    c = results.get("capacity", {})
    if "levels" in c:
        lines += [
            "",
            f"### Capacity (open streams through the gateway: {c.get('workers', 1)} workers "
            "and the supervisor, RSS added up)",
            "",
            f"Baseline RSS {c['baseline_rss_bytes'] / 2**20:.1f} MiB "
            f"(per process: {_mib(c.get('baseline_rss_bytes_per_process', []))}).",
            "",
            "| streams | RSS MiB | bytes per stream |",
            "| --- | --- | --- |",
        ]
        for n, r in c["levels"].items():
            lines.append(f"| {n} | {r['rss_bytes'] / 2**20:.1f} | {r['bytes_per_stream']} |")
    a = results.get("auth", {})
    if a:
        lines += [
            "",
            "### Auth cost per request (µs, best of 5)",
            "",
            "| check | µs |",
            "| --- | --- |",
        ]
        lines += [f"| {k.removesuffix('_us')} | {v} |" for k, v in a.items()]
    if results.get("notes"):
        lines += ["", "Notes: " + "; ".join(results["notes"]) + "."]
    return "\n".join(lines)


def _mib(values: list[int]) -> str:
    return ", ".join(f"{v / 2**20:.1f} MiB" for v in values) or "-"


def chart(results: dict[str, Any], path: Path) -> bool:
    http_ = results.get("http", {})
    if "targets" not in http_ or not have("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(http_["targets"])
    cs = sorted({c for by_c in http_["targets"].values() for c in by_c}, key=int)
    hi, lo = cs[-1], cs[0]
    colors = ["#1f77b4" if not n.startswith("gateway") else "#d62728" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (left, [http_["targets"][n][hi]["rps"] for n in names], "requests/s", hi, "higher"),
        (right, [http_["targets"][n][lo]["p50_ms"] for n in names], "p50 latency ms", lo, "lower"),
    )
    for ax, values, what, c, better in panels:
        ax.barh(names, values, color=colors)
        # Log scale: the values span four orders of magnitude.
        ax.set_xscale("log")
        ax.set_title(f"{what}, concurrency {c} ({better} is better; log)")
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:,.0f}" if value >= 100 else f" {value:.3g}", va="center")
        ax.set_xlim(min(values) / 2, max(values) * 8)
    fig.suptitle(f"authenticated small chat, {results['date']}, {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_docs(results: dict[str, Any], docs: Path, chart_name: str | None) -> None:
    section = f"{BEGIN}\n{markdown(results, chart_name)}\n{END}"
    text = docs.read_text() if docs.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text += "\n" + section + "\n"
    docs.write_text(text)
