"""Dropless token permutation: group (token, expert) assignments by expert and back.

XLA on every backend (see routing.py's docstring): one stable argsort of tokens x top_k expert
ids, a row gather, a histogram. No capacity factor: every assignment keeps its row.
"""
import jax
import jax.numpy as jnp


def permute(x, topk_idx, num_experts: int):
    """Sort the rows of x by expert, one row per (token, choice) assignment.

    x [tokens, hidden], topk_idx [tokens, top_k] int.
    Returns (x_sorted [tokens*top_k, hidden], group_sizes [num_experts] int32,
    inverse [tokens*top_k] int32) where inverse[t*top_k + j] is the row of x_sorted that holds
    assignment (t, j): `x_sorted[inverse] == repeat(x, top_k)`.
    """
    tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1).astype(jnp.int32)  # [tokens*top_k]
    # Stable, so rows of one expert stay in token order (deterministic, cache-friendly gathers).
    order = jnp.argsort(flat, stable=True)  # sorted position -> assignment
    x_sorted = x[order // top_k]  # [tokens*top_k, hidden]
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    # inverse = argsort(order), done as a scatter: O(n) instead of a second sort.
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return x_sorted, group_sizes, inverse.astype(jnp.int32)


def unpermute_combine(y_sorted, inverse, topk_weights):
    """y[t] = sum_j topk_weights[t, j] * y_sorted[inverse[t*top_k + j]], summed in float32.

    y_sorted [tokens*top_k, hidden], inverse [tokens*top_k], topk_weights [tokens, top_k].
    Returns [tokens, hidden] in y_sorted's dtype.
    """
    tokens, top_k = topk_weights.shape
    y = y_sorted[inverse].reshape(tokens, top_k, -1).astype(jnp.float32)  # [tokens, top_k, hidden]
    out = jnp.einsum("tkh,tk->th", y, topk_weights.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(y_sorted.dtype)
