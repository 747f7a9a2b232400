"""Helpers for tests that run `dsjax train` as two real processes on this machine: jax.distributed over
localhost (CPU collectives over gloo), 4 CPU devices each, one global 8-device mesh."""
import json
import os
import socket
import subprocess
import sys

from tests.train.cli_util import REPO

RUN = ["model.num_hidden_layers=2", "seq_len=32", "batch_size=8", "log_every=1", "eval_every=1000", "eval_batches=1",
       "checkpoint_every=1000", "progress=false", "async_checkpointing=false", "lr=0.01", "warmup_steps=1",
       # a constant lr after warm-up: a run stopped at step N and resumed to K equals one run of K steps
       "decay_start_fraction=1.0", "decay_end_fraction=1.0", "data_shards=2"]
FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env(devices, **extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FLAGS}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(k, None)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")  # this checkout, as cli_util.env
    e.update(extra)
    return e


def train(workdir, steps, env):
    return subprocess.Popen([sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(workdir), f"steps={steps}",
                             *RUN], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(workdir, steps):
    """Two processes of one `dsjax train` run (process 0 first)."""
    port = free_port()
    return [train(workdir, steps, env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i))) for i in range(2)]


def finish(procs, timeout=600) -> list[str]:
    """Wait for every process; assert each exited 0; return their stderr."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()  # (no-op for a finished process; never leave a half of the run waiting on the other)
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    return [err for _, err in outs]


def two_processes(workdir, steps) -> list[str]:
    return finish(start_two(workdir, steps))


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return list(map(json.loads, f))
