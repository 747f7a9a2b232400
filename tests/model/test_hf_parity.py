"""dsjax logits against Hugging Face transformers' DeepseekV3/V2ForCausalLM (the independent oracle)."""
import numpy as np
import pytest

import dsjax
from tests.hf_util import YARN, build_v2, build_v3, hf_logits

TOL = 1e-4  # max |logit difference|, float32


def _tokens(vocab, batch=2, seq=40, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


V3_CASES = {
    "qlora_groups_bias_yarn": dict(rope_scaling=YARN),
    "no_qlora": dict(q_lora_rank=None),
    "qlora_no_groups": dict(n_group=1, topk_group=1, bias_std=0.0),
    "two_moe_layers_top2": dict(num_hidden_layers=4, first_k_dense_replace=2, num_experts_per_tok=2, n_group=2,
                                topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False),
}


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_v3_parity(tmp_path, case):
    hf = build_v3(tmp_path, seed=hash(case) % 1000, **V3_CASES[case])
    model = dsjax.from_pretrained(tmp_path)
    tokens = _tokens(model.config.vocab_size)
    ours, ref = model.logits(tokens), hf_logits(hf, tokens)
    diff = float(np.abs(ours - ref).max())
    print(f"{case}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL, diff


def test_v3_parity_exercises_every_expert(tmp_path):
    """The comparison above only means something if routing reaches every expert."""
    build_v3(tmp_path, seed=3, rope_scaling=YARN)
    model = dsjax.from_pretrained(tmp_path)
    _, aux = model.forward(_tokens(model.config.vocab_size))
    assert np.all(np.asarray(aux["expert_load"]) > 0), aux["expert_load"]


@pytest.mark.parametrize("case", ["greedy_yarn", "group_limited"])
def test_v2_parity(tmp_path, case):
    kw = dict(rope_scaling=YARN) if case == "greedy_yarn" else dict(topk_method="group_limited_greedy", n_group=4,
                                                                      topk_group=2)
    hf = build_v2(tmp_path, seed=7, **kw)
    model = dsjax.from_pretrained(tmp_path)
    assert model.config.scoring_func == "softmax"
    tokens = _tokens(model.config.vocab_size)
    diff = float(np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max())
    print(f"v2 {case}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL, diff


def test_v3_parity_through_the_pallas_kernels_in_interpret_mode(tmp_path):
    """The same HF comparison with MLA attention and the MoE grouped matmul running as Pallas kernels
    (the TPU kernels, in interpret mode on CPU)."""
    hf = build_v3(tmp_path, seed=11, rope_scaling=YARN, num_hidden_layers=2)
    model = dsjax.from_pretrained(tmp_path, overrides=["attention_impl=pallas", "moe_impl=pallas",
                                                       "kernel_interpret=true"])
    tokens = _tokens(model.config.vocab_size, batch=1, seq=24)
    diff = float(np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max())
    print(f"pallas interpret: max |logit diff| = {diff:.3g}")
    assert diff <= TOL, diff
