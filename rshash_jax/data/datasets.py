"""Image datasets as tables of (stable id, label, source): class folders, TFDS, generated.

Every example gets a stable integer id: its position in a deterministic order (sorted
class folder, sorted file name; TFDS's unshuffled split order). The DHCNN memory bank
indexes by it and cached features are keyed by it. Splits are seeded and per class.

Sources, as written in `config.data.source`:
  folder:/path/to/root     a class-folder tree (tif, tiff, jpg, jpeg, png, webp, bmp)
  tfds:uc_merced           any TFDS builder (download, or its manual dir)
  generated                small synthetic scenes written to a directory (offline default)
  auto                     ../shared/data/ucmerced when it is there, else `generated`
"""

import dataclasses
import hashlib
import os
import shutil
from typing import List, Optional

import numpy as np
from absl import logging
from PIL import Image

from rshash_jax import errors
from rshash_jax.data import image_limits, rasters, scenes
from rshash_jax.parallel import distributed

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Where `auto` looks for UC Merced, relative to the working directory and to this package.
LOCAL_UCMERCED = (
  "../shared/data/ucmerced",
  os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ucmerced"),
)


@dataclasses.dataclass
class ImageTable:
  """All examples of a dataset. Exactly one of `paths` / `tfds_name` describes the source."""

  name: str
  labels: np.ndarray  # int32 [N] class ids, or multi-hot int32 [N, C] (a label file)
  class_names: List[str]
  paths: Optional[List[str]] = None
  tfds_name: Optional[str] = None
  tfds_split: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  image_key: str = "image"
  description: str = ""
  # >1: a coarse-resolution view, as a sensor with `degrade` times larger ground sampling
  # distance sees the scene (area-averaged down by this factor, bicubic back up).
  degrade: int = 1
  # How GeoTIFF/TIFF files become 8-bit images (data.bands, data.scale; rshash_jax/data/rasters.py).
  raster: rasters.RasterSpec = dataclasses.field(default_factory=rasters.RasterSpec)
  # A scene archive's windows (rshash_jax/data/scenes.py): `paths` are then tile paths.
  tiles: Optional[scenes.Tiles] = None

  @property
  def ids(self) -> np.ndarray:
    return np.arange(len(self.labels), dtype=np.int64)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def multilabel(self) -> bool:
    return self.labels.ndim == 2

  def __len__(self):
    return len(self.labels)

  def lonlat(self) -> np.ndarray:
    """float64 [N, 2] WGS84 (lon, lat) of each image's centre; NaN where a file has no
    transform and CRS (every non-raster, every TFDS example)."""
    if self.paths is None:
      return np.full((len(self), 2), np.nan)
    if self.tiles is not None:
      return self.tiles.centre
    if getattr(self, "_lonlat", None) is None:
      self._lonlat = rasters.table_lonlat(self.paths)  # pylint: disable=attribute-defined-outside-init
    return self._lonlat

  def with_raster(self, spec: "rasters.RasterSpec") -> "ImageTable":
    """This table reading its rasters by `spec`; every raster's header is checked against it
    now (bands present, type scalable), before any long work. data.bands=all takes its band
    count from the first image and requires it of every other."""
    if spec.all_bands and self.paths is not None:
      pictures = [p for p in self.paths if not rasters.is_raster(p)]
      if pictures:
        raise errors.InvalidInput(
          f"{pictures[0]}: not a GeoTIFF/TIFF raster; data.bands=all takes rasters only "
          f"({len(pictures)} of the {len(self.paths)} images are not)"
        )
    if self.tiles is not None:  # every scene's header was checked when it was cut
      return dataclasses.replace(self, tiles=self.tiles, raster=_resolve_tiles(self, spec))
    lonlat = None if self.paths is None else np.full((len(self.paths), 2), np.nan)
    for i, p in enumerate(self.paths or []):
      if rasters.is_raster(p):
        count, numbers, lonlat[i] = rasters.header(p, spec)  # one opening: checks and coordinates
        if spec.all_bands and not spec.count:
          spec = spec.with_count(count, p)
        if not spec.numbers:
          spec = dataclasses.replace(spec, numbers=numbers)
    if self.paths is None:  # TFDS: the first example's bands
      name = f"TFDS {self.tfds_name}"
      c = next(self.tfds_arrays([0])).shape[-1]
      if spec.all_bands and not spec.count:
        spec = spec.with_count(c, name)
      numbers = rasters.array_band_numbers(c, spec, name)
      spec = spec if spec.numbers else dataclasses.replace(spec, numbers=numbers)
    out = dataclasses.replace(self, raster=spec)
    out._lonlat = lonlat  # pylint: disable=protected-access,attribute-defined-outside-init
    return out

  def tfds_arrays(self, indices):
    """The raw images [H, W, C] of a TFDS table at sorted `indices` (one pass over the split)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    wanted = set(int(i) for i in indices)
    last = max(wanted)
    ds = tfds.load(
      self.tfds_name,
      split=f"{self.tfds_split}[:{last + 1}]",
      data_dir=self.tfds_data_dir,
      shuffle_files=False,
    )
    for i, ex in enumerate(ds.as_numpy_iterator()):
      if i in wanted:
        yield np.asarray(ex[self.image_key])

  def fingerprint(self) -> str:
    """Changes whenever the examples or their order change (cache keys)."""
    h = hashlib.sha1(self.name.encode())
    h.update(self.labels.tobytes())
    h.update(f"degrade={self.degrade}".encode() if self.degrade != 1 else b"")
    h.update(b"" if self.raster.is_default else self.raster.describe().encode())
    for p in self.paths or []:
      h.update(p.encode())
    return h.hexdigest()[:12]


def _resolve_tiles(table: "ImageTable", spec: rasters.RasterSpec) -> rasters.RasterSpec:
  """A scene table under another raster spec: every scene's header checked against it."""
  for path in table.tiles.scenes:
    count, numbers = rasters.check(path, spec)
    if spec.all_bands and not spec.count:
      spec = spec.with_count(count, path)
    if not spec.numbers:
      spec = dataclasses.replace(spec, numbers=numbers)
  return spec


