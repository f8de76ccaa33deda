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
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from rshash_jax import config_defaults, errors, scratch
from rshash_jax.data import datasets, features
from rshash_jax.models import backbones, baselines, dhcnn
from rshash_jax.parallel import distributed, sharding
from rshash_jax.retrieval import encoder, metrics
from rshash_jax.training import (
  config_checks,
  dhcnn_step,
  evaluation,
  inputs as inputs_lib,
  loop,
  train_state,
)


@dataclasses.dataclass
class _Setup:
  config: Any
  mesh: Any
  table: datasets.ImageTable
  train_idx: np.ndarray
  test_idx: np.ndarray
  bb: backbones.Backbone
  model: dhcnn.DHCNN
  inputs: inputs_lib.Inputs
  cache_dir: str
  unseen_db: np.ndarray  # data.unseen_classes: images of the held-out classes, database part
  unseen_q: np.ndarray  # and query part (both empty without held-out classes)


def _setup(config, workdir: str) -> _Setup:
  mesh = sharding.data_mesh()
  table = datasets.from_config(config.data, workdir)
  train_idx, test_idx = datasets.split_per_class(
    table.labels, config.data.train_ratio, config.data.seed
  )
  unseen_db = unseen_q = np.zeros(0, np.int64)
  if config.data.unseen_classes:
    # Held-out classes: no image and no label of theirs enters training. Their images are
    # split like the others (training part -> database, test part -> queries; the training
    # part again under data.validation) and ranked among themselves.
    held = datasets.hold_out_classes(table.labels, config.data.unseen_classes, config.data.seed)
    out = np.isin(table.labels, held)
    unseen_db, unseen_q = train_idx[out[train_idx]], test_idx[out[test_idx]]
    train_idx, test_idx = train_idx[~out[train_idx]], test_idx[~out[test_idx]]
    if config.data.validation:
      unseen_db, unseen_q = datasets.validation_split(
        table.labels, unseen_db, config.data.validation, config.data.seed
      )
    logging.info(
      "Unseen classes %s: %d database / %d query images",
      held.tolist(),
      len(unseen_db),
      len(unseen_q),
    )
  if config.data.validation:
    train_idx, test_idx = datasets.validation_split(
      table.labels, train_idx, config.data.validation, config.data.seed
    )
  table = datasets.fit_raster(table, train_idx, config.data.seed)
  mc = config.model
  dtype = jnp.dtype(mc.dtype)
  bb = backbones.create(
    mc.backbone,
    pretrained=mc.pretrained,
    weights_path=mc.weights_path or None,
    image_size=mc.image_size or None,
    dtype=dtype,
    seed=config.seed,
    channels=table.raster.channels,
  )
  feats = None
  cache = config_defaults.cache_dir(config, workdir)
  if config.train.mode == "frozen":
    feats = _backbone_features(config, bb, table, cache)
  inputs = inputs_lib.Inputs.from_config(
    config, bb, table, cache, features_=feats, resize_size=config.data.resize_size or None
  )
  model = dhcnn.DHCNN(
    backbone=None if feats is not None else bb.module,
    bits=mc.bits,
    num_classes=table.num_classes,
    hidden=mc.head_hidden,
    dropout=mc.dropout,
    dtype=dtype,
    backbone_start=inputs.point,
  )
  return _Setup(
    config, mesh, table, train_idx, test_idx, bb, model, inputs, cache, unseen_db, unseen_q
  )


def _init_state(s: _Setup, stage: loop.Stage) -> train_state.TrainState:
  """Head initialised N(0, 0.01^2); backbone variables from the (pretrained) backbone."""
  config = s.config
  dummy = s.inputs.dummy()
  head = jax.jit(lambda k: s.model.init(k, dummy)["params"]["head"])(jax.random.key(config.seed))
  if config.train.init_head_from:
    # Linear probe, then fine-tune: start from the head of a finished (e.g. frozen) run.
    enc = encoder.load_encoder(config.train.init_head_from, devices=jax.local_devices()[:1])
    got = jax.tree.map(np.shape, enc.variables["params"]["head"])
    want = jax.tree.map(np.shape, jax.device_get(head))
    if got != want or enc.meta["backbone"] != s.bb.name:
      raise errors.InvalidInput(
        f"train.init_head_from={config.train.init_head_from}: its head ({enc.meta['backbone']}, "
        f"{enc.meta['bits']} bits) does not fit this model ({s.bb.name}, {config.model.bits} bits)"
      )
    head = jax.device_get(enc.variables["params"]["head"])
  params = {"head": head}
  constants = {}
  if s.inputs.trains_backbone:
    params["backbone"], constants = s.inputs.trained_backbone()
  return stage.initial_state(
    params, constants, {"bank": jnp.zeros((len(s.train_idx), config.model.bits), jnp.float32)}
  )


