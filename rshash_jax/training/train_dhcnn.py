"""DHCNN training and evaluation: `train_and_evaluate(config, workdir)`.

Data-parallel the modern way: one jitted step over a 1-D ('data',) mesh, the global batch
sharded along 'data', the state (params, optimizer, memory bank) replicated and donated.
The same global batches are drawn on any device count, so 1 and 8 devices compute the
same loss and gradients (up to float summation order).

Modes (config.train.mode):
  finetune: backbone + hash head trained end to end on images (the paper).
  frozen:   backbone features of every image computed once (cached in the workdir), the
            hash head trained on them: minutes on a laptop CPU.
  finetune with train.finetune_from=P (a split point: blocks_N or head, EfficientNet-Lite):
            the layers below P frozen, P and above trained with the hash head. With the
            activation cache (train.finetune_cache: auto = on CPU) the frozen layers run
            once per image and view (train.cached_views dihedral views when data.augment;
            each step draws one view per image), stored like the feature cache; without
            it they run in every step on augmented images. Same model and parameters
            either way; only the augmentations drawn differ.
"""

import dataclasses
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from rshash_jax import errors
from rshash_jax.data import datasets, features, input_pipeline
from rshash_jax.models import backbones, dhcnn
from rshash_jax.parallel import distributed, sharding
from rshash_jax.retrieval import encoder
from rshash_jax.training import config_checks, dhcnn_step, evaluation, loop, train_state


@dataclasses.dataclass
class _Setup:
  config: Any
  mesh: Any
  table: datasets.ImageTable
  train_idx: np.ndarray
  test_idx: np.ndarray
  bb: backbones.Backbone
  model: dhcnn.DHCNN
  feats: Any  # [N, D] in frozen mode, else None
  cache_dir: str  # feature caches, TFDS image stores
  acts: Any = None  # [N, views, h, w, c] cached activations at train.finetune_from, else None
  act_shape: Tuple[int, ...] = ()  # [h, w, c] of the activation at train.finetune_from

  @property
  def point(self) -> str:
    """The split point of partial fine-tuning ('' otherwise; config_checks: finetune mode only)."""
    return self.config.train.finetune_from

  @property
  def cached(self):
    """Per-example model inputs read from a cache (features or activations), else None."""
    return self.feats if self.feats is not None else self.acts


def _setup(config, workdir: str) -> _Setup:
  mesh = sharding.data_mesh()
  table = datasets.from_config(config.data, workdir)
  train_idx, test_idx = datasets.split_per_class(table.labels, config.data.train_ratio, config.data.seed)
  if config.data.validation:
    train_idx, test_idx = datasets.validation_split(table.labels, train_idx, config.data.validation,
                                                    config.data.seed)
  table = datasets.fit_raster(table, train_idx, config.data.seed)
  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  bb = backbones.create(mc.backbone, pretrained=mc.pretrained, weights_path=mc.weights_path or None,
                        image_size=mc.image_size or None, dtype=dtype, seed=config.seed,
                        channels=table.raster.channels)
  feats = None
  cache = config.features.cache_dir or os.path.join(workdir, "cache")
  if config.train.mode == "frozen":
    feats = features.cached_features(bb, table, cache, weights_path=mc.weights_path or None,
                                     batch_size=config.features.batch_size,
                                     resize_size=config.data.resize_size or None, threads=config.data.threads)
  acts, act_shape = None, ()
  point = config.train.finetune_from  # config_checks: finetune mode only
  if point and features.use_activation_cache(config.train):
    acts = features.cached_activations(bb, table, cache, point, views=features.views_to_cache(config),
                                       weights_path=mc.weights_path or None, batch_size=config.features.batch_size,
                                       resize_size=config.data.resize_size or None, threads=config.data.threads)
    act_shape = acts.shape[2:]
  elif point:
    act_shape = features.activation_shape(bb, point)
  model = dhcnn.DHCNN(backbone=None if feats is not None else bb.module, bits=mc.bits,
                      num_classes=table.num_classes, hidden=mc.head_hidden, dropout=mc.dropout, dtype=dtype,
                      backbone_start=point)
  return _Setup(config, mesh, table, train_idx, test_idx, bb, model, feats, cache, acts, act_shape)


def _init_state(s: _Setup, tx) -> train_state.TrainState:
  """Head initialised N(0, 0.01^2); backbone variables from the (pretrained) backbone."""
  config = s.config
  if s.feats is not None:
    dummy = jnp.zeros((1, s.feats.shape[1]), jnp.float32)
  elif s.point:
    dummy = jnp.zeros((1, *s.act_shape), jnp.float32)
  else:
    dummy = jnp.zeros((1, s.bb.image_size, s.bb.image_size, s.bb.preprocessing.channels), jnp.float32)
  head = jax.jit(lambda k: s.model.init(k, dummy)["params"]["head"])(jax.random.key(config.seed))
  if config.train.init_head_from:
    # Linear probe, then fine-tune: start from the head of a finished (e.g. frozen) run.
    enc = encoder.load_encoder(config.train.init_head_from, devices=jax.local_devices()[:1])
    got = jax.tree.map(np.shape, enc.variables["params"]["head"])
    want = jax.tree.map(np.shape, jax.device_get(head))
    if got != want or enc.meta["backbone"] != s.bb.name:
      raise errors.InvalidInput(f"train.init_head_from={config.train.init_head_from}: its head ({enc.meta['backbone']}, "
                                f"{enc.meta['bits']} bits) does not fit this model ({s.bb.name}, {config.model.bits} bits)")
    head = jax.device_get(enc.variables["params"]["head"])
  params = {"head": head}
  constants = {}
  if s.feats is None:
    part = backbones.trained_part(s.bb, s.point, s.act_shape)
    params["backbone"] = part["params"]
    constants = {k: {"backbone": v} for k, v in part.items() if k != "params"}
  n_train = len(s.train_idx)
  extra = {"bank": jnp.zeros((n_train, config.model.bits), jnp.float32)}
  return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                constants=constants, extra=extra)


