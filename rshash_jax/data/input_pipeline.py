"""tf.data pipelines over an ImageTable: per-process sharding, global batches, eval padding.

Each step's global batch is the same whichever number of processes/devices runs it: the
epoch order is drawn in numpy from (seed, epoch) and process p takes rows
[p * B, (p + 1) * B) of every global batch (B = per-process batch). Evaluation pads the
example list to a multiple of the global batch and marks padding with mask=False, so every
image is encoded exactly once on any device count.

Images: TensorFlow decodes PNG/JPEG/BMP/GIF in the graph, PIL the rest (WebP, TIFF) inside
tf.numpy_function; `resize` is the one resize of every source, and `load_image` applies
the same two eagerly (search queries). A decode error names the file. TFDS splits are
streamed once into a memory-mapped image store. data.threads=0: the host's cores.
"""

import hashlib
import io
import os
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from rshash_jax import errors
from rshash_jax.data import chunk_store, datasets, image_limits, rasters, scenes


def _options(threads: int) -> tf.data.Options:
  opts = tf.data.Options()
  # tf.data threads compete with XLA for the same cores on CPU hosts: bound them
  # (data.threads; 0 = the host's cores).
  opts.threading.private_threadpool_size = max(1, threads)
  opts.deterministic = True
  return opts


def _augment(image, seed):
  """Random horizontal/vertical flips and 90-degree rotations: overhead scenes have no
  canonical orientation. Stateless, so a resumed run draws the same augmentations."""
  image = tf.image.stateless_random_flip_left_right(image, seed)
  image = tf.image.stateless_random_flip_up_down(image, seed + 1)
  k = tf.random.stateless_uniform([], seed + 2, 0, 4, dtype=tf.int32)
  return tf.image.rot90(image, k)


