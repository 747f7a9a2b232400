"""Helpers for tests that run `python -m dsjax.cli` as real subprocesses."""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny default at its smallest: a step takes tens of milliseconds on a CPU.
SMALL = ["model.num_hidden_layers=2", "seq_len=64", "batch_size=8", "log_every=1", "eval_every=1000", "mesh.fsdp=1",
         "progress=false"]


def env():
    """This process's environment (same XLA flags and matmul precision, so a subprocess computes the
    same bits as an in-process run) with this checkout first on the path."""
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def train_cmd(workdir, *over):
    return [sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(workdir), *SMALL, *over]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsjax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def start(cmd):
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc, workdir, n, timeout=240):
    """Wait until WORKDIR/metrics.jsonl has `n` rows while `proc` runs; return the rows."""
    path = os.path.join(str(workdir), "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
            if len(lines) >= n:
                return [json.loads(x) for x in lines[:n]]
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} rows after {timeout}s")


def losses(workdir):
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
