"""Every package passes the checked-in linter and formatter (ruff.toml)."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize(
  "command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"]
)
def test_ruff_is_clean(command):
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, (
    f"ruff {' '.join(command)} found problems (fix: ruff check --fix . && ruff format .):\n"
    f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
  )
