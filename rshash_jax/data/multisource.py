"""Multisource training data for MrHash: per example, features of two or more sources.

Two ways in:
1. The MrHash release format (`release:DIR`): split lists `DIR/{split}.txt` with one line
   per example, `relative/image/path 0 0 1 0 ...` (image path, then the one-hot label),
   and one feature file per source, `DIR/{split}_{source}.npy` ([N, D_s] float, rows in
   list order; .npz with one array or .mat with variable `features` also read). The
   images are the single-source images the hash network sees, relative to DIR (or
   `image_root`).
2. Sources given as images (`views`): each source is a view of the table's images (the
   full image, `full`; a coarse-resolution view `coarseN`, N times coarser; or
   `folder:DIR`, a tree with the same relative paths as the table, e.g. another sensor),
   whose features a pretrained backbone extracts once, cached on disk, in id order.
   A view may read its rasters its own way: `;bands=...` and `;scale=...` after it take
   the place of data.bands / data.scale for that source alone (same syntax, rasters.py),
   e.g. `folder:/data/s2;bands=B8,B4,B3;scale=stretch` beside `full` aerial RGB, or
   `folder:/data/s2;bands=all;scale=10000` (the backbone's stem adapted to that
   source's band count). A stretch is fitted on the training split of that source.
"""

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from rshash_jax import errors
from rshash_jax.untrusted import arrays as safe_arrays, mat as safe_mat
from rshash_jax.data import datasets, features, rasters
from rshash_jax.models import backbones


@dataclasses.dataclass
class MultiSource:
  """`table` holds the single-source images; sources[s] is [N, D_s] in table id order."""

  table: datasets.ImageTable
  sources: List[np.ndarray]
  source_names: List[str]
  train_idx: Optional[np.ndarray] = None  # given splits (release format)
  test_idx: Optional[np.ndarray] = None


def _load_matrix(path: str) -> np.ndarray:
  """A source's feature matrix [N, D] of numbers from .npy, .npz (one array) or .mat
  (variable `features`); a malformed file is refused by name (safe_arrays, safe_mat)."""
  if path.endswith(".npy"):
    m = safe_arrays.load_npy(path)
  elif path.endswith(".npz"):
    z = safe_arrays.load_npz(path)
    if len(z) != 1:
      raise errors.InvalidInput(f"{path}: expected one array, found {sorted(z)}")
    (m,) = z.values()
  else:
    mat = safe_mat.load_mat(path, squeeze=False)
    if "features" not in mat:
      raise errors.InvalidInput(
        f"{path}: no variable 'features' (found {sorted({k.split('/')[0] for k in mat})})"
      )
    m = mat["features"]
  if not isinstance(m, np.ndarray) or m.ndim != 2 or m.dtype.kind not in "fiub":
    raise errors.InvalidInput(
      f"{path}: features must be a 2-D numeric matrix [N, D], found "
      f"{getattr(m, 'dtype', type(m).__name__)} {list(getattr(m, 'shape', []))}"
    )
  return m


def _find(directory: str, stem: str) -> str:
  for ext in (".npy", ".npz", ".mat"):
    p = os.path.join(directory, stem + ext)
    if os.path.isfile(p):
      return p
  raise errors.NotFound(f"feature file {stem}.npy/.npz/.mat not found in {directory}")


def read_list(path: str, image_root: str):
  """(paths, labels) of a release split list; errors name the file and line."""
  if not os.path.isfile(path):
    raise errors.NotFound(f"split list not found: {path}")
  paths, labels = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) < 3:
        raise errors.InvalidInput(
          f"{path}:{n}: expected 'image_path label_0 label_1 ...', got {line.strip()!r}"
        )
      try:
        onehot = np.asarray([int(float(v)) for v in parts[1:]])
      except ValueError as e:
        raise errors.InvalidInput(f"{path}:{n}: labels must be 0/1 numbers ({e})") from e
      if onehot.sum() != 1 or not set(np.unique(onehot)) <= {0, 1}:
        raise errors.InvalidInput(f"{path}:{n}: the label must be one-hot, got {parts[1:]}")
      paths.append(os.path.join(image_root, parts[0]))
      labels.append(int(np.argmax(onehot)))
  if not labels:
    raise errors.InvalidInput(f"{path}: empty split list")
  return paths, np.asarray(labels, np.int32)


