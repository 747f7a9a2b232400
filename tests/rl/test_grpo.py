"""GRPO math against values derived by hand in this file (advantages, loss, gradient) and the closed-form
KL of a toy categorical distribution (k3)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.rl.grpo import group_advantages, grpo_loss, k3_kl, token_logprobs

LN2 = math.log(2.0)
# Jitted once: eager op-by-op dispatch (especially under grad) is slow on a shared CPU.
loss_jit = jax.jit(grpo_loss, static_argnames=("clip_eps", "beta", "aggregation"))


def test_group_advantages_by_hand():
    rewards = jnp.array([[1.0, 0.0, 0.0],     # mean 1/3, population var 2/9 -> std sqrt(2)/3
                         [2.0, 0.0, 1.0],     # mean 1,   population var 2/3 -> std sqrt(2/3)
                         [0.5, 0.5, 0.5]])    # no spread -> no signal
    want = np.array([[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)],
                     [math.sqrt(1.5), -math.sqrt(1.5), 0.0],
                     [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(group_advantages(rewards, eps=0.0)[:2], want[:2], rtol=1e-6)
    adv = group_advantages(rewards)  # default eps = 1e-6
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    assert adv.dtype == jnp.float32
    # Dr. GRPO variant: centring only.
    np.testing.assert_allclose(group_advantages(rewards, scale_by_std=False)[0], [2 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="num_prompts"):
        group_advantages(jnp.ones(6))


# Hand example: B=4 completions, T=3, clip_eps=0.2 -> clip range [0.8, 1.2].
#   row  A     mask     ratios          min(rA, clip(r)A) per token            per-seq mean
#   0   +1    1 1 1    1.0 1.5 0.9     1.0, 1.2 (clip active), 0.9             3.1/3
#   1   -1    1 1 0    0.5 1.1 (7.0)   -0.8 (clip active), -1.1                -1.9/2
#   2   +2    1 0 0    0.5             min(1.0, 1.6) = 1.0 (clip not active)   1.0
#   3   -0.5  1 1 1    1.5 1.0 1.0     min(-0.75,-0.6) = -0.75 (not active), -0.5, -0.5   -1.75/3
# sequence objective = (3.1/3 - 0.95 + 1.0 - 1.75/3) / 4 = 0.5 / 4 = 0.125
# token objective    = (3.1 - 1.9 + 1.0 - 1.75) / 9 = 0.45 / 9 = 0.05
# clip_frac = 2/9; mean ratio over the 9 tokens = 9/9 = 1.
# KL: logp_ref - logp_new = ln 2 on token (0, 0) only -> k3 = 2 - ln2 - 1 = 1 - ln2 there, 0 elsewhere.
RATIOS = np.array([[1.0, 1.5, 0.9], [0.5, 1.1, 7.0], [0.5, 1.0, 1.0], [1.5, 1.0, 1.0]])
MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
ADV = np.array([1.0, -1.0, 2.0, -0.5], np.float32)


def _logps():
    logp_old = jnp.array(np.log(np.full((4, 3), 0.3)), jnp.float32)
    logp_new = logp_old + jnp.log(jnp.array(RATIOS, jnp.float32))
    logp_ref = logp_new.at[0, 0].add(LN2)
    return logp_new, logp_old, logp_ref


@pytest.mark.parametrize("aggregation,want_objective", [("sequence", 0.125), ("token", 0.05)])
def test_grpo_loss_by_hand_no_kl(aggregation, want_objective):
    new, old, ref = _logps()
    loss, m = loss_jit(new, old, ref, ADV, MASK, clip_eps=0.2, beta=0.0, aggregation=aggregation)
    np.testing.assert_allclose(loss, -want_objective, atol=1e-6)
    np.testing.assert_allclose(m["objective"], want_objective, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 9, atol=1e-6)
    np.testing.assert_allclose(m["ratio"], 1.0, atol=1e-6)
    np.testing.assert_allclose(m["kl"], (1 - LN2) / 9, atol=1e-6)


@pytest.mark.parametrize("aggregation,want_objective", [
    ("sequence", 0.125 - 0.04 * (1 - LN2) / 3 / 4),   # the KL token is 1 of 3 in row 0, 1 of 4 rows
    ("token", 0.05 - 0.04 * (1 - LN2) / 9),
])
def test_grpo_loss_by_hand_with_kl(aggregation, want_objective):
    new, old, ref = _logps()
    loss, _ = loss_jit(new, old, ref, ADV, MASK, clip_eps=0.2, beta=0.04, aggregation=aggregation)
    np.testing.assert_allclose(loss, -want_objective, atol=1e-6)


def test_grpo_loss_jits_and_ignores_padding_rows():
    new, old, ref = _logps()
    loss, _ = loss_jit(new, old, ref, ADV, MASK)
    # An all-zero-mask row (batch padding) changes neither aggregation.
    pad = lambda x, v: jnp.concatenate([x, jnp.full((1,) + x.shape[1:], v, x.dtype)])  # noqa: E731
    for agg in ("sequence", "token"):
        a, _ = loss_jit(new, old, ref, ADV, MASK, aggregation=agg)
        b, _ = loss_jit(pad(new, -1.0), pad(old, -3.0), pad(ref, -2.0), pad(jnp.asarray(ADV), 5.0),
                         pad(jnp.asarray(MASK), 0.0), aggregation=agg)
        np.testing.assert_allclose(a, b, atol=1e-7)
    np.testing.assert_allclose(loss, grpo_loss(new, old, ref, ADV, MASK)[0], atol=1e-7)  # jit == eager
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(new, old, ref, ADV, MASK, aggregation="mean")


def test_grpo_loss_ignores_garbage_under_the_mask():
    new, old, ref = _logps()
    want_loss, _ = loss_jit(new, old, ref, ADV, MASK)
    hole = jnp.asarray(MASK) == 0
    bad_new = jnp.where(hole, -jnp.inf, new)
    bad_old = jnp.where(hole, jnp.nan, old)
    bad_ref = jnp.where(hole, 1e30, ref)
    adv = jnp.concatenate([jnp.asarray(ADV), jnp.array([jnp.nan])])
    pad = lambda x: jnp.concatenate([x, jnp.full((1, 3), jnp.nan)])  # noqa: E731
    mask = jnp.concatenate([jnp.asarray(MASK), jnp.zeros((1, 3))])
    grad = jax.jit(jax.value_and_grad(lambda x, o, r, a, m: grpo_loss(x, o, r, a, m)[0]))
    loss, g = grad(pad(bad_new), pad(bad_old), pad(bad_ref), adv, mask)
    np.testing.assert_allclose(loss, want_loss, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g[-1] == 0))
    assert bool(jnp.all(jnp.where(hole, g[:4], 0) == 0))


def test_grpo_gradient_at_ratio_one():
    # At logp_new == logp_old, beta=0, sequence aggregation: d loss / d logp_new[i, t] = -A_i / (G |o_i|)
    # on completion tokens (r = exp(logp_new - logp_old) has dr/dlogp_new = r = 1; clip is inactive), 0 elsewhere.
    rng = np.random.default_rng(0)
    logp = jnp.array(np.log(rng.uniform(0.1, 0.9, (4, 3))), jnp.float32)
    ref = logp + 0.3
    grad = jax.jit(jax.grad(lambda x, old, ref, adv, mask: grpo_loss(x, old, ref, adv, mask, beta=0.0)[0]))
    g = grad(logp, logp, ref, ADV, MASK)
    lens = MASK.sum(1, keepdims=True)
    np.testing.assert_allclose(g, -ADV[:, None] / (4 * lens) * MASK, atol=1e-7)
    # Single completion: exactly -A/|o|.
    g1 = grad(logp[:1], logp[:1], ref[:1], ADV[:1], MASK[:1])
    np.testing.assert_allclose(g1, -ADV[0] / 3 * MASK[:1], atol=1e-7)
    # End to end: at ratio 1, beta 0, the sequence objective is mean(A) = 0 for group-normalised A.
    adv = group_advantages(jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0]])).reshape(-1)
    x = jnp.zeros((6, 2))
    np.testing.assert_allclose(loss_jit(x, x, x, adv, jnp.ones((6, 2)), beta=0.0)[0], 0.0, atol=1e-6)


def test_k3_expectation_is_kl_on_categorical():
    p = np.array([0.5, 0.3, 0.2])      # policy
    q = np.array([0.2, 0.5, 0.3])      # reference
    kl_closed = float(np.sum(p * np.log(p / q)))  # KL(p || q)
    k3 = np.asarray(k3_kl(jnp.log(jnp.array(p)), jnp.log(jnp.array(q))), np.float64)
    # sum_x p (q/p - log(q/p) - 1) = sum q - 1 + sum p log(p/q) = KL(p||q) exactly.
    np.testing.assert_allclose(np.sum(p * k3), kl_closed, rtol=1e-6)
    assert np.all(k3 >= 0)
    # k3 >= 0 everywhere, = 0 iff the log-probs agree.
    grid = jnp.linspace(-20.0, 5.0, 101)
    vals = k3_kl(grid[:, None], grid[None, :])
    assert bool(jnp.all(vals >= 0))
    np.testing.assert_allclose(jnp.diag(vals), 0.0, atol=1e-7)


def test_token_logprobs_vs_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    tokens = rng.integers(0, 7, (2, 3))
    z = logits.astype(np.float64)
    want = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(want, tokens[..., None], -1)[..., 0]
    got = token_logprobs(jnp.array(logits, jnp.bfloat16).astype(jnp.float32), jnp.array(tokens))
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(token_logprobs(logits, tokens), want, atol=1e-5)
