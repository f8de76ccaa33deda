"""tf.data pipelines over an ImageTable: per-process sharding, global batches, eval padding.

Each step's global batch is the same whichever number of processes/devices runs it: the
epoch order is drawn in numpy from (seed, epoch) and process p takes rows
[p * B, (p + 1) * B) of every global batch (B = per-process batch). Evaluation pads the
example list to a multiple of the global batch and marks padding with mask=False, so every
image is encoded exactly once on any device count.
"""

import os
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from rshash_jax import datasets


def _options(threads: int) -> tf.data.Options:
  opts = tf.data.Options()
  # tf.data threads compete with XLA for the same cores on CPU hosts: bound them.
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


def _decoder(table: datasets.ImageTable, size: int, resize_size: Optional[int]):
  """index -> uint8 [size, size, 3] for folder tables (PIL: reads WebP/TIFF that TF cannot)."""
  paths = np.asarray(table.paths)

  def load(i):
    return datasets.load_image(paths[int(i)], size, resize_size, table.degrade)

  def fn(i):
    img = tf.numpy_function(load, [i], tf.uint8, stateful=False)
    img.set_shape([size, size, 3])
    return img
  return fn


def _tfds_images(table: datasets.ImageTable, size: int, resize_size: Optional[int]) -> np.ndarray:
  """Decodes a TFDS split into memory once (TFDS splits here are small image sets)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load(table.tfds_name, split=table.tfds_split, data_dir=table.tfds_data_dir, shuffle_files=False)
  target = resize_size or size

  def prep(ex):
    img = tf.image.convert_image_dtype(ex[table.image_key][..., :3], tf.float32) * 255.0
    if table.degrade > 1:
      hw = tf.shape(img)[:2] // table.degrade
      img = tf.image.resize(img, hw, method="area")
    img = tf.image.resize(img, (target, target), method="bicubic", antialias=True)
    img = tf.image.resize_with_crop_or_pad(img, size, size)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
  return np.stack(list(ds.map(prep).as_numpy_iterator()))


class ImageSource:
  """Decodes examples of a table by index, for tf.data."""

  def __init__(self, table: datasets.ImageTable, size: int, resize_size: Optional[int] = None):
    self.table, self.size = table, size
    if table.paths is not None:
      self._fn = _decoder(table, size, resize_size)
    else:
      images = tf.constant(_tfds_images(table, size, resize_size))
      self._fn = lambda i: tf.gather(images, i)

  def __call__(self, i):
    return self._fn(i)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder of an epoch is dropped)."""
  if global_batch % jax.process_count():
    raise ValueError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
  if num_examples < global_batch:
    raise ValueError(f"global batch {global_batch} exceeds the {num_examples} training examples")
  return num_examples // global_batch


def global_steps(indices: np.ndarray, global_batch: int, seed: int, start_step: int = 0,
                 num_steps: Optional[int] = None) -> Iterator:
  """Yields (global batch of example indices, step) from start_step to num_steps.

  Epoch e's order is permutation(seed, e): any step can be regenerated, so a resumed run
  continues exactly where the interrupted one stopped."""
  spe = steps_per_epoch(len(indices), global_batch)
  s = start_step
  while num_steps is None or s < num_steps:
    epoch, r = divmod(s, spe)
    order = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    rows = order[:spe * global_batch].reshape(spe, global_batch)
    for row in rows[r:]:
      if num_steps is not None and s >= num_steps:
        return
      yield row, s
      s += 1


def process_rows(global_row: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch."""
  per = len(global_row) // jax.process_count()
  return global_row[jax.process_index() * per:(jax.process_index() + 1) * per]


def train_batches(source: ImageSource, indices: np.ndarray, *, global_batch: int, seed: int,
                  start_step: int = 0, num_steps: Optional[int] = None, augment: bool = False,
                  threads: int = 2) -> Iterator[dict]:
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
      examples, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)))

  def load(i, step):
    img = source(i)
    if augment:
      img = _augment(img, tf.stack([step, i]))
    return {"image": img, "label": tf.gather(labels, i), "id": tf.gather(ids, i)}

  ds = ds.map(load, num_parallel_calls=threads).batch(per_proc).prefetch(2)
  yield from ds.with_options(_options(threads)).as_numpy_iterator()


def eval_batches(source: ImageSource, indices: np.ndarray, *, global_batch: int,
                 threads: int = 2, local: bool = False) -> Iterator[dict]:
  """Per-process batches {'image', 'label', 'id', 'pos', 'mask'} covering `indices` exactly
  once (pos: the example's position in `indices`; mask False on padding). local=True: this
  process takes every row (for a mesh of its own devices)."""
  pc, pi = (1, 0) if local else (jax.process_count(), jax.process_index())
  per_proc = global_batch // pc
  n = len(indices)
  padded = -(-n // global_batch) * global_batch
  idx = np.concatenate([indices, np.full(padded - n, indices[0] if n else 0, indices.dtype)])
  pos = np.arange(padded, dtype=np.int64)
  mine = lambda a: a.reshape(-1, global_batch)[:, pi * per_proc:(pi + 1) * per_proc].reshape(-1)
  labels, ids = source.table.labels, source.table.ids
  ds = tf.data.Dataset.from_tensor_slices((mine(idx).astype(np.int64), mine(pos), mine(pos < n)))

  def load(i, p, m):
    return {"image": source(i), "label": tf.gather(labels, i), "id": tf.gather(ids, i), "pos": p, "mask": m}

  ds = ds.map(load, num_parallel_calls=threads).batch(per_proc).prefetch(2)
  yield from ds.with_options(_options(threads)).as_numpy_iterator()


def configure_tf():
  """Keeps TensorFlow off accelerators (JAX owns them) and quiet."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  tf.config.set_visible_devices([], "GPU")
