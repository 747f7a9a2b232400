"""Each layer as a pure function against a value derived independently in the test.

References: the papers' formulas and worked numbers re-derived in numpy (YaRN, softmax scale, MLA with explicit
loops, complex-number RoPE), hand-made routing tables with their answers written out, and equalities between
paths that share no code (the four MoE expert paths, packed vs separate documents, jit vs eager).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ModelConfig, RopeScaling, load_config
from dsjax.model.layers import rms_norm
from dsjax.model.mla import mla
from dsjax.model.experts import expert_capacity
from dsjax.model.moe import moe, route
from dsjax.model.params import abstract_params
from dsjax.model.rope import apply_rope, inv_frequencies, rope_tables, yarn_correction_range
from dsjax.model.transformer import block, forward

YARN = RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
# A toy model with every V3 feature: q-LoRA, YaRN, dense + MoE layers, groups, bias, shared expert, MTP.
FWD = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=1,
                  max_position_embeddings=128, rope_scaling=YARN, init_std=0.1, moe_block_size=8)


def _params(cfg, seed=0):
    """Random params in numpy (no compile): matrices N(0, 0.1), norms 1 + N(0, 0.1), bias N(0, 0.05)."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(a.shape), a.dtype)
        if "e_score_correction_bias" in name:
            return jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(f, abstract_params(cfg))


@pytest.fixture(scope="module")
def fwd_params():
    return _params(FWD, 0)


@pytest.fixture(scope="module")
def fwd_jit():
    return jax.jit(lambda p, t, pos, seg: forward(p, t, FWD, positions=pos, segment_ids=seg))


# ----------------------------------------------------------------------------- RoPE / YaRN


def yarn_np(dim, theta, factor, orig, beta_fast, beta_slow):
    """MLA as in the DeepSeek-V2 paper, written out in float64."""
    f = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    d = lambda r: dim * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))
    low, high = max(math.floor(d(beta_fast)), 0), min(math.ceil(d(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    g = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    smooth = 1 - g
    return f / factor * (1 - smooth) + f * smooth, low, high


def test_yarn_frequencies_v3():
    cfg = load_config("configs/deepseek_v3_671b.yaml")
    want, low, high = yarn_np(64, 10000.0, 40.0, 4096, 32, 1)
    assert (low, high) == (10, 23)  # worked by hand from the YaRN formulas
    assert yarn_correction_range(cfg) == (10, 23)
    inv, att = inv_frequencies(cfg)
    assert inv.shape == (32,) and att == 1.0
    np.testing.assert_allclose(inv, want, rtol=2e-6)
    f = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:10], f[:10], rtol=2e-6)  # below low: unscaled
    np.testing.assert_allclose(inv[23:], f[23:] / 40, rtol=2e-6)  # above high: divided by the factor


def test_softmax_scale_v3():
    cfg = load_config("configs/deepseek_v3_671b.yaml")
    m = 0.1 * 1.0 * math.log(40) + 1
    assert abs(m - 1.368888) < 1e-6
    assert abs(cfg.softmax_scale - 192 ** -0.5 * m * m) < 1e-12
    assert round(cfg.softmax_scale, 6) == 0.135234
    assert FWD.replace(rope_scaling=None).softmax_scale == 12 ** -0.5


def test_yarn_attention_factor_when_mscales_differ():
    cfg = FWD.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                                               mscale_all_dim=0.707))
    _, att = inv_frequencies(cfg)
    want = (0.1 * 1.0 * math.log(4) + 1) / (0.1 * 0.707 * math.log(4) + 1)
    assert abs(att - want) < 1e-7


def test_rope_is_complex_multiplication():
    """(x[2i] + i x[2i+1]) * e^{i pos f_i}, emitted de-interleaved: [real parts | imaginary parts]."""
    rng = np.random.default_rng(0)
    b, s, h, d = 2, 5, 3, FWD.qk_rope_head_dim
    x = rng.standard_normal((b, s, h, d)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 20, 33, 100, 127]])
    f, _, _ = yarn_np(d, FWD.rope_theta, 4.0, 16, 32, 1)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * np.exp(1j * pos[:, :, None, None] * f)
    want = np.concatenate([rot.real, rot.imag], axis=-1)
    cos, sin = rope_tables(FWD, jnp.asarray(pos))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rms_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 16)).astype(np.float32) * 3
    w = rng.standard_normal(16).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(w), jnp.asarray(x), 1e-6)), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- MLA