def _batches(s: _Setup, global_batch: int, start: int, total: int):
  """Per-process training batches {'x', 'label', 'row'} from step `start`."""
  config = s.config
  row_of = np.full(len(s.table), -1, np.int64)
  row_of[s.train_idx] = np.arange(len(s.train_idx))
  if s.feats is not None:
    for row, _ in input_pipeline.global_steps(s.train_idx, global_batch, config.data.seed, start, total):
      mine = input_pipeline.process_rows(row)
      yield {"x": s.feats[mine], "label": s.table.labels[mine], "row": row_of[mine]}
    return
  if s.acts is not None:
    for row, step in input_pipeline.global_steps(s.train_idx, global_batch, config.data.seed, start, total):
      mine = input_pipeline.process_rows(row)
      x = features.read_views(s.acts, row, step, config.data.seed)
      yield {"x": x, "label": s.table.labels[mine], "row": row_of[mine]}
    return
  source = input_pipeline.ImageSource(s.table, s.bb.image_size, config.data.resize_size or None,
                                      cache_dir=s.cache_dir)
  for b in input_pipeline.train_batches(source, s.train_idx, global_batch=global_batch, seed=config.data.seed,
                                        start_step=start, num_steps=total, augment=config.data.augment,
                                        threads=config.data.threads):
    yield {"x": b["image"], "label": b["label"], "row": row_of[b["id"]]}


def _preprocess(s: _Setup):
  """uint8 images -> the model's input in finetune mode: the backbone's preprocessing, and
  with finetune_from (no cache) the frozen layers below it. None for cached inputs."""
  if s.cached is not None:
    return None
  return features.frozen_input(s.bb, s.point)


