"""The Makefile: `make` alone lists the targets, each with its one line."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def documented_targets() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^## ([a-z][a-z-]*): (.+)$", text, re.MULTILINE))


def test_make_alone_lists_every_documented_target_with_its_line():
    result = subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^  ([a-z][a-z-]*) +(.+)$", result.stdout, re.MULTILINE))
    assert listed == documented_targets()


def test_every_target_a_user_runs_is_documented():
    text = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY: ((?:.*\\\n)*.*)$", text, re.MULTILINE)[1].split()) - {"\\"}
    # test-phases is make test's own step, not a user's target.
    assert phony - {"test-phases"} == set(documented_targets())
