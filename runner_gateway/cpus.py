"""How many CPUs this process may use: the default of ``server.workers``.

``os.cpu_count()`` is the host's count. A container limited to 2 CPUs on a
64-core host would start 64 workers that share 2 CPUs' worth of time. The
count here is the smallest of: the CPUs the scheduler lets the process run
on (``sched_getaffinity``: taskset, cpusets, Kubernetes' static CPU manager)
and the CPU quota of its cgroup, rounded up (cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: Docker's ``--cpus``, Kubernetes'
CPU limits). Pure apart from reading the files it is pointed at, so tests
give it fake ones.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cpus"]


def usable_cpus(
    cgroup_root: str = "/sys/fs/cgroup",
    proc_cgroup: str = "/proc/self/cgroup",
    affinity: int | None = None,
) -> int:
    """At least 1; ``affinity`` is the scheduler's count (looked up when None)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    return max(1, min(affinity, limit) if limit is not None else affinity)


def cgroup_cpu_limit(cgroup_root: str, proc_cgroup: str) -> int | None:
    """CPUs' worth of time the cgroup quota allows (rounded up), None without a quota."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(cgroup_root)
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            for directory in _up_from(root, relative):
                limits += _v2_limit(directory / "cpu.max")
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                for directory in _up_from(mount, relative):
                    limits += _v1_limit(directory)
    return math.ceil(min(limits)) if limits else None


def _up_from(mount: Path, relative: str) -> list[Path]:
    """The cgroup's directory and its ancestors up to the mount (a limit on a
    parent binds too); inside a container's namespace the path is often "/"."""
    directories = [mount]
    parts = [p for p in relative.split("/") if p]
    for i in range(len(parts)):
        directories.append(mount.joinpath(*parts[: i + 1]))
    return [d for d in directories if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(path: Path) -> list[float]:
    text = _read(path)  # "max 100000" or "200000 100000"
    if not text:
        return []
    quota, _, period = text.partition(" ")
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return []
    return [int(quota) / int(period)]


def _v1_limit(directory: Path) -> list[float]:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return []
    if q <= 0 or p <= 0:  # -1: no quota
        return []
    return [q / p]
