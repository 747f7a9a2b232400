"""Multi-host helpers: initialise the JAX distributed runtime on pods, and per-host data slicing.

On a multi-host TPU slice every host runs the same program; `jax.distributed.initialize()` must run
before any other JAX call so each process sees all devices. The training engine
(dsjax.train.engine.start_runtime) calls `maybe_initialize` first thing. On a single host (CPU, one
GPU box, a single-host TPU VM) it is skipped. Any other cluster (or several CPU processes) is launched
explicitly with JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID per process.
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
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True  # an explicit launch (any platform, CPU included)
    if env.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False  # a CPU run on a TPU VM or a SLURM node: the pod's variables are not ours
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:
        return int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def initialize_args(env=None) -> dict:
    """jax.distributed.initialize's arguments: none on Cloud TPU / SLURM (JAX detects the cluster); for an
    explicit launch JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    env = os.environ if env is None else env
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        return {}
    kw = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            try:
                kw[arg] = int(env[var])
            except ValueError:
                raise ValueError(f"{var}={env[var]!r} is not an integer") from None
    return kw


def maybe_initialize(env=None) -> bool:
    """Call `jax.distributed.initialize()` when launched as one of several processes (TPU pod,
    multislice, SLURM, or JAX_COORDINATOR_ADDRESS set). Must run before anything touches a device.
    Returns whether it initialised; idempotent. CPU processes exchange collectives over gloo."""
    global _initialized
    if _initialized:
        return True
    if not _is_multi_process_env(env):
        return False
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**initialize_args(env))
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


def gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (on one process: [obj]). For host-local state
    that a checkpoint must hold for all hosts, such as each host's data-iterator positions."""
    import json

    import numpy as np

    if process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(everyone[i, :sizes[i]]).decode("utf-8")) for i in range(len(sizes))]