def _batches(s: _Setup, global_batch: int, start: int, stop: int):
  """Per-process training batches {'x', 'label', 'row'} of steps start -> stop ('row': the
  example's row of the memory bank)."""
  row_of = np.full(len(s.table), -1, np.int64)
  row_of[s.train_idx] = np.arange(len(s.train_idx))
  for x, ids in s.inputs.train_batches(s.train_idx, global_batch, s.config.data.seed, start, stop):
    yield {"x": x, "label": s.table.labels[ids], "row": row_of[ids]}


def encode(s: _Setup, params, constants, indices: np.ndarray):
  """(u [n, K], logits [n, C]) of the examples `indices`, every one encoded once."""
  mesh, config = s.mesh, s.config
  rep = sharding.replicated(mesh)
  prep = s.inputs.preprocess()
  apply = jax.jit(
    lambda v, x: s.model.apply(v, x if prep is None else prep(x)),
    in_shardings=(rep, sharding.sharded_rows(mesh)),
  )
  n_dev = mesh.devices.size
  gb = -(-config.eval.batch_size // n_dev) * n_dev
  u, logits = s.inputs.apply(apply, {"params": params, **constants}, indices, mesh, gb)
  return u, logits


def evaluate(
  s: _Setup, state, workdir: str, timing: Optional[Dict[str, float]] = None
) -> Dict[str, Any]:
  """Encodes database (train) and queries (test) and ranks: the results (written to
  results.json by the caller, after the encoder: see evaluation.commit_run). `timing`
  (seconds per phase of this run) goes into them with eval_seconds added."""
  config = s.config
  t = time.perf_counter()
  db_u, _ = encode(s, state.params, state.constants, s.train_idx)
  q_u, q_logits = encode(s, state.params, state.constants, s.test_idx)
  scratch.release()
  db_labels, q_labels = s.table.labels[s.train_idx], s.table.labels[s.test_idx]
  ref = _reference_features(s)
  ref_db = ref_q = None
  if ref is not None:  # gathered once, into scratch files: not held in process memory
    tmp = config_defaults.scratch_dir(workdir)
    ref_db, ref_q = scratch.take(ref, s.train_idx, tmp), scratch.take(ref, s.test_idx, tmp)
  report = evaluation.evaluate_codes(
    db_u,
    q_u,
    db_labels,
    q_labels,
    map_ks=tuple(config.eval.map_ks),
    ks=tuple(config.eval.ks),
    q_predictions=np.argmax(q_logits, axis=1),
    q_logits=q_logits,
    db_reference=ref_db,
    q_reference=ref_q,
  )
  itq = None
  if ref is not None:  # the same run's ITQ on the reference features of the seen classes
    itq = baselines.fit_itq(ref_db, config.model.bits, seed=config.seed)
    ref_report = evaluation.evaluate_codes(
      itq(ref_db), itq(ref_q), db_labels, q_labels, ks=(1,), db_reference=ref_db, q_reference=ref_q
    )
    report["reference_itq"] = {
      k: ref_report[k]
      for k in ("map", "map_tie_aware", "neighbour_recall_at", "distinct_codes", "bit_entropy")
    }
  if len(s.unseen_db) and len(s.unseen_q):
    report.update(
      evaluation.unseen_report(
        encode(s, state.params, state.constants, s.unseen_db)[0],
        encode(s, state.params, state.constants, s.unseen_q)[0],
        s.table.labels[s.unseen_db],
        s.table.labels[s.unseen_q],
        db_reference=None if ref is None else ref[s.unseen_db],
        q_reference=None if ref is None else ref[s.unseen_q],
        itq_codes=None if itq is None else (itq(ref[s.unseen_db]), itq(ref[s.unseen_q])),
      )
    )
  eval_seconds = time.perf_counter() - t
  results = dict(
    method="dhcnn",
    dataset=s.table.name,
    dataset_description=s.table.description,
    split="validation" if config.data.validation else "test",
    backbone=s.bb.name,
    pretrained=s.bb.pretrained,
    mode=config.train.mode,
    finetune_from=s.inputs.point or None,
    activation_cache=s.inputs.mode == "activations",
    num_classes=s.table.num_classes,
    class_names=s.table.class_names,
    step=int(distributed.to_host(state.step)),
    eval_seconds=eval_seconds,
    timing={**(timing or {}), "eval_seconds": eval_seconds},
    devices=jax.device_count(),
    processes=jax.process_count(),
    config=config.to_dict(),
    **report,
  )
  logging.info("%s", evaluation.summary_line(results))
  return results


def _reference_features(s: _Setup, always: bool = False) -> Optional[np.ndarray]:
  """The reference embedding of neighbour recall, the unseen-class references and the
  distillation term: the pooled features of the backbone as created (pretrained and
  frozen: the same for every model of that backbone) of every image; None under
  eval.reference=none unless `always`."""
  if s.config.eval.reference == "none" and not always:
    return None
  if s.inputs.mode == "features":
    return s.inputs.features
  return _backbone_features(s.config, s.bb, s.table, s.cache_dir)


def _backbone_features(config, bb, table, cache_dir: str) -> np.ndarray:
  """The pooled features of `bb` (as created) of every image, cached in `cache_dir`."""
  return features.cached_features(
    bb,
    table,
    cache_dir,
    weights_path=config.model.weights_path or None,
    batch_size=config.features.batch_size,
    resize_size=config.data.resize_size or None,
    threads=config.data.threads,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains DHCNN per `config`, checkpointing to and resuming from `workdir`; returns the
  evaluation results (also written to WORKDIR/results.json) or {} when stopped early."""
  config_checks.check_dhcnn(config)
  os.makedirs(workdir, exist_ok=True)
  t_setup = time.perf_counter()
  s = _setup(config, workdir)
  setup_seconds = time.perf_counter() - t_setup
  scratch.release()  # feature extraction's freed temporaries, before training's
  tc = config.train
  global_batch = tc.batch_size
  if global_batch % jax.process_count():
    raise errors.InvalidInput(
      f"train.batch_size={global_batch} is not divisible by the {jax.process_count()} processes: "
      "each process reads an equal share of every global batch"
    )
  if global_batch % s.mesh.devices.size:
    raise errors.InvalidInput(
      f"train.batch_size={global_batch} must be a multiple of the {s.mesh.devices.size} devices"
    )
  lr_mults = (
    {"backbone": tc.backbone_lr_mult}
    if s.inputs.trains_backbone and tc.backbone_lr_mult != 1.0
    else None
  )
  stage = loop.Stage(
    config,
    tc,
    workdir,
    s.mesh,
    num_train=len(s.train_idx),
    global_batch=global_batch,
    lr_mults=lr_mults,
  )
  state = stage.restore(_init_state(s, stage))
  bank_labels = distributed.replicate(s.table.labels[s.train_idx], s.mesh)
  bank_reference = None
  if config.dhcnn.distill_weight:
    ref = metrics.unit_rows(_reference_features(s, always=True)[s.train_idx])
    bank_reference = distributed.replicate(ref, s.mesh)
  step_fn = dhcnn_step.make_train_step(
    s.model,
    stage.tx,
    config,
    bank_labels,
    s.mesh,
    preprocess=s.inputs.preprocess(),
    bank_reference=bank_reference,
  )
  rng = distributed.replicate(jax.random.key_data(jax.random.key(config.seed)), s.mesh)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  start, stop, total = stage.start, stage.stop, stage.total
  logging.info(
    "Training %s (%s) %d bits: steps %d -> %d of %d (%d/epoch, global batch %d, %d devices)",
    s.bb.name,
    tc.mode,
    config.model.bits,
    start,
    stop,
    total,
    stage.steps_per_epoch,
    global_batch,
    s.mesh.devices.size,
  )
  step_with_rng = lambda st, b: step_fn(st, b, rng)
  t_train = time.perf_counter()
  state, finished = stage.run(
    step_with_rng, state, _batches(s, global_batch, start, stop), writer, loss_key="reported"
  )
  if not finished:
    return {}
  # This run's phases (a resumed run counts only its own steps): data + backbone features
  # (extracted, or read from the cache), training, evaluation.
  timing = {
    "data_and_features_seconds": setup_seconds,
    "train_seconds": time.perf_counter() - t_train,
    "train_steps": stop - start,
  }
  scratch.release()  # training's freed temporaries, before evaluation's
  results = evaluate(s, state, workdir, timing)
  params = distributed.to_host(state.params)
  # The trained backbone layers (all, or finetune_from and above) over the pretrained ones.
  bb = s.bb if "backbone" not in params else backbones.with_trained(s.bb, params["backbone"])
  evaluation.commit_run(
    workdir,
    results,
    lambda path, **kw: encoder.save_encoder(path, **kw),
    method="dhcnn",
    bb=bb,
    head_params=params["head"],
    bits=config.model.bits,
    class_names=s.table.class_names,
    hidden=config.model.head_hidden,
    extra_meta={
      "results_map": results["map"],
      "dataset": s.table.name,
      "raster": s.table.raster.to_meta(),
      "multilabel": s.table.multilabel,
    },
  )
  writer.write_scalars(
    total,
    {
      "eval/map": results["map"],
      "eval/accuracy": results.get("accuracy", results.get("f1_macro", 0.0)),
    },
  )
  writer.flush()
  return results
