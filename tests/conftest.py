"""Test setup: 8 fake CPU devices (set before JAX initialises), quiet TF, shared fixtures."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
UCMERCED = REPO.parent / "shared" / "data" / "ucmerced"


@pytest.fixture
def ucmerced_dir():
  if not UCMERCED.is_dir():
    pytest.skip(f"real data not found at {UCMERCED}")
  return UCMERCED