# Formats TensorFlow decodes in the graph (in parallel, without the GIL); the others
# (WebP, TIFF) are decoded by PIL inside tf.numpy_function.
TF_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def default_threads() -> int:
  """The host's cores available to this process (data.threads=0)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def resize(img, size: int, resize_size: Optional[int] = None, degrade: int = 1):
  """uint8 [H, W, C] -> uint8 [size, size, C]: degrade > 1 first area-averages the image down
  by that factor (a coarser sensor); then an antialiased bicubic resize to resize_size (then
  a centre crop of size) or straight to size. One definition for every source."""
  img = tf.cast(img, tf.float32)
  if degrade > 1:
    img = tf.image.resize(img, tf.maximum(tf.shape(img)[:2] // degrade, 1), method="area")
  target = resize_size or size
  img = tf.image.resize(img, (target, target), method="bicubic", antialias=True)
  if target != size:
    img = tf.image.resize_with_crop_or_pad(img, size, size)
  img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
  img.set_shape([size, size, img.shape[-1]])
  return img


def _decode_tf(path):
  img = tf.io.decode_image(
    tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8
  )
  img.set_shape([None, None, 3])
  return img


def channels(raster) -> int:
  """Channels of the images a table or encoder reading rasters by `raster` gets: 3, or
  every band under data.bands=all."""
  return raster.channels if raster is not None else 3


def _decode_other(path, raster):
  img = tf.numpy_function(
    lambda p: datasets.decode_other(p.decode(), raster), [path], tf.uint8, stateful=False
  )
  img.set_shape([None, None, channels(raster)])
  return img


def _refuse_picture(name: str, raster):
  if channels(raster) != 3:
    raise errors.Incompatible(
      f"{name}: not a GeoTIFF/TIFF raster; data.bands=all here takes rasters of "
      f"{raster.count} bands"
    )


def decode_file(path: str, raster=None):
  """One file's pixels, uint8 [H, W, 3] ([H, W, C] under data.bands=all), by the decoder
  its format gets in the pipelines (rasters by `raster`, a rasters.RasterSpec). The header's
  size is checked against image_limits first."""
  if not rasters.is_raster(path) and not scenes.is_tile(path):
    _refuse_picture(path, raster)
  if path.lower().endswith(TF_FORMATS):
    datasets.check_image(path)
    try:
      return _decode_tf(tf.constant(path))
    except tf.errors.OpError as e:
      raise errors.NotAnImage(
        f"corrupt or unreadable image: {path} ({e.message.splitlines()[0]})"
      ) from None
  return tf.constant(datasets.decode_other(path, raster))


# PIL's names of the formats `decode_file` hands to TensorFlow (by extension).
_TF_PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
# PIL modes of 8-bit pictures (grey, palette, RGB, with or without alpha): what an RGB
# encoder takes. Others (16-bit or float rasters, many bands) are refused, not clipped.
PICTURE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def decode_bytes(
  data: bytes, name: str = "upload", raster=None, max_bytes: Optional[int] = None
) -> np.ndarray:
  """An image file's contents (not a path: an upload) as uint8 [H, W, 3], by the decoder
  `decode_file` would use for that format, so a file searched by upload or by path gives
  the same pixels. The header's size is checked against `max_bytes` (default: the file
  limit of image_limits) before decoding. Errors name `name` and say what is wrong, by
  type: TooLarge, NotAnImage, Incompatible."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if data[:4] in (
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
  ):  # TIFF / BigTIFF: as files are read
    return rasters.read_bytes(data, raster or rasters.RasterSpec(), name, max_bytes)
  _refuse_picture(name, raster)
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode, bands = im.format, im.mode, len(im.getbands())
      image_limits.check_pil(im, name, max_bytes)
      if mode not in PICTURE_MODES:
        raise errors.Incompatible(
          f"{name}: a {fmt} image of mode {mode} ({bands} band(s)) is not an 8-bit "
          "RGB or grey picture; this encoder takes 3-band (RGB) images"
        )
      if fmt not in _TF_PIL_FORMATS:
        return np.asarray(im.convert("RGB"), np.uint8)
  except errors.UserError:
    raise
  except Image.DecompressionBombError as e:
    raise errors.TooLarge(f"{name}: {e}") from None
  except Exception:  # PIL cannot read the header or the pixels: not an image
    raise errors.NotAnImage(
      f"{name}: not an image (not PNG, JPEG, BMP, GIF, WebP, TIFF or another format PIL "
      "reads), or a corrupt one"
    ) from None
  try:
    return tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8).numpy()
  except tf.errors.OpError as e:
    raise errors.NotAnImage(f"{name}: corrupt {fmt} image ({e.message.splitlines()[0]})") from None


def load_image(
  path: str, size: int, resize_size: Optional[int] = None, degrade: int = 1, raster=None
) -> np.ndarray:
  """Eager `decode_file` + `resize`: exactly what the pipelines feed a model for this file."""
  return resize(decode_file(path, raster), size, resize_size, degrade).numpy()


class ImageSource:
  """Examples of a table by index, decoded and resized to [size, size, C] uint8 in tf.data
  (C = 3, or every band under data.bands=all).

  Folder tables decode each file (TF_FORMATS in the graph, the rest through PIL). TFDS
  tables are streamed once, split into per-process slices, into a chunk store of resized
  images under `cache_dir` (disk, memory-mapped: no process holds the split in memory),
  and read from it by index."""

  def __init__(
    self,
    table: datasets.ImageTable,
    size: int,
    resize_size: Optional[int] = None,
    *,
    cache_dir: Optional[str] = None,
  ):
    self.table, self.size, self.resize_size = table, size, resize_size
    if table.paths is not None:
      self._paths = tf.constant(np.asarray(table.paths))
      self._use_tf = tf.constant(np.asarray([p.lower().endswith(TF_FORMATS) for p in table.paths]))
      self._images = None
    else:
      if not cache_dir:
        raise errors.InvalidInput(
          f"TFDS source {table.tfds_name}: needs a cache directory for its image store"
        )
      self._images = _tfds_image_store(table, size, resize_size, cache_dir)

  def __call__(self, i):
    if self._images is not None:
      images = self._images
      img = tf.numpy_function(lambda j: np.asarray(images[int(j)]), [i], tf.uint8, stateful=False)
      img.set_shape([self.size, self.size, channels(self.table.raster)])
      return img
    path = tf.gather(self._paths, i)
    raster = self.table.raster
    img = tf.cond(
      tf.gather(self._use_tf, i), lambda: _decode_tf(path), lambda: _decode_other(path, raster)
    )
    return resize(img, self.size, self.resize_size, self.table.degrade)

  def find_bad(self, indices: np.ndarray, error: Exception):
    """Re-raises a decode error of a batch as a ValueError naming the file (TF's own error
    names none): decodes the batch's candidates one by one."""
    if self.table.paths is not None:
      for i in np.unique(indices):
        path = self.table.paths[int(i)]
        decode_file(path, self.table.raster)  # raises ValueError naming `path`
    raise error


