"""`make install` on a machine without uv: it gets uv itself, privately, then goes on.

A clean copy of the repository (no .venv, no .tools) is installed with a PATH that holds make, the
shell's tools and a Python 3.11, but no uv anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = (".git", ".venv", ".tools", ".infra", "__pycache__", ".pytest_cache", ".ruff_cache")

pytestmark = [
    # It installs every dependency into a new virtualenv: a whole-system cost, and the index.
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
]


def path_without_uv(bin_dir: Path) -> str:
    """A PATH of our own: a Python 3.11 and make, then the system's directories that hold no uv."""
    bin_dir.mkdir()
    # The interpreter itself, not a pyenv shim (whose directory holds a uv shim too).
    python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    (bin_dir / "python3").symlink_to(python)
    (bin_dir / "python3.11").symlink_to(python)
    make = shutil.which("make")
    assert make is not None
    (bin_dir / "make").symlink_to(make)
    system = [d for d in ("/usr/local/bin", "/usr/bin", "/bin") if not Path(d, "uv").exists()]
    return os.pathsep.join([str(bin_dir), *system])


@pytest.mark.timeout(600)
def test_make_install_without_uv_gets_uv_into_a_private_virtualenv_and_installs(tmp_path: Path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*LEFT_OUT), symlinks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    env["PATH"] = path_without_uv(tmp_path / "bin")
    assert shutil.which("uv", path=env["PATH"]) is None

    result = subprocess.run(
        ["make", "install"],
        cwd=copy,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "uv is not on the PATH: installing it into .tools/" in output
    version = subprocess.run(
        [str(copy / ".tools" / "bin" / "uv"), "--version"], capture_output=True, text=True
    )
    pinned = (ROOT / "requirements-tools.lock").read_text().split("uv==")[1].split()[0]
    assert version.stdout.split()[:2] == ["uv", pinned]
    # ... and went on with that uv: the project's virtualenv holds the services.
    imported = subprocess.run(
        [str(copy / ".venv" / "bin" / "python"), "-c", "import booking.orders, booking.gateway"],
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr
