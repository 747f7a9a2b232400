"""Multi-host training with two real processes on this machine: jax.distributed over localhost (CPU
collectives over gloo), 4 CPU devices each, one global 8-device mesh. `dsjax train` there gives the
losses of the same run in one process on 8 devices (fp32, rtol 1e-5), including after resuming from the
checkpoint both processes wrote together (each host's data position restored)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

RUN = ["model.num_hidden_layers=2", "seq_len=32", "batch_size=8", "log_every=1", "eval_every=1000", "eval_batches=1",
       "checkpoint_every=1000", "progress=false", "async_checkpointing=false", "lr=0.01", "warmup_steps=1",
       # a constant lr after warm-up: the run stopped at step 3 and resumed to 4 equals one run of 4 steps
       "decay_start_fraction=1.0", "decay_end_fraction=1.0", "data_shards=2"]
FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FLAGS}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _train(workdir, steps, env):
    return subprocess.Popen([sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(workdir), f"steps={steps}",
                             *RUN], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(workdir, steps):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_train(workdir, steps, _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                         JAX_PROCESS_ID=str(i))) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()  # (no-op for a finished process; never leave a half of the run waiting on the other)
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return list(map(json.loads, f))


def test_two_processes_equal_one_process_and_resume(tmp_path):
    one = tmp_path / "one"
    ref = _train(one, 4, _env(8))
    try:
        two = tmp_path / "two"
        _two_processes(two, 3)
        assert sorted(os.listdir(two / "checkpoints")) == ["3"]
        _two_processes(two, 4)  # resumes from the checkpoint at step 3 on both processes
        _, err = ref.communicate(timeout=600)
    finally:
        ref.kill()
    assert ref.returncode == 0, err[-3000:]
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose(b[-1]["eval_loss"], a[-1]["eval_loss"], rtol=1e-5)
    assert b[-1]["loss"] < b[0]["loss"]
