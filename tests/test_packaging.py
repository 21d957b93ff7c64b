"""Packaging: `pip install .` and `pip install -e .` both leave the twistd plugin
findable, and the lock (requirements/*.txt) agrees with setup.cfg's ranges."""

from __future__ import annotations

import configparser
import re
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")

pytestmark = pytest.mark.timeout(240)


def test_editable_install_exposes_the_plugin(tmp_path: Path) -> None:
    # The dev venv is an editable install (make install): run twistd from
    # elsewhere so the checkout is not found through the working directory.
    result = subprocess.run(
        [TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert "runner-gateway" in result.stdout


def test_wheel_install_exposes_the_plugin(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("runner_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/runner_gateway_plugin.py" in names
    # Shipping twisted/__init__.py or twisted/plugins/__init__.py would shadow Twisted.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "runner_gateway/testing/runner.py" in names

    # A bare venv that sees the dependencies (but not the editable checkout)
    # and gets the wheel installed into its own site-packages.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import runner_gateway, sys; from twisted.scripts.twistd import run;"
        "print(runner_gateway.__file__); sys.argv = ['twistd', '--help']; run()"
    )
    result = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert str(target) in result.stdout.splitlines()[0], result.stdout + result.stderr
    assert "runner-gateway" in result.stdout


# ------------------------------------------------------------------- the lock


def _declared(section: str, key: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [Requirement(line) for line in config[section][key].split("\n") if line.strip()]


def _pins(lock: Path) -> dict[str, Version]:
    """name -> version of every ``name==version`` line; each must carry hashes."""
    pins: dict[str, Version] = {}
    text = lock.read_text()
    for entry in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if match:
            assert "--hash=sha256:" in entry, f"{lock.name}: {match.group(1)} has no hash"
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


@pytest.mark.parametrize(
    ("lock", "groups"),
    [
        ("runtime.txt", [("options", "install_requires")]),
        (
            "dev.txt",
            [
                ("options", "install_requires"),
                ("options.extras_require", "test"),
                ("options.extras_require", "dev"),
            ],
        ),
    ],
)
def test_lock_pins_every_declared_dependency_within_its_range(
    lock: str, groups: list[tuple[str, str]]
) -> None:
    """make lock after a setup.cfg change: a lock outside the ranges is stale."""
    pins = _pins(ROOT / "requirements" / lock)
    for section, key in groups:
        for requirement in _declared(section, key):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock} lacks {requirement}: run make lock"
            assert pins[name] in requirement.specifier, (
                f"{lock} pins {name}=={pins[name]}, outside {requirement}: run make lock"
            )


def test_dev_lock_has_the_runtime_lock_versions() -> None:
    """The suite tests what the image ships: the layered lock shares its pins."""
    runtime = _pins(ROOT / "requirements" / "runtime.txt")
    dev = _pins(ROOT / "requirements" / "dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_twisted_has_an_upper_bound() -> None:
    """Our code reaches beneath Twisted's public API: a release we have not
    tested must not be installed by a range (README "Supported versions")."""
    (twisted,) = [r for r in _declared("options", "install_requires") if r.name == "Twisted"]
    assert any(spec.operator == "<" for spec in twisted.specifier)


def test_readme_states_the_tested_ranges() -> None:
    """README "Supported versions" says what setup.cfg declares."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    (twisted,) = [
        line.strip()
        for line in config["options"]["install_requires"].split("\n")
        if line.strip().startswith("Twisted")
    ]
    assert f"`{twisted}`" in section
    pythons = re.findall(r"Python :: (3\.\d+)$", config["metadata"]["classifiers"], flags=re.M)
    assert f"| Python | {', '.join(pythons)} |" in section
