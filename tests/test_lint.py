"""`ruff check` (pyflakes + pycodestyle at a line length of 100) and `ruff format --check` pass."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ruff():
  exe = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
  if not pathlib.Path(exe).exists():
    pytest.fail("ruff is not installed (it is in the [dev] extra: pip install -e '.[dev]')")
  return exe


@pytest.mark.parametrize(
  "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff(args):
  proc = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
