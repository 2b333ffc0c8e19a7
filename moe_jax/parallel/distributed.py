"""Multi-host runs with JAX's own multi-controller runtime (never a home-made launcher).

Every host runs the same command; `initialize_distributed` connects them (on TPU pods and SLURM /
Open MPI GPU clusters JAX detects everything itself; elsewhere pass the coordinator, process count
and this process's id). Each process then loads only its slice of every global batch
(`process_batch_slice`, or grain's `ShardOptions` from `grain_shard_options`), and
`global_batch_array` assembles the per-process pieces into one globally sharded array.

Every multi-process helper lives here: which process writes shared files (`is_lead`), waiting for
every process (`sync`), and the gathers of rows (`all_rows`: every process's host rows everywhere;
`local_rows`: this process's rows of a global array).
"""

from __future__ import annotations

from typing import Any

import grain.python as grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.parallel.mesh import BATCH_AXES


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> bool:
    """Call `jax.distributed.initialize` once, before any other JAX call, when asked to.

    `auto=True` lets JAX detect the cluster (TPU pods, SLURM, Open MPI); explicit arguments are
    for other GPU clusters. Returns whether it initialized (False: single-process run)."""
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return False
    if not auto and any(v is None for v in explicit):
        raise ValueError("multi-host: give coordinator_address, num_processes and process_id "
                         "together (or use auto detection on TPU pods / SLURM / Open MPI)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--distributed` (auto-detect) or `--coordinator_address/--num_processes/--process_id`."""
    flags.DEFINE_bool("distributed", False, "multi-host: let JAX detect the cluster (TPU pod, SLURM, "
                      "Open MPI) and connect the processes", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=flag_values)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """`initialize_distributed` from the flags of `define_distributed_flags`."""
    return initialize_distributed(flag_values.coordinator_address, flag_values.num_processes,
                                  flag_values.process_id, auto=flag_values.distributed)


def process_batch_slice(global_batch: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """The rows of a global batch this process loads: contiguous, equal shares in process order
    (the order `jax.make_array_from_process_local_data` expects for a batch-sharded array)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, {count})")
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by {count} processes. "
                         "Fix: use a global batch that is a multiple of the process count")
    per_process = global_batch // count
    return slice(index * per_process, (index + 1) * per_process)


def grain_shard_options(process_index: int | None = None, process_count: int | None = None
                        ) -> grain.ShardOptions:
    """grain sharding so that each process reads a disjoint 1/process_count of the records."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return grain.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)


def global_batch_array(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """One global array, batch-sharded over the mesh's batch axes, from each process's rows."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return jax.make_array_from_process_local_data(sharding, local_rows)


def is_lead() -> bool:
    """Whether this process writes the files every process shares (the others wait at `sync`)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all have arrived (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_rows(local: Any) -> Any:
    """A pytree of per-process host arrays (or global arrays), every process's rows concatenated in
    process order (the global batch's row order) on every process; the identity on one process."""
    return local if jax.process_count() == 1 else multihost_utils.process_allgather(local, tiled=True)


def local_rows(out: Any, mesh: Mesh) -> Any:
    """This process's rows of a pytree of batch-sharded global arrays, on the host."""
    return jax.device_get(multihost_utils.global_array_to_host_local_array(out, mesh, PartitionSpec(BATCH_AXES)))