def encode(s: _Setup, params, constants, indices: np.ndarray):
  """(u [n, K], logits [n, C]) of the examples `indices`, every one encoded once."""
  mesh, config = s.mesh, s.config
  rep = sharding.replicated(mesh)
  prep = _preprocess(s)
  apply = jax.jit(lambda v, x: s.model.apply(v, x if prep is None else prep(x)),
                  in_shardings=(rep, sharding.sharded_rows(mesh)))
  variables = {"params": params, **constants}
  n_dev = mesh.devices.size
  gb = -(-config.eval.batch_size // n_dev) * n_dev
  u_out = np.zeros((len(indices), config.model.bits), np.float32)
  l_out = np.zeros((len(indices), s.table.num_classes), np.float32)
  pos = {int(i): j for j, i in enumerate(indices)}
  if s.cached is not None:
    padded = -(-len(indices) // gb) * gb
    idx = np.concatenate([indices, np.full(padded - len(indices), indices[0])])
    for start in range(0, padded, gb):
      mine = input_pipeline.process_rows(idx[start:start + gb])
      x = s.feats[mine] if s.feats is not None else s.acts[mine, 0]  # view 0: the image as it is
      u, logits = apply(variables, sharding.to_global(mesh, x))
      u, logits = sharding.gather_rows(u), sharding.gather_rows(logits)
      keep = slice(0, max(0, min(gb, len(indices) - start)))
      u_out[start:start + gb][:keep.stop] = u[keep]
      l_out[start:start + gb][:keep.stop] = logits[keep]
    return u_out, l_out
  source = input_pipeline.ImageSource(s.table, s.bb.image_size, config.data.resize_size or None,
                                      cache_dir=s.cache_dir)
  for b in input_pipeline.eval_batches(source, indices, global_batch=gb, threads=config.data.threads):
    u, logits = apply(variables, sharding.to_global(mesh, b["image"]))
    u, logits = sharding.gather_rows(u), sharding.gather_rows(logits)
    ids = sharding.gather_rows(sharding.to_global(mesh, b["id"]))
    mask = sharding.gather_rows(sharding.to_global(mesh, b["mask"]))
    for j in np.flatnonzero(mask):
      u_out[pos[int(ids[j])]] = u[j]
      l_out[pos[int(ids[j])]] = logits[j]
  return u_out, l_out


def evaluate(s: _Setup, state, workdir: str, timing: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
  """Encodes database (train) and queries (test), ranks, writes results.json + plots.
  `timing` (seconds per phase of this run) goes into results.json with eval_seconds added."""
  config = s.config
  t = time.perf_counter()
  db_u, _ = encode(s, state.params, state.constants, s.train_idx)
  q_u, q_logits = encode(s, state.params, state.constants, s.test_idx)
  db_labels, q_labels = s.table.labels[s.train_idx], s.table.labels[s.test_idx]
  report = evaluation.evaluate_codes(np.where(db_u >= 0, 1, -1), np.where(q_u >= 0, 1, -1), db_labels, q_labels,
                                     map_ks=tuple(config.eval.map_ks), ks=tuple(config.eval.ks),
                                     q_predictions=np.argmax(q_logits, axis=1), q_logits=q_logits)
  eval_seconds = time.perf_counter() - t
  results = dict(method="dhcnn", dataset=s.table.name, dataset_description=s.table.description,
                 split="validation" if config.data.validation else "test",
                 backbone=s.bb.name, pretrained=s.bb.pretrained, mode=config.train.mode,
                 finetune_from=s.point or None, activation_cache=s.acts is not None,
                 num_classes=s.table.num_classes,
                 class_names=s.table.class_names, step=int(distributed.to_host(state.step)),
                 eval_seconds=eval_seconds, timing={**(timing or {}), "eval_seconds": eval_seconds},
                 devices=jax.device_count(),
                 processes=jax.process_count(), config=config.to_dict(), **report)
  evaluation.write_results(workdir, results)
  logging.info("%s", evaluation.summary_line(results))
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains DHCNN per `config`, checkpointing to and resuming from `workdir`; returns the
  evaluation results (also written to WORKDIR/results.json) or {} when stopped early."""
  config_checks.check_dhcnn(config)
  os.makedirs(workdir, exist_ok=True)
  t_setup = time.perf_counter()
  s = _setup(config, workdir)
  setup_seconds = time.perf_counter() - t_setup
  tc = config.train
  global_batch = tc.batch_size
  if global_batch % jax.process_count():
    raise errors.InvalidInput(f"train.batch_size={global_batch} is not divisible by the {jax.process_count()} processes: "
                              "each process reads an equal share of every global batch")
  if global_batch % s.mesh.devices.size:
    raise errors.InvalidInput(f"train.batch_size={global_batch} must be a multiple of the {s.mesh.devices.size} devices")
  spe = input_pipeline.steps_per_epoch(len(s.train_idx), global_batch)
  total = tc.epochs * spe
  lr_mults = {"backbone": tc.backbone_lr_mult} if s.feats is None and tc.backbone_lr_mult != 1.0 else None
  tx = train_state.make_optimizer(tc, spe, lr_mults)
  mngr = train_state.checkpoint_manager(workdir, tc.checkpoint_every_steps)
  train_state.check_run(mngr, config, steps_per_epoch=spe, num_train=len(s.train_idx))
  state = distributed.replicate(_init_state(s, tx), s.mesh)
  state = train_state.restore_or_keep(mngr, state)
  bank_labels = distributed.replicate(s.table.labels[s.train_idx], s.mesh)
  step_fn = dhcnn_step.make_train_step(s.model, tx, config, bank_labels, s.mesh, preprocess=_preprocess(s))
  rng = distributed.replicate(jax.random.key_data(jax.random.key(config.seed)), s.mesh)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  start = int(distributed.to_host(state.step))
  stop = loop.stop_step(start, total, tc.max_steps_per_run)
  logging.info("Training %s (%s) %d bits: steps %d -> %d of %d (%d/epoch, global batch %d, %d devices)",
               s.bb.name, tc.mode, config.model.bits, start, stop, total, spe, global_batch, s.mesh.devices.size)
  step_with_rng = lambda st, b: step_fn(st, b, rng)
  t_train = time.perf_counter()
  state, finished = loop.run(step_with_rng, state, _batches(s, global_batch, start, stop), mesh=s.mesh,
                             mngr=mngr, writer=writer, total=total, stop=stop, log_every=tc.log_every_steps,
                             loss_key="reported")
  if not finished:
    return {}
  # This run's phases (a resumed run counts only its own steps): data + backbone features
  # (extracted, or read from the cache), training, evaluation.
  timing = {"data_and_features_seconds": setup_seconds, "train_seconds": time.perf_counter() - t_train,
            "train_steps": stop - start}
  results = evaluate(s, state, workdir, timing)
  params = distributed.to_host(state.params)
  # The trained backbone layers (all, or finetune_from and above) over the pretrained ones.
  bb = s.bb if "backbone" not in params else backbones.with_trained(s.bb, params["backbone"])
  encoder.save_encoder(os.path.join(workdir, "encoder"), method="dhcnn", bb=bb, head_params=params["head"],
                       bits=config.model.bits, class_names=s.table.class_names, hidden=config.model.head_hidden,
                       extra_meta={"results_map": results["map"], "dataset": s.table.name,
                                   "raster": s.table.raster.to_meta(), "multilabel": s.table.multilabel},
                       overwrite=True)
  writer.write_scalars(total, {"eval/map": results["map"],
                               "eval/accuracy": results.get("accuracy", results.get("f1_macro", 0.0))})
  writer.flush()
  return results
