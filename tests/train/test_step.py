"""The train step: losses against hand computations, grad accumulation, bias balancing, NaN guard."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax.model.params import init_params
from dsjax.train.balance import load_max_over_mean, update_bias
from dsjax.train.config import TrainConfig
from dsjax.train.loss import balance_loss, loss_fn
from dsjax.train.optim import lr_schedule
from dsjax.train.step import compiler_options, init_state, jit_step, make_train_step

TINY = dsjax.load_config("tiny").replace(num_hidden_layers=2)


def _batch(b=4, s=32, seed=0, vocab=TINY.vocab_size):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (b, s)).astype(np.int32)
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2
    seg[0, -3:] = 0  # padding
    pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0).astype(np.int32)
    return {"tokens": jnp.asarray(toks), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def test_lm_and_mtp_loss_match_a_hand_computation():
    params = init_params(TINY, 0)
    batch = _batch()
    _, m = loss_fn(params, batch, TINY, mtp_lambda=0.3, balance_alpha=0.0, z_loss=0.0)
    logits, aux = dsjax.forward(params, batch["tokens"], TINY, positions=batch["positions"],
                                segment_ids=batch["segment_ids"])
    toks, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])

    def ce(lg, shift):
        tot, n = 0.0, 0
        for b in range(toks.shape[0]):
            for t in range(toks.shape[1] - shift):
                if seg[b, t] != 0 and seg[b, t + shift] == seg[b, t]:
                    row = np.asarray(lg[b, t], np.float64)
                    tot += np.log(np.exp(row - row.max()).sum()) + row.max() - row[toks[b, t + shift]]
                    n += 1
        return tot / n

    np.testing.assert_allclose(float(m["lm_loss"]), ce(logits, 1), rtol=1e-5)
    np.testing.assert_allclose(float(m["mtp_loss"]), ce(aux["mtp_logits"][0], 2), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), float(m["lm_loss"]) + 0.3 * float(m["mtp_loss"]), rtol=1e-6)


def test_balance_loss_by_hand():
    # one layer, one sequence of T=2 tokens, E=4 experts, K=2
    cfg = TINY.replace(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    s = np.array([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.6, 0.4]])  # scores per token
    chosen = np.array([[1, 0, 1, 0], [0, 1, 1, 0]])  # top-2 per token
    p_norm = s / s.sum(1, keepdims=True)
    f = 4 / (2 * 2) * chosen.sum(0)
    P = p_norm.mean(0)
    want = float((f * P).sum())
    got = balance_loss(jnp.asarray(chosen.sum(0))[None, None], jnp.asarray(p_norm.sum(0))[None, None],
                       jnp.asarray([2.0]), cfg)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_bias_update_rule_by_hand():
    bias = jnp.zeros((1, 4))
    load = jnp.array([[10.0, 2.0, 4.0, 4.0]])  # mean 5
    np.testing.assert_allclose(np.asarray(update_bias(bias, load, 0.01)), [[-0.01, 0.01, 0.01, 0.01]])
    assert float(load_max_over_mean(load)) == 2.0


def test_grad_accumulation_equals_one_big_batch():
    t1 = TrainConfig(model=TINY, batch_size=4, seq_len=32, steps=10)
    t2 = dataclasses.replace(t1, grad_accum=2)
    b = _batch()
    s1, m1 = jax.jit(make_train_step(TINY, t1))(init_state(init_params(TINY, 1), t1), b)
    s2, m2 = jax.jit(make_train_step(TINY, t2))(init_state(init_params(TINY, 1), t2), b)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def test_bias_is_not_trained_by_the_optimizer_but_moves_by_its_rule():
    t = TrainConfig(model=TINY, batch_size=4, seq_len=32, steps=10, bias_gamma=0.0)
    s, _ = jax.jit(make_train_step(TINY, t))(init_state(init_params(TINY, 0), t), _batch())
    assert not np.any(np.asarray(s.params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]))
    t = dataclasses.replace(t, bias_gamma=0.01)
    s, _ = jax.jit(make_train_step(TINY, t))(init_state(init_params(TINY, 0), t), _batch())
    b = np.asarray(s.params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"])
    mag = np.abs(b).ravel()
    assert np.all(np.isclose(mag, 0.0) | np.isclose(mag, 0.01)) and np.any(b)  # exactly one gamma step
    mtp_b = np.asarray(s.params["mtp_layers"]["mlp"]["gate"]["e_score_correction_bias"])
    assert np.any(mtp_b), "the MTP block's MoE gate is balanced too"


def test_bias_balancing_reduces_a_skewed_router_load():
    """A router skewed towards experts 0-2: the sign rule evens the load out, with lr=0 (no gradients)."""
    cfg = TINY
    params = init_params(cfg, 0)
    gate = params["moe_layers"]["mlp"]["gate"]
    gate["weight"] = jax.random.normal(jax.random.key(1), gate["weight"].shape) * 0.2  # scores that differ per token
    gate["e_score_correction_bias"] = jnp.zeros_like(gate["e_score_correction_bias"]).at[:, :3].set(0.3)
    t = TrainConfig(model=cfg, batch_size=4, seq_len=32, steps=40, lr=0.0, warmup_steps=0, bias_gamma=0.01,
                    mtp_lambda=0.0)
    step = jax.jit(make_train_step(cfg, t))
    state = init_state(params, t)
    ratios = []
    for i in range(30):
        state, m = step(state, _batch(seed=i))
        ratios.append(float(m["expert_load_max_over_mean"]))
    assert ratios[0] > 2.0, ratios[0]
    assert np.mean(ratios[-8:]) < 0.65 * ratios[0], ratios


def test_non_finite_loss_leaves_state_unchanged():
    t = TrainConfig(model=TINY, batch_size=4, seq_len=32, steps=10)
    params = init_params(TINY, 0)
    params["embed_tokens"] = params["embed_tokens"].at[5].set(jnp.nan)
    b = _batch()
    b["tokens"] = b["tokens"].at[0, 0].set(5)
    state = init_state(params, t)
    new, m = jax.jit(make_train_step(TINY, t))(state, b)
    assert not bool(m["finite"])
    for a, c in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_cpu_compiler_options_keep_the_step_and_yield_to_xla_flags(monkeypatch):
    opts = compiler_options("cpu")
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert compiler_options("gpu") is None and compiler_options("tpu") is None
    t = TrainConfig(model=TINY, batch_size=4, seq_len=32, steps=10)
    state, b = init_state(init_params(TINY, 0), t), _batch()
    want = jax.jit(make_train_step(TINY, t))(state, b)
    got = jit_step(make_train_step(TINY, t))(state, b)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    compiler_options.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    try:
        assert compiler_options("cpu") is None  # the user's own setting wins
    finally:
        compiler_options.cache_clear()


def test_lr_schedule_shape():
    t = TrainConfig(model=TINY, steps=100, lr=1.0, warmup_steps=10, decay_start_fraction=0.5,
                    decay_end_fraction=0.9, final_lr_ratio=0.1)
    s = lr_schedule(t)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6
    assert float(s(10)) == 1.0 and float(s(49)) == 1.0
    assert abs(float(s(70)) - (0.1 + 0.9 * 0.5)) < 1e-3  # cosine midpoint
    assert abs(float(s(95)) - 0.1) < 1e-6
