"""The one device mesh the project uses: a 1-D ('data',) mesh over all devices.

Training shards the batch along 'data' and replicates the state; retrieval shards
the database rows along 'data'. Axis type is Auto on purpose: under the Explicit
default of `jax.make_mesh`, pairwise expressions such as `y[:, None] == y[None, :]`
on a data-sharded batch fail to trace, and we want XLA to choose the collectives.
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rshash_jax import errors

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Returns a 1-D Auto-typed mesh named ('data',) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise errors.InvalidInput("data_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device of `mesh`."""
  return NamedSharding(mesh, P())


def sharded_rows(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading axis across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def is_local(mesh: Mesh) -> bool:
  """True when every device of `mesh` belongs to this process."""
  pi = jax.process_index()
  return all(d.process_index == pi for d in mesh.devices.flat)


def to_global(mesh, local: np.ndarray):
  """This process's rows -> one global array sharded over the mesh's 'data' axis (for a
  mesh of this process's devices alone, `local` is the whole array)."""
  return jax.make_array_from_process_local_data(sharded_rows(mesh), local)


def gather_rows(x) -> np.ndarray:
  """A data-sharded array -> the full numpy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