def _tfds_image_store(
  table: datasets.ImageTable, size: int, resize_size: Optional[int], cache_dir: str
):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  key = hashlib.sha1(
    f"{table.tfds_name}|{table.tfds_split}|{len(table)}|{size}|{resize_size}|{table.degrade}"
    f"|{table.raster.describe()}".encode()
  ).hexdigest()[:16]
  feature = tfds.builder(table.tfds_name, data_dir=table.tfds_data_dir).info.features[
    table.image_key
  ]
  if table.raster.is_default and np.dtype(feature.np_dtype).kind == "f":
    raise errors.InvalidInput(
      f"TFDS {table.tfds_name}: its {table.image_key} images are {np.dtype(feature.np_dtype)} "
      "(reflectance?): set data.scale (a divisor such as 10000, or stretch) and data.bands "
      "(e.g. 4,3,2)"
    )
  store = chunk_store.ChunkStore(
    os.path.join(cache_dir, f"images_{table.name}_{key}"),
    len(table),
    {"image": ((size, size, channels(table.raster)), "uint8")},
    chunk=1024,
    key=key,
  )

  def compute(start, stop):
    ds = tfds.load(
      table.tfds_name,
      split=f"{table.tfds_split}[{start}:{stop}]",
      data_dir=table.tfds_data_dir,
      shuffle_files=False,
    )

    spec, name = table.raster, f"TFDS {table.tfds_name}"

    def prep(ex):
      img = ex[table.image_key]
      if not spec.is_default:  # data.bands / data.scale (rshash_jax/data/rasters.py)
        img = tf.numpy_function(
          lambda a: rasters.to_uint8(rasters.select_array_bands(a, spec, name), spec, name),
          [img],
          tf.uint8,
          stateful=False,
        )
        img.set_shape([None, None, channels(spec)])
      elif img.dtype != tf.uint8:  # e.g. 16-bit: scaled to 0..255 as convert_image_dtype does
        img = tf.image.convert_image_dtype(tf.image.convert_image_dtype(img, tf.float32), tf.uint8)
      return resize(img if spec.all_bands else img[..., :3], size, resize_size, table.degrade)

    images = np.stack(list(ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator()))
    if len(images) != stop - start:
      raise errors.InvalidInput(
        f"TFDS {table.tfds_name}[{start}:{stop}] gave {len(images)} examples, expected "
        f"{stop - start}"
      )
    return {"image": images}

  return store.build(compute, name=f"images {table.name}")["image"]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder of an epoch is dropped)."""
  if global_batch % jax.process_count():
    raise errors.InvalidInput(
      f"global batch {global_batch} is not divisible by {jax.process_count()} processes"
    )
  if num_examples < global_batch:
    raise errors.InvalidInput(
      f"global batch {global_batch} exceeds the {num_examples} training examples"
    )
  return num_examples // global_batch


def global_steps(
  indices: np.ndarray,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  num_steps: Optional[int] = None,
) -> Iterator:
  """Yields (global batch of example indices, step) from start_step to num_steps.

  Epoch e's order is permutation(seed, e): any step can be regenerated, so a resumed run
  continues exactly where the interrupted one stopped."""
  spe = steps_per_epoch(len(indices), global_batch)
  s = start_step
  while num_steps is None or s < num_steps:
    epoch, r = divmod(s, spe)
    order = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    rows = order[: spe * global_batch].reshape(spe, global_batch)
    for row in rows[r:]:
      if num_steps is not None and s >= num_steps:
        return
      yield row, s
      s += 1


def process_rows(global_row: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch."""
  per = len(global_row) // jax.process_count()
  return global_row[jax.process_index() * per : (jax.process_index() + 1) * per]


