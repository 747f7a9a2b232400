"""`dsjax train` on the 8 emulated devices with each test mesh gives the one-device losses (float32,
<= 1e-5 relative), through the trainer itself: sharded state, sharded batches and, where the mesh has an
expert axis, the expert-parallel all-to-all path."""
import json
import os

import jax
import numpy as np
import pytest

from dsjax.parallel import expert_parallel as ep
from dsjax.train.config import load_train_config
from dsjax.train.trainer import train

RUN = ["model.num_hidden_layers=2", "seq_len=32", "batch_size=8", "steps=3", "log_every=1", "eval_every=1000",
       "checkpoint_every=1000", "progress=false", "async_checkpointing=false", "lr=0.01", "warmup_steps=1"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([r["loss"] for r in map(json.loads, f)])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("one"))
    train(load_train_config(None, RUN + ["mesh.fsdp=1"]), wd)
    return _losses(wd)


# expert8 and data2xexpert2xtensor2 in the slow set for CI time: tests/parallel/test_expert_parallel.py
# checks the model's loss and gradients on both meshes; fsdp2xexpert4 keeps the trainer's path in CI.
@pytest.mark.parametrize("mesh", [
    pytest.param(["mesh.fsdp=1", "mesh.expert=8"], marks=pytest.mark.slow),
    ["mesh.fsdp=2", "mesh.expert=4"],
    pytest.param(["mesh.fsdp=1", "mesh.data=2", "mesh.expert=2", "mesh.tensor=2"], marks=pytest.mark.slow),
], ids=["expert8", "fsdp2xexpert4", "data2xexpert2xtensor2"])
def test_train_losses_equal_one_device(one_device, mesh, tmp_path, monkeypatch):
    assert len(jax.devices()) == 8
    calls = []
    orig = ep.routed_experts_ep
    monkeypatch.setattr(ep, "routed_experts_ep", lambda *a, **k: calls.append(1) or orig(*a, **k))
    train(load_train_config(None, RUN + mesh), str(tmp_path))
    got = _losses(tmp_path)
    assert calls, "the expert-parallel path was not taken"
    assert len(got) == len(one_device) == 3
    np.testing.assert_allclose(got, one_device, rtol=1e-5)
    assert got[-1] < got[0]  # and it trains
