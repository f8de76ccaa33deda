"""The training loop both methods share: steps, NaN guard, logging, checkpoints, preemption."""

from typing import Callable, Iterable, Optional, Tuple

import numpy as np
from absl import logging
from clu import periodic_actions

from rshash_jax import errors
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
          f"non-finite loss at step {step - len(host) + k + 1} ({detail}); lower train.lr_start or check "
          f"the data. The last good checkpoint (step {mngr.latest_step()}) in {mngr.directory} is kept.")
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in mean.items()})


def run(step_fn: Callable, state, batches: Iterable[dict], *, mesh, mngr, writer, total: int,
        stop: int, log_every: int, loss_key: str = "loss", prefix: str = "train",
        before_step: Optional[Callable] = None) -> Tuple[object, bool]:
  """Runs steps state.step -> stop (of `total`) over per-process `batches`.

  Returns (state, finished): finished is False when stopped early (max steps per run or a
  preemption signal); a checkpoint of the last step is saved either way. before_step(step,
  state) -> state runs on the host before each step (e.g. per-epoch targets).
  """
  step = int(distributed.to_host(state.step))
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_steps=log_every)
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
      _check_and_write(pending, step, writer, mngr, loss_key, prefix)  # never checkpoint unchecked steps
      pending = []
    report(step)
    if saving:
      train_state.save(mngr, state, force=True)
    if preempted:
      mngr.wait_until_finished()
      logging.warning("Preemption signal at step %d: checkpoint saved in %s, exiting.", step, mngr.directory)
      return state, False
  mngr.wait_until_finished()
  writer.flush()
  if step < total:
    logging.info("Stopped at step %d of %d (train.max_steps_per_run); rerun the command to continue.", step, total)
    return state, False
  return state, True


def stop_step(start: int, total: int, max_steps_per_run: int) -> int:
  return total if not max_steps_per_run else min(total, start + max_steps_per_run)