def _np_rms(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def _np_rope(v, pos, f):
    """Interleaved pairs rotated as complex numbers, returned interleaved (the official layout)."""
    z = (v[0::2] + 1j * v[1::2]) * np.exp(1j * pos * f)
    out = np.empty_like(v)
    out[0::2], out[1::2] = z.real, z.imag
    return out


def mla_naive(p, x, pos, cfg):
    """MLA (DeepSeek-V2) for one sequence x [T, hidden], float64, explicit loops over heads and positions."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    T = x.shape[0]
    H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    rs = cfg.rope_scaling
    f, _, _ = yarn_np(dr, cfg.rope_theta, rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow)
    m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1
    scale = (dn + dr) ** -0.5 * m * m
    eps = cfg.rms_norm_eps
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]
    else:
        q = _np_rms(x @ p["q_a_proj"], p["q_a_layernorm"], eps) @ p["q_b_proj"]
    q = q.reshape(T, H, dn + dr)
    kv_a = x @ p["kv_a_proj_with_mqa"]
    c = _np_rms(kv_a[:, :r], p["kv_a_layernorm"], eps)
    k_pe = [_np_rope(kv_a[t, r:], pos[t], f) for t in range(T)]  # one rope key shared by all heads
    kv = (c @ p["kv_b_proj"]).reshape(T, H, dn + dv)
    out = np.zeros((T, H, dv))
    for h in range(H):
        for t in range(T):
            q_pe = _np_rope(q[t, h, dn:], pos[t], f)
            scores = np.array([(q[t, h, :dn] @ kv[u, h, :dn] + q_pe @ k_pe[u]) * scale for u in range(t + 1)])
            w = np.exp(scores - scores.max())
            w /= w.sum()
            out[t, h] = sum(w[u] * kv[u, h, dn:] for u in range(t + 1))
    return out.reshape(T, H * dv) @ p["o_proj"]


@pytest.mark.parametrize("q_lora", [16, None])
def test_mla_against_naive_loops(q_lora):
    cfg = FWD.replace(q_lora_rank=q_lora)
    p = _params(cfg, 3)["dense_layers"]["self_attn"]
    p = jax.tree.map(lambda a: a[0], p)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, cfg.hidden_size)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [3, 9, 10, 40, 41, 100]])
    cos, sin = rope_tables(cfg, jnp.asarray(pos))
    got = np.asarray(mla(p, jnp.asarray(x), cos, sin, None, cfg))
    for bi in range(2):
        want = mla_naive(p, x[bi].astype(np.float64), pos[bi], cfg)
        np.testing.assert_allclose(got[bi], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_q", [32, 64, None])
def test_blockwise_causal_attention_against_naive_loops(block_q):
    """dot_attention's per-query-block form (keys only up to the block) equals masked softmax by hand,
    with segment boundaries inside and across blocks and a length that is not a block multiple."""
    from dsjax.model.mla import dot_attention

    rng = np.random.default_rng(5)
    b, s, h, dqk, dv = 2, 150, 2, 6, 4
    q, k = (rng.standard_normal((b, s, h, dqk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, s, h, dv)).astype(np.float32)
    seg = np.ones((b, s), np.int32)
    seg[0, 40:] = 2
    seg[0, 97:] = 3
    seg[1, 131:] = 0  # padding tail
    got = np.asarray(dot_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg), 0.3, block_q))
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    for bi in range(b):
        for t in range(s):
            keys = [u for u in range(t + 1) if seg[bi, u] == seg[bi, t]]
            for hh in range(h):
                sc = np.array([q[bi, t, hh] @ k[bi, u, hh] * 0.3 for u in keys])
                w = np.exp(sc - sc.max())
                w /= w.sum()
                want = sum(wi * v[bi, u, hh] for wi, u in zip(w, keys))
                np.testing.assert_allclose(got[bi, t, hh], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_q", [32, None])
def test_attention_gradients_against_autodiff_of_plain_softmax(block_q):
    """dot_attention's hand-written VJP (dS = P (dP - rowsum(dO O)), per query block) equals jax's
    autodiff of a plain full masked softmax, with segments, a padding tail and a ragged last block."""
    from dsjax.model.mla import dot_attention

    rng = np.random.default_rng(6)
    b, s, h, dqk, dv = 2, 150, 2, 6, 4
    q, k = (jnp.asarray(rng.standard_normal((b, s, h, dqk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, s, h, dv)), jnp.float32)
    do = jnp.asarray(rng.standard_normal((b, s, h, dv)), jnp.float32)
    seg = np.ones((b, s), np.int32)
    seg[0, 40:] = 2
    seg[1, 131:] = 0
    seg = jnp.asarray(seg)

    def plain(q, k, v):
        sc = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        mask = (jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]) & (seg[:, None, :, None] == seg[:, None, None, :])
        w = jax.nn.softmax(jnp.where(mask, sc, -1e30), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v)

    got = jax.vjp(lambda q, k, v: dot_attention(q, k, v, seg, 0.3, block_q), q, k, v)
    want = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), got[1](do), want[1](do)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_absorbed_form_identity():
    """q_nope . (W_UK c) == (q_nope W_UK) . c, and sum_t p_t (W_UV c_t) == (sum_t p_t c_t) W_UV (fp32)."""
    cfg = FWD
    rng = np.random.default_rng(4)
    H, dn, dv, r, T = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, 7
    kv_b = jnp.asarray(rng.standard_normal((r, H * (dn + dv))), jnp.float32)  # the JAX kernel [in, out]
    c = jnp.asarray(rng.standard_normal((T, r)), jnp.float32)
    q_nope = jnp.asarray(rng.standard_normal((H, dn)), jnp.float32)
    w = kv_b.reshape(r, H, dn + dv)
    w_uk, w_uv = w[..., :dn], w[..., dn:]  # [r, H, dn], [r, H, dv]
    k_nope = jnp.einsum("tr,rhd->thd", c, w_uk)
    plain = jnp.einsum("hd,thd->ht", q_nope, k_nope)
    q_lat = jnp.einsum("hd,rhd->hr", q_nope, w_uk)  # [H, 512] in V3
    absorbed = jnp.einsum("hr,tr->ht", q_lat, c)
    np.testing.assert_allclose(absorbed, plain, rtol=1e-5, atol=1e-4)
    prob = jax.nn.softmax(plain, -1)
    o_plain = jnp.einsum("ht,thd->hd", prob, jnp.einsum("tr,rhd->thd", c, w_uv))
    o_lat = jnp.einsum("ht,tr->hr", prob, c)
    np.testing.assert_allclose(jnp.einsum("hr,rhd->hd", o_lat, w_uv), o_plain, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(plain).max()) > 1.0


# ----------------------------------------------------------------------------- gate


GATE = ModelConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=1,
                   num_key_value_heads=1, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
                   moe_intermediate_size=4, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                   norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0)
# groups {0,1} {2,3} {4,5} {6,7}; bias per expert (selection only)
BIAS = np.array([0.0, 0.0, -0.6, -0.6, -0.3, -0.3, -0.8, -0.8], np.float32)
SCORES = np.array([  # sigmoid scores s, written out; s_b = s + BIAS in the comments
    [0.90, 0.10, 0.80, 0.68, 0.20, 0.30, 0.60, 0.50],  # s_b .9 .1 | .2 .08 | -.1 0 | -.2 -.3 ; groups 1.0 .28 -.1 -.5
    [0.20, 0.25, 0.55, 0.45, 0.35, 0.05, 0.95, 0.90],  # s_b .2 .25 | -.05 -.15 | .05 -.25 | .15 .1 ; groups .45 -.2 -.2 .25
    [0.15, 0.10, 0.40, 0.35, 0.22, 0.12, 0.60, 0.70],  # s_b .15 .1 | -.2 -.25 | -.08 -.18 | -.2 -.1 ; groups .25 -.45 -.26 -.3
    [0.95, 0.90, 0.10, 0.05, 0.85, 0.20, 0.10, 0.15],  # s_b .95 .9 | -.5 -.55 | .55 -.1 | -.7 -.65 ; groups 1.85 -1.05 .45 -1.35
], np.float32)
# kept groups {0,1}, {0,3}, {0,2}, {0,2}; top-3 of s_b inside them:
PICK_BIASED = [{0, 2, 1}, {1, 0, 6}, {0, 1, 4}, {0, 1, 4}]
# Row 2: the kept experts 4, 5 have negative s_b; masking dropped groups with 0.0 (not -inf) would pick
# expert 2 (s_b 0.0 after masking > -0.08) instead of 4.
PICK_ZERO_MASK_BUG = [{0, 2, 1}, {1, 0, 6}, {0, 1, 2}, {0, 1, 4}]
# Without the bias, groups by top-2 s: row 0: 1.0 1.48 .5 1.1 -> {1,3}: 2,3,6; row 1: .45 1.0 .4 1.85 -> {1,3}: 6,7,2;
# row 2: .25 .75 .34 1.3 -> {1,3}: 7,6,2; row 3: 1.85 .15 1.05 .25 -> {0,2}: 0,1,4.
PICK_UNBIASED = [{2, 3, 6}, {6, 7, 2}, {7, 6, 2}, {0, 1, 4}]


def _route_table(cfg, scores, bias):
    """Identity gate weight and x = logit(s), so the gate's sigmoid scores are the table."""
    x = np.log(scores / (1 - scores)).astype(np.float32)
    p = {"weight": jnp.eye(cfg.n_routed_experts, dtype=jnp.float32), "e_score_correction_bias": jnp.asarray(bias)}
    w, idx, s = route(p, jnp.asarray(x), cfg)
    np.testing.assert_allclose(s, scores, atol=1e-6)
    return np.asarray(w), np.asarray(idx)


def test_group_limited_selection_hand_table():
    w, idx = _route_table(GATE, SCORES, BIAS)
    assert [set(r) for r in idx.tolist()] == PICK_BIASED
    assert PICK_ZERO_MASK_BUG[2] != PICK_BIASED[2]  # the table discriminates -inf from 0.0 masking
    # weights: unbiased scores of the chosen experts, normalised, times routed_scaling_factor
    for t in range(len(SCORES)):
        s = SCORES[t, idx[t]]
        np.testing.assert_allclose(w[t], s / s.sum() * 2.5, rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-6)


def test_bias_changes_selection_not_weights():
    wb, ib = _route_table(GATE, SCORES, BIAS)
    wu, iu = _route_table(GATE, SCORES, np.zeros(8, np.float32))
    assert [set(r) for r in iu.tolist()] == PICK_UNBIASED
    assert [set(r) for r in ib.tolist()] != [set(r) for r in iu.tolist()]
    # row 3 selects the same experts either way: identical weights (the bias never enters them)
    order_b, order_u = np.argsort(ib[3]), np.argsort(iu[3])
    np.testing.assert_array_equal(ib[3][order_b], iu[3][order_u])
    np.testing.assert_array_equal(wb[3][order_b], wu[3][order_u])


def test_no_norm_topk_prob_and_scaling_factor():
    cfg = GATE.replace(norm_topk_prob=False, routed_scaling_factor=1.5)
    w, idx = _route_table(cfg, SCORES, BIAS)
    assert [set(r) for r in idx.tolist()] == PICK_BIASED
    np.testing.assert_allclose(w, np.take_along_axis(SCORES, idx, 1) * 1.5, rtol=1e-6)


def test_v2_softmax_greedy_routing_by_hand():
    cfg = GATE.replace(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=2,
                       norm_topk_prob=False, routed_scaling_factor=1.0, n_routed_experts=6, hidden_size=6)
    logits = np.array([[1.0, 2.0, 3.0, 0.0, -1.0, 0.5],
                       [0.3, -0.2, 0.1, 2.2, 2.1, -3.0]], np.float32)
    p = {"weight": jnp.eye(6, dtype=jnp.float32), "e_score_correction_bias": jnp.zeros(6)}
    w, idx, s = route(p, jnp.asarray(logits), cfg)
    z0 = np.exp([1.0, 2.0, 3.0, 0.0, -1.0, 0.5]).sum()
    z1 = np.exp([0.3, -0.2, 0.1, 2.2, 2.1, -3.0]).sum()
    assert np.asarray(idx).tolist() == [[2, 1], [3, 4]]
    np.testing.assert_allclose(w, [[np.exp(3) / z0, np.exp(2) / z0], [np.exp(2.2) / z1, np.exp(2.1) / z1]], rtol=1e-6)
    w2, _, _ = route(p, jnp.asarray(logits), cfg.replace(norm_topk_prob=True, routed_scaling_factor=2.0))
    np.testing.assert_allclose(w2, [[2 * np.e / (np.e + 1), 2 / (np.e + 1)],
                                    [2 / (1 + np.exp(-0.1)), 2 / (1 + np.exp(0.1))]], rtol=1e-6)


# ----------------------------------------------------------------------------- MoE expert paths


def _moe_impls():
    impls = ["blocked", "ragged_dot", "dense"]
    try:
        from pallas_kernels.moe import gmm  # noqa: F401

        impls.append("pallas")
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("skewed", [True, False], ids=["blocks", "capacity"])
def test_moe_paths_agree_with_uneven_loads_and_empty_experts(skewed):
    cfg = FWD.replace(n_group=1, topk_group=1, moe_block_size=4 if skewed else 8, kernel_interpret=True)
    p = jax.tree.map(lambda a: a[0], _params(cfg, 5)["moe_layers"]["mlp"])
    # experts 6 and 7 can never win; skewed: expert 0 wins almost always (more rows than the blocked
    # path's capacity buffer holds, so it takes blocks); else loads fit the capacity buffer (one exactly).
    p["gate"]["e_score_correction_bias"] = jnp.array([0.5 if skewed else 0, 0, 0, 0, 0, 0, -10, -10], jnp.float32)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 11, cfg.hidden_size)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((2, 11, cfg.hidden_size)), jnp.float32)

    def loss(p, x, cfg):
        y, stats = moe(p, x, cfg)
        return jnp.sum(y * r), (y, stats["load"])

    results = {}
    for impl in _moe_impls():
        c = cfg.replace(moe_impl=impl)
        (_, (y, load)), grads = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, c), (0, 1), has_aux=True))(p, x)
        results[impl] = (y, grads, load)
    load = np.asarray(results["dense"][2])
    assert load[6] == load[7] == 0 and load.sum() == 44 and len(set(load[:6].tolist())) > 2, load
    cap = expert_capacity(44, cfg)
    assert (load[0] == 22 and load.max() > cap) if skewed else load.max() == cap, (load, cap)
    y_ref, g_ref, _ = results["dense"]
    assert float(jnp.abs(y_ref).max()) > 0.01
    for impl, (y, g, _) in results.items():
        np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg=impl)
        for (path, a), b in zip(jax.tree.flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{impl} grad {jax.tree_util.keystr(path)}")
    assert float(jnp.abs(g_ref[0]["experts"]["down_proj"][6:]).max()) == 0.0  # empty experts get no gradient


# ----------------------------------------------------------------------------- the stack


def test_packed_segments_equal_separate_documents(fwd_params, fwd_jit):
    rng = np.random.default_rng(7)
    docs = rng.integers(0, FWD.vocab_size, (2, 9))
    packed = docs.reshape(1, 18)
    seg = np.repeat([[1, 2]], 9, axis=1)
    pos = np.tile(np.arange(9), 2)[None]  # positions restart per document
    lp, ap = fwd_jit(fwd_params, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    ls, as_ = fwd_jit(fwd_params, jnp.asarray(docs), jnp.asarray(np.tile(np.arange(9), (2, 1))), None)
    np.testing.assert_allclose(np.asarray(lp).reshape(2, 9, -1), ls, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ap["mtp_logits"]).reshape(1, 2, 9, -1)[0], as_["mtp_logits"][0], atol=1e-5)
    np.testing.assert_allclose(ap["expert_load"], as_["expert_load"])


def test_mtp_logits_by_hand(fwd_params, fwd_jit):
    """MTP (DeepSeek-V3 report): h' = eh_proj([enorm(Emb(t+1)); hnorm(h)]), one block, logits = head(norm(h^1))."""
    p, cfg = fwd_params, FWD
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    logits, aux = fwd_jit(p, tokens, pos, None)
    h = aux["hidden"]  # the main model after its final norm
    np.testing.assert_allclose(h @ p["lm_head"], logits, atol=1e-5)
    m = jax.tree.map(lambda a: a[0], p["mtp_layers"])
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((2, 1), tokens.dtype)], axis=1)
    emb = p["embed_tokens"][nxt] * (jnp.arange(9) < 8)[None, :, None]  # no token t+1 at the end: zero
    eps = cfg.rms_norm_eps
    hp = jnp.concatenate([rms_norm(m["enorm"], emb, eps), rms_norm(m["hnorm"], h, eps)], -1) @ m["eh_proj"]
    cos, sin = rope_tables(cfg, pos)
    x, _ = block(m, hp, cos, sin, None, None, cfg, True)
    want = rms_norm(m["shared_head_norm"], x, eps) @ p["lm_head"]
    assert aux["mtp_logits"].shape == (1, 2, 9, cfg.vocab_size)
    np.testing.assert_allclose(aux["mtp_logits"][0], want, atol=1e-5)