def scene_table(
  data: str,
  grid: scenes.Grid,
  raster: Optional[rasters.RasterSpec] = None,
  labels: str = "",
  label_field: str = "class",
) -> ImageTable:
  """A scene archive (a scene, a folder of scenes or a list file; scenes.scene_paths) cut
  into windows by `grid`: one row per window, tile paths, no labels (-1). With `labels`
  (a point / polygon file, scenes.read_labels), only the windows a label covers, with
  their classes (sorted names; scenes.label_windows)."""
  paths = scenes.scene_paths(data)
  tiles, spec = scenes.scene_tiles(paths, grid, raster)
  if labels:
    geoms, classes = scenes.read_labels(labels, label_field)
    names, conflicts = scenes.label_windows(tiles, geoms, classes, labels)
    keep = np.nonzero(names != "")[0]
    if not len(keep):
      raise errors.InvalidInput(f"data.scene_labels: {labels} labels none of the windows")
    class_names = sorted(set(names[keep]))
    tiles = scenes.take(tiles, keep)
    return ImageTable(
      name=os.path.basename(os.path.abspath(data).rstrip(os.sep)),
      labels=np.asarray([class_names.index(n) for n in names[keep]], np.int32),
      class_names=class_names,
      paths=tiles.paths(),
      description=f"{len(tiles)} labelled windows of {len(paths)} scene(s) under {data} "
      f"({grid.describe()}; labels from {labels}; {len(names) - len(keep)} windows without "
      f"a label or with conflicting labels ({conflicts}) left out)",
      raster=spec,
      tiles=tiles,
    )
  return ImageTable(
    name=os.path.basename(os.path.abspath(data).rstrip(os.sep)),
    labels=np.full(len(tiles), -1, np.int32),
    class_names=[],
    paths=tiles.paths(),
    description=f"{len(tiles)} windows of {len(paths)} scene(s) under {data} ({grid.describe()}"
    + (f"; {tiles.skipped} nodata-only windows left out" if tiles.skipped else "")
    + ")",
    raster=spec,
    tiles=tiles,
  )


