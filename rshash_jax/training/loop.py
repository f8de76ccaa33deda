"""The training loop every stage shares: optimizer, checkpoints, resume, steps, NaN guard,
logging, preemption. `Stage` sets a stage up (DHCNN's one, MrHash's autoencoder and hashing
stages) and `run` steps it."""

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax.numpy as jnp

import numpy as np
from absl import logging
from clu import periodic_actions

from rshash_jax import errors
from rshash_jax.data import input_pipeline
from rshash_jax.parallel import distributed, sharding
from rshash_jax.training import train_state


def _check_and_write(pending, step, writer, mngr, loss_key, prefix):
  """Stops on a non-finite loss (before it can be checkpointed); logs the mean metrics."""
  host = distributed.to_host(pending)
  for k, m in enumerate(host):
    if not np.isfinite(m[loss_key]):
      mngr.wait_until_finished()
      detail = ", ".join(f"{n}={v}" for n, v in m.items())
      raise errors.Diverged(
        f"non-finite loss at step {step - len(host) + k + 1} ({detail}); lower train.lr_start or "
        f"check "
        f"the data. The last good checkpoint (step {mngr.latest_step()}) in {mngr.directory} is "
        f"kept."
      )
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in mean.items()})


def run(
  step_fn: Callable,
  state,
  batches: Iterable[dict],
  *,
  mesh,
  mngr,
  writer,
  total: int,
  stop: int,
  log_every: int,
  loss_key: str = "loss",
  prefix: str = "train",
  before_step: Optional[Callable] = None,
) -> Tuple[object, bool]:
  """Runs steps state.step -> stop (of `total`) over per-process `batches`.

  Returns (state, finished): finished is False when stopped early (max steps per run or a
  preemption signal); a checkpoint of the last step is saved either way. before_step(step,
  state) -> state runs on the host before each step (e.g. per-epoch targets).
  """
  step = int(distributed.to_host(state.step))
  report = periodic_actions.ReportProgress(
    num_train_steps=total, writer=writer, every_steps=log_every
  )
  pending = []
  for batch in batches:
    if before_step is not None:
      state = before_step(step, state)
    state, metrics = step_fn(state, {k: sharding.to_global(mesh, v) for k, v in batch.items()})
    step += 1
    pending.append(metrics)
    preempted = mngr.reached_preemption(step)
    saving = mngr.should_save(step) or preempted or step == stop
    if saving or step % log_every == 0:
      _check_and_write(
        pending, step, writer, mngr, loss_key, prefix
      )  # never checkpoint unchecked steps
      pending = []
    report(step)
    if saving:
      train_state.save(mngr, state, force=True)
    if preempted:
      mngr.wait_until_finished()
      logging.warning(
        "Preemption signal at step %d: checkpoint saved in %s, exiting.", step, mngr.directory
      )
      return state, False
  mngr.wait_until_finished()
  writer.flush()
  if step < total:
    logging.info(
      "Stopped at step %d of %d (train.max_steps_per_run); rerun the command to continue.",
      step,
      total,
    )
    return state, False
  return state, True


def stop_step(start: int, total: int, max_steps_per_run: int) -> int:
  return total if not max_steps_per_run else min(total, start + max_steps_per_run)


class Stage:
  """One trained stage: its optimizer (per `tc`, a config.train block), its checkpoints in
  WORKDIR/<name> with the run they belong to checked (train_state.check_run: a resumed run
  must be the same run), the resumed state and the steps this run takes."""

  def __init__(
    self,
    config,
    tc,
    workdir: str,
    mesh,
    *,
    num_train: int,
    global_batch: int,
    name: str = "checkpoints",
    lr_mults: Optional[Dict[str, float]] = None,
    **facts,
  ):
    self.tc, self.mesh = tc, mesh
    self.steps_per_epoch = input_pipeline.steps_per_epoch(num_train, global_batch)
    self.total = tc.epochs * self.steps_per_epoch
    self.tx = train_state.make_optimizer(tc, self.steps_per_epoch, lr_mults)
    self.mngr = train_state.checkpoint_manager(workdir, tc.checkpoint_every_steps, name=name)
    train_state.check_run(
      self.mngr, config, **facts, steps_per_epoch=self.steps_per_epoch, num_train=num_train
    )
    self.start = self.stop = 0

  @property
  def fresh(self) -> bool:
    """No checkpoint yet: the stage starts from its initial state."""
    return self.mngr.latest_step() is None

  def initial_state(
    self, params, constants: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None
  ) -> train_state.TrainState:
    """Host state at step 0 (the optimizer initialised on `params`)."""
    return train_state.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      constants=constants or {},
      extra=extra or {},
    )

  def restore(self, state: train_state.TrainState) -> train_state.TrainState:
    """`state` replicated over the mesh, then the latest checkpoint restored into it; sets
    the steps of this run (start -> stop, at most train.max_steps_per_run)."""
    state = train_state.restore_or_keep(self.mngr, distributed.replicate(state, self.mesh))
    self.start = int(distributed.to_host(state.step))
    self.stop = stop_step(self.start, self.total, self.tc.max_steps_per_run)
    return state

  def run(
    self, step_fn: Callable, state, batches: Iterable[dict], writer, **kw
  ) -> Tuple[object, bool]:
    """`run` over this stage's steps (see run for `kw`)."""
    return run(
      step_fn,
      state,
      batches,
      mesh=self.mesh,
      mngr=self.mngr,
      writer=writer,
      total=self.total,
      stop=self.stop,
      log_every=self.tc.log_every_steps,
      **kw,
    )
