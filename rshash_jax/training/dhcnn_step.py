"""The jitted data-parallel DHCNN training step (model, loss, optimiser, mesh).

Kept apart from train.py's data and logging stack (tf.data, clu), so that it imports with
jax, flax and optax alone: benchmarks/train_step.py runs it on accelerator machines that
have no TensorFlow, and a user with a loader of their own can drive it directly.
"""

import jax
import jax.numpy as jnp

from rshash_jax.models import dhcnn
from rshash_jax.parallel import sharding


def make_train_step(
  model: dhcnn.DHCNN, tx, config, bank_labels, mesh, preprocess=None, bank_reference=None
):
  """The jitted data-parallel step: (state, batch) -> (state, metrics).

  preprocess: uint8 images -> backbone input (finetune mode); None for features.
  bank_reference: [N_train, D] unit-norm reference features of the bank's rows (replicated),
  needed by dhcnn.distill_weight > 0."""
  dc = config.dhcnn
  ce_scale = dhcnn.ce_grad_scale(dc.eta, dc.ce_to_classifier)
  centers = (
    jnp.asarray(dhcnn.hash_centers(model.num_classes, model.bits, config.seed))
    if dc.center_weight
    else None
  )
  rep, rows = sharding.replicated(mesh), sharding.sharded_rows(mesh)

  def step(state, batch, rng):
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw key data (placeable on any mesh)
      rng = jax.random.wrap_key_data(rng)

    def loss_of(params):
      variables = {"params": params, **state.constants}
      x = batch["x"] if preprocess is None else preprocess(batch["x"])
      u, logits = model.apply(
        variables,
        x,
        train=True,
        ce_grad_scale=ce_scale,
        rngs={"dropout": jax.random.fold_in(rng, state.step)},
      )
      out = dhcnn.loss_fn(
        u,
        logits,
        batch["label"],
        batch["row"],
        state.extra["bank"],
        bank_labels,
        eta=dc.eta,
        beta=dc.beta,
        theta_scale=dc.theta_scale,
        gradient=dc.gradient,
        ce_to_classifier=dc.ce_to_classifier,
        num_classes=model.num_classes,
        centers=centers,
        center_weight=dc.center_weight,
        center_margin=dc.get("center_margin", 0.0),
        ref_sim=None if bank_reference is None else bank_reference[batch["row"]] @ bank_reference.T,
        distill_weight=dc.get("distill_weight", 0.0),
        distill=dc.get("distill", "class"),
        distill_temperature=dc.get("distill_temperature", 0.05),
        distill_label_boost=dc.get("distill_label_boost", 0.0),
      )
      return out["loss"], out

    grads, out = jax.grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    new = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extra={"bank": out["bank"]}
    )
    metrics = {k: out[k] for k in ("reported", "pairwise", "quant", "ce", "center", "distill")}
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return new, metrics

  return jax.jit(step, in_shardings=(rep, rows, rep), out_shardings=(rep, rep), donate_argnums=(0,))
