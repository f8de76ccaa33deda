"""Train state, optimizers and the orbax checkpoint manager shared by both methods.

Verified checkpoints: orbax's OCDBT files carry no checksum of the values (bytes flipped in
a data file restored without error). So every save also records a SHA-256 of the state's
values, <checkpoint dir>/digests/<step>.json, and a restore recomputes it: a step whose
files fail to read or whose values differ is reported by name, moved aside to
<checkpoint dir>/corrupt/<step>, and the previous complete step is restored instead (a
run with no good step left starts over). Steps saved before digests existed are restored
unchecked.
"""

import json
import math
import os
import re
import shutil
import time
from typing import Any, Dict, Optional

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from rshash_jax import errors
from rshash_jax.parallel import distributed
from rshash_jax.retrieval import encoder as encoder_lib

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("log_epoch", "constant", "cosine", "step")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `extra` holds method state (DHCNN's memory bank)."""

  step: jnp.ndarray
  params: Any
  opt_state: Any
  constants: Any  # non-trained variables, e.g. frozen BatchNorm statistics
  extra: Dict[str, Any]


def learning_rate_schedule(tc, steps_per_epoch: int):
  """optax schedule from config.train: lr_start, lr_end, schedule, epochs.

  log_epoch: the DHCNN paper's schedule, constant within an epoch and log-spaced from
  lr_start to lr_end across epochs (MatConvNet `logspace(-2, -5, epochs)`).
  step: lr_start multiplied by lr_decay every lr_decay_epochs (MrHash).
  """
  if tc.schedule not in SCHEDULES:
    raise errors.InvalidInput(f"train.schedule must be one of {SCHEDULES}, got {tc.schedule!r}")
  total = tc.epochs * steps_per_epoch
  if tc.schedule == "constant":
    return optax.constant_schedule(tc.lr_start)
  if tc.schedule == "cosine":
    return optax.cosine_decay_schedule(tc.lr_start, total, alpha=tc.lr_end / tc.lr_start)
  if tc.schedule == "step":
    return optax.exponential_decay(
      tc.lr_start, tc.lr_decay_epochs * steps_per_epoch, tc.lr_decay, staircase=True
    )
  lo, hi = math.log10(tc.lr_start), math.log10(tc.lr_end)
  n = max(tc.epochs - 1, 1)

  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, tc.epochs - 1)
    return 10.0 ** (lo + (hi - lo) * epoch / n)

  return schedule


def make_optimizer(tc, steps_per_epoch: int, lr_mults: Optional[Dict[str, float]] = None):
  """optax chain per config.train (optimizer, momentum, weight_decay, grad_clip) with optional
  per-top-level-module learning-rate multipliers, e.g. {'backbone': 0.1}. grad_clip clips the
  global norm of all gradients together, before the per-module transforms."""
  if tc.optimizer not in OPTIMIZERS:
    raise errors.InvalidInput(f"train.optimizer must be one of {OPTIMIZERS}, got {tc.optimizer!r}")
  schedule = learning_rate_schedule(tc, steps_per_epoch)

  def one(mult):
    lr = (lambda s: schedule(s) * mult) if mult != 1.0 else schedule
    if tc.optimizer == "adamw":
      return optax.adamw(lr, weight_decay=tc.weight_decay)
    parts = [optax.add_decayed_weights(tc.weight_decay)] if tc.weight_decay else []
    if tc.optimizer == "adam":
      parts.append(optax.adam(lr))
    else:
      parts.append(optax.sgd(lr, momentum=tc.momentum if tc.optimizer == "momentum" else None))
    return optax.chain(*parts)

  if lr_mults:
    labels = lambda params: {k: (k if k in lr_mults else "default") for k in params}
    txs = {k: one(v) for k, v in lr_mults.items()}
    txs["default"] = one(1.0)
    tx = optax.multi_transform(txs, labels)
  else:
    tx = one(1.0)
  # grad_clip applies with and without learning-rate multipliers (tested).
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx) if tc.grad_clip else tx