def class_folder(root: str, name: Optional[str] = None, check_images: bool = True) -> ImageTable:
  """A tree root/<class>/<image>. Classes and files in sorted order define the ids.

  check_images opens every file's header up front, so a corrupt or non-image file is
  reported by name before any long work starts. Rasters are left to `with_raster`, which
  `from_config` and `commands.image_table` run on every table: it checks their headers
  against data.bands / data.scale and reads their coordinates in the same opening.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise errors.NotFound(f"dataset directory not found: {root}")
  classes = sorted(
    d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
  )
  paths, labels, names = [], [], []
  for c in classes:
    files = sorted(
      f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
      continue
    names.append(c)
    paths += [os.path.join(root, c, f) for f in files]
    labels += [len(names) - 1] * len(files)
  if len(names) < 2:
    raise errors.InvalidInput(
      f"{root}: expected a class-folder tree (root/<class>/<image>) with at least two "
      f"classes of {'/'.join(IMAGE_EXTENSIONS)} images, found {len(names)}"
    )
  if check_images:
    for p in paths:
      if not rasters.is_raster(p):  # rasters: ImageTable.with_raster
        check_image(p)
  return ImageTable(
    name=name or os.path.basename(root),
    labels=np.asarray(labels, np.int32),
    class_names=names,
    paths=paths,
    description=f"class folders under {root}",
  )


def check_image(path: str):
  """Raises InvalidInput naming `path` if it is not a readable image, TooLarge if its header
  declares more pixels than image_limits allows (nothing is decoded)."""
  if scenes.is_tile(path):
    scene, _, _ = scenes.parse_tile(path)
    rasters.open_raster(scene).close()
    return
  if rasters.is_raster(path):  # rasterio reads what PIL cannot (many bands, 16-bit, float)
    rasters.open_raster(path).close()
    return
  try:
    with Image.open(path) as im:
      image_limits.check_pil(im, path)
  except errors.UserError:
    raise
  except Image.DecompressionBombError as e:
    raise errors.TooLarge(f"{path}: {e}") from None
  except Exception as e:
    raise errors.NotAnImage(f"corrupt or unreadable image: {path} ({e})") from e


def decode_pil(path: str) -> np.ndarray:
  """PIL decode of `path` to RGB uint8 [H, W, 3] (formats TF cannot read: WebP, TIFF, ...),
  after the header's size check. Errors name the file."""
  try:
    with Image.open(path) as im:
      image_limits.check_pil(im, path)
      return np.asarray(im.convert("RGB"), np.uint8)
  except errors.UserError:
    raise
  except Image.DecompressionBombError as e:
    raise errors.TooLarge(f"{path}: {e}") from None
  except Exception as e:
    raise errors.NotAnImage(f"corrupt or unreadable image: {path} ({e})") from e


def decode_other(path: str, raster: Optional[rasters.RasterSpec] = None) -> np.ndarray:
  """Files TensorFlow does not decode: rasters (and scene windows) through rasterio, the
  rest through PIL."""
  if scenes.is_tile(path):
    return scenes.read_tile(path, raster or rasters.RasterSpec())
  if rasters.is_raster(path):
    return rasters.read(path, raster or rasters.RasterSpec())
  return decode_pil(path)


