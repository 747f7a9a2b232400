"""Config loading: every YAML in configs/, HF config.json (both rope spellings), overrides, errors that name the field.

References: the released DeepSeek-V3 config.json, HF transformers' DeepseekV3Config as a writer of config.json.
"""
import glob
import json
import os

import pytest
import yaml

from dsjax.config import ConfigError, ModelConfig, RopeScaling, apply_overrides, load_config

# Model configs; run configs (a `model:` section plus training/RL fields) belong to their own loaders.
CONFIGS = sorted(p for p in glob.glob("configs/*.yaml") if "model" not in yaml.safe_load(open(p)))


def test_configs_exist():
    assert {"configs/tiny.yaml", "configs/deepseek_v3_671b.yaml", "configs/deepseek_v2_lite.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_yaml_loads_and_matches_its_packaged_copy(path):
    cfg = load_config(path)
    assert isinstance(cfg, ModelConfig)
    name = os.path.basename(path)
    packaged = os.path.join("dsjax", "configs", name)
    assert os.path.exists(packaged), packaged
    assert load_config(packaged) == cfg
    assert load_config(name[: -len(".yaml")]) == cfg  # resolution by bare name uses the packaged copy


def test_v3_values_from_spec():
    c = load_config("configs/deepseek_v3_671b.yaml")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.moe_intermediate_size) == (129280, 7168, 18432, 2048)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.num_attention_heads) == (61, 3, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 1, 8, 8, 4)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.5)
    assert c.rope_scaling == RopeScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                                         mscale=1.0, mscale_all_dim=1.0)
    assert c.num_nextn_predict_layers == 1 and c.max_position_embeddings == 163840
    assert abs(c.softmax_scale - 0.135234) < 1e-6


def test_v2_lite_values_from_spec():
    c = load_config("configs/deepseek_v2_lite.yaml")
    assert c.q_lora_rank is None and c.model_type == "deepseek_v2"
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (64, 2, 6)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("softmax", "greedy", False, 1.0)
    assert c.rope_scaling.mscale == 0.707 and c.num_nextn_predict_layers == 0


def _hf_json(tmp_path, **changes):
    d = load_config("configs/tiny.yaml").to_hf_dict()
    d.pop("rope_scaling")
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None or k not in changes}
    d.update(transformers_version="5.0.0", torch_dtype="bfloat16", quantization_config={"fmt": "e4m3"})
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return p


YARN = dict(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def test_hf_rope_scaling_spelling(tmp_path):
    cfg = load_config(_hf_json(tmp_path, rope_scaling={"type": "yarn", **YARN}, rope_theta=10000.0))
    assert cfg.rope_scaling == RopeScaling(**YARN) and cfg.rope_theta == 10000.0


def test_hf_rope_parameters_spelling_with_theta_inside(tmp_path):
    d = {"rope_type": "yarn", "rope_theta": 50000.0, **YARN}
    p = _hf_json(tmp_path, rope_parameters=d, rope_theta=None)  # transformers 5 writes no top-level rope_theta
    cfg = load_config(p)
    assert cfg.rope_scaling == RopeScaling(**YARN)
    assert cfg.rope_theta == 50000.0
    # the directory form reads config.json
    assert load_config(tmp_path) == cfg


def test_hf_rope_parameters_default_type_means_no_scaling(tmp_path):
    cfg = load_config(_hf_json(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                               rope_theta=None))
    assert cfg.rope_scaling is None and cfg.rope_theta == 20000.0


def test_config_json_written_by_transformers(tmp_path):
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                          num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                          q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, rope_theta=5000.0,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    hf.save_pretrained(tmp_path)
    cfg = load_config(tmp_path / "config.json")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.n_routed_experts, cfg.q_lora_rank, cfg.rope_theta) == (100, 64, 8, 16, 5000.0)
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.mscale_all_dim == 0.707
    assert cfg.rope_scaling.original_max_position_embeddings == 64


def test_overrides():
    base = load_config("configs/tiny.yaml")
    assert base.rope_scaling is None
    cfg = apply_overrides(base, ["num_hidden_layers=5", "rope_scaling.factor=8", "q_lora_rank=null",
                                 "moe_impl=dense", "routed_scaling_factor=1.5"])
    assert cfg.num_hidden_layers == 5 and cfg.q_lora_rank is None and cfg.moe_impl == "dense"
    assert cfg.routed_scaling_factor == 1.5
    assert cfg.rope_scaling == RopeScaling(factor=8)
    v3 = load_config("configs/deepseek_v3_671b.yaml", overrides=["rope_scaling.factor=8"])
    assert v3.rope_scaling.factor == 8 and v3.rope_scaling.mscale == 1.0  # the other yarn fields are kept
    assert apply_overrides(base, {"hidden_size": 32}).hidden_size == 32


@pytest.mark.parametrize("override, field", [
    ("nonexistent_field=1", "nonexistent_field"),
    ("rope_scaling.nonexistent=1", "rope_scaling.nonexistent"),
    ("num_hidden_layers=0", "num_hidden_layers"),
    ("scoring_func=relu", "scoring_func"),
    ("n_routed_experts=10", "n_routed_experts"),
    ("topk_group=5", "topk_group"),
    ("moe_impl=magic", "moe_impl"),
    ("rope_scaling.factor=-1", "rope_scaling.factor"),
    ("qk_rope_head_dim=7", "qk_rope_head_dim"),
    ("num_key_value_heads=1", "num_key_value_heads"),
])
def test_override_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("configs/tiny.yaml", overrides=[override])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="num_hidden_layers.*key=value"):
        load_config("configs/tiny.yaml", overrides=["num_hidden_layers"])


def test_file_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match="no_such.yaml"):
        load_config(tmp_path / "no_such.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*cannot read"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*mapping"):
        load_config(bad)
    bad.write_text(open("configs/tiny.yaml").read().replace("hidden_size: 64", "hidden_size: -64"))
    with pytest.raises(ConfigError, match="bad.yaml.*hidden_size"):
        load_config(bad)
    p = _hf_json(tmp_path, rope_scaling={"type": "yarn", "factor": 4, "warp": 2})
    with pytest.raises(ConfigError, match="config.json.*warp"):
        load_config(p)


def test_combined_run_config_uses_model_section(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  " + open("configs/tiny.yaml").read().replace("\n", "\n  ") + "\ntrain: {}\n")
    assert load_config(p) == load_config("configs/tiny.yaml")
