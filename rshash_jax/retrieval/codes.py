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
  scene archives (`encode --tile`; rshash_jax/data/scenes.py), besides:
  scenes       str [S]: the scene files;  scene_crs  str [S]: each one's CRS (WKT, "" none)
  scene        int32 [N]: each window's scene;  window  int64 [N, 4]: col, row, width,
               height in scene pixels;  corners  float64 [N, 4, 2]: the window's corners
               in its scene's CRS;  footprint  float64 [N, 4, 2]: the same in WGS84
               (lon, lat; NaN without a CRS)
  bits, identity, method, backbone: the encoder that wrote it (codes of another encoder
               are refused: their bits mean something else)
Written with allow_pickle=False and read through safe_arrays (no pickle; every member's
header, size and CRC-32 checked), then every field's type and length is checked, so a
corrupt or crafted codes file is refused by name before anything uses it.
"""

import os
from typing import Dict, Optional, Sequence

import numpy as np

from rshash_jax import errors
from rshash_jax.untrusted import arrays as safe_arrays
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
  tiles=None,
):
  """Writes a codes file at `path` (a plain write: callers make it atomic); `tiles` (a
  scenes.Tiles) adds a scene archive's windows and footprints."""
  extra = {}
  if tiles is not None:
    extra = dict(
      scenes=np.asarray(tiles.scenes, dtype=str),
      scene_crs=np.asarray(tiles.crs, dtype=str),
      scene=tiles.scene,
      window=tiles.window,
      corners=tiles.corners,
      footprint=tiles.footprint,
    )
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
      **extra,
    )


def load_codes(path: str, enc: Optional[encoder_lib.Encoder] = None) -> Dict[str, np.ndarray]:
  """A codes file's arrays; with `enc`, refuses codes that another encoder wrote."""
  if not os.path.isfile(path):
    raise errors.NotFound(f"codes file not found: {path}")
  z = safe_arrays.load_npz(path)
  if str(z.get("format")) != FORMAT:
    raise errors.InvalidInput(f"{path}: not an rshash_jax codes file (format {z.get('format')!r})")
  if "identity" not in z or "bits" not in z:
    raise errors.Corrupt(f"{path}: codes file without its encoder's identity and bits")
  if enc is not None and (str(z["identity"]) != enc.identity or int(z["bits"]) != enc.bits):
    raise errors.InvalidInput(
      f"{path} was encoded by encoder {z['identity']} ({int(z['bits'])} bits), "
      f"not by {enc.identity} ({enc.bits} bits): re-encode the database with this encoder"
    )
  _check_fields(path, z)
  return z


_PER_ROW = ("ids", "labels", "predicted", "paths", "lon", "lat")


def _check_fields(path: str, z: Dict[str, np.ndarray]):
  """Each field present, of its kind, one row per code: errors.Corrupt names the field."""
  if "codes" in z and getattr(z["codes"], "ndim", 0) == 2:  # files written before coordinates
    for k in ("lon", "lat"):
      z.setdefault(k, np.full(z["codes"].shape[0], np.nan))
  need = ("codes", "class_names", "bits", "identity", "method", "backbone") + _PER_ROW
  missing = [k for k in need if k not in z]
  if missing:
    raise errors.Corrupt(f"{path}: codes file without field(s) {', '.join(missing)}")

  def bad(field, what):
    raise errors.Corrupt(f"{path}: field {field!r} is {what}")

  codes, bits = z["codes"], z["bits"]
  if bits.shape != () or bits.dtype.kind not in "iu" or not 1 <= int(bits) <= 1 << 16:
    bad("bits", f"{bits!r}, not a code length in 1..65536")
  if codes.dtype != np.uint32 or codes.ndim != 2 or codes.shape[1] != -(-int(bits) // 32):
    bad("codes", f"{codes.dtype} {list(codes.shape)}, not uint32 [N, ceil({int(bits)} / 32)]")
  n = codes.shape[0]
  for k in _PER_ROW:
    if z[k].ndim < 1 or z[k].shape[0] != n:
      bad(k, f"of shape {list(z[k].shape)}, not one row per code ({n})")
  for k in ("ids", "labels", "predicted"):
    if z[k].dtype.kind not in "iub":
      bad(k, f"of type {z[k].dtype}, not integers")
  for k in ("lon", "lat"):
    if z[k].dtype.kind != "f" or z[k].ndim != 1:
      bad(k, f"of type {z[k].dtype} {list(z[k].shape)}, not floats [N]")
  if z["paths"].dtype.kind != "U" or z["paths"].ndim != 1:
    bad("paths", f"of type {z['paths'].dtype}, not strings [N]")
  names = z["class_names"]
  if names.dtype.kind != "U" or names.ndim != 1:
    bad("class_names", f"of type {names.dtype} {list(names.shape)}, not strings [C]")
  labels = z["labels"]
  if labels.ndim == 2 and labels.shape[1] != len(names):
    bad("labels", f"multi-hot of {labels.shape[1]} columns for {len(names)} classes")
  if labels.ndim == 1 and n and (labels.min() < -1 or labels.max() >= max(len(names), 1)):
    bad("labels", f"with class ids outside -1..{len(names) - 1}")
  _check_scene_fields(z, n, bad)
  if n and (z["predicted"].min() < -1 or z["predicted"].max() >= max(len(names), 1)):
    bad("predicted", f"with class ids outside -1..{len(names) - 1}")


SCENE_FIELDS = ("scenes", "scene_crs", "scene", "window", "corners", "footprint")


def _check_scene_fields(z: Dict[str, np.ndarray], n: int, bad):
  """A scene archive's fields: all or none, each of its shape and type, scene ids in range."""
  have = [k for k in SCENE_FIELDS if k in z]
  if not have:
    return
  if len(have) != len(SCENE_FIELDS):
    bad(
      sorted(set(SCENE_FIELDS) - set(have))[0],
      "missing (a scene archive has all of " + ", ".join(SCENE_FIELDS) + ")",
    )
  for k in ("scenes", "scene_crs"):
    if z[k].dtype.kind != "U" or z[k].ndim != 1:
      bad(k, f"of type {z[k].dtype} {list(z[k].shape)}, not strings [S]")
  if z["scene_crs"].shape != z["scenes"].shape:
    bad("scene_crs", "not one CRS per scene")
  shapes = {"scene": (n,), "window": (n, 4), "corners": (n, 4, 2), "footprint": (n, 4, 2)}
  kinds = {"scene": "iu", "window": "iu", "corners": "f", "footprint": "f"}
  for k, shape in shapes.items():
    if z[k].shape != shape or z[k].dtype.kind not in kinds[k]:
      bad(k, f"{z[k].dtype} {list(z[k].shape)}, not {list(shape)}")
  if n and (z["scene"].min() < 0 or z["scene"].max() >= len(z["scenes"])):
    bad("scene", f"with scene ids outside 0..{len(z['scenes']) - 1}")
  if n and (z["window"][:, :2].min() < 0 or z["window"][:, 2:].min() < 1):
    bad("window", "with a negative offset or an empty window")
