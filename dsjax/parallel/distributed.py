"""Multi-host helpers: initialise the JAX distributed runtime on pods, and per-host data slicing.

On a multi-host TPU slice every host runs the same program; `jax.distributed.initialize()` must run
before any other JAX call so each process sees all devices. On a single host (CPU, one GPU box, a
single-host TPU VM) it is skipped.
"""
from __future__ import annotations

import os

import jax

_initialized = False

# Environment variables that mark a multi-process launch (TPU pod VMs, xpk/GKE, SLURM, explicit).
_MULTI_HOST_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                   "SLURM_NTASKS")


def _is_multi_process_env(env=None) -> bool:
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:
        return int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def maybe_initialize(env=None) -> bool:
    """Call `jax.distributed.initialize()` when launched as one of several processes (TPU pod,
    multislice, SLURM, or JAX_COORDINATOR_ADDRESS set). Returns whether it initialised; idempotent."""
    global _initialized
    if _initialized:
        return True
    if not _is_multi_process_env(env):
        return False
    jax.distributed.initialize()  # reads the coordinator, process count and id from the environment
    _initialized = True
    return True


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """Process 0 writes logs, checkpoints' metadata and reports."""
    return jax.process_index() == 0


def host_batch_slice(global_batch: int) -> slice:
    """The rows of the global batch this host loads: contiguous, equal shares per process."""
    n, i = process_count(), process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch_from_host(host_arrays, mesh, global_batch: int):
    """Assemble per-host [host_batch, ...] numpy arrays into global jax.Arrays sharded like
    `dsjax.parallel.mesh.batch_sharding` (each host supplies the rows its devices own)."""
    import numpy as np

    from dsjax.parallel.mesh import batch_sharding

    sharding = batch_sharding(mesh, global_batch)
    sl = host_batch_slice(global_batch)

    def one(a):
        a = np.asarray(a)
        shape = (global_batch,) + a.shape[1:]
        return jax.make_array_from_callback(shape, sharding, lambda idx: a[_local(idx[0], sl)][(slice(None),) + tuple(idx[1:])])

    return jax.tree.map(one, host_arrays)


def _local(rows: slice, host: slice) -> slice:
    start = (rows.start or 0) - host.start
    stop = (rows.stop if rows.stop is not None else host.stop) - host.start
    if start < 0 or stop > host.stop - host.start:
        raise ValueError(f"device rows {rows} are outside this host's rows {host}: the batch sharding does not "
                         f"follow process order")
    return slice(start, stop)
