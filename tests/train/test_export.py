"""A `dsjax train` workdir is a checkpoint: `dsjax export` writes HF safetensors from it that HF
transformers loads with the same logits, and `from_pretrained` / `dsjax generate` read it directly."""
import numpy as np
import pytest
import torch

import dsjax
from dsjax.cli import main
from dsjax.train.config import load_train_config
from dsjax.train.trainer import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    cfg = load_train_config(None, ["model.num_hidden_layers=2", "seq_len=32", "batch_size=4", "steps=2",
                                   "checkpoint_every=1", "mesh.fsdp=1", "progress=false", "async_checkpointing=false"])
    train(cfg, str(wd))
    return str(wd)


def test_export_loads_in_hf_with_the_same_logits(workdir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", "--workdir", workdir, "--out", str(out)]) == 0
    model = dsjax.from_pretrained(workdir)  # the workdir itself: its latest checkpoint
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 12))
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        hf_logits = hf.eval()(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model.logits(tokens)) - hf_logits).max() <= 1e-4
    # an earlier step differs: the trained params really moved
    assert main(["export", "--workdir", workdir, "--out", str(tmp_path / "s1"), "--step", "1"]) == 0
    assert np.abs(dsjax.from_pretrained(tmp_path / "s1").logits(tokens) - model.logits(tokens)).max() > 0


def test_generate_from_a_train_workdir(workdir, capsys):
    assert main(["generate", "--checkpoint", workdir, "--prompt", "ab", "--max-new-tokens", "3"]) == 0


def test_export_of_a_non_workdir_is_a_user_error(tmp_path, capsys):
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a dsjax training workdir" in capsys.readouterr().err
