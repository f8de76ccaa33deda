"""Many processes: start-up from the environment, barriers, files written once, replicated state.

Multi-controller JAX runs the same program in every process; `jax.devices()` spans all of
them. How a run finds its peers (read by `initialize_from_env`, before any computation):

  RSHASH_DISTRIBUTED=1          clusters JAX detects itself (Cloud TPU VMs, SLURM, Open MPI,
                                Kubernetes JobSets): `jax.distributed.initialize()`.
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
                                by hand, any machines; process 0 listens at the address.
  RSHASH_INIT_TIMEOUT=300       seconds to wait for the coordinator and all N processes.
  RSHASH_HEARTBEAT_TIMEOUT=60   seconds after which a silent (dead) process stops the others.
  RSHASH_BARRIER_TIMEOUT=3600   seconds a process waits for the others at a barrier.

On CPU the cross-process collectives use gloo. `launch/local.sh N ARGS` starts N processes
on one machine this way.

Rules the rest of the package follows: every process makes the same collective calls
(barriers included) in the same order, whatever it finds on disk; a shared file (generated
data, feature caches, results.json, plots, the encoder, codes files) is written by the
primary process alone, to a temporary name renamed into place, and the others wait at a
barrier before they read it. WORKDIR must therefore be one filesystem all processes see.
"""

import contextlib
import os
import socket
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from rshash_jax import errors
from rshash_jax.parallel import sharding

_barrier_count = 0


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, "")
  if not value:
    return default
  try:
    out = int(value)
  except ValueError:
    out = -1
  if out < 0:
    raise errors.InvalidInput(
      f"environment variable {name}={value!r} is invalid: expected a non-negative integer"
    )
  return out


def _wait_for_coordinator(address: str, timeout: float):
  """Polls a TCP connection to host:port; a clear error instead of XLA's abort on a timeout."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise errors.InvalidInput(f"JAX_COORDINATOR_ADDRESS={address!r} is invalid: expected host:port")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise errors.Unreachable(
          f"cannot reach the coordinator at {address} within {timeout:.0f} s ({e}); "
          "start process 0 there first, or check JAX_COORDINATOR_ADDRESS "
          "(RSHASH_INIT_TIMEOUT sets the wait)"
        ) from e
      time.sleep(0.5)


def initialize_from_env() -> bool:
  """Joins the processes named by the environment (module docstring); False if single-process."""
  if _client() is not None:  # already initialised
    return True
  address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num = os.environ.get("JAX_NUM_PROCESSES", "")
  pid = os.environ.get("JAX_PROCESS_ID", "")
  auto = os.environ.get("RSHASH_DISTRIBUTED", "") not in ("", "0")
  if not (auto or address or num or pid):
    return False
  init_timeout = _env_int("RSHASH_INIT_TIMEOUT", 300)
  kwargs = dict(
    initialization_timeout=init_timeout,
    heartbeat_timeout_seconds=_env_int("RSHASH_HEARTBEAT_TIMEOUT", 60),
  )
  if num or pid:
    missing = [
      n
      for n, v in (
        ("JAX_COORDINATOR_ADDRESS", address),
        ("JAX_NUM_PROCESSES", num),
        ("JAX_PROCESS_ID", pid),
      )
      if not v
    ]
    if missing:
      raise errors.InvalidInput(
        f"multi-process start by hand needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
        f"JAX_PROCESS_ID; missing: {', '.join(missing)}"
      )
    try:
      num_i, pid_i = int(num), int(pid)
    except ValueError:
      raise errors.InvalidInput(
        f"JAX_NUM_PROCESSES={num!r} and JAX_PROCESS_ID={pid!r} must be integers"
      ) from None
    if num_i < 1 or not 0 <= pid_i < num_i:
      raise errors.InvalidInput(f"JAX_PROCESS_ID={pid_i} must be in [0, JAX_NUM_PROCESSES={num_i})")
    kwargs.update(coordinator_address=address, num_processes=num_i, process_id=pid_i)
    if pid_i != 0:
      _wait_for_coordinator(address, init_timeout)
  # Cross-process collectives of the CPU backend (used on CPU hosts; harmless beside an
  # accelerator, whose own collectives carry the training step).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def _client():
  from jax._src import distributed as jd  # pylint: disable=g-import-not-at-top

  return jd.global_state.client


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str, timeout: Optional[float] = None):
  """All processes wait here (no-op with one). Fails with a message after the timeout."""
  global _barrier_count
  if jax.process_count() == 1:
    return
  _barrier_count += 1  # every process passes the same barriers in the same order
  timeout = timeout if timeout is not None else _env_int("RSHASH_BARRIER_TIMEOUT", 3600)
  try:
    _client().wait_at_barrier(f"rshash/{_barrier_count}/{name}", int(timeout * 1000))
  except Exception as e:  # the coordination service's error names the missing processes
    raise errors.Timeout(
      f"process {jax.process_index()}: not all {jax.process_count()} processes reached "
      f"barrier {name!r} within {timeout:.0f} s: {e}"
    ) from e


def agree(name: str, value):
  """The primary process's `value` (JSON-able), returned on every process: for decisions
  that depend on what a process sees on disk, so that all take the same branch."""
  global _barrier_count
  if jax.process_count() == 1:
    return value
  import json  # pylint: disable=g-import-not-at-top

  _barrier_count += 1
  key = f"rshash/agree/{_barrier_count}/{name}"
  if is_primary():
    _client().key_value_set(key, json.dumps(value))
    return value
  timeout = _env_int("RSHASH_BARRIER_TIMEOUT", 3600)
  try:
    return json.loads(_client().blocking_key_value_get(key, int(timeout * 1000)))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.Timeout(
      f"process {jax.process_index()}: no word from process 0 on {name!r} within "
      f"{timeout:.0f} s: {e}"
    ) from e


def on_primary(fn: Callable[[], None], name: str):
  """The primary process runs fn(); every process then meets at barrier `name`. An error of
  fn is raised on the primary after the barrier (its peers then stop with it, see
  `fail_fast`), so no process waits forever for work that failed."""
  err = None
  if is_primary():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      err = e
  barrier(name)
  if err is not None:
    raise err


def write_once(path: str, write: Callable[[str], None], name: Optional[str] = None):
  """The primary process calls write(tmp) and renames tmp to `path`; every process returns
  after the file exists. write() gets a temporary path in the same directory."""

  def write_and_rename():
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      write(tmp)
      os.replace(tmp, path)
    finally:
      with contextlib.suppress(OSError):
        if os.path.isdir(tmp):
          import shutil  # pylint: disable=g-import-not-at-top

          shutil.rmtree(tmp)
        elif os.path.exists(tmp):
          os.remove(tmp)

  on_primary(write_and_rename, name or f"write {os.path.basename(path)}")


def replicate(tree, mesh):
  """Host values (identical on every process) -> arrays replicated over `mesh`, which may
  span devices of other processes (a plain device_put of device arrays cannot)."""
  return jax.device_put(jax.device_get(tree), sharding.replicated(mesh))


def to_host(tree):
  """Replicated (possibly multi-process) arrays -> numpy, from this process's own copy."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x) if isinstance(x, jax.Array) else x

  return jax.tree.map(one, tree)


