"""`pip install .` and `pip install -e .` both leave the twistd plugin findable."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

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
