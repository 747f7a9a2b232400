"""generate(): greedy against HF transformers' generate, speculative == greedy, prefix cache == recompute,
sampling, stop tokens, streaming, argument errors."""
import numpy as np
import pytest

import dsjax
from dsjax.config import ConfigError
from dsjax.infer import PrefixCache, generate, stream
from tests.hf_util import YARN, build_v3
from tests.infer.conftest import ragged_prompts

N = 10
LENS = (4, 9, 6)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return ragged_prompts(LENS, tiny_model.config.vocab_size, seed=5)


@pytest.fixture(scope="module")
def greedy(tiny_model, prompts):
    return generate(tiny_model, prompts, max_new_tokens=N, stop_tokens=[])


def _hf_greedy(hf, prompt, n):
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=2)
    return out[0, len(prompt):].numpy()


@pytest.mark.parametrize("case", ["qlora_yarn", pytest.param("no_qlora", marks=pytest.mark.slow)])
def test_greedy_matches_hf_generate(tmp_path, case):
    """Oracle: HF transformers' greedy generate (with its own KV cache), each prompt on its own;
    ours batched with right-padded prompts of different lengths. HF stops at eos (2) and pads with 0 —
    so do we by default."""
    kw = dict(rope_scaling=YARN) if case == "qlora_yarn" else dict(q_lora_rank=None)
    hf = build_v3(tmp_path, seed=11, **kw)
    model = dsjax.from_pretrained(tmp_path)
    prompts = ragged_prompts((5, 11, 8), model.config.vocab_size, seed=2)
    ours = model.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert ours.shape == (3, 12)
    for i, p in enumerate(prompts):
        ref = _hf_greedy(hf, p, 12)
        np.testing.assert_array_equal(ours[i, : len(ref)], ref, err_msg=f"row {i}")
        assert (ours[i, len(ref):] == 0).all()


def test_speculative_equals_greedy(tiny_model, prompts, greedy):
    out, info = generate(tiny_model, prompts, max_new_tokens=N, stop_tokens=[], speculative=True,
                         return_info=True)
    np.testing.assert_array_equal(out, greedy)
    assert info["drafted"] == info["main_forwards"] > 0
    assert 0 <= info["acceptance_rate"] <= 1 and info["tokens_per_forward"] >= 1
    print(f"MTP acceptance {info['acceptance_rate']:.2f}, tokens per main forward {info['tokens_per_forward']:.2f}")


def test_prefix_cache_equals_recompute(tiny_model, prompts, greedy):
    pc = PrefixCache(max_entries=4)
    np.testing.assert_array_equal(generate(tiny_model, prompts, max_new_tokens=N, stop_tokens=[], prefix_cache=pc),
                                  greedy)
    assert len(pc) == 3 and pc.hits == 0
    rng = np.random.default_rng(9)
    new = [prompts[1][:7] + rng.integers(3, 500, 2).tolist(),  # shares 7 tokens with a stored prompt
           prompts[0][:3] + [7],  # shares 3
           rng.integers(3, 500, 6).tolist()]  # shares nothing
    out, info = generate(tiny_model, new, max_new_tokens=N, stop_tokens=[], prefix_cache=pc, return_info=True)
    assert info["prefix_reused_tokens"] == 10 and pc.hits == 2
    np.testing.assert_array_equal(out, generate(tiny_model, new, max_new_tokens=N, stop_tokens=[]))


def test_prefix_cache_lru_and_lookup():
    pc = PrefixCache(max_entries=2)
    e = lambda n: {"moe": {"c": np.zeros((1, n, 2)), "k_pe": np.zeros((1, n, 1))}}
    pc.insert([1, 2, 3], e(3))
    pc.insert([1, 2, 4, 5], e(4))
    m, got = pc.lookup([1, 2, 4, 9])
    assert m == 3 and got["moe"]["c"].shape == (1, 3, 2)
    pc.insert([7], e(1))  # evicts the least recently used: [1, 2, 4, 5] was used last, so [1, 2, 3] goes
    assert [1, 2, 3] not in pc and [1, 2, 4, 5] in pc
    assert pc.lookup([1, 2, 4, 5, 6], max_len=2)[0] == 2
    assert pc.lookup([8, 8])[0] == 0


