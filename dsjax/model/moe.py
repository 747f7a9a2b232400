"""DeepSeekMoE (SPEC.md section 3): the gate and dropless routed + shared experts.

Expert kernels are stacked: gate_proj/up_proj [experts, hidden, moe_inter], down_proj [experts, moe_inter, hidden].

Four interchangeable expert paths (`cfg.moe_impl`), all dropless and numerically equal:
  blocked     sort assignments by expert, pad each expert's rows to a multiple of `moe_block_size`,
              gather into [blocks, block, hidden] and batch-matmul with each block's expert weights.
              Work is O(tokens*top_k + experts*block): the fast path on CPU, where ragged_dot
              degenerates into a dense expansion over all experts (SPEC.md, CPU facts).
  ragged_dot  sort by expert + jax.lax.ragged_dot (the natural TPU/GPU XLA path).
  pallas      sort by expert + the grouped-matmul Pallas kernel of pallas_kernels.moe.
  dense       every expert on every token, weighted by the (mostly zero) combine matrix. A reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import swiglu, swiglu_hidden_grads, vary_together


def route(p_gate: dict, x: jnp.ndarray, cfg: ModelConfig):
    """Gate for tokens x [T, hidden] -> (weights [T, K] f32, indices [T, K] int32, scores [T, E] f32).

    Scores are computed in float32 from float32 weights, as both reference implementations do.
    `e_score_correction_bias` only steers selection; the weights are the unbiased scores.
    """
    logits = x.astype(jnp.float32) @ p_gate["weight"].astype(jnp.float32)  # [T, E]
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    t, e = scores.shape
    k = cfg.num_experts_per_tok
    if cfg.topk_method == "noaux_tc":
        choice = scores + p_gate["e_score_correction_bias"].astype(jnp.float32)
        if cfg.n_group > 1:
            grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, n_group]
            choice = _mask_groups(choice, grouped, group_scores, cfg)
        idx = jax.lax.top_k(choice, k)[1]
    elif cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
        grouped = scores.reshape(t, cfg.n_group, e // cfg.n_group)
        choice = _mask_groups(scores, grouped, grouped.max(-1), cfg)
        idx = jax.lax.top_k(choice, k)[1]
    else:  # greedy
        idx = jax.lax.top_k(scores, k)[1]
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32), scores


def _mask_groups(choice, grouped, group_scores, cfg: ModelConfig):
    """Keep the topk_group best groups; the others get -inf so they can never be chosen."""
    t, g, per = grouped.shape
    keep = jax.lax.top_k(group_scores, cfg.topk_group)[1]  # [T, topk_group]
    group_mask = jax.nn.one_hot(keep, g, dtype=jnp.int32).sum(1) > 0  # [T, n_group]; no scatter
    mask = jnp.repeat(group_mask, per, axis=1)
    return jnp.where(mask, choice, -jnp.inf)


def _sort_by_expert(idx: jnp.ndarray, num_experts: int):
    """Flatten [T, K] assignments and sort them by expert (stable)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # sorted position -> flat assignment
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, flat[order], group_sizes


def _combine(y_sorted, order, w, t: int, k: int):
    """Undo the sort and add each token's K expert outputs, weighted. y_sorted [T*K, hidden]."""
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, w.astype(y.dtype))


def _experts_dense(p, x, w, idx, cfg):
    dt = x.dtype
    t = x.shape[0]
    combine = jnp.zeros((t, cfg.n_routed_experts), jnp.float32).at[jnp.arange(t)[:, None], idx].add(w)
    g = jnp.einsum("td,edf->etf", x, p["gate_proj"].astype(dt))
    u = jnp.einsum("td,edf->etf", x, p["up_proj"].astype(dt))
    y = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, p["down_proj"].astype(dt))
    return jnp.einsum("etd,te->td", y, combine.astype(dt))