def test_mtp_loss_gradient_reaches_mtp_params(fwd_params):
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, FWD.vocab_size, (1, 8)))
    r = jnp.asarray(np.random.default_rng(10).standard_normal((1, 1, 8, FWD.vocab_size)), jnp.float32)

    def mtp_loss(trained):  # differentiate the MTP block and the (shared) head
        return jnp.sum(forward({**fwd_params, **trained}, tokens, FWD)[1]["mtp_logits"] * r)

    g = jax.jit(jax.grad(mtp_loss))({k: fwd_params[k] for k in ("mtp_layers", "lm_head")})
    for path, a in jax.tree.flatten_with_path(g["mtp_layers"])[0]:
        name = jax.tree_util.keystr(path)
        if "e_score_correction_bias" in name:  # selection only: no gradient by design
            assert float(jnp.abs(a).max()) == 0.0
        else:
            assert float(jnp.abs(a).max()) > 0, name
    assert float(jnp.abs(g["lm_head"]).max()) > 0


def test_jit_equals_eager(fwd_params, fwd_jit):
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, FWD.vocab_size, (2, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    lj, aj = fwd_jit(fwd_params, tokens, pos, None)
    le, ae = forward(fwd_params, tokens, FWD, positions=pos)
    np.testing.assert_allclose(le, lj, atol=1e-5)
    np.testing.assert_allclose(ae["mtp_logits"], aj["mtp_logits"], atol=1e-5)


def test_scan_keeps_program_size_flat_in_depth():
    def hlo(n):
        cfg = FWD.replace(num_hidden_layers=n, first_k_dense_replace=0, num_nextn_predict_layers=0)
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return jax.jit(lambda p, t: forward(p, t, cfg)[0]).lower(abstract_params(cfg), tokens).as_text()

    two, eight = len(hlo(2)), len(hlo(8))
    assert eight <= 1.3 * two, (two, eight)


@pytest.mark.slow  # 15 s of CI: an option that only changes XLA's loop structure (CI time, 2026-11-30)
def test_scan_unroll_changes_nothing_but_speed():
    """scan_unroll=L (the stack unrolled) gives the scanned model's logits and gradients."""
    from dsjax.config import apply_overrides
    from dsjax.model.params import init_params

    cfg = load_config("tiny")
    params = init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, cfg.vocab_size)

    def loss(p, c):
        logits, _ = forward(p, tokens, c)
        return jax.nn.logsumexp(logits, -1).mean()

    ref = jax.value_and_grad(loss)(params, cfg)
    got = jax.value_and_grad(loss)(params, apply_overrides(cfg, {"scan_unroll": cfg.num_hidden_layers}))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="scan_unroll"):
        apply_overrides(cfg, {"scan_unroll": 0})