def test_sampling(tiny_model, prompts, greedy):
    kw = dict(max_new_tokens=N, stop_tokens=[], temperature=1.0)
    a = generate(tiny_model, prompts, seed=1, **kw)
    np.testing.assert_array_equal(a, generate(tiny_model, prompts, seed=1, **kw))  # reproducible
    assert not np.array_equal(a, generate(tiny_model, prompts, seed=2, **kw))
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(generate(tiny_model, prompts, seed=3, top_k=1, **kw), greedy)
    np.testing.assert_array_equal(generate(tiny_model, prompts, seed=3, top_p=1e-6, **kw), greedy)


def test_stop_tokens(tiny_model, prompts, greedy):
    stop = int(greedy[0, 3])
    out = generate(tiny_model, prompts, max_new_tokens=N, stop_tokens=[stop], pad_id=0)
    for i in range(len(prompts)):
        hits = np.nonzero(greedy[i] == stop)[0]
        end = hits[0] + 1 if len(hits) else N
        np.testing.assert_array_equal(out[i, :end], greedy[i, :end])
        assert (out[i, end:] == 0).all()


def test_stream_equals_generate(tiny_model, prompts, greedy):
    from dsjax.infer.generate import _options, _step_fn

    chunks = list(stream(tiny_model, prompts, max_new_tokens=N, stop_tokens=[]))
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), greedy)
    opts = _options(tiny_model.config, N, 0.0, None, None, [], False, 0, "auto", "jnp")[0]
    assert _step_fn(tiny_model.config, opts)._cache_size() == 1  # compiled once for all N steps


@pytest.mark.slow
def test_speculative_accept_path_with_oracle_drafts(tiny_model, prompts, greedy):
    """A random MTP block is rarely right, so force the accept branch: replace each draft by the true
    greedy token (rows 0 and 2) or a wrong one (row 1) and check the emitted tokens and counts."""
    from dsjax.infer.generate import _start, _step_fn

    cfg, opts, params, state, _ = _start(tiny_model, prompts, N, 0.0, None, None, 0, [], True, None, None, None,
                                         "auto", "jnp")
    step = _step_fn(cfg, opts)
    forwards = 0
    while not np.asarray(state["done"]).all():
        count = np.asarray(state["count"])
        truth = greedy[np.arange(3), np.minimum(count, N - 1)]
        draft = np.where(np.arange(3) == 1, (truth + 1) % cfg.vocab_size, truth).astype(np.int32)
        state = dict(state, draft=draft)
        state = step(params, state)
        forwards += 1
    np.testing.assert_array_equal(np.asarray(state["out"])[:, :N], greedy)
    acc = np.asarray(state["accepted"])
    assert acc[1] == 0 and acc[0] > 0 and acc[2] > 0
    assert np.asarray(state["forwards"])[0] <= (N + 1) // 2 + 1  # ~2 tokens per main forward


def test_argument_errors(tiny_model, prompts):
    with pytest.raises(ConfigError, match="max_position_embeddings 64"):
        generate(tiny_model, [[5] * 60], max_new_tokens=10)
    with pytest.raises(ConfigError, match="temperature"):
        generate(tiny_model, prompts, temperature=-1.0)
    with pytest.raises(ConfigError, match="top_p"):
        generate(tiny_model, prompts, temperature=1.0, top_p=1.5)
    with pytest.raises(ConfigError, match="greedy only"):
        generate(tiny_model, prompts, temperature=0.5, speculative=True)
    with pytest.raises(ConfigError, match="vocab_size=512"):
        generate(tiny_model, [[1, 600]])
    with pytest.raises(ConfigError, match="prompt_lengths"):
        generate(tiny_model, np.ones((2, 4), int), prompt_lengths=[4, 0])
    no_mtp = dsjax.Model(tiny_model.params, tiny_model.config.replace(num_nextn_predict_layers=0))
    with pytest.raises(ConfigError, match="num_nextn_predict_layers"):
        generate(no_mtp, prompts, speculative=True)
