"""Pixel budgets, checked from an image's header before a single pixel is decoded.

A PNG of 8000 x 8000 zeros is 187 KB on disk and 192 MB decoded (and several times that
through a float resize); a deflate TIFF of 12000^2 is 156 KB. So every decoder of the
package asks the header first: width x height x bands x bytes per sample (what the decoder
will allocate) must fit `limit` bytes, or the file is refused with `errors.TooLarge`
naming it, its size and the limit, before anything is decoded.

Limits: `DEFAULT_MAX_DECODED_MB` (1024 MB) for files named on the command line or in a
dataset, overridable with the environment variable RSHASH_MAX_IMAGE_MB; the service passes
its own, smaller one (`serve --max_image_mb`, default 64 MB: a 4600 x 4600 RGB upload).
Whole scenes are not decoded at once by design: cut them into tiles.
"""

import contextlib
import os
import threading
import time
from typing import Optional

from rshash_jax import errors

DEFAULT_MAX_DECODED_MB = 1024
ENV = "RSHASH_MAX_IMAGE_MB"

# Bytes per sample of PIL's modes (what its decoder allocates per band); 1 elsewhere.
_PIL_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}


def max_decoded_bytes() -> int:
  """The limit for files: RSHASH_MAX_IMAGE_MB if set, else DEFAULT_MAX_DECODED_MB."""
  raw = os.environ.get(ENV, "")
  if not raw:
    return DEFAULT_MAX_DECODED_MB << 20
  try:
    mb = float(raw)
  except ValueError:
    raise errors.InvalidInput(f"{ENV}={raw!r} is not a number of megabytes") from None
  if not mb > 0:
    raise errors.InvalidInput(f"{ENV}={raw!r} must be a positive number of megabytes")
  return int(mb * (1 << 20))


# Peak memory of a decode and its float resize per declared byte (uint8 pixels, a float32
# copy, the antialiased resize's intermediate): what a Budget reserves.
WORKING_SET = 6


class Budget:
  """Bytes that concurrent decodes may hold together (the service's memory budget for
  images): a decode reserves WORKING_SET x its declared size and waits until that fits,
  up to `timeout_s`, then fails with errors.Timeout. A decode larger than the whole budget
  runs alone. Used through `held`: `check` reserves, the end of the `held` block
  releases."""

  def __init__(self, total_bytes: int, timeout_s: float = 30.0):
    self.total, self.timeout_s = int(total_bytes), float(timeout_s)
    self.in_use = 0
    self._cond = threading.Condition()

  def acquire(self, n: int, name: str):
    deadline = time.monotonic() + self.timeout_s
    with self._cond:
      while self.in_use and self.in_use + n > self.total:
        left = deadline - time.monotonic()
        if left <= 0:
          raise errors.Timeout(
            f"{name}: waited {self.timeout_s:g} s for {n / (1 << 20):.0f} MB of the image "
            f"memory budget ({self.total / (1 << 20):.0f} MB, busy with other images)"
          )
        self._cond.wait(left)
      self.in_use += n

  def release(self, n: int):
    with self._cond:
      self.in_use -= n
      self._cond.notify_all()


_scope = threading.local()


@contextlib.contextmanager
def held(budget: Optional[Budget]):
  """Decodes in this block (this thread) reserve their declared size from `budget` in
  `check`; it is all released when the block ends, decoded or not."""
  _scope.budget, _scope.reserved = budget, 0
  try:
    yield
  finally:
    if budget is not None and _scope.reserved:
      budget.release(_scope.reserved)
    _scope.budget, _scope.reserved = None, 0


def check(
  name: str, width: int, height: int, bands: int, sample_bytes: int, limit: Optional[int] = None
) -> int:
  """Raises TooLarge unless the declared pixels fit `limit` bytes (default: the file
  limit); inside `held(budget)`, then reserves them from the budget. Returns the declared
  size in bytes."""
  limit = max_decoded_bytes() if limit is None else int(limit)
  if width <= 0 or height <= 0 or bands <= 0:
    raise errors.NotAnImage(f"{name}: the header declares {width} x {height} x {bands} pixels")
  size = int(width) * int(height) * int(bands) * int(sample_bytes)
  if size > limit:
    raise errors.TooLarge(
      f"{name}: {width} x {height} pixels x {bands} band(s) x {sample_bytes} byte(s) "
      f"= {size / (1 << 20):.0f} MB decoded, over the limit of {limit / (1 << 20):.0f} MB "
      f"({ENV} for files, serve --max_image_mb for the service); cut large scenes into tiles"
    )
  budget = getattr(_scope, "budget", None)
  if budget is not None:
    budget.acquire(WORKING_SET * size, name)
    _scope.reserved += WORKING_SET * size
  return size


def check_pil(im, name: str, limit: Optional[int] = None) -> int:
  """`check` for an image PIL has opened (header only: PIL decodes lazily). The first frame
  is what every decoder here reads of an animation."""
  w, h = im.size
  return check(name, w, h, len(im.getbands()), _PIL_SAMPLE_BYTES.get(im.mode, 1), limit)


def check_raster(src, bands: int, name: str, limit: Optional[int] = None) -> int:
  """`check` for an open rasterio dataset read as `bands` float32 bands (how rasters are
  read before scaling)."""
  return check(name, src.width, src.height, bands, 4, limit)
