"""MrHash training and evaluation: `train_and_evaluate(config, workdir)`.

Stage 1 trains the multisource autoencoder; k-means on its latents gives the centres;
stage 2 trains AE, centres and hash network with the KL losses against the per-epoch
target. Both stages are one jitted data-parallel step over the ('data',) mesh (batch
sharded, state replicated and donated), checkpointed in WORKDIR/checkpoints/stage{1,2}
and resumable. train.mode = frozen: the hash network works on cached backbone features of
the single-source image; finetune (the paper, which fine-tunes AlexNet at 1e-5): it reads
the images, and the backbone trains at train.backbone_lr_mult x the learning rate. Features
are row-normalised (mrhash.feature_norm) and divided by their training-set RMS.

`mrhash.baseline` = lsh | itq runs a shallow baseline on the same image features and
evaluates it the same way (no training stages). No labels enter training anywhere.
"""

import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from scipy.cluster import vq

from rshash_jax import config_defaults, errors, scratch
from rshash_jax.data import datasets, features, input_pipeline, multisource
from rshash_jax.models import backbones, baselines, kmeans as kmeans_lib, mrhash, signs
from rshash_jax.parallel import distributed, sharding
from rshash_jax.retrieval import encoder, hamming, metrics
from rshash_jax.training import config_checks, evaluation, inputs as inputs_lib, loop


def load_data(config, workdir: str):
  """(table, train_idx, test_idx, image features [N, D], sources [[N, D_s]], backbone, the
  table as the hash network sees it)."""
  mc, dc, hc = config.model, config.data, config.mrhash
  bb = backbones.create(
    mc.backbone,
    pretrained=mc.pretrained,
    weights_path=mc.weights_path or None,
    image_size=mc.image_size or None,
    seed=config.seed,
  )
  cache = config_defaults.cache_dir(config, workdir)
  kw = dict(
    batch_size=config.features.batch_size, threads=dc.threads, weights_path=mc.weights_path or None
  )
  if dc.source.startswith("release:"):
    ms = multisource.read_release(
      dc.source[len("release:") :],
      list(hc.release_sources),
      image_root=dc.get("image_root") or None,
    )
    table, train_idx, test_idx, sources = ms.table, ms.train_idx, ms.test_idx, ms.sources
    if test_idx is None:
      raise errors.InvalidInput(f"{dc.source}: a test split (test.txt) is needed for evaluation")
    img_view = table
  else:
    table = datasets.from_config(dc, workdir)
    train_idx, test_idx = datasets.split_per_class(table.labels, dc.train_ratio, dc.seed)
    table = datasets.fit_raster(table, train_idx, dc.seed)  # the training part only
    sources = multisource.features_of_views(
      table, list(hc.sources), bb, cache, train_idx=train_idx, seed=dc.seed, **kw
    )
    img_view = multisource.view(table, hc.image_view, train_idx, dc.seed)
    bb = backbones.with_channels(bb, img_view.raster.channels)  # the hash network's input
  if dc.validation:
    train_idx, test_idx = datasets.validation_split(table.labels, train_idx, dc.validation, dc.seed)
    logging.info(
      "Validation run: %d database / %d queries from the training part",
      len(train_idx),
      len(test_idx),
    )
  image_feats = features.cached_features(bb, img_view, cache, **kw)
  return table, train_idx, test_idx, image_feats, sources, bb, img_view


def _make_step(loss_of, tx, mesh):
  rep, rows = sharding.replicated(mesh), sharding.sharded_rows(mesh)

  def step(state, batch):
    grads, metrics = jax.grad(loss_of, has_aux=True)(state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(rep, rows), out_shardings=(rep, rep), donate_argnums=(0,))


def _feature_batches(arrays: Dict[str, np.ndarray], train_idx, global_batch, seed, start, stop):
  rows_of = np.arange(len(train_idx))
  for row, _ in input_pipeline.global_steps(rows_of, global_batch, seed, start, stop):
    mine = input_pipeline.process_rows(row)
    out = {k: v[mine] for k, v in arrays.items()}
    out["row"] = mine
    yield out


