"""HF-layout export and import: dsjax -> sharded safetensors -> HF transformers and back, and `dsjax convert`.

Independent references: the `safetensors` library reads the files, HF transformers loads the directory
and computes the logits.
"""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import dsjax
from dsjax.config import RopeScaling, load_config

SHARD = 300_000  # bytes: the tiny model (~1.5 MB in float32) needs several shards


@pytest.fixture(scope="module")
def model():
    """configs/tiny.yaml (MoE, groups, MTP depth 1) with YaRN, larger weights, non-trivial norms and bias."""
    cfg = load_config("configs/tiny.yaml").replace(
        init_std=0.05, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128, mscale=0.707,
                                                mscale_all_dim=0.707))
    m = dsjax.init(cfg, seed=1)
    rng = np.random.default_rng(0)

    def spread(path, a):
        name = jax.tree_util.keystr(path)
        a = np.asarray(a)
        if "norm" in name:
            return (1.0 + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
        if "e_score_correction_bias" in name:
            return (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
        return a

    m.params = jax.tree_util.tree_map_with_path(spread, m.params)
    return m


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf"))
    model.save_pretrained(path, max_shard_size=SHARD)
    return path


def _assert_same(a, b):
    la, ta = jax.tree.flatten_with_path(a)
    lb, tb = jax.tree.flatten_with_path(b)
    assert ta == tb
    for (p, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(p)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(p)} differs"


def _same_config(got, want):
    """HF config.json carries the architecture, not dsjax's run-time fields (init_std, moe_impl, ...)."""
    assert got.to_hf_dict() == want.to_hf_dict()


def _keys(file):
    with safe_open(file, "np") as f:
        return set(f.keys()), f.metadata()


def _mtp_prefix(cfg):
    return f"model.layers.{cfg.num_hidden_layers}."


def test_sharded_files_index_and_metadata(model, saved):
    cfg = model.config
    files = sorted(f for f in os.listdir(saved) if f.startswith("model-"))
    n = len(files)
    assert n >= 3, files
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with open(os.path.join(saved, "model.safetensors.index.json")) as f:
        index = json.load(f)
    wm = index["weight_map"]
    total, seen = 0, {}
    for fn in files:
        keys, meta = _keys(os.path.join(saved, fn))
        assert meta == {"format": "pt"}, (fn, meta)
        with safe_open(os.path.join(saved, fn), "np") as f:
            sizes = {k: f.get_tensor(k).nbytes for k in keys}
        assert sum(sizes.values()) <= SHARD or len(keys) == 1, (fn, sum(sizes.values()))
        total += sum(sizes.values())
        seen.update({k: fn for k in keys})
    assert wm == seen  # the map is complete and right about every tensor
    assert index["metadata"]["total_size"] == total
    # the main model: every layer, embedding, norm, head; the MTP layer is NOT in the index ...
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(wm)
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in wm
    assert not any(k.startswith(_mtp_prefix(cfg)) for k in wm)
    # ... it is in mtp.safetensors, with the official names (including the embed/head copies)
    mtp_keys, meta = _keys(os.path.join(saved, "mtp.safetensors"))
    assert meta == {"format": "pt"}
    p = _mtp_prefix(cfg)
    assert {p + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                            "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                            "self_attn.kv_b_proj.weight", "mlp.experts.0.gate_proj.weight")} <= mtp_keys
    assert all(k.startswith(p) for k in mtp_keys)
    with open(os.path.join(saved, "config.json")) as f:
        hf_cfg = json.load(f)
    assert hf_cfg["architectures"] == ["DeepseekV3ForCausalLM"] and hf_cfg["rope_scaling"]["factor"] == 4.0


def test_hf_loads_with_no_missing_or_unexpected_keys_and_same_logits(model, saved):
    import torch
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(tokens)).logits.float().numpy()
    ours = model.logits(tokens)
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-4, diff
    assert float(np.abs(ref).max()) > 0.1  # the comparison is not between two near-zero tensors


def test_reload_is_bit_identical_including_mtp(model, saved):
    back = dsjax.from_pretrained(saved)
    assert back.config.num_nextn_predict_layers == 1
    _same_config(back.config, model.config)
    _assert_same(back.params, model.params)


def test_mtp_layout_index_lists_mtp_tensors(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SHARD, mtp_layout="index")
    assert not os.path.exists(tmp_path / "mtp.safetensors")
    with open(tmp_path / "model.safetensors.index.json") as f:
        wm = json.load(f)["weight_map"]
    p = _mtp_prefix(model.config)
    mtp = {k for k in wm if k.startswith(p)}
    assert {p + "eh_proj.weight", p + "shared_head.head.weight", p + "embed_tokens.weight",
            p + "mlp.experts.15.up_proj.weight"} <= mtp
    for k in mtp:
        assert k in _keys(str(tmp_path / wm[k]))[0]
    _assert_same(dsjax.from_pretrained(tmp_path).params, model.params)


def test_bfloat16_export(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=SHARD, dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    for fn in sorted(set(index["weight_map"].values())) + ["mtp.safetensors"]:
        with safe_open(str(tmp_path / fn), "pt") as f:
            for k in f.keys():
                assert str(f.get_slice(k).get_dtype()) == "BF16", (fn, k)
    back = dsjax.from_pretrained(tmp_path)
    want = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), model.params)
    _assert_same(back.params, want)
    assert index["metadata"]["total_size"] == sum(
        np.asarray(a).size * 2 for a in jax.tree.leaves({k: v for k, v in model.params.items() if k != "mtp_layers"}))


def test_cli_convert_both_directions(model, saved, tmp_path, capsys):
    from dsjax.cli import main

    native = str(tmp_path / "native")
    assert main(["convert", "--from", saved, "--to", native]) == 0
    assert os.path.exists(os.path.join(native, "dsjax_native.yaml"))
    back = dsjax.from_pretrained(native)
    _same_config(back.config, model.config)
    _assert_same(back.params, model.params)

    hf2 = str(tmp_path / "hf2")
    assert main(["convert", "--from", native, "--to", hf2, "--max-shard-size", str(SHARD)]) == 0
    assert os.path.exists(os.path.join(hf2, "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(hf2, "mtp.safetensors"))
    again = dsjax.from_pretrained(hf2)
    _same_config(again.config, model.config)
    _assert_same(again.params, model.params)
    assert "wrote hf checkpoint" in capsys.readouterr().out
