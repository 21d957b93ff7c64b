"""server.workers' default: the CPUs the process may use, from fake cgroup files."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_gateway import settings as settings_module
from runner_gateway.cpus import cgroup_cpu_limit, usable_cpus


def _tree(root: Path, files: dict[str, str], proc: str) -> tuple[str, str]:
    for name, text in files.items():
        path = root / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "cgroup").mkdir(exist_ok=True)
    (root / "proc-cgroup").write_text(proc)
    return str(root / "cgroup"), str(root / "proc-cgroup")


@pytest.mark.parametrize(
    ("files", "proc", "limit"),
    [
        # cgroup v2, in a container's namespace ("0::/"): docker --cpus=2
        ({"cpu.max": "200000 100000\n"}, "0::/\n", 2),
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "50000 100000\n"}, "0::/\n", 1),
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),
        # v2 on the host's view: the limit sits on a parent slice
        (
            {
                "kubepods.slice/cpu.max": "300000 100000",
                "kubepods.slice/pod1/cpu.max": "max 100000",
            },
            "0::/kubepods.slice/pod1\n",
            3,
        ),
        # cgroup v1: cfs quota and period; -1 is no quota
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "400000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            "4:cpu,cpuacct:/\n1:memory:/\n",
            4,
        ),
        (
            {
                "cpu/docker/abc/cpu.cfs_quota_us": "100000",
                "cpu/docker/abc/cpu.cfs_period_us": "100000",
            },
            "3:cpu:/docker/abc\n",
            1,
        ),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            "4:cpu,cpuacct:/\n",
            None,
        ),
        ({}, "0::/\n", None),  # no files at all
        ({"cpu.max": "garbage"}, "0::/\n", None),
    ],
)
def test_cgroup_limit(tmp_path: Path, files: dict[str, str], proc: str, limit: int | None) -> None:
    root, proc_path = _tree(tmp_path, files, proc)
    assert cgroup_cpu_limit(root, proc_path) == limit


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    root, proc = _tree(tmp_path, {"cpu.max": "200000 100000"}, "0::/\n")
    assert usable_cpus(root, proc, affinity=64) == 2
    assert usable_cpus(root, proc, affinity=1) == 1
    assert usable_cpus(str(tmp_path / "none"), str(tmp_path / "none"), affinity=8) == 8


def test_default_workers_follow_the_usable_cpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 3)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert settings_module.load_settings(tmp_path, environ={}).server.workers == 3
    (tmp_path / "auto.yaml").write_text("server: {workers: auto}\n")
    assert settings_module.load_settings(tmp_path, env="auto", environ={}).server.workers == 3
