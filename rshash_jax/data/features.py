"""Backbone features of a whole dataset: jitted, data-parallel, cached on disk by id.

The frozen-backbone training modes (DHCNN frozen, MrHash, the LSH/ITQ baselines) encode
every image once and train on these features; the cache (a `chunk_store`: resumable,
shared out over processes, memory-mapped) makes re-runs and resumed runs skip the CNN.
"""

import hashlib
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rshash_jax.data import chunk_store, datasets, input_pipeline
from rshash_jax.models import backbones
from rshash_jax.parallel import distributed, sharding


def make_encoder(bb: backbones.Backbone, mesh, output: str = "features"):
  """jit(images uint8 [B, S, S, 3] sharded over 'data') -> bb output [B, ...]."""

  def fn(variables, images):
    return bb.module.apply(variables, bb.preprocessing(images, bb.module.dtype))[output].astype(
      jnp.float32
    )

  return jax.jit(
    fn,
    in_shardings=(sharding.replicated(mesh), sharding.sharded_rows(mesh)),
    out_shardings=sharding.sharded_rows(mesh),
  )


def apply_to_images(
  fn,
  variables,
  table: datasets.ImageTable,
  size: int,
  out_dim: int,
  mesh,
  *,
  indices: Optional[np.ndarray] = None,
  batch_size: int = 64,
  resize_size: Optional[int] = None,
  threads: int = 0,
  log_every: int = 10,
  name: str = "features",
  cache_dir: Optional[str] = None,
  source: Optional[input_pipeline.ImageSource] = None,
) -> np.ndarray:
  """fn(variables, uint8 images sharded over 'data') [B, out_dim] of the examples `indices`
  (default: all) of `table`, as float32 [len(indices), out_dim] in that order.

  With a mesh over all processes' devices every process decodes its share of each batch
  and all get the result; with a mesh of this process's devices (`sharding.is_local`) this
  process decodes and encodes every example alone. cache_dir: where a TFDS table's image
  store lives (input_pipeline.ImageSource); source: an ImageSource of `table` to reuse
  across calls (it holds the table's paths in the graph)."""
  indices = table.ids if indices is None else np.asarray(indices)
  n_dev = mesh.devices.size
  global_batch = -(-batch_size // n_dev) * n_dev
  local = sharding.is_local(mesh)
  source = source or input_pipeline.ImageSource(table, size, resize_size, cache_dir=cache_dir)
  variables = distributed.replicate(variables, mesh)
  out = np.zeros((len(indices), out_dim), np.float32)
  t0, done = time.perf_counter(), 0
  steps = -(-len(indices) // global_batch)
  for step, batch in enumerate(
    input_pipeline.eval_batches(
      source, indices, global_batch=global_batch, threads=threads, local=local
    )
  ):
    values = sharding.gather_rows(fn(variables, sharding.to_global(mesh, batch["image"])))
    pos = sharding.gather_rows(sharding.to_global(mesh, batch["pos"]))
    mask = sharding.gather_rows(sharding.to_global(mesh, batch["mask"]))
    out[pos[mask]] = values[mask]
    done += int(mask.sum())
    if log_every and (step + 1) % log_every == 0 or step + 1 == steps:
      rate = done / (time.perf_counter() - t0)
      logging.info(
        "%s: %d/%d images, %.1f images/s, ETA %.0fs",
        name,
        done,
        len(indices),
        rate,
        (len(indices) - done) / max(rate, 1e-9),
      )
  return out


def extract(
  bb: backbones.Backbone,
  table: datasets.ImageTable,
  mesh,
  *,
  batch_size: int = 64,
  resize_size: Optional[int] = None,
  threads: int = 0,
  log_every: int = 10,
  encoder=None,
  indices: Optional[np.ndarray] = None,
  cache_dir: Optional[str] = None,
  source: Optional[input_pipeline.ImageSource] = None,
) -> np.ndarray:
  """Features [len(indices), D] float32 of the examples `indices` (default: all) of `table`.

  encoder: a `make_encoder(bb, mesh)` result to reuse (already compiled)."""
  return apply_to_images(
    encoder or make_encoder(bb, mesh),
    bb.variables,
    table,
    bb.image_size,
    bb.feature_dim,
    mesh,
    indices=indices,
    batch_size=batch_size,
    resize_size=resize_size,
    threads=threads,
    log_every=log_every,
    name=f"features {bb.name}",
    cache_dir=cache_dir,
    source=source,
  )


def cache_key(
  bb: backbones.Backbone,
  table: datasets.ImageTable,
  weights_path: Optional[str],
  resize_size: Optional[int],
) -> str:
  desc = dict(
    backbone=bb.name,
    pretrained=bb.pretrained,
    weights=weights_path,
    size=bb.image_size,
    resize=resize_size,
    dtype=str(jnp.dtype(bb.module.dtype)),
    table=table.fingerprint(),
  )
  if bb.preprocessing.channels != 3:  # data.bands=all: an adapted stem
    desc["channels"] = bb.preprocessing.channels
  return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(
  bb: backbones.Backbone,
  table: datasets.ImageTable,
  cache_dir: str,
  *,
  weights_path: Optional[str] = None,
  batch_size: int = 64,
  resize_size: Optional[int] = None,
  threads: int = 0,
  chunk: int = 4096,
) -> np.ndarray:
  """`extract`, memoised in the chunk store cache_dir/features_<backbone>_<key>/ and
  returned memory-mapped (float32 [N, D], read-only).

  Chunks of `chunk` images are shared out over the processes; each process encodes its
  chunks on its own devices, so no collective runs during extraction and an interrupted
  extraction (with any process count) continues at the first missing chunk."""
  key = cache_key(bb, table, weights_path, resize_size)
  return _cached(
    lambda mesh: make_encoder(bb, mesh),
    bb,
    table,
    cache_dir,
    f"features_{bb.name}_{key}",
    key,
    "features",
    (bb.feature_dim,),
    batch_size=batch_size,
    resize_size=resize_size,
    threads=threads,
    chunk=chunk,
    name=f"features {bb.name}",
  )


# Views of an image for cached augmentation (train.cached_views): the dihedral group's 8
# elements in this order, as (transpose, flip rows, flip columns) of an [H, W] image.
DIHEDRAL = (
  (False, False, False),
  (False, False, True),
  (False, True, False),
  (False, True, True),
  (True, False, True),
  (True, True, False),
  (True, False, False),
  (True, True, True),
)


def dihedral(x, v: int):
  """View v of images x [B, H, W, C] (v = 0: unchanged; 1: left-right flip; 2: up-down
  flip; 3: rotation by 180; 4, 5: rotations by 90; 6, 7: the transposes)."""
  transpose, flip_rows, flip_cols = DIHEDRAL[v]
  if transpose:
    x = jnp.swapaxes(x, 1, 2)
  if flip_rows:
    x = x[:, ::-1]
  if flip_cols:
    x = x[:, :, ::-1]
  return x


def activation_shape(bb: backbones.Backbone, point: str):
  """[h, w, c] of the activation at split point `point` of an image of bb's size."""
  x = jax.ShapeDtypeStruct(
    (1, bb.image_size, bb.image_size, bb.preprocessing.channels), jnp.float32
  )
  out = jax.eval_shape(lambda v, x: bb.module.apply(v, x, stop=point), bb.variables, x)
  return tuple(out["activation"].shape[1:])


def cached_activations(
  bb: backbones.Backbone,
  table: datasets.ImageTable,
  cache_dir: str,
  point: str,
  *,
  views: int = 1,
  weights_path: Optional[str] = None,
  batch_size: int = 32,
  resize_size: Optional[int] = None,
  threads: int = 0,
  chunk: int = 256,
) -> np.ndarray:
  """The backbone's activations at split point `point` (the input of the first trained
  layer in train.finetune_from) of `views` dihedral views of every image, memoised like
  cached_features: memory-mapped float32 [N, views, h, w, c]."""
  if not 1 <= views <= len(DIHEDRAL):
    raise ValueError(f"views must be 1..{len(DIHEDRAL)}, got {views}")
  shape = activation_shape(bb, point)
  key = hashlib.sha1(
    f"{cache_key(bb, table, weights_path, resize_size)}/{point}/{views}".encode()
  ).hexdigest()[:16]

  def make(mesh):
    def fn(variables, images):
      x = bb.preprocessing(images, bb.module.dtype)
      acts = [
        bb.module.apply(variables, dihedral(x, v), stop=point)["activation"] for v in range(views)
      ]
      return jnp.stack(acts, axis=1).reshape(x.shape[0], -1).astype(jnp.float32)

    return jax.jit(
      fn,
      in_shardings=(sharding.replicated(mesh), sharding.sharded_rows(mesh)),
      out_shardings=sharding.sharded_rows(mesh),
    )

  return _cached(
    make,
    bb,
    table,
    cache_dir,
    f"activations_{bb.name}_{point}_{key}",
    key,
    "activations",
    (views, *shape),
    batch_size=batch_size,
    resize_size=resize_size,
    threads=threads,
    chunk=chunk,
    name=f"{bb.name} activations at {point} x{views}",
  )


def split_point_inputs(
  config,
  bb: backbones.Backbone,
  table: datasets.ImageTable,
  cache_dir: str,
  resize_size: Optional[int] = None,
):
  """(activations, [h, w, c]) at train.finetune_from for partial fine-tuning: the cached
  activations of every image and view (cached_activations) when the cache is used
  (use_activation_cache), else None and the shape alone; (None, ()) without a split point."""
  point = config.train.finetune_from
  if not point:
    return None, ()
  if not use_activation_cache(config.train):
    return None, activation_shape(bb, point)
  acts = cached_activations(
    bb,
    table,
    cache_dir,
    point,
    views=views_to_cache(config),
    weights_path=config.model.weights_path or None,
    batch_size=config.features.batch_size,
    resize_size=resize_size,
    threads=config.data.threads,
  )
  return acts, acts.shape[2:]


def use_activation_cache(tc) -> bool:
  """train.finetune_cache: 'auto' caches the frozen layers' activations on CPU, where they
  are most of a step's cost, and runs them in the step on accelerators."""
  if tc.finetune_cache == "auto":
    return jax.default_backend() == "cpu"
  return tc.finetune_cache == "yes"


def views_to_cache(config) -> int:
  """train.cached_views with data.augment, else 1 (the image as it is)."""
  return config.train.cached_views if config.data.augment else 1


def read_views(acts: np.ndarray, global_row: np.ndarray, step: int, seed: int) -> np.ndarray:
  """This process's rows of a global batch from an activation store [N, views, ...], one
  view per row drawn from (seed, step): a resumed run draws the same views."""
  views = np.random.default_rng([seed, step, 1]).integers(0, acts.shape[1], len(global_row))
  mine, my_views = input_pipeline.process_rows(global_row), input_pipeline.process_rows(views)
  order = np.argsort(mine, kind="stable")  # memory-mapped rows read in file order
  x = np.empty((len(mine), *acts.shape[2:]), np.float32)
  x[order] = acts[mine[order], my_views[order]]
  return x


def frozen_input(bb: backbones.Backbone, point: str = ""):
  """uint8 images -> the trained model's input: bb's preprocessing, then with a split point
  the frozen layers below it (no gradient), for fine-tuning without an activation cache."""
  prep = lambda x: bb.preprocessing(x, bb.module.dtype)
  if not point:
    return prep
  return lambda x: jax.lax.stop_gradient(
    bb.module.apply(bb.variables, prep(x), stop=point)["activation"]
  )


def _cached(
  make_fn,
  bb,
  table,
  cache_dir,
  dirname,
  key,
  field,
  row_shape,
  *,
  batch_size,
  resize_size,
  threads,
  chunk,
  name,
) -> np.ndarray:
  """make_fn(mesh)(bb.variables, images) [B, prod(row_shape)] of every image of `table`, in
  the chunk store cache_dir/dirname (one field), memory-mapped [N, *row_shape]."""
  store = chunk_store.ChunkStore(
    os.path.join(cache_dir, dirname),
    len(table),
    {field: (row_shape, "float32")},
    chunk=chunk,
    key=key,
  )
  state = {}
  width = int(np.prod(row_shape))

  def compute(start, stop):
    if not state:  # built and compiled once, on the first missing chunk
      state["mesh"] = sharding.data_mesh(jax.local_devices())
      state["fn"] = make_fn(state["mesh"])
      state["source"] = input_pipeline.ImageSource(
        table, bb.image_size, resize_size, cache_dir=cache_dir
      )
    rows = apply_to_images(
      state["fn"],
      bb.variables,
      table,
      bb.image_size,
      width,
      state["mesh"],
      indices=np.arange(start, stop),
      batch_size=batch_size,
      resize_size=resize_size,
      threads=threads,
      name=name,
      cache_dir=cache_dir,
      source=state["source"],
    )
    return {field: rows.reshape(-1, *row_shape)}

  return store.build(compute, name=name)[field]
