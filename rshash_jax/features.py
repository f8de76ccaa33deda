"""Backbone features of a whole dataset: jitted, data-parallel, cached on disk by id.

The frozen-backbone training modes (DHCNN frozen, MrHash, the LSH/ITQ baselines) encode
every image once and train on these features; the cache makes re-runs and resumed runs
skip the CNN entirely.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from rshash_jax import backbones, datasets, input_pipeline, sharding


def make_encoder(bb: backbones.Backbone, mesh, output: str = "features"):
  """jit(images uint8 [B, S, S, 3] sharded over 'data') -> bb output [B, ...]."""
  def fn(variables, images):
    return bb.module.apply(variables, bb.preprocessing(images, bb.module.dtype))[output].astype(jnp.float32)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.sharded_rows(mesh)),
                 out_shardings=sharding.sharded_rows(mesh))


def to_global(mesh, local: np.ndarray):
  """This process's rows -> one global array sharded over the mesh's 'data' axis."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(sharding.DATA_AXIS)), local)


def gather_rows(x) -> np.ndarray:
  """A data-sharded global array -> the full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def apply_to_images(fn, variables, table: datasets.ImageTable, size: int, out_dim: int, mesh, *,
                    batch_size: int = 64, resize_size: Optional[int] = None, threads: int = 2,
                    log_every: int = 10, name: str = "features") -> np.ndarray:
  """fn(variables, uint8 images sharded over 'data') [B, out_dim] of every example of
  `table`, in id order, as float32 [N, out_dim] on every process."""
  n_dev = mesh.devices.size
  global_batch = -(-batch_size // n_dev) * n_dev
  source = input_pipeline.ImageSource(table, size, resize_size)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  out = np.zeros((len(table), out_dim), np.float32)
  t0, done = time.perf_counter(), 0
  steps = -(-len(table) // global_batch)
  for step, batch in enumerate(input_pipeline.eval_batches(source, table.ids, global_batch=global_batch,
                                                            threads=threads)):
    values = gather_rows(fn(variables, to_global(mesh, batch["image"])))
    ids = gather_rows(to_global(mesh, batch["id"]))
    mask = gather_rows(to_global(mesh, batch["mask"]))
    out[ids[mask]] = values[mask]
    done += int(mask.sum())
    if log_every and (step + 1) % log_every == 0 or step + 1 == steps:
      rate = done / (time.perf_counter() - t0)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %.0fs", name, done, len(table),
                   rate, (len(table) - done) / max(rate, 1e-9))
  return out


def extract(bb: backbones.Backbone, table: datasets.ImageTable, mesh, *, batch_size: int = 64,
            resize_size: Optional[int] = None, threads: int = 2, log_every: int = 10,
            encoder=None) -> np.ndarray:
  """Features [N, D] float32 of every example of `table`, in id order.

  encoder: a `make_encoder(bb, mesh)` result to reuse (already compiled)."""
  return apply_to_images(encoder or make_encoder(bb, mesh), bb.variables, table, bb.image_size, bb.feature_dim,
                         mesh, batch_size=batch_size, resize_size=resize_size, threads=threads,
                         log_every=log_every, name=f"features {bb.name}")


def cache_key(bb: backbones.Backbone, table: datasets.ImageTable, weights_path: Optional[str],
              resize_size: Optional[int]) -> str:
  desc = dict(backbone=bb.name, pretrained=bb.pretrained, weights=weights_path, size=bb.image_size,
              resize=resize_size, dtype=str(jnp.dtype(bb.module.dtype)), table=table.fingerprint())
  return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(bb: backbones.Backbone, table: datasets.ImageTable, mesh, cache_dir: str, *,
                    weights_path: Optional[str] = None, batch_size: int = 64,
                    resize_size: Optional[int] = None, threads: int = 2) -> np.ndarray:
  """`extract`, memoised in cache_dir/features_<backbone>_<key>.npy (written atomically)."""
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"features_{bb.name}_{cache_key(bb, table, weights_path, resize_size)}.npy")
  if os.path.exists(path):
    feats = np.load(path)
    if feats.shape == (len(table), bb.feature_dim):
      logging.info("Loaded cached features %s", path)
      return feats
    logging.warning("Ignoring cached features %s of shape %s", path, feats.shape)
  feats = extract(bb, table, mesh, batch_size=batch_size, resize_size=resize_size, threads=threads)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npy"
    np.save(tmp, feats)
    os.replace(tmp, path)
  return feats