def _stage1_config(tc, epochs, batch, lr, decay, decay_epochs):
  """Stage 1's optimizer: Adam, lr x decay every decay_epochs (the paper: 1e-3, halved / 40)."""
  c = ml_collections.ConfigDict(tc.to_dict())
  c.epochs, c.batch_size, c.lr_start, c.lr_end = epochs, batch, lr, lr
  c.schedule, c.lr_decay, c.lr_decay_epochs, c.optimizer, c.weight_decay = (
    "step",
    decay,
    decay_epochs,
    "adam",
    0.0,
  )
  c.grad_clip = 0.0
  return c


def _stage1(config, workdir, mesh, xs, writer):
  """Trains the AE; returns its params."""
  hc, tc = config.mrhash, config.train
  ae = mrhash.MultiSourceAE([x.shape[1] for x in xs])
  n = xs[0].shape[0]
  gb = min(hc.ae_batch_size, n - n % mesh.devices.size)
  stage = loop.Stage(
    config,
    _stage1_config(tc, hc.ae_epochs, gb, hc.ae_lr, 0.5, hc.ae_lr_halve_epochs),
    workdir,
    mesh,
    num_train=n,
    global_batch=gb,
    name="checkpoints/stage1",
    stage=1,
  )
  params = jax.jit(ae.init)(jax.random.key(config.seed), jnp.zeros((1, xs[0].shape[1])))["params"]
  state = stage.restore(stage.initial_state(params))

  def loss_of(p, state, batch):
    del state
    srcs = [batch[f"x{s}"] for s in range(len(xs))]
    _, recons = ae.apply({"params": p}, srcs[0])
    return mrhash.stage1_loss(recons, srcs)

  logging.info(
    "MrHash stage 1 (autoencoder): steps %d -> %d of %d, batch %d",
    stage.start,
    stage.stop,
    stage.total,
    gb,
  )
  arrays = {f"x{s}": x for s, x in enumerate(xs)}
  state, finished = stage.run(
    _make_step(loss_of, stage.tx, mesh),
    state,
    _feature_batches(arrays, np.arange(n), gb, config.data.seed, stage.start, stage.stop),
    writer,
    prefix="stage1",
  )
  return (distributed.to_host(state.params) if finished else None), ae


# mrhash.kmeans=auto: scipy's in-memory k-means while the latents take at most this many
# bytes (as float64), the chunked one (models/kmeans.py) over a memory-mapped file beyond.
KMEANS_IN_MEMORY_BYTES = 256 << 20
KMEANS_CHOICES = ("auto", "exact", "streamed")
# Rows per slice of a whole-training-set pass (latents, targets, codes): the only part of
# the archive's features on the devices at once.
ROW_CHUNK = 1 << 16


def kmeans(z: np.ndarray, k: int, n_init: int, seed: int) -> np.ndarray:
  """Best-of-n_init k-means++ centres (scipy), by inertia: the exact, in-memory variant."""
  best, best_inertia = None, np.inf
  for i in range(n_init):
    centres, assign = vq.kmeans2(
      z.astype(np.float64), k, minit="++", seed=np.random.default_rng([seed, i])
    )
    inertia = float(np.sum(np.square(z - centres[assign])))
    if inertia < best_inertia:
      best, best_inertia = centres, inertia
  return best.astype(np.float32)


def rows_apply(fn, x, mesh, out_dim: int, out=None, chunk: int = ROW_CHUNK) -> np.ndarray:
  """fn (rows -> rows [n, out_dim]) over a host array x [N, ...] (memory-mapped or not) in
  slices of `chunk` rows, each replicated over `mesh` in turn: no whole-archive array on
  any device. Results go to `out` (e.g. a memory-mapped file) or a new float32 array."""
  out = np.empty((x.shape[0], out_dim), np.float32) if out is None else out
  for i in range(0, x.shape[0], chunk):
    part = distributed.replicate(np.ascontiguousarray(x[i : i + chunk]), mesh)
    out[i : i + chunk] = distributed.to_host(fn(part))
  return out