def checkpoint_manager(
  workdir: str, every_steps: int, keep: int = 2, name: str = "checkpoints"
) -> ocp.CheckpointManager:
  """Periodic checkpoints in WORKDIR/<name>; orbax also saves at preemption signals."""
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=max(1, every_steps), max_to_keep=keep, create=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, name)),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def _shapes(tree) -> Dict[str, str]:
  """path -> "dtype[shape]" with one path spelling for flax structs, optax namedtuples and
  the plain dicts/lists orbax's metadata holds ('opt_state/1/0/mu/head/...')."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", jax.tree_util.keystr(path))
    out["/".join("".join(p) for p in parts)] = f"{np.dtype(leaf.dtype)}{list(leaf.shape)}"
  return out


# What a checkpoint's state and step numbering depend on: resuming with any of these
# changed would continue another run's state on other data, order or model, silently.
# Everything else (learning rates, epochs, logging, threads, evaluation) may change.
RUN_FIELDS_FIXED = (
  "method",
  "seed",
  "model",
  "train.batch_size",
  "train.mode",
  "data.source",
  "data.train_ratio",
  "data.validation",
  "data.unseen_classes",
  "data.seed",
  "data.tfds_split",
  "data.resize_size",
  "data.generated_classes",
  "data.generated_per_class",
  "data.generated_size",
  "mrhash.sources",
  "mrhash.image_view",
  "mrhash.num_clusters",
)


# Fields of RUN_FIELDS_FIXED newer than release 0.1.0, with the value a run had before them.
FIELDS_ADDED = {"data.unseen_classes": 0.0}


def check_run(mngr: ocp.CheckpointManager, config, **facts):
  """Records what a checkpointed run is (RUN_FIELDS_FIXED, processes, devices, facts such as
  steps per epoch) in <checkpoint dir>/run.json, and refuses to resume a run that differs in
  one of them, naming each. The process and device counts may change: the state is
  replicated and the data order depends on the global batch alone."""
  fixed = lambda k: any(k == f or k.startswith(f + ".") for f in RUN_FIELDS_FIXED)
  flat = traverse_util.flatten_dict(json.loads(json.dumps(config.to_dict(), default=str)), sep=".")
  now = {k: v for k, v in flat.items() if fixed(k)}
  now.update({f"run.{k}": v for k, v in facts.items()})
  path = os.path.join(mngr.directory, "run.json")
  record = dict(config=now, processes=jax.process_count(), devices=jax.device_count())
  old = None
  if mngr.latest_step() is not None and os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
  old = distributed.agree("run.json", old)
  if old is None:

    def write(tmp):
      with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)

    distributed.write_once(path, write, name="run.json")
    return
  # A field added to RUN_FIELDS_FIXED since a run was checkpointed had its default then.
  old_config = {**{k: v for k, v in FIELDS_ADDED.items() if k in now}, **old["config"]}
  diff = [
    f"{k}: {old_config.get(k, '<unset>')!r} in the checkpointed run, {now.get(k, '<unset>')!r} now"
    for k in sorted(set(old_config) | set(now))
    if old_config.get(k) != now.get(k)
  ]
  if diff:
    raise errors.InvalidInput(
      f"the checkpoints in {mngr.directory} do not match this config: "
      + "; ".join(diff[:8])
      + ". Use a fresh --workdir, or run with the checkpointed settings."
    )
  if (old["processes"], old["devices"]) != (jax.process_count(), jax.device_count()):
    logging.info(
      "Resuming a run checkpointed by %d process(es) with %d device(s) on %d process(es) with %d "
      "device(s)",
      old["processes"],
      old["devices"],
      jax.process_count(),
      jax.device_count(),
    )


def state_digest(state) -> str:
  """SHA-256 over every leaf of `state` (path, dtype, shape and bytes of this process's
  replicated copy), by the rule encoders use."""
  return encoder_lib.params_digest(distributed.to_host(state))


def _digest_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(mngr.directory, "digests", f"{step}.json")


def _write_digest(mngr: ocp.CheckpointManager, step: int, digest: str):
  """Primary only: the digest of `step` (atomic), and none for steps orbax has dropped."""
  if not distributed.is_primary():
    return
  path = _digest_path(mngr, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"step": step, "sha256": digest}, f)
  os.replace(path + ".tmp", path)
  keep = set(mngr.all_steps()) | {step}
  for name in os.listdir(os.path.dirname(path)):
    stem = name.split(".")[0]
    if name.endswith(".json") and stem.isdigit() and int(stem) not in keep:
      os.remove(os.path.join(os.path.dirname(path), name))


def _saved_digest(mngr: ocp.CheckpointManager, step: int) -> Optional[str]:
  try:
    with open(_digest_path(mngr, step)) as f:
      return json.load(f)["sha256"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):
    return "unreadable digest file"


def _set_aside(mngr: ocp.CheckpointManager, step: int):
  """Primary only: moves a corrupt step out of orbax's sight (kept for inspection)."""
  if not distributed.is_primary():
    return
  dest = os.path.join(mngr.directory, "corrupt", f"{step}.{int(time.time())}")
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  src = os.path.join(mngr.directory, str(step))
  if os.path.exists(src):
    shutil.move(src, dest)
  digest = _digest_path(mngr, step)
  if os.path.exists(digest):
    os.remove(digest)


