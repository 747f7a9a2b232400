"""Helpers that build tiny random Hugging Face DeepSeek models: the numerics oracle of the tests."""
from __future__ import annotations

import numpy as np
import torch

V3_BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
               qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
               max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
               num_nextn_predict_layers=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def randomize(model: torch.nn.Module, seed: int, std: float = 0.08, gate_std: float = 0.5, bias_std: float = 0.0):
    """Spread the weights (HF's 0.02 init makes routing ties likely) and set a random balancing bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(gate_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        if bias_std:
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(bias_std * torch.randn(b.shape, generator=g))
    return model


def build_v3(tmp_path, seed=0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(V3_BASE)
    kw.update(overrides)
    bias_std = kw.pop("bias_std", 0.05)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw, attn_implementation="eager")).eval()
    randomize(model, seed, bias_std=bias_std)
    model.save_pretrained(tmp_path)
    return model


def build_v2(tmp_path, seed=0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    kw = dict(V3_BASE)
    kw.update(q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
              norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy")
    kw.pop("num_nextn_predict_layers")
    kw.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw, attn_implementation="eager")).eval()
    randomize(model, seed)
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
