"""Pure-jnp / numpy references for the MoE kernels: slow, obvious, used only as test oracles.

Each function is written to be read against the DeepSeek-V3 report (DeepSeekMoE), not to be fast: the grouped
matmuls materialise one weight matrix per row, routing loops over tokens in numpy.
"""
import numpy as np
import jax
import jax.numpy as jnp


def row_groups(group_sizes, m):
    """Group id of every row of a grouped lhs; rows past sum(group_sizes) get id == groups."""
    ends = jnp.cumsum(group_sizes)  # [groups]
    return jnp.searchsorted(ends, jnp.arange(m), side="right")  # [m] in 0..groups


def gmm_reference(lhs, rhs, group_sizes):
    """out[i] = lhs[i] @ rhs[group(i)] (f32 accumulation), zero for rows past the sum.  [m, n]"""
    m = lhs.shape[0]
    groups = rhs.shape[0]
    gid = row_groups(group_sizes, m)  # [m]
    w = rhs[jnp.minimum(gid, groups - 1)]  # [m, k, n]: one weight matrix per row
    out = jnp.einsum("mk,mkn->mn", lhs.astype(jnp.float32), w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    out = jnp.where((gid < groups)[:, None], out, 0.0)
    return out.astype(lhs.dtype)


def tgmm_reference(lhs, dout, group_sizes):
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: the rhs gradient of gmm.  [groups, k, n]"""
    groups = group_sizes.shape[0]
    gid = row_groups(group_sizes, lhs.shape[0])
    onehot = (gid[:, None] == jnp.arange(groups)[None, :]).astype(jnp.float32)  # [m, groups]
    return jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32),
                      dout.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def route_reference(logits, bias, *, top_k, n_group, topk_group, scoring_func,
                    group_score, norm_topk_prob, routed_scaling_factor):
    """Token-by-token numpy transcription of the DeepSeek-V3 report (DeepSeekMoE) (V3 gate and V2 gate).

    Returns (weights [T, k] f32, idx [T, k] int), experts of each token in descending biased score.
    """
    logits = np.asarray(logits, np.float64)
    tokens, experts = logits.shape
    per_group = experts // n_group
    weights = np.zeros((tokens, top_k), np.float64)
    idx = np.zeros((tokens, top_k), np.int64)
    for t in range(tokens):
        z = logits[t]
        if scoring_func == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-z))
        else:
            e = np.exp(z - z.max())
            s = e / e.sum()
        sb = s + (0.0 if bias is None else np.asarray(bias, np.float64))  # selection only
        gscore = []
        for g in range(n_group):
            members = sorted(sb[g * per_group:(g + 1) * per_group], reverse=True)
            gscore.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        masked = np.array([sb[e] if e // per_group in keep else -np.inf for e in range(experts)])
        chosen = sorted(range(experts), key=lambda e: -masked[e])[:top_k]
        w = s[chosen]  # the *unbiased* scores
        if norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        weights[t] = w * routed_scaling_factor
        idx[t] = chosen
    return weights, idx


def moe_combine_reference(x, topk_idx, topk_weights, expert_fn):
    """y[t] = sum_j w[t, j] * expert_fn(topk_idx[t, j], x[t]), token by token (numpy)."""
    x = np.asarray(x, np.float64)
    rows = [sum(topk_weights[t, j] * expert_fn(int(topk_idx[t, j]), x[t])
                for j in range(topk_idx.shape[1])) for t in range(x.shape[0])]
    return np.stack(rows)
