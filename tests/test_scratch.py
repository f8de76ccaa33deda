"""Scratch arrays (rshash_jax/scratch.py): unnamed memory-mapped files, gathered rows, standardised
features equal to the in-memory formula."""

import os

import numpy as np
import pytest

from rshash_jax import scratch


def test_empty_is_an_unnamed_writable_memory_map(tmp_path):
  a = scratch.empty((5, 3), np.float32, str(tmp_path / "tmp"))
  assert isinstance(a, np.memmap) and a.shape == (5, 3) and not a.any()
  a[2] = 7
  assert a.sum() == 21
  assert os.listdir(tmp_path / "tmp") == []  # nothing named to leave behind
  assert scratch.empty((0, 4), np.int32, str(tmp_path)).shape == (0, 4)


def test_take_gathers_rows_in_slices(tmp_path, monkeypatch):
  monkeypatch.setattr(scratch, "ROWS", 3)
  x = np.arange(40, dtype=np.int64).reshape(10, 4)
  rows = np.array([9, 0, 4, 4, 7, 2, 1])
  np.testing.assert_array_equal(scratch.take(x, rows, str(tmp_path)), x[rows])


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("subset", [False, True])
def test_standardised_equals_the_formula_in_memory(tmp_path, monkeypatch, l2, subset):
  monkeypatch.setattr(scratch, "ROWS", 4)  # several slices in every pass
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(23, 6)) * rng.uniform(0.1, 5, size=(23, 1))).astype(np.float32)
  rows = np.sort(rng.choice(23, 15, replace=False)) if subset else None
  fit = np.array([0, 3, 4, 10, 11]) if subset else None
  y, scale = scratch.standardised(x, rows, l2=l2, fit=fit, directory=str(tmp_path))
  want = x if rows is None else x[rows]
  if l2:
    want = want / (np.linalg.norm(want, axis=1, keepdims=True) + 1e-12)
  on = want if fit is None else want[fit]
  want_scale = np.sqrt(np.mean(np.square(on.astype(np.float64)))) + 1e-12
  assert scale == pytest.approx(want_scale, rel=1e-6)
  np.testing.assert_allclose(y, want / want_scale, rtol=1e-6)
  if l2 and fit is None:  # unit rows scaled to a unit RMS entry: every row has norm sqrt(D)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.sqrt(6), rtol=1e-5)


def test_release_collects_and_trims(monkeypatch):
  calls = []
  monkeypatch.setattr(scratch, "_malloc_trim", lambda: calls.append)
  scratch.release()
  assert calls == [0]  # glibc's malloc_trim(0): every arena, nothing kept
  monkeypatch.setattr(scratch, "_malloc_trim", lambda: None)  # not glibc: a no-op
  scratch.release()
