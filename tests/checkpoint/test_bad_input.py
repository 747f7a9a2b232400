"""Every bad input is refused with the intended error, and the message names the file and the tensor/field."""
import json
import os
import pickle
import re

import ml_dtypes
import numpy as np
import pytest

import dsjax
from dsjax.checkpoint.hf_names import hf_entries, hf_shape
from dsjax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.model.params import abstract_params

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
                  first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=8,
                  kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=0,
                  max_position_embeddings=64)
FILE = "model.safetensors"


def _tensors(cfg=CFG):
    abstract = abstract_params(cfg)
    rng = np.random.default_rng(0)
    out = {}
    for e in hf_entries(cfg):
        leaf = abstract
        for k in e.path:
            leaf = leaf[k]
        out[e.name] = rng.standard_normal(hf_shape(e, leaf.shape)).astype(np.float32)
    return out


def _write(path, tensors, hf_cfg=None, file=FILE):
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, file), list(tensors.items()), {k: v.shape for k, v in tensors.items()},
                      {k: v.dtype for k, v in tensors.items()})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg or CFG.to_hf_dict(), f)
    return os.path.join(path, file)


def _m(*parts):
    """A regex requiring every part, in order."""
    return ".*".join(re.escape(str(p)) for p in parts)


def test_valid_checkpoint_loads(tmp_path):
    _write(tmp_path, _tensors())
    assert dsjax.from_pretrained(tmp_path).config.hidden_size == 16


def test_missing_tensor(tmp_path):
    t = _tensors()
    del t["model.layers.1.mlp.experts.2.up_proj.weight"]
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(tmp_path, "missing", "model.layers.1.mlp.experts.2.up_proj.weight")):
        dsjax.from_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    t = _tensors()
    t["model.layers.1.mlp.experts.4.up_proj.weight"] = t["model.layers.1.mlp.experts.3.up_proj.weight"]
    f = _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(f, "unexpected", "model.layers.1.mlp.experts.4.up_proj.weight")):
        dsjax.from_pretrained(tmp_path)


def test_shape_disagrees_with_config(tmp_path):
    t = _tensors()
    name = "model.layers.0.self_attn.kv_b_proj.weight"  # [heads*(nope+v)=16, kv_lora=8]
    t[name] = np.zeros((16, 9), np.float32)
    f = _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(f, name, "[16, 9]", "[16, 8]")):
        dsjax.from_pretrained(tmp_path)


def test_unsupported_dtype(tmp_path):
    t = _tensors()
    name = "model.layers.0.mlp.down_proj.weight"
    t[name] = t[name].astype(np.int64)
    f = _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(f, name, "unsupported dtype", "int64")):
        dsjax.from_pretrained(tmp_path)


def test_unknown_dtype_in_header(tmp_path):
    f = _write(tmp_path, _tensors())
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["lm_head.weight"]["dtype"] = "C64"
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))
    assert len(blob) == n
    open(f, "wb").write(raw[:8] + blob + raw[8 + n:])
    with pytest.raises(CheckpointError, match=_m(f, "lm_head.weight", "unsupported dtype C64")):
        dsjax.from_pretrained(tmp_path)


def test_truncated_file(tmp_path):
    f = _write(tmp_path, _tensors())
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)  # lm_head.weight is written last
    with pytest.raises(CheckpointError, match=_m(f, "truncated", "lm_head.weight")):
        dsjax.from_pretrained(tmp_path)
    with open(f, "r+b") as fh:  # cut into the header itself
        fh.truncate(5)
    with pytest.raises(CheckpointError, match=_m(f, "truncated")):
        SafetensorsFile(f)


def test_corrupt_header(tmp_path):
    f = _write(tmp_path, _tensors())
    data = bytearray(open(f, "rb").read())
    data[:64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()  # garbage length + JSON
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=_m(f, "corrupt safetensors header")):
        dsjax.from_pretrained(tmp_path)
    # a plausible length followed by bytes that are not JSON
    data[:8] = (40).to_bytes(8, "little")
    data[8:48] = b"\xff\xfe not json at all \x00\x01" + b"#" * 19
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=_m(f, "corrupt safetensors header")):
        SafetensorsFile(f)


class _Payload:
    """Unpickling this creates the marker file: the proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_refused_never_unpickled(tmp_path, monkeypatch, name):
    import torch

    marker = tmp_path / "UNPICKLED"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(str(marker))}))
    with open(ckpt / "config.json", "w") as f:
        json.dump(CFG.to_hf_dict(), f)

    def forbidden(*a, **k):
        raise AssertionError("a pickle loader was called")

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, forbidden)
    with pytest.raises(CheckpointError, match=_m(ckpt / name, "pickle", "refused")):
        dsjax.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=_m(ckpt / name, "refused")):
        SafetensorsFile(str(ckpt / name))
    assert not marker.exists()
    monkeypatch.undo()
    pickle.loads((ckpt / name).read_bytes())  # the payload really does what the test guards against
    assert marker.exists()


def test_fp8_weight_without_scale(tmp_path):
    t = _tensors()
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    t[name] = t[name].astype(ml_dtypes.float8_e4m3fn)
    hf_cfg = CFG.to_hf_dict()
    hf_cfg["quantization_config"] = {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    f = _write(tmp_path, t, hf_cfg)
    with pytest.raises(CheckpointError, match=_m(f, name, "no", name + "_scale_inv")):
        dsjax.from_pretrained(tmp_path)


def test_fp8_scale_with_wrong_shape(tmp_path):
    t = _tensors()
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    t[name] = t[name].astype(ml_dtypes.float8_e4m3fn)
    t[name + "_scale_inv"] = np.ones((2, 1), np.float32)  # weight [8, 16] needs [1, 1]
    f = _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(f, name + "_scale_inv", "(2, 1)", "(1, 1)")):
        dsjax.from_pretrained(tmp_path)


def test_index_lists_a_missing_shard(tmp_path):
    _write(tmp_path, _tensors())
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match=_m("model.safetensors.index.json", "model-00002-of-00002.safetensors")):
        dsjax.from_pretrained(tmp_path)


def test_config_experts_not_divisible_by_groups(tmp_path):
    with pytest.raises(ConfigError, match=_m("n_routed_experts", "10", "n_group=4")):
        CFG.replace(n_routed_experts=10, n_group=4)
    hf_cfg = CFG.to_hf_dict()
    hf_cfg.update(n_routed_experts=10, n_group=4)
    _write(tmp_path, _tensors(), hf_cfg)
    with pytest.raises(ConfigError, match=_m(tmp_path / "config.json", "n_routed_experts", "n_group=4")):
        dsjax.from_pretrained(tmp_path)


def test_unknown_field_in_yaml(tmp_path):
    p = tmp_path / "model.yaml"
    p.write_text(open("configs/tiny.yaml").read() + "num_hiden_layers: 4\n")
    with pytest.raises(ConfigError, match=_m(p, "unknown", "num_hiden_layers")):
        load_config(p)


def test_info_on_missing_path_exits_2(tmp_path, capsys):
    from dsjax.cli import main

    missing = str(tmp_path / "no" / "such" / "model")
    assert main(["info", missing]) == 2
    err = capsys.readouterr().err
    assert "dsjax info: error:" in err and missing in err, err
    assert "Traceback" not in err