def read_release(
  directory: str,
  source_names: Sequence[str],
  splits=("train", "test"),
  image_root: Optional[str] = None,
  check_images: bool = True,
) -> MultiSource:
  """Reads the release format (see module docstring); ids run over train then test."""
  directory = os.path.abspath(directory)
  image_root = image_root or directory
  all_paths, all_labels, parts = [], [], []
  src: Dict[str, List[np.ndarray]] = {s: [] for s in source_names}
  for split in splits:
    paths, labels = read_list(os.path.join(directory, f"{split}.txt"), image_root)
    for s in source_names:
      m = np.asarray(_load_matrix(_find(directory, f"{split}_{s}")), np.float32)
      if m.ndim != 2 or m.shape[0] != len(paths):
        raise errors.InvalidInput(
          f"{_find(directory, f'{split}_{s}')}: expected [{len(paths)}, D] features for the "
          f"{len(paths)} lines of {split}.txt, got shape {m.shape}"
        )
      src[s].append(m)
    parts.append(np.arange(len(paths)) + len(all_paths))
    all_paths += paths
    all_labels.append(labels)
  labels = np.concatenate(all_labels)
  num_classes = int(max(labels.max() + 1, 2))
  if check_images:
    for p in all_paths:
      datasets.check_image(p)
  table = datasets.ImageTable(
    name=os.path.basename(directory),
    labels=labels,
    class_names=[f"class{c}" for c in range(num_classes)],
    paths=all_paths,
    description=f"MrHash release format in {directory}",
  )
  if len(source_names) < 1:
    raise errors.InvalidInput("read_release needs at least one source name")
  sources = [np.concatenate(src[s]) for s in source_names]
  return MultiSource(
    table, sources, list(source_names), parts[0], parts[1] if len(parts) > 1 else None
  )


VIEW_OPTIONS = ("bands", "scale")


def split_view(spec: str):
  """'folder:DIR;bands=4,3,2;scale=10000' -> ('folder:DIR', {'bands': '4,3,2', 'scale': ...})."""
  base, *opts = spec.split(";")
  options = {}
  for o in opts:
    key, eq, value = o.partition("=")
    if not eq or key.strip() not in VIEW_OPTIONS or key.strip() in options:
      raise errors.InvalidInput(
        f"source view {spec!r}: {o!r} is not an option; expected ;bands=... and/or "
        ";scale=..., each once"
      )
    options[key.strip()] = value.strip()
  return base, options


def view_raster(spec: rasters.RasterSpec, options) -> rasters.RasterSpec:
  """The raster spec of a view with `options`: the table's `spec`, with the view's own bands
  and / or scale (not yet fitted)."""
  own = rasters.RasterSpec.parse(options.get("bands", ""), options.get("scale", ""))
  bands = own if "bands" in options else spec
  scale = own if "scale" in options else spec
  return rasters.RasterSpec(
    bands=bands.bands, all_bands=bands.all_bands, divisor=scale.divisor, stretch=scale.stretch
  )


def view(
  table: datasets.ImageTable, spec: str, train_idx=None, seed: int = 0
) -> datasets.ImageTable:
  """The table seen through source `spec`: full | coarseN | folder:DIR (same relative
  paths), each optionally with ;bands= / ;scale= (that view's own reading of its rasters;
  a stretch fitted on the rows `train_idx`)."""
  spec, options = split_view(spec)
  if not options:
    return _view(table, spec)
  out = _view(dataclasses.replace(table, raster=view_raster(table.raster, options)), spec)
  if not spec.startswith("folder:"):  # a folder view has checked its rasters' headers already
    out = out.with_raster(out.raster)
  if out.raster.needs_fit:
    if train_idx is None:
      raise errors.InvalidInput(
        f"source view {spec!r}: scale=stretch needs the training split to fit on"
      )
    out = datasets.fit_raster(out, train_idx, seed)
  return out


def _view(table: datasets.ImageTable, spec: str) -> datasets.ImageTable:
  if spec == "full":
    return table
  if spec.startswith("coarse"):
    try:
      factor = int(spec[len("coarse") :])
    except ValueError as e:
      raise errors.InvalidInput(
        f"source view {spec!r}: expected coarseN with an integer N, e.g. coarse4"
      ) from e
    return dataclasses.replace(
      table, degrade=factor, description=f"{table.description}, {factor}x coarser view"
    )
  if spec.startswith("folder:"):
    root = spec[len("folder:") :]
    if table.paths is None:
      raise errors.InvalidInput(f"source view {spec!r} needs a class-folder table")
    base = os.path.commonpath(table.paths)
    paths = [os.path.join(root, os.path.relpath(p, base)) for p in table.paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise errors.NotFound(f"source {spec}: {len(missing)} images missing, e.g. {missing[0]}")
    # data.bands / data.scale, or this view's own: checked against this sensor's rasters.
    return dataclasses.replace(table, paths=paths, description=f"images under {root}").with_raster(
      table.raster
    )
  raise errors.InvalidInput(f"unknown source view {spec!r}: use full, coarseN or folder:DIR")


def features_of_views(
  table: datasets.ImageTable,
  specs: Sequence[str],
  bb: backbones.Backbone,
  cache_dir: str,
  *,
  batch_size: int = 32,
  threads: int = 0,
  weights_path: Optional[str] = None,
  train_idx=None,
  seed: int = 0,
) -> List[np.ndarray]:
  """Backbone features [N, D] of every source view, cached in cache_dir by table + view; a
  view of C bands (bands=all) is read by `bb` with its stem adapted to C channels."""
  out = []
  for spec in specs:
    v = view(table, spec, train_idx, seed)
    out.append(
      features.cached_features(
        backbones.with_channels(bb, v.raster.channels),
        v,
        cache_dir,
        weights_path=weights_path,
        batch_size=batch_size,
        threads=threads,
      )
    )
  return out
