"""The codes file (.npz) that `encode` writes and `search`, the service and the metrics read.

Arrays (one row per archive image, in its stable id order):
  format       "rshash_jax.codes/1"
  codes        uint32 [N, ceil(bits / 32)]: the bit-packed codes (hamming.pack_codes)
  ids          int [N]: the images' stable ids in their table
  labels       int [N] class ids (-1: unknown), or uint8 [N, C] multi-hot rows
  predicted    int32 [N]: the encoder's predicted class (-1 where it has no classifier)
  paths        str [N]: image paths (or tfds:NAME:SPLIT[i])
  lon, lat     float [N]: WGS84 centres of georeferenced rasters (NaN elsewhere)
  class_names  str [C]
  bits, identity, method, backbone: the encoder that wrote it (codes of another encoder
               are refused: their bits mean something else)
Written with allow_pickle=False and read with it: a codes file holds no pickle.
"""

import os
from typing import Dict, Optional, Sequence

import numpy as np

from rshash_jax import errors
from rshash_jax.retrieval import encoder as encoder_lib

FORMAT = "rshash_jax.codes/1"


def write_codes(
  path: str,
  *,
  codes: np.ndarray,
  ids: np.ndarray,
  labels: np.ndarray,
  lonlat: np.ndarray,
  predicted: np.ndarray,
  paths: Sequence[str],
  class_names: Sequence[str],
  encoder: encoder_lib.Encoder,
):
  """Writes a codes file at `path` (a plain write: callers make it atomic)."""
  with open(path, "wb") as f:
    np.savez(
      f,
      format=FORMAT,
      codes=codes,
      ids=ids,
      labels=labels,
      lon=lonlat[:, 0],
      lat=lonlat[:, 1],
      predicted=predicted,
      paths=np.asarray(paths),
      class_names=np.asarray(class_names, dtype=str),
      bits=encoder.bits,
      identity=encoder.identity,
      method=encoder.meta["method"],
      backbone=encoder.meta["backbone"],
    )


def load_codes(path: str, enc: Optional[encoder_lib.Encoder] = None) -> Dict[str, np.ndarray]:
  """A codes file's arrays; with `enc`, refuses codes that another encoder wrote."""
  if not os.path.isfile(path):
    raise errors.NotFound(f"codes file not found: {path}")
  try:
    z = dict(np.load(path, allow_pickle=False))
  except Exception as e:
    raise errors.InvalidInput(f"{path}: not a codes file ({e})") from e
  if str(z.get("format")) != FORMAT:
    raise errors.InvalidInput(f"{path}: not an rshash_jax codes file (format {z.get('format')!r})")
  if enc is not None and (str(z["identity"]) != enc.identity or int(z["bits"]) != enc.bits):
    raise errors.InvalidInput(
      f"{path} was encoded by encoder {z['identity']} ({int(z['bits'])} bits), "
      f"not by {enc.identity} ({enc.bits} bits): re-encode the database with this encoder"
    )
  return z