def split_per_class(labels: np.ndarray, train_ratio: float, seed: int):
  """Seeded per-class split: (train indices, test indices), each sorted.

  In every class, round(train_ratio * n) random examples go to train (at least one to
  each side when the class has two or more). Multi-hot labels [N, C] have no single class:
  a seeded random split of all examples, round(train_ratio * N) to train.
  """
  if not 0.0 < train_ratio < 1.0:
    raise errors.InvalidInput(f"data.train_ratio must be in (0, 1), got {train_ratio}")
  rng = np.random.default_rng(seed)
  if labels.ndim == 2:
    perm = rng.permutation(len(labels))
    n = min(max(int(round(train_ratio * len(labels))), 1), len(labels) - 1)
    return np.sort(perm[:n]), np.sort(perm[n:])
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    n = int(round(train_ratio * len(idx)))
    if len(idx) >= 2:
      n = min(max(n, 1), len(idx) - 1)
    train.append(idx[:n])
    test.append(idx[n:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def hold_out_classes(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """The classes (sorted ids) held out of training by data.unseen_classes = `fraction`:
  round(fraction x classes), at least one and at most all but one, drawn by `seed`."""
  if labels.ndim != 1:
    raise errors.InvalidInput(
      "data.unseen_classes needs one class per image; a multi-label archive has none to hold out"
    )
  classes = np.unique(labels[labels >= 0])
  if len(classes) < 2:
    raise errors.InvalidInput(
      f"data.unseen_classes needs two classes or more, the data has {len(classes)}"
    )
  n = min(max(int(round(fraction * len(classes))), 1), len(classes) - 1)
  return np.sort(np.random.default_rng([seed, 29]).choice(classes, n, replace=False))


def validation_split(labels: np.ndarray, train_idx: np.ndarray, validation: float, seed: int):
  """For choosing settings without the test part: the training part split again per class,
  (database, validation queries) = (1 - validation, validation) of it, seeded by seed + 1."""
  db, val = split_per_class(labels[train_idx], 1.0 - validation, seed + 1)
  return train_idx[db], train_idx[val]


def _draw_scene(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
  """A synthetic 'scene': class-specific stripe orientation/frequency and colour, plus noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  angle = np.pi * cls / 7.0
  freq = 3 + 2 * (cls % 4)
  phase = rng.uniform(0, 2 * np.pi)
  wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
  base = np.array([(37 * cls) % 200 + 30, (91 * cls) % 200 + 30, (53 * cls) % 200 + 30], np.float64)
  img = base + 50 * wave[..., None] + rng.normal(0, 20, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def generate(
  directory: str, num_classes: int = 6, per_class: int = 20, size: int = 64, seed: int = 0
) -> ImageTable:
  """Writes (once, by the primary process, atomically) a class-folder tree of synthetic PNG
  scenes and returns its table."""
  root = os.path.join(directory, f"generated_c{num_classes}_n{per_class}_s{size}_seed{seed}")
  done = os.path.join(root, ".complete")

  def write(tmp):
    if os.path.isdir(root):  # left by an interrupted run of an older version: redo it
      shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
      os.makedirs(os.path.join(tmp, f"class{c:02d}"), exist_ok=True)
      for i in range(per_class):
        Image.fromarray(_draw_scene(rng, c, size)).save(
          os.path.join(tmp, f"class{c:02d}", f"img{i:04d}.png")
        )
    open(os.path.join(tmp, ".complete"), "w").close()

  if not distributed.agree(f"generated {root}", os.path.exists(done)):
    os.makedirs(directory, exist_ok=True)
    distributed.write_once(root, write, name="generated data")
  table = class_folder(root, name="generated")
  table.description = (
    f"{num_classes} classes x {per_class} generated {size}x{size} scenes in {root}"
  )
  return table


def tfds_table(
  name: str,
  split: str = "train",
  data_dir: Optional[str] = None,
  manual_dir: Optional[str] = None,
  download: bool = True,
) -> ImageTable:
  """Any TFDS image-classification builder; ids follow the unshuffled split order.

  Prepares the dataset if needed: from `manual_dir` (e.g. UCMerced_LandUse.zip for
  uc_merced, resisc45's rar contents) or by download when `download` is true.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise errors.InvalidInput(f"unknown TFDS dataset {name!r}: {e}") from e
  if not builder.is_prepared():
    if not download and not manual_dir:
      raise errors.NotFound(
        f"TFDS dataset {name} is not prepared in {builder.data_dir} and downloads are off; "
        "set data.manual_dir to the directory holding its archive, or data.download=True"
      )
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )
    except Exception as e:
      raise errors.NotFound(
        f"could not prepare TFDS dataset {name} (manual_dir={manual_dir}): {e}. For uc_merced put "
        "UCMerced_LandUse.zip in data.manual_dir, or use "
        "data.source=folder:/path/to/UCMerced_LandUse/Images"
      ) from e
  info = builder.info
  # One ClassLabel (single-label), or a Sequence of ClassLabel (multi-label: bigearthnet).
  label_key = (
    "label"
    if "label" in info.features
    else next(
      (k for k, f in info.features.items() if isinstance(f, tfds.features.ClassLabel)), None
    )
  )
  multi = None
  if label_key is None:
    multi = next(
      (
        k
        for k, f in info.features.items()
        if isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.ClassLabel)
      ),
      None,
    )
    if multi is None:
      raise errors.InvalidInput(
        f"TFDS dataset {name}: no ClassLabel or Sequence(ClassLabel) feature among "
        f"{list(info.features)}"
      )
    label_key = multi
  # An Image feature, or a multispectral Tensor [H, W, C] (eurosat/all's `sentinel2`).
  image_key = (
    "image"
    if "image" in info.features
    else next((k for k, f in info.features.items() if isinstance(f, tfds.features.Image)), None)
    or next(
      (
        k
        for k, f in info.features.items()
        if isinstance(f, tfds.features.Tensor) and len(f.shape) == 3
      ),
      None,
    )
  )
  if image_key is None:
    raise errors.InvalidInput(
      f"TFDS dataset {name}: no image feature (an Image, or a Tensor [H, W, C]) among "
      f"{list(info.features)}"
    )
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders={
      k: tfds.decode.SkipDecoding()
      for k, f in info.features.items()
      if k != label_key and isinstance(f, tfds.features.Image)
    },
  )
  if multi:
    names = info.features[label_key].feature.names
    rows = [np.asarray(ex[label_key], np.int64) for ex in ds.as_numpy_iterator()]
    labels = np.zeros((len(rows), len(names)), np.int32)
    for i, r in enumerate(rows):
      labels[i, r] = 1
  else:
    names = info.features[label_key].names
    labels = np.fromiter((int(ex[label_key]) for ex in ds.as_numpy_iterator()), np.int32)
  return ImageTable(
    name=name.replace("/", "_"),
    labels=labels,
    class_names=names,
    tfds_name=name,
    tfds_split=split,
    tfds_data_dir=data_dir,
    image_key=image_key,
    description=f"TFDS {name} split {split} in {builder.data_dir}",
  )


def label_file(
  csv_path: str, image_root: Optional[str] = None, check_images: bool = True
) -> ImageTable:
  """A multi-label table from a CSV of `path,label1;label2;...` lines (an optional header
  `path,labels`; paths relative to `image_root`, default the CSV's directory). Labels are
  the sorted union of the names; the rows keep the file's order."""
  import csv  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(csv_path):
    raise errors.NotFound(f"label file not found: {csv_path}")
  root = image_root or os.path.dirname(os.path.abspath(csv_path))
  rows = []
  with open(csv_path, newline="") as f:
    for n, row in enumerate(csv.reader(f), 1):
      if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "labels"]):
        continue
      if len(row) != 2:
        raise errors.InvalidInput(
          f"{csv_path}:{n}: expected 'path,label1;label2', got {','.join(row)!r}"
        )
      path, labels = row[0].strip(), [x.strip() for x in row[1].split(";") if x.strip()]
      full = path if os.path.isabs(path) else os.path.join(root, path)
      if not os.path.isfile(full):
        raise errors.NotFound(f"{csv_path}:{n}: image not found: {full}")
      if not labels:
        raise errors.InvalidInput(f"{csv_path}:{n}: {path} has no label")
      rows.append((full, labels))
  if not rows:
    raise errors.InvalidInput(f"{csv_path}: no labelled images")
  names = sorted({x for _, labs in rows for x in labs})
  col = {x: i for i, x in enumerate(names)}
  labels = np.zeros((len(rows), len(names)), np.int32)
  for i, (_, labs) in enumerate(rows):
    labels[i, [col[x] for x in labs]] = 1
  paths = [p for p, _ in rows]
  if check_images:
    for p in paths:
      if not rasters.is_raster(p):  # rasters: ImageTable.with_raster (see class_folder)
        check_image(p)
  return ImageTable(
    name=os.path.splitext(os.path.basename(csv_path))[0],
    labels=labels,
    class_names=names,
    paths=paths,
    description=f"{len(paths)} images with {len(names)} labels from {csv_path}",
  )