def initial_centres(encode, x1, mesh, hc, seed: int, tmp_dir: str) -> np.ndarray:
  """k-means centres of the autoencoder's latents of x1 (mrhash.kmeans: `exact` is scipy's
  k-means on the latents in memory; `streamed` writes them to a memory-mapped file in
  `tmp_dir` and runs chunked Lloyd iterations (models/kmeans.py); `auto` picks exact while
  they take at most KMEANS_IN_MEMORY_BYTES)."""
  choice = hc.get("kmeans", "auto")
  n, d = x1.shape[0], mrhash.LATENT
  if choice == "auto":
    choice = "exact" if n * d * 8 <= KMEANS_IN_MEMORY_BYTES else "streamed"
  if choice == "exact":
    z = rows_apply(encode, x1, mesh, d)
    return kmeans(z, hc.num_clusters, hc.kmeans_n_init, seed)
  z = rows_apply(encode, x1, mesh, d, out=scratch.empty((n, d), np.float32, tmp_dir))
  logging.info("k-means (streamed) over %d latents of %d dims (scratch file in %s)", n, d, tmp_dir)
  return kmeans_lib.kmeans(z, hc.num_clusters, n_init=hc.kmeans_n_init, seed=seed)


def _stage2_batches(inputs: inputs_lib.Inputs, train_idx, arrays, global_batch, seed, start, stop):
  """Per-process batches {'f': the hash network's input, 'x<s>': source features, 'row': the
  example's row of the training part} of global steps start -> stop."""
  row_of = np.full(len(inputs.table), -1, np.int64)
  row_of[train_idx] = np.arange(len(train_idx))
  for x, ids in inputs.train_batches(train_idx, global_batch, seed, start, stop):
    rows = row_of[ids]
    yield {"f": x, **{k: v[rows] for k, v in arrays.items()}, "row": rows}


