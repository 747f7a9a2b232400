"""`dsjax train` end to end on the embedded default: loss falls, exact resume, kill -9 safety,
corrupt-checkpoint fallback, and the failure messages."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dsjax.config import ConfigError
from dsjax.errors import DataError
from dsjax.train.config import load_train_config
from dsjax.train.trainer import TrainingError, train

SMALL = ["model.num_hidden_layers=2", "seq_len=64", "batch_size=8", "log_every=1", "eval_every=1000", "mesh.fsdp=1",
         "progress=false"]


def _cfg(*over):
    return load_train_config(None, SMALL + list(over))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_loss_falls_and_resume_is_exact(tmp_path):
    cfg = _cfg("steps=24", "checkpoint_every=8", "lr=0.003", "warmup_steps=4")
    full = train(cfg, str(tmp_path / "full"))
    first, last = full[0]["loss"], np.mean([r["loss"] for r in full[-4:]])
    assert last < first - 1.0, (first, last)  # visibly falls within a few dozen steps
    # the same run interrupted after step 13 (between checkpoints), then started again
    part = tmp_path / "part"
    assert full[-1]["eval_loss"] > 0 and "eval_loss" not in full[-2]  # evaluated at the last step only
    train(cfg, str(part), stop_after=13)
    assert max(_losses(part)) == 13
    train(cfg, str(part))
    a, b = _losses(tmp_path / "full"), _losses(part)
    assert sorted(b) == list(range(1, 25))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]  # bit-identical on CPU


@pytest.mark.slow  # three training runs; CI's determinism check is the bit-identical resume above
def test_same_seed_same_losses_and_seed_matters(tmp_path):
    cfg = _cfg("steps=3", "checkpoint_every=100")
    l1 = [r["loss"] for r in train(cfg, str(tmp_path / "a"))]
    l2 = [r["loss"] for r in train(cfg, str(tmp_path / "b"))]
    l3 = [r["loss"] for r in train(_cfg("steps=3", "checkpoint_every=100", "seed=1"), str(tmp_path / "c"))]
    assert l1 == l2 and l1 != l3


def test_kill_9_during_async_saves_then_resume(tmp_path):
    """Checkpoint every step (async) and SIGKILL the process mid-run: a half-written save must never
    become "latest", and running again finishes the job."""
    wd = tmp_path / "run"
    args = [sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(wd), "steps=400", "checkpoint_every=1",
            "keep_checkpoints=2"] + SMALL
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics = wd / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert steps_before, "some checkpoint completed before the kill"
    cfg = _cfg("steps=" + str(max(steps_before) + 2), "checkpoint_every=1", "keep_checkpoints=2")
    rows = train(cfg, str(wd))
    assert rows and rows[-1]["step"] == max(steps_before) + 2
    assert np.isfinite(rows[-1]["loss"])


def test_nan_loss_stops_with_the_step_or_skips(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step \d+"):
        train(_cfg("steps=6", "lr=1e30", "warmup_steps=0", "checkpoint_every=100"), str(tmp_path / "a"))
    with pytest.warns(UserWarning, match=r"non-finite loss or gradient at step \d+.*skipped"):
        train(_cfg("steps=6", "lr=1e30", "warmup_steps=0", "checkpoint_every=100", "nan_policy=skip"),
              str(tmp_path / "b"))


def test_bad_config_and_data_errors_name_the_culprit(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_train_config(None, ["stepz=3"])
    with pytest.raises(ConfigError, match="model.*hidden_sise|hidden_sise"):
        load_train_config(None, ["model.hidden_sise=3"])
    with pytest.raises(ConfigError, match="mesh.widgets"):
        load_train_config(None, ["mesh.widgets=3"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt"):
        train(_cfg("steps=2", "data.source=text", f"data.paths=[{empty}]"), str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(tmp_path / "x"), "bogus=1"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "unknown config key 'bogus'" in r.stderr


def test_workdir_of_another_model_is_refused(tmp_path):
    rows = train(_cfg("steps=1", "eval_batches=0"), str(tmp_path))
    assert "eval_loss" not in rows[-1], rows  # no held-out tokens: no eval loss (not a loss of 0)
    with pytest.raises(ConfigError, match=r"changed model.hidden_size \(model.hidden_size: 64 in the workdir, 32 now\)"):
        train(_cfg("steps=1", "model.hidden_size=32"), str(tmp_path))


@pytest.mark.parametrize("key", ["model.attention_impl", "model.moe_impl"])
def test_pallas_impl_on_cpu_is_a_user_error(tmp_path, capsys, key):
    """The Pallas kernels have no CPU compiler: `dsjax train` exits 2 naming the kernel and the config
    way out (never a traceback, never a silent fall-back to the XLA path)."""
    from dsjax.cli import main

    rc = main(["train", "--workdir", str(tmp_path), f"{key}=pallas", "steps=1", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2
    assert "impl='pallas') was lowered for CPU" in err and "kernel_interpret=true" in err