def _dead_processes() -> str:
  """'process 1 is gone' when the coordination service has lost processes, else ''."""
  try:
    n = jax.process_count()
    live = set(_client().get_live_nodes(list(range(n))))
    dead = sorted(set(range(n)) - live)
  except Exception:  # pylint: disable=broad-except
    return ""
  if not dead:
    return ""
  if len(dead) == 1:
    return f"process {dead[0]} is gone"
  return f"processes {', '.join(map(str, dead))} are gone"


def fail_fast(exc: BaseException, code: int = 1, brief: bool = False):
  """In a multi-process run, a process that fails exits at once, skipping JAX's shutdown
  barrier: its peers, waiting in a collective, are stopped within RSHASH_HEARTBEAT_TIMEOUT
  by the coordination service instead of hanging for the shutdown timeout. `brief`: an
  error in the input, reported as one line without its traceback."""
  import traceback  # pylint: disable=g-import-not-at-top

  if brief:
    msg = " ".join(str(exc).split())
    print(
      f"rshash: error: process {jax.process_index()} of {jax.process_count()}: {msg}",
      file=sys.stderr,
      flush=True,
    )
  else:
    traceback.print_exception(exc, file=sys.stderr)
    print(
      f"rshash: process {jax.process_index()} of {jax.process_count()} failed: "
      f"{type(exc).__name__}: {exc}",
      file=sys.stderr,
      flush=True,
    )
  # The coordination service knows within RSHASH_HEARTBEAT_TIMEOUT whether a peer died (if
  # it aborts this process first, its own message lists the unhealthy tasks).
  dead = _dead_processes()
  if dead:
    print(f"rshash: {dead} (no heartbeat): the cause, see its log", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access
