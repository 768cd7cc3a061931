"""The README's two commands set up their own environment: under an externally managed Python, with a clear message
when venv is missing, and again when the interpreter or checkout changes. Dry runs (`make -n`) and a scratch
interpreter without `ensurepip`; nothing is installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture
def checkout(tmp_path):
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def make(checkout, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")}
    environ.update(env)
    return subprocess.run(["make", *args], cwd=checkout, env=environ, capture_output=True, text=True, timeout=120)


def test_without_an_active_environment_it_makes_its_own_venv(checkout):
    done = make(checkout, "-n", "test", f"PYTHON={sys.executable}")
    assert done.returncode == 0, done.stderr
    assert f"{sys.executable} -m venv {checkout}/.venv" in done.stdout
    assert f"{checkout}/.venv/bin/python -m pytest -q --durations=15 tests" in done.stdout
    assert "pip install" in done.stdout and " -q -e" not in done.stdout  # progress shown, not -q silence


def test_an_active_environment_is_used(checkout, tmp_path_factory):
    venv = tmp_path_factory.mktemp("active")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    done = make(checkout, "-n", "demo", VIRTUAL_ENV=str(venv))
    assert done.returncode == 0, done.stderr
    assert "-m venv" not in done.stdout
    assert f"{venv}/bin/python examples/demo.py" in done.stdout


def test_a_python_without_venv_gets_a_message_naming_the_package(checkout, tmp_path_factory):
    # a scratch interpreter like Debian's python3 without python3.X-venv: `import ensurepip` fails
    shadow = tmp_path_factory.mktemp("no-ensurepip")
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip is not available (simulated)')\n")
    python = shadow / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    done = make(checkout, "install", f"PYTHON={python}")
    assert done.returncode != 0
    version = "%d.%d" % sys.version_info[:2]
    assert f"apt install python{version}-venv" in done.stdout
    assert not (checkout / ".venv").exists()


def test_the_install_stamp_does_not_survive_a_change_of_interpreter(checkout):
    # an environment set up with another interpreter: its stamp says so, and make sets it up again
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".forking-trl-installed").write_text(f"{checkout} | /usr/bin/python3.9 3 9 2\n")
    done = make(checkout, "-n", "test", f"PYTHON={sys.executable}")
    assert done.returncode == 0, done.stderr
    assert "set up for another checkout or interpreter" in done.stdout
    assert f"-m venv {venv}" in done.stdout and "pip install" in done.stdout