def _experts_grouped(p, x, w, idx, cfg, matmul):
    """Sort tokens by expert, run a grouped matmul `matmul(lhs, rhs, group_sizes)`, combine."""
    t, k = idx.shape
    order, _, group_sizes = _sort_by_expert(idx, cfg.n_routed_experts)
    xs = x[order // k]  # [T*K, hidden] grouped by expert
    dt = x.dtype
    g = matmul(xs, p["gate_proj"].astype(dt), group_sizes)
    u = matmul(xs, p["up_proj"].astype(dt), group_sizes)
    y = matmul(jax.nn.silu(g) * u, p["down_proj"].astype(dt), group_sizes)
    return _combine(y, order, w, t, k)


def _ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _pallas_gmm(interpret):
    from pallas_kernels.moe import gmm

    return lambda lhs, rhs, gs: gmm(lhs, rhs, gs, impl="pallas", interpret=interpret)


@jax.custom_vjp
def _take_rows(x, idx, readers):
    """x[idx] over rows (idx == len(x) reads a zero row) whose transpose is a gather too.

    readers [len(x), m]: the output rows that read each row of x (m per row; len(idx) = none).
    The plain gather's transpose is a scatter-add, which XLA:CPU runs as a serial loop; with the
    readers known (the routing is a permutation), dx is a gather and a sum instead."""
    return _gather_rows(x, idx)


def _gather_rows(x, idx):
    """x[idx] for idx in [0, len(x)], len(x) reading a zero row (appended: "fill" mode costs a select
    over the whole output)."""
    return _rows(jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)]), idx)


