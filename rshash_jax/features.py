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
from jax.sharding import NamedSharding, PartitionSpec as P

from rshash_jax import backbones, chunk_store, datasets, distributed, input_pipeline, sharding


def make_encoder(bb: backbones.Backbone, mesh, output: str = "features"):
  """jit(images uint8 [B, S, S, 3] sharded over 'data') -> bb output [B, ...]."""
  def fn(variables, images):
    return bb.module.apply(variables, bb.preprocessing(images, bb.module.dtype))[output].astype(jnp.float32)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.sharded_rows(mesh)),
                 out_shardings=sharding.sharded_rows(mesh))


def to_global(mesh, local: np.ndarray):
  """This process's rows -> one global array sharded over the mesh's 'data' axis (for a
  mesh of this process's devices alone, `local` is the whole array)."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(sharding.DATA_AXIS)), local)


def gather_rows(x) -> np.ndarray:
  """A data-sharded array -> the full numpy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def apply_to_images(fn, variables, table: datasets.ImageTable, size: int, out_dim: int, mesh, *,
                    indices: Optional[np.ndarray] = None, batch_size: int = 64,
                    resize_size: Optional[int] = None, threads: int = 0, log_every: int = 10,
                    name: str = "features", cache_dir: Optional[str] = None,
                    source: Optional[input_pipeline.ImageSource] = None) -> np.ndarray:
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
  for step, batch in enumerate(input_pipeline.eval_batches(source, indices, global_batch=global_batch,
                                                            threads=threads, local=local)):
    values = gather_rows(fn(variables, to_global(mesh, batch["image"])))
    pos = gather_rows(to_global(mesh, batch["pos"]))
    mask = gather_rows(to_global(mesh, batch["mask"]))
    out[pos[mask]] = values[mask]
    done += int(mask.sum())
    if log_every and (step + 1) % log_every == 0 or step + 1 == steps:
      rate = done / (time.perf_counter() - t0)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %.0fs", name, done, len(indices),
                   rate, (len(indices) - done) / max(rate, 1e-9))
  return out


def extract(bb: backbones.Backbone, table: datasets.ImageTable, mesh, *, batch_size: int = 64,
            resize_size: Optional[int] = None, threads: int = 0, log_every: int = 10,
            encoder=None, indices: Optional[np.ndarray] = None, cache_dir: Optional[str] = None,
            source: Optional[input_pipeline.ImageSource] = None) -> np.ndarray:
  """Features [len(indices), D] float32 of the examples `indices` (default: all) of `table`.

  encoder: a `make_encoder(bb, mesh)` result to reuse (already compiled)."""
  return apply_to_images(encoder or make_encoder(bb, mesh), bb.variables, table, bb.image_size, bb.feature_dim,
                         mesh, indices=indices, batch_size=batch_size, resize_size=resize_size, threads=threads,
                         log_every=log_every, name=f"features {bb.name}", cache_dir=cache_dir, source=source)


def cache_key(bb: backbones.Backbone, table: datasets.ImageTable, weights_path: Optional[str],
              resize_size: Optional[int]) -> str:
  desc = dict(backbone=bb.name, pretrained=bb.pretrained, weights=weights_path, size=bb.image_size,
              resize=resize_size, dtype=str(jnp.dtype(bb.module.dtype)), table=table.fingerprint())
  if bb.preprocessing.channels != 3:  # data.bands=all: an adapted stem
    desc["channels"] = bb.preprocessing.channels
  return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(bb: backbones.Backbone, table: datasets.ImageTable, cache_dir: str, *,
                    weights_path: Optional[str] = None, batch_size: int = 64,
                    resize_size: Optional[int] = None, threads: int = 0,
                    chunk: int = 4096) -> np.ndarray:
  """`extract`, memoised in the chunk store cache_dir/features_<backbone>_<key>/ and
  returned memory-mapped (float32 [N, D], read-only).

  Chunks of `chunk` images are shared out over the processes; each process encodes its
  chunks on its own devices, so no collective runs during extraction and an interrupted
  extraction (with any process count) continues at the first missing chunk."""
  key = cache_key(bb, table, weights_path, resize_size)
  store = chunk_store.ChunkStore(os.path.join(cache_dir, f"features_{bb.name}_{key}"), len(table),
                                 {"features": ((bb.feature_dim,), "float32")}, chunk=chunk, key=key)
  state = {}

  def compute(start, stop):
    if not state:  # built and compiled once, on the first missing chunk
      state["mesh"] = sharding.data_mesh(jax.local_devices())
      state["fn"] = make_encoder(bb, state["mesh"])
      state["source"] = input_pipeline.ImageSource(table, bb.image_size, resize_size, cache_dir=cache_dir)
    feats = extract(bb, table, state["mesh"], batch_size=batch_size, resize_size=resize_size, threads=threads,
                    encoder=state["fn"], indices=np.arange(start, stop), source=state["source"])
    return {"features": feats}
  return store.build(compute, name=f"features {bb.name}")["features"]
