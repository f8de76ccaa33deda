"""What a trained network reads for each example: one object, three modes, both trainers.

  features     backbone features computed once and cached, [N, D] (train.mode=frozen)
  activations  the frozen layers' output at train.finetune_from, cached once per image and
               dihedral view, [N, views, h, w, c] (partial fine-tuning with the cache)
  images       uint8 images through the tf.data pipeline, augmented as data.augment
               (fine-tuning; with finetune_from, the frozen layers run in every step)

Every mode draws the same global batches of example ids for a step (input_pipeline.
global_steps), so a resumed or re-sharded run reads what an uninterrupted one would.
"""

from typing import Callable, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rshash_jax.data import datasets, features, input_pipeline
from rshash_jax.models import backbones
from rshash_jax.parallel import sharding

MODES = ("features", "activations", "images")


class Inputs:
  """One of MODES over `table` (see the module docstring)."""

  def __init__(
    self,
    table: datasets.ImageTable,
    bb: backbones.Backbone,
    *,
    features_: Optional[np.ndarray] = None,
    activations: Optional[np.ndarray] = None,
    point: str = "",
    activation_shape: Tuple[int, ...] = (),
    resize_size: Optional[int] = None,
    cache_dir: str = "",
    augment: bool = False,
    threads: int = 0,
  ):
    self.table, self.bb, self.point = table, bb, point
    self.features, self.activations, self.activation_shape = (
      features_,
      activations,
      tuple(activation_shape),
    )
    self.resize_size, self.cache_dir, self.augment, self.threads = (
      resize_size,
      cache_dir,
      augment,
      threads,
    )
    self.mode = (
      "features"
      if features_ is not None
      else "activations"
      if activations is not None
      else "images"
    )

  @classmethod
  def from_config(
    cls,
    config,
    bb: backbones.Backbone,
    table: datasets.ImageTable,
    cache_dir: str,
    *,
    features_: Optional[np.ndarray] = None,
    resize_size: Optional[int] = None,
  ) -> "Inputs":
    """`features_` (frozen mode) or, in finetune mode, the activation cache at
    train.finetune_from when it is used (features.split_point_inputs), else images."""
    acts, shape = (
      (None, ())
      if features_ is not None
      else features.split_point_inputs(config, bb, table, cache_dir, resize_size)
    )
    return cls(
      table,
      bb,
      features_=features_,
      activations=acts,
      point=config.train.finetune_from,
      activation_shape=shape,
      resize_size=resize_size,
      cache_dir=cache_dir,
      augment=config.data.augment,
      threads=config.data.threads,
    )

  @property
  def cached(self) -> bool:
    return self.mode != "images"

  @property
  def trains_backbone(self) -> bool:
    """Backbone layers are trained (all of them, or those from the split point on)."""
    return self.mode != "features"

  def dummy(self) -> jax.Array:
    """One example of the network's input, for initialisation."""
    if self.mode == "features":
      return jnp.zeros((1, self.features.shape[1]), jnp.float32)
    if self.point:
      return jnp.zeros((1, *self.activation_shape), jnp.float32)
    return jnp.zeros(
      (1, self.bb.image_size, self.bb.image_size, self.bb.preprocessing.channels), jnp.float32
    )

  def preprocess(self) -> Optional[Callable]:
    """uint8 images -> the network's input in the images mode (the backbone's preprocessing,
    and with a split point the frozen layers below it); None for cached inputs."""
    return None if self.cached else features.frozen_input(self.bb, self.point)

  def trained_backbone(self):
    """(params, constants) of the backbone layers that train (backbones.nest)."""
    return backbones.nest(backbones.trained_part(self.bb, self.point, self.activation_shape))

  def _source(self) -> input_pipeline.ImageSource:
    return input_pipeline.ImageSource(
      self.table, self.bb.image_size, self.resize_size, cache_dir=self.cache_dir
    )

  def train_batches(
    self, indices: np.ndarray, global_batch: int, seed: int, start: int, stop: int
  ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(this process's inputs, their example ids) of global steps start -> stop over `indices`.
    The activations mode draws one cached view per example and step; images are augmented."""
    if self.cached:
      for row, step in input_pipeline.global_steps(indices, global_batch, seed, start, stop):
        mine = input_pipeline.process_rows(row)
        if self.mode == "features":
          yield self.features[mine], mine
        else:
          yield features.read_views(self.activations, row, step, seed), mine
      return
    for b in input_pipeline.train_batches(
      self._source(),
      indices,
      global_batch=global_batch,
      seed=seed,
      start_step=start,
      num_steps=stop,
      augment=self.augment,
      threads=self.threads,
    ):
      yield b["image"], b["id"]

  def apply(
    self, fn: Callable, variables, indices: np.ndarray, mesh, global_batch: int
  ) -> List[np.ndarray]:
    """fn(variables, inputs sharded over 'data') -> a tuple of [B, ...] outputs, for every
    example of `indices` once (the image as it is: view 0 of the activations, no
    augmentation), as numpy arrays in the order of `indices` on every process."""
    outs = None
    n = len(indices)
    if self.cached:
      padded = -(-n // global_batch) * global_batch
      idx = np.concatenate([indices, np.full(padded - n, indices[0])])
      for start in range(0, padded, global_batch):
        mine = input_pipeline.process_rows(idx[start : start + global_batch])
        x = self.features[mine] if self.mode == "features" else self.activations[mine, 0]
        got = [sharding.gather_rows(y) for y in fn(variables, sharding.to_global(mesh, x))]
        outs = outs or [np.zeros((n,) + y.shape[1:], np.float32) for y in got]
        keep = max(0, min(global_batch, n - start))
        for o, y in zip(outs, got):
          o[start : start + keep] = y[:keep]
      return outs
    for b in input_pipeline.eval_batches(
      self._source(), indices, global_batch=global_batch, threads=self.threads
    ):
      got = [sharding.gather_rows(y) for y in fn(variables, sharding.to_global(mesh, b["image"]))]
      pos = sharding.gather_rows(sharding.to_global(mesh, b["pos"]))  # positions in `indices`
      mask = sharding.gather_rows(sharding.to_global(mesh, b["mask"]))
      outs = outs or [np.zeros((n,) + y.shape[1:], np.float32) for y in got]
      for o, y in zip(outs, got):
        o[pos[mask]] = y[mask]
    return outs
