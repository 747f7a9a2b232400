"""DeepSeekMoE routing: gate scores, group-limited top-k, weights, per-expert counts.

What runs where, and why
------------------------
* Routing (this module) and permutation (`permute.py`) are plain XLA on every backend. The work is
  O(tokens x experts) elementwise plus a top-k over <= 256 experts and one argsort of
  tokens x top_k assignment ids: memory-bound, tiny next to the expert matmuls, and XLA already
  fuses it. On TPU a Pallas kernel would not help: the TensorCore has no sort or scatter unit, so
  Mosaic kernels cannot express the argsort / histogram that permutation needs, and XLA's TPU sort
  is the tool (megablox and MaxText make the same split). On GPU, XLA's top-k and sort are CUB-class
  kernels; a Triton rewrite would save one small fusion at most.
* The grouped matmuls (`gmm` forward, `gmm(dout, rhs^T)` for the lhs gradient, `tgmm` for the rhs
  gradient) are the Pallas kernels: Mosaic TPU (`tpu.py`) and Pallas Triton (`gpu.py`). On CPU
  there is no Pallas compiler, so `impl="auto"` uses XLA (`jax.lax.ragged_dot`, or the blocked
  batched-matmul path `impl="xla_blocked"`), and the Pallas kernels run only in interpret mode
  (tests).

The gate follows the DeepSeek-V3 report (DeepSeekMoE) exactly: scores in float32; `e_score_correction_bias` is added for
*selection only*; non-selected groups are masked with -inf (masking with 0.0 picks differently when
biased scores are negative); weights are the unbiased scores of the chosen experts.
"""
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    weights: jax.Array  # [tokens, top_k] float32, already times routed_scaling_factor
    indices: jax.Array  # [tokens, top_k] int32, descending biased score
    expert_counts: jax.Array  # [experts] int32: tokens routed to each expert (the load)
    scores: jax.Array  # [tokens, experts] float32 unbiased scores (for the balance loss)


def gate_logits(x, gate_weight):
    """x [tokens, hidden] @ gate_weight^T, gate_weight [experts, hidden] (HF layout), in float32."""
    return jnp.dot(x.astype(jnp.float32), gate_weight.astype(jnp.float32).T)  # [tokens, experts]


def route(
    logits,
    *,
    top_k: int,
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid",
    e_score_correction_bias: Optional[jax.Array] = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: Optional[Literal["top2_sum", "max"]] = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """Route tokens to experts from gate logits [tokens, experts].

    V3: scoring_func="sigmoid", bias given, n_group=8, topk_group=4, group score = sum of the top-2
    biased scores, norm_topk_prob=True, routed_scaling_factor=2.5. V2: scoring_func="softmax", no bias,
    greedy (n_group=1) or group-limited with group score = max. `group_score=None` picks V3's
    "top2_sum" for sigmoid and V2's "max" for softmax.
    """
    logits = logits.astype(jnp.float32)
    tokens, experts = logits.shape
    if experts % n_group:
        raise ValueError(f"route: {experts} experts do not split into n_group={n_group} groups")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if top_k > experts // n_group * topk_group:
        raise ValueError(f"route: top_k={top_k} exceeds the {experts // n_group * topk_group} "
                         "experts in the kept groups")
    if scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    elif scoring_func == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        raise ValueError(f"route: unknown scoring_func {scoring_func!r}")
    if group_score is None:
        group_score = "top2_sum" if scoring_func == "sigmoid" else "max"

    choice = scores  # [tokens, experts]: biased, for selection only
    if e_score_correction_bias is not None:
        choice = scores + e_score_correction_bias.astype(jnp.float32)[None, :]

    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(tokens, n_group, experts // n_group)
        if group_score == "top2_sum":
            gscore = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [tokens, n_group]
        elif group_score == "max":
            gscore = grouped.max(-1)
        else:
            raise ValueError(f"route: unknown group_score {group_score!r}")
        _, keep = jax.lax.top_k(gscore, topk_group)  # [tokens, topk_group]
        group_mask = jnp.zeros((tokens, n_group), bool).at[jnp.arange(tokens)[:, None], keep].set(True)
        # -inf, not 0.0: a kept expert whose biased score is negative must still beat a dropped group.
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(tokens, experts)

    _, indices = jax.lax.top_k(choice, top_k)  # [tokens, top_k]
    weights = jnp.take_along_axis(scores, indices, axis=-1)  # unbiased
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    counts = jnp.zeros((experts,), jnp.int32).at[indices.reshape(-1)].add(1)
    return Routing(weights, indices.astype(jnp.int32), counts, scores)
