"""Shared tiny models for the inference tests (random init; the oracles are named in each test)."""
import numpy as np
import pytest

import dsjax
from dsjax.config import ModelConfig

# Every V3 feature at toy size: q-LoRA, 1 dense + 2 MoE layers, grouped sigmoid gate, MTP depth 1, YaRN.
# vocab 512 so the byte tokenizer fits. init_std 0.1 keeps logits peaked (no near-ties for argmax).
TINY = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                   num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                   num_nextn_predict_layers=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, init_std=0.1, moe_block_size=8,
                   rope_scaling=dsjax.config.RopeScaling(factor=4.0, original_max_position_embeddings=16,
                                                         mscale=0.707, mscale_all_dim=0.707))


@pytest.fixture(scope="session")
def tiny_model():
    return dsjax.init(TINY, seed=3)


def ragged_prompts(lengths, vocab, seed=0, low=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, n).tolist() for n in lengths]