def from_config(data_cfg, workdir: str) -> ImageTable:
  """Resolves `data.source` (see the module docstring) into a table, and logs which."""
  source = data_cfg.source
  if source == "auto":
    for cand in LOCAL_UCMERCED:
      if os.path.isdir(cand):
        source = f"folder:{cand}"
        break
    else:
      source = "generated"
  if data_cfg.get("labels_file"):
    if not source.startswith("folder:"):
      raise errors.InvalidInput(
        f"config.data.labels_file needs data.source=folder:DIR (the image tree its paths "
        f"are relative to), got {source!r}"
      )
    table = label_file(data_cfg.labels_file, source[len("folder:") :])
  elif source.startswith("scenes:"):
    if not data_cfg.get("scene_labels") or not data_cfg.get("tile"):
      raise errors.InvalidInput(
        f"data.source={source!r} needs data.tile (window size: 256 or 2560m) and "
        "data.scene_labels (a GeoJSON / GeoPackage of labelled points or polygons)"
      )
    table = scene_table(
      source[len("scenes:") :],
      scenes.Grid.parse(data_cfg.tile, data_cfg.get("stride", ""), data_cfg.get("gsd", "")),
      rasters.RasterSpec.parse(data_cfg.get("bands", ""), data_cfg.get("scale", "")),
      labels=data_cfg.scene_labels,
      label_field=data_cfg.get("scene_label_field", "class"),
    )
  elif source.startswith("folder:"):
    table = class_folder(source[len("folder:") :], name=data_cfg.get("name") or None)
  elif source.startswith("tfds:"):
    table = tfds_table(
      source[len("tfds:") :],
      split=data_cfg.get("tfds_split", "train"),
      data_dir=data_cfg.get("tfds_data_dir") or None,
      manual_dir=data_cfg.get("manual_dir") or None,
      download=data_cfg.get("download", True),
    )
  elif source == "generated":
    table = generate(
      os.path.join(workdir, "generated_data"),
      num_classes=data_cfg.get("generated_classes", 6),
      per_class=data_cfg.get("generated_per_class", 20),
      size=data_cfg.get("generated_size", 64),
      seed=data_cfg.get("seed", 0),
    )
  else:
    raise errors.InvalidInput(
      "data.source must be 'auto', 'generated', 'folder:DIR', 'scenes:DIR' or 'tfds:NAME', "
      f"got {source!r}"
    )
  spec = rasters.RasterSpec.parse(data_cfg.get("bands", ""), data_cfg.get("scale", ""))
  if (
    table.paths is not None or not spec.is_default
  ):  # rasters' headers checked before any long work
    table = table.with_raster(spec)
  logging.info(
    "Dataset %s: %d images, %d classes (%s)",
    table.name,
    len(table),
    table.num_classes,
    table.description,
  )
  return table


def fit_raster(table: ImageTable, train_idx: np.ndarray, seed: int = 0) -> ImageTable:
  """data.scale=stretch: the per-band percentiles fitted on the training split's rasters."""
  if not table.raster.needs_fit:
    return table
  if table.paths is None:  # TFDS: a seeded sample of up to 256 training examples
    sample = np.sort(
      np.random.default_rng(seed).choice(train_idx, min(256, len(train_idx)), replace=False)
    )
    arrays = (
      (f"TFDS {table.tfds_name}[{i}]", rasters.select_array_bands(a, table.raster, table.tfds_name))
      for i, a in zip(sample, table.tfds_arrays(sample))
    )
    spec = rasters.fit_stretch_arrays(arrays, table.raster, seed=seed)
  else:
    spec = rasters.fit_stretch([table.paths[i] for i in train_idx], table.raster, seed=seed)
  logging.info("Raster scaling fitted on %d training images: %s", len(train_idx), spec.describe())
  return dataclasses.replace(table, raster=spec)