def _rows(x, idx):
    """x[idx] along axis 0 for indices known to be in range: no clamping or wrapping arithmetic,
    which XLA:CPU would evaluate for every element gathered."""
    dims = jax.lax.GatherDimensionNumbers(offset_dims=tuple(range(1, x.ndim)), collapsed_slice_dims=(0,),
                                          start_index_map=(0,))
    return jax.lax.gather(x, idx[:, None], dims, (1, *x.shape[1:]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _take_rows_fwd(x, idx, readers):
    return _take_rows(x, idx, readers), readers


def _take_rows_bwd(readers, g):
    return _gather_rows(g, readers.reshape(-1)).reshape(*readers.shape, -1).sum(1), None, None  # len(idx): nobody


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_mlp(wg, wu, wd, xb, block_expert, num_experts: int):
    """The experts' SwiGLU on blocks of rows: xb [blocks, block, hidden], block_expert [blocks] sorted
    (each block's expert) -> [blocks, block, hidden]."""
    return _block_mlp_fwd(wg, wu, wd, xb, block_expert, num_experts)[0]


def _block_mlp_fwd(wg, wu, wd, xb, block_expert, num_experts: int):
    wgb, wub, wdb = _rows(wg, block_expert), _rows(wu, block_expert), _rows(wd, block_expert)  # [blocks, in, out]
    g = jnp.einsum("nbd,ndf->nbf", xb, wgb)
    u = jnp.einsum("nbd,ndf->nbf", xb, wub)
    y = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, wdb)
    return y, (wgb, wub, wdb, xb, g, u, block_expert)


def _block_mlp_bwd(num_experts: int, res, dy):
    # Written out (as layers.swiglu's) so that XLA:CPU gets each product once, with no fused
    # transposed copies; the per-block weight gradients add up per expert in a sorted segment sum.
    # Expert MLP fwd+bwd at cpu_bench shapes (80 blocks of 256 rows): 120 -> 106 ms.
    wgb, wub, wdb, xb, g, u, block_expert = res
    h, dg, du = swiglu_hidden_grads(g, u, jnp.einsum("nbd,nfd->nbf", dy, wdb))
    dx = jnp.einsum("nbf,ndf->nbd", dg, wgb) + jnp.einsum("nbf,ndf->nbd", du, wub)
    per_expert = lambda a: jax.ops.segment_sum(a, block_expert, num_experts, indices_are_sorted=True)
    return (per_expert(jnp.einsum("nbd,nbf->ndf", xb, dg)), per_expert(jnp.einsum("nbd,nbf->ndf", xb, du)),
            per_expert(jnp.einsum("nbf,nbd->nfd", h, dy)), dx, None)


_block_mlp.defvjp(_block_mlp_fwd, _block_mlp_bwd)


def _experts_blocked(p, x, w, idx, cfg):
    t, k = idx.shape
    e, bs = cfg.n_routed_experts, cfg.moe_block_size
    n = t * k
    order, sorted_e, group_sizes = _sort_by_expert(idx, e)
    padded = (group_sizes + bs - 1) // bs * bs
    pad_end = jnp.cumsum(padded)
    pad_start = pad_end - padded
    start = jnp.cumsum(group_sizes) - group_sizes
    dest = pad_start[sorted_e] + (jnp.arange(n) - start[sorted_e])  # row of each sorted assignment
    num_blocks = -(-(n + e * (bs - 1)) // bs)  # static upper bound on padded blocks
    rows = num_blocks * bs
    block_expert = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(num_blocks) * bs, side="right"), e - 1)
    # Assignment a = token * k + slot. row_assign: the assignment in each padded row (n = padding);
    # assign_row: the row of each assignment. Both directions are gathers, forward and backward.
    row_assign = jnp.full((rows,), n, jnp.int32).at[dest].set(order.astype(jnp.int32))
    assign_row = jnp.zeros((n,), jnp.int32).at[order].set(dest.astype(jnp.int32))
    # Every gather index comes straight out of a scatter: XLA:CPU fuses index arithmetic into the
    # gather that reads it, and such a gather ran 7x slower on 2 threads (20480 x 256 rows, measured
    # alone: 5.4 vs 0.7 ms).
    row_token = jnp.full((rows,), t, jnp.int32).at[dest].set((order // k).astype(jnp.int32))  # t: zero row
    dt = x.dtype
    xb = _take_rows(x, row_token, assign_row.reshape(t, k)).reshape(num_blocks, bs, -1)
    weights = (p["gate_proj"].astype(dt), p["up_proj"].astype(dt), p["down_proj"].astype(dt))
    y = _block_mlp(*vary_together(*weights, xb), block_expert, e)
    yk = _take_rows(y.reshape(rows, -1), assign_row, row_assign[:, None]).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", yk, w.astype(dt))


def routed_experts(p: dict, x: jnp.ndarray, w, idx, cfg: ModelConfig) -> jnp.ndarray:
    from dsjax.parallel import expert_parallel as ep  # late: dsjax.parallel imports this module

    if ep.expert_axis_size() > 1:  # a mesh with an "expert" axis is set: tokens travel to their experts
        return ep.routed_experts_ep(p, x, w, idx, cfg)
    if cfg.moe_impl == "dense":
        return _experts_dense(p, x, w, idx, cfg)
    if cfg.moe_impl == "ragged_dot":
        return _experts_grouped(p, x, w, idx, cfg, _ragged)
    if cfg.moe_impl == "pallas":  # per device under a mesh: XLA does not partition Pallas calls
        def specs(mesh):  # experts replicated (gathered), tokens split over the batch axes
            tok = jax.sharding.PartitionSpec(ep.token_axes(mesh, x.shape[0]) or None)
            return (jax.sharding.PartitionSpec(), tok, tok, tok), tok

        fn = lambda p, x, w, idx: _experts_grouped(p, x, w, idx, cfg, _pallas_gmm(cfg.kernel_interpret))
        return ep.per_shard(fn, (p, x, w, idx), specs)
    return _experts_blocked(p, x, w, idx, cfg)


def moe(p: dict, x: jnp.ndarray, cfg: ModelConfig, token_mask: jnp.ndarray | None = None):
    """The MoE feed-forward. x [b, s, hidden] -> (y [b, s, hidden], routing statistics).

    Statistics (for balancing and logging; padding tokens excluded via token_mask [b, s]):
      load        [E]     tokens routed to each expert
      seq_count   [b, E]  per sequence, tokens choosing each expert (f_i numerator)
      seq_prob    [b, E]  per sequence, sum over tokens of s_i / sum_j s_j (P_i numerator)
    """
    b, s, d = x.shape
    x2 = x.reshape(b * s, d)
    w, idx, scores = route(p["gate"], x2, cfg)
    y = routed_experts(p["experts"], x2, w, idx, cfg)
    if cfg.n_shared_experts > 0:
        y = y + swiglu(p["shared_experts"], x2)
    m = jnp.ones((b * s,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    # one-hot sums rather than a scatter (a serial loop on XLA:CPU); top-k indices are distinct
    chosen = jax.nn.one_hot(idx, cfg.n_routed_experts, dtype=jnp.float32).sum(1)
    chosen = chosen * m[:, None]
    probs = scores / scores.sum(-1, keepdims=True) * m[:, None]
    stats = {
        "load": chosen.sum(0),
        "seq_count": chosen.reshape(b, s, -1).sum(1),
        "seq_prob": probs.reshape(b, s, -1).sum(1),
    }
    return y.reshape(b, s, d), stats