def _check_shapes(mngr: ocp.CheckpointManager, step: int, abstract):
  """A checkpoint of another model is a config error (raised), not a corrupt step."""
  saved, want = _shapes(mngr.item_metadata(step)), _shapes(abstract)
  diff = [
    f"{k}: {saved.get(k, 'absent')} in the checkpoint, {want.get(k, 'absent')} now"
    for k in sorted(set(saved) | set(want), key=lambda k: (not k.startswith("params"), k))
    if saved.get(k) != want.get(k)
  ]
  if diff:
    raise errors.InvalidInput(
      f"cannot restore checkpoint {step} from {mngr.directory}: it does not match this "
      f"config (model, bits, mode?): {'; '.join(diff[:4])}"
      f"{f' and {len(diff) - 4} more' if len(diff) > 4 else ''}. Use a fresh --workdir."
    )


def _restore_verified(mngr: ocp.CheckpointManager, step: int, abstract):
  """(state, None) or (None, why the step is corrupt). Shapes are compared before orbax
  starts reading: a restore that fails half-way leaves orbax's reads un-awaited."""
  try:
    meta = mngr.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except  (a truncated or mangled _METADATA)
    return None, f"its metadata cannot be read ({type(e).__name__}: {str(e)[:200]})"
  if meta is None:
    return None, "it has no metadata"
  _check_shapes(mngr, step, abstract)
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except  (truncated or missing data files)
    return None, f"its files cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
  want = _saved_digest(mngr, step)
  if want is not None and state_digest(restored) != want:
    return None, "its values do not match the SHA-256 recorded when it was saved"
  return restored, None


def restore_or_keep(mngr: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The latest good checkpoint restored into `state`'s structure and shardings, or `state`.

  `state` must already be placed (replicated over the mesh): orbax restores every array
  with the sharding of its counterpart, on any number of processes. A corrupt step (see
  the module docstring) is logged by name, set aside, and the one before it is tried."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(mngr.all_steps(), reverse=True):
    restored, why = _restore_verified(mngr, step, abstract)
    why = distributed.agree(f"checkpoint {step} verdict", why)
    if why is None:
      logging.info("Resumed from checkpoint at step %d in %s", step, mngr.directory)
      return restored
    logging.warning(
      "Checkpoint step %d in %s is corrupt: %s. It is moved to %s/corrupt/; trying the "
      "step before it.",
      step,
      mngr.directory,
      why,
      mngr.directory,
    )
    distributed.on_primary(lambda s=step: _set_aside(mngr, s), f"set aside step {step}")
    mngr.reload()
  if mngr.all_steps() == [] and os.path.isdir(os.path.join(mngr.directory, "corrupt")):
    logging.warning("No good checkpoint left in %s: training starts over", mngr.directory)
  return state


def save(mngr: ocp.CheckpointManager, state: TrainState, force: bool = False) -> bool:
  step = int(distributed.to_host(state.step))
  saved = mngr.save(step, args=ocp.args.StandardSave(state), force=force)
  if saved:
    _write_digest(mngr, step, state_digest(state))
  return saved