def train_batches(
  source: ImageSource,
  indices: np.ndarray,
  *,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  num_steps: Optional[int] = None,
  augment: bool = False,
  threads: int = 0,
) -> Iterator[dict]:
  """Per-process batches {'image', 'label', 'id'} of global training steps from start_step.

  Step s belongs to epoch s // steps_per_epoch, whose order is permutation(seed, epoch); a
  resumed run therefore continues exactly where it stopped.
  """
  per_proc = global_batch // jax.process_count()
  labels, ids = source.table.labels, source.table.ids

  def examples():
    for row, s in global_steps(indices, global_batch, seed, start_step, num_steps):
      for i in process_rows(row):
        yield i, s

  ds = tf.data.Dataset.from_generator(
    examples, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64))
  )

  def load(i, step):
    img = source(i)
    if augment:
      img = _augment(img, tf.stack([step, i]))
    return {"image": img, "label": tf.gather(labels, i), "id": tf.gather(ids, i)}

  threads = threads or default_threads()
  ds = ds.map(load, num_parallel_calls=threads).batch(per_proc).prefetch(2)

  def rows_of(b):
    row, _ = next(global_steps(indices, global_batch, seed, start_step + b, start_step + b + 1))
    return process_rows(row)

  yield from _named_errors(ds.with_options(_options(threads)), source, rows_of)


def _named_errors(ds, source: ImageSource, rows_of) -> Iterator[dict]:
  """Iterates `ds`; a decode error in batch b is re-raised naming the file (rows_of(b): the
  example indices of batch b)."""
  it = ds.as_numpy_iterator()
  b = 0
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      source.find_bad(rows_of(b), e)
    yield batch
    b += 1


def eval_batches(
  source: ImageSource,
  indices: np.ndarray,
  *,
  global_batch: int,
  threads: int = 0,
  local: bool = False,
) -> Iterator[dict]:
  """Per-process batches {'image', 'label', 'id', 'pos', 'mask'} covering `indices` exactly
  once (pos: the example's position in `indices`; mask False on padding). local=True: this
  process takes every row (for a mesh of its own devices)."""
  pc, pi = (1, 0) if local else (jax.process_count(), jax.process_index())
  per_proc = global_batch // pc
  n = len(indices)
  padded = -(-n // global_batch) * global_batch
  idx = np.concatenate([indices, np.full(padded - n, indices[0] if n else 0, indices.dtype)])
  pos = np.arange(padded, dtype=np.int64)
  mine = lambda a: a.reshape(-1, global_batch)[:, pi * per_proc : (pi + 1) * per_proc].reshape(-1)
  labels, ids = source.table.labels, source.table.ids
  ds = tf.data.Dataset.from_tensor_slices((mine(idx).astype(np.int64), mine(pos), mine(pos < n)))

  blank = tf.zeros([source.size, source.size, channels(source.table.raster)], tf.uint8)

  def load(i, p, m):  # padding rows are blank, not decoded again
    image = tf.cond(m, lambda: source(i), lambda: blank)
    return {
      "image": image,
      "label": tf.gather(labels, i),
      "id": tf.gather(ids, i),
      "pos": p,
      "mask": m,
    }

  threads = threads or default_threads()
  ds = ds.map(load, num_parallel_calls=threads).batch(per_proc).prefetch(2)
  mine_idx = mine(idx).reshape(-1, per_proc)
  yield from _named_errors(ds.with_options(_options(threads)), source, lambda b: mine_idx[b])


def configure_tf():
  """Keeps TensorFlow off accelerators (JAX owns them) and quiet."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  tf.config.set_visible_devices([], "GPU")