def _stage2(
  config, workdir, mesh, all_feats, xs, ae_params, writer, *, bb, view_table, train_idx, scale
):
  """Trains stage 2; returns (h [len(view_table), K] of every example of the image view,
  params), or None when stopped early. all_feats: normalised, scaled features of every
  example (the frozen hash network's input; fine-tuning reads the images instead)."""
  hc, tc = config.mrhash, config.train
  finetune = tc.mode == "finetune"
  # Frozen: the cached features; fine-tuning: images, or the activation cache at a split point
  # (partial fine-tuning, as DHCNN's; config_checks: finetune mode only).
  inputs = inputs_lib.Inputs.from_config(
    config,
    bb,
    view_table,
    config_defaults.cache_dir(config, workdir),
    features_=None if finetune else all_feats,
  )
  point = inputs.point
  model = mrhash.MrHash(
    [x.shape[1] for x in xs],
    bits=config.model.bits,
    num_clusters=hc.num_clusters,
    hidden=config.model.head_hidden,
    backbone=bb.module if finetune else None,
    feature_norm=hc.feature_norm,
    feature_scale=scale,
    backbone_start=point,
  )
  n = len(train_idx)
  gb = min(tc.batch_size, n - n % mesh.devices.size)
  # config.train is stage 2's; fine-tuning trains the backbone at backbone_lr_mult x the rate.
  stage = loop.Stage(
    config,
    tc,
    workdir,
    mesh,
    num_train=n,
    global_batch=gb,
    name="checkpoints/stage2",
    stage=2,
    lr_mults={"backbone": tc.backbone_lr_mult} if finetune else None,
  )
  spe = stage.steps_per_epoch
  params = jax.jit(model.init)(
    jax.random.key(config.seed + 1), inputs.dummy(), [jnp.zeros((1, x.shape[1])) for x in xs]
  )
  params = jax.device_get(params["params"])
  params["ae"] = ae_params
  constants = {}
  if inputs.trains_backbone:
    params["backbone"], constants = inputs.trained_backbone()
  if hc.hash_init == "itq":  # config_checks: only with a linear hash layer (head_hidden=0)
    # Start the hash layer at ITQ's projection of the same features (scaled so tanh sees
    # unit-variance inputs); the KL loss then moves the codes towards the multisource clusters.
    image_feats = np.asarray(all_feats[train_idx])
    itq = baselines.fit_itq(image_feats, config.model.bits, seed=config.seed)
    proj = (image_feats - itq.mean) @ itq.projection
    s = 1.0 / (proj.std(axis=0) + 1e-12)
    params["hashnet"]["hash"]["kernel"] = (itq.projection * s).astype(np.float32)
    params["hashnet"]["hash"]["bias"] = (-(itq.mean @ itq.projection) * s).astype(np.float32)
  if stage.fresh:  # k-means only for a fresh stage 2
    init = distributed.replicate(params, mesh)  # the stage-1 autoencoder, initial centres
    encode = jax.jit(
      lambda p, x: mrhash.batched_apply(
        lambda v: model.apply({"params": p}, v, method=lambda m, v: m.ae.encode(v)), x
      )
    )
    params["centres"] = initial_centres(
      lambda x: encode(init, x), xs[0], mesh, hc, config.seed, config_defaults.scratch_dir(workdir)
    )
    del init
  state = stage.restore(
    stage.initial_state(params, constants, {"p": jnp.zeros((n, hc.num_clusters), jnp.float32)})
  )
  assign = jax.jit(
    lambda p, x: mrhash.batched_apply(
      lambda v: model.apply({"params": p}, v, method=lambda m, v: m.feature_assign(v)), x
    )
  )
  normalise = jax.jit(mrhash.target_distribution, out_shardings=sharding.replicated(mesh))

  def targets(params):
    """The target distribution of every training row: soft assignments in row slices (the
    features stay on the host, memory-mapped), then p = q^2 / f, rows normalised."""
    q = rows_apply(lambda x: assign(params, x), xs[0], mesh, hc.num_clusters)
    return normalise(distributed.replicate(q, mesh))

  def before_step(step, state):
    if step % spe == 0:  # the target is fixed within an epoch and stored in the state
      state = state.replace(extra={"p": targets(state.params)})
    return state

  prep = inputs.preprocess() or (lambda x: x)

  def loss_of(p, state, batch):
    srcs = [batch[f"x{s}"] for s in range(len(xs))]
    out = model.apply({"params": p, **state.constants}, prep(batch["f"]), srcs)
    target = state.extra["p"][batch["row"]]
    return mrhash.stage2_loss(
      out,
      target,
      srcs,
      recon_weight=hc.recon_weight,
      kl_reduction=hc.kl_reduction,
      pair_weight=hc.pair_weight,
      quant_weight=hc.quant_weight,
      balance_weight=hc.balance_weight,
    )

  start, stop = stage.start, stage.stop
  logging.info(
    "MrHash stage 2 (hashing, %s backbone): steps %d -> %d of %d, batch %d, %d bits",
    tc.mode,
    start,
    stop,
    stage.total,
    gb,
    config.model.bits,
  )
  arrays = {f"x{s}": x for s, x in enumerate(xs)}
  batches = _stage2_batches(inputs, train_idx, arrays, gb, config.data.seed, start, stop)
  state, finished = stage.run(
    _make_step(loss_of, stage.tx, mesh),
    state,
    batches,
    writer,
    prefix="stage2",
    before_step=before_step,
  )
  if not finished:
    return None
  params = distributed.to_host(state.params)
  variables = {"params": params, **constants}
  if inputs.mode == "features":  # in row slices: the features stay on the host
    rep_vars = distributed.replicate(variables, mesh)
    codes_of = jax.jit(
      lambda v, x: mrhash.batched_apply(
        lambda r: model.apply(v, r, method=lambda m, r: m.codes(r)), x
      )
    )
    return rows_apply(lambda x: codes_of(rep_vars, x), all_feats, mesh, config.model.bits), params
  if inputs.mode == "activations":  # view 0 of every example: the image as it is
    codes = jax.jit(lambda x: model.apply(variables, x, method=lambda m, x: m.codes(x)))
    return np.asarray(
      mrhash.batched_apply(codes, inputs.activations[:, 0], batch=config.eval.batch_size)
    ), params
  rep, rows = sharding.replicated(mesh), sharding.sharded_rows(mesh)
  fn = jax.jit(
    lambda v, images: model.apply(v, prep(images), method=lambda m, x: m.codes(x)),
    in_shardings=(rep, rows),
    out_shardings=rows,
  )
  h = features.apply_to_images(
    fn,
    variables,
    view_table,
    bb.image_size,
    config.model.bits,
    mesh,
    batch_size=config.eval.batch_size,
    threads=config.data.threads,
    name="MrHash codes",
    cache_dir=config_defaults.cache_dir(config, workdir),
  )
  return h, params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains MrHash (or fits the LSH/ITQ baseline) and evaluates it; writes results.json."""
  config_checks.check_mrhash(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.data_mesh()
  t_data = time.perf_counter()
  table, train_idx, test_idx, image_feats, sources, bb, view_table = load_data(config, workdir)
  data_seconds = time.perf_counter() - t_data
  hc = config.mrhash
  t0 = time.perf_counter()
  # Normalised, standardised features in unnamed memory-mapped files (rshash_jax/scratch.py): the
  # process's own memory stays flat in the archive size.
  tmp, l2 = config_defaults.scratch_dir(workdir), hc.feature_norm == "l2"
  image_feats, scale = scratch.standardised(image_feats, l2=l2, fit=train_idx, directory=tmp)
  if hc.baseline:
    fit = baselines.fit_lsh if hc.baseline == "lsh" else baselines.fit_itq
    h = fit(image_feats[train_idx], config.model.bits, seed=config.seed)(image_feats)
    method = hc.baseline
  else:
    xs = [scratch.standardised(s, train_idx, l2=l2, directory=tmp)[0] for s in sources]
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    ae_params, _ = _stage1(config, workdir, mesh, xs, writer)
    if ae_params is None:
      return {}
    stage2 = _stage2(
      config,
      workdir,
      mesh,
      image_feats,
      xs,
      ae_params,
      writer,
      bb=bb,
      view_table=view_table,
      train_idx=train_idx,
      scale=scale,
    )
    if stage2 is None:
      return {}
    h, params = stage2
    method = "mrhash" if len(set(hc.sources)) > 1 else "mrhash_unisource"
  train_seconds = time.perf_counter() - t0
  scratch.release()  # training's freed temporaries, before evaluation's
  t_eval = time.perf_counter()
  db_codes, q_codes = h[train_idx], h[test_idx]
  report = evaluation.evaluate_codes(
    db_codes,
    q_codes,
    table.labels[train_idx],
    table.labels[test_idx],
    map_ks=tuple(config.eval.map_ks),
    ks=tuple(config.eval.ks),
    # Neighbour recall's reference: the frozen backbone's features of the image view (the
    # same for every model of this backbone; row scaling does not change their cosines).
    **(
      {}
      if config.eval.reference == "none"
      else {
        "db_reference": scratch.take(image_feats, train_idx, tmp),
        "q_reference": scratch.take(image_feats, test_idx, tmp),
      }
    ),
  )
  r = min(config.eval.map_at_r, len(train_idx))
  report["map_at_r"] = report["map_at"].get(r) if r in report["map_at"] else None
  if report["map_at_r"] is None:
    report["map_at_r"] = metrics.mean_average_precision(
      hamming.pack_codes(signs.signs(q_codes)),
      hamming.pack_codes(signs.signs(db_codes)),
      table.labels[test_idx],
      table.labels[train_idx],
      topk=r,
    )
  report["r"] = r
  results = dict(
    method=method,
    dataset=table.name,
    dataset_description=table.description,
    backbone=bb.name,
    pretrained=bb.pretrained,
    image_view=hc.image_view,
    sources=list(hc.sources),
    num_classes=table.num_classes,
    train_seconds=train_seconds,
    timing={
      "data_and_features_seconds": data_seconds,
      "train_seconds": train_seconds,
      "eval_seconds": time.perf_counter() - t_eval,
    },
    devices=jax.device_count(),
    processes=jax.process_count(),
    mode=config.train.mode,
    split="validation" if config.data.validation else "test",
    config=config.to_dict(),
    **report,
  )
  if hc.baseline:
    evaluation.write_results(workdir, results)
  else:
    if "backbone" in params:  # fine-tuned (all layers, or those from train.finetune_from on)
      bb = backbones.with_trained(bb, params["backbone"])
    evaluation.commit_run(
      workdir,
      results,
      lambda path, **kw: encoder.save_encoder(path, **kw),
      method="mrhash",
      bb=bb,
      head_params=params["hashnet"],
      bits=config.model.bits,
      class_names=table.class_names,
      hidden=config.model.head_hidden,
      feature_scale=scale,
      feature_norm=hc.feature_norm,
      degrade=view_table.degrade,
      extra_meta={
        "results_map": results["map"],
        "dataset": table.name,
        "raster": view_table.raster.to_meta(),
      },
    )
  at_r = "" if r in results["map_at"] else f" mAP@{r}={results['map_at_r']:.4f}"
  logging.info("%s%s", evaluation.summary_line(results), at_r)
  return results
