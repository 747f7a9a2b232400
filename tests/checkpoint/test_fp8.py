"""Import of the official FP8 release layout: float8_e4m3fn weights with float32 128x128 block scales.

The checkpoint is written here with torch + the `safetensors` library; the expected value of every
dequantised element is computed in the test as W_fp8[i, j] * scale_inv[i // 128, j // 128].
"""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dsjax
from dsjax.checkpoint.hf_names import hf_entries, hf_shape
from dsjax.config import ModelConfig
from dsjax.model.params import abstract_params

# hidden 160, MLP 200, experts 136: every matrix has a dimension > 128 that is not a multiple of 128, so the
# last block row/column of the scales covers a partial block.
CFG = ModelConfig(vocab_size=64, hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                  q_lora_rank=144, kv_lora_rank=130, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                  num_nextn_predict_layers=1, max_position_embeddings=64)
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
E4M3_MAX = 448.0


def _torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _quantise(w: np.ndarray):
    """Per 128x128 block: scale = amax/448, W_fp8 = W/scale (the official scheme)."""
    out_d, in_d = w.shape
    sb = np.zeros((-(-out_d // 128), -(-in_d // 128)), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for bi in range(sb.shape[0]):
        for bj in range(sb.shape[1]):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            sb[bi, bj] = np.float32(np.abs(blk).max() / E4M3_MAX)
            q[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] = (blk / sb[bi, bj]).astype(ml_dtypes.float8_e4m3fn)
    return q, sb


def _is_quantised(name: str) -> bool:
    """Linear weights are FP8; embeddings, norms, the gate (and its bias) and the head stay high precision."""
    return name.endswith("_proj.weight") or name.endswith("eh_proj.weight")


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    rng = np.random.default_rng(0)
    abstract = abstract_params(CFG)
    tensors, expected = {}, {}
    for e in hf_entries(CFG):
        leaf = abstract
        for k in e.path:
            leaf = leaf[k]
        shape = hf_shape(e, leaf.shape)
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0)).astype(np.float32)
        if _is_quantised(e.name):
            # make the blocks' ranges differ so a wrong block index gives a wrong value
            w = w * (1 + np.arange(shape[0])[:, None] // 128 * 7 + np.arange(shape[1])[None, :] // 128 * 3)
            q, s = _quantise(w)
            tensors[e.name], tensors[e.name + "_scale_inv"] = q, s
            i, j = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
            expected[e.name] = q.astype(np.float32) * s[i // 128, j // 128]  # W_fp8[i, j] * scale_inv[i//128, j//128]
        elif e.name.endswith("e_score_correction_bias"):
            tensors[e.name] = w  # float32 in the release
            expected[e.name] = w
        else:
            tensors[e.name] = w.astype(ml_dtypes.bfloat16)
            expected[e.name] = tensors[e.name].astype(np.float32)
    names = list(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fn, ks in shards.items():
        save_file({k: _torch(tensors[k]) for k in ks}, str(path / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in ks})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": wm}, f)
    hf_cfg = CFG.to_hf_dict()
    hf_cfg["quantization_config"] = QUANT
    hf_cfg["torch_dtype"] = "bfloat16"
    with open(path / "config.json", "w") as f:
        json.dump(hf_cfg, f)
    return path, tensors, expected


def _loaded(params, e):
    leaf = params
    for k in e.path:
        leaf = leaf[k]
    a = np.asarray(leaf)[e.index]
    return a.T if e.transpose else a


def test_fp8_checkpoint_layout_is_the_official_one(fp8_ckpt):
    _, tensors, _ = fp8_ckpt
    w = tensors["model.layers.1.mlp.experts.3.down_proj.weight"]  # [hidden 160, moe 136]
    assert w.dtype == ml_dtypes.float8_e4m3fn and w.shape == (160, 136)
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].shape == (2, 2)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 2)  # [160, 200]
    assert tensors["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape == (1, 2)  # [64, 130]
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.2.enorm.weight"):
        assert tensors[n].dtype == ml_dtypes.bfloat16, n


def test_every_tensor_dequantises_exactly(fp8_ckpt):
    path, tensors, expected = fp8_ckpt
    model = dsjax.from_pretrained(path)
    assert model.config.num_nextn_predict_layers == 1
    n_fp8 = 0
    for e in hf_entries(CFG):
        if e.copy_of_shared:
            continue
        got = _loaded(model.params, e)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[e.name], err_msg=e.name)
        n_fp8 += _is_quantised(e.name)
    assert n_fp8 > 40
    # the bf16 ones load exactly too
    np.testing.assert_array_equal(np.asarray(model.params["embed_tokens"]),
                                  tensors["model.embed_tokens.weight"].astype(np.float32))

