"""DeepSeekMoE (DeepSeek-V3 report, section 2.1.2): the gate and dropless routed + shared experts.

  y = sum_{e in topk} w_e * Expert_e(x) + Shared(x)

The gate (`route`) is the report's: sigmoid (V3) or softmax (V2) affinities, group-limited top-k
selection steered by `e_score_correction_bias`, weights from the unbiased scores. The routed experts
run through dsjax.model.experts (every expert on this device) or, under a mesh with an "expert" axis,
through dsjax.parallel.expert_parallel: the mesh the layer is given decides, nothing ambient.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import MLP, param
from dsjax.parallel.expert_parallel import experts_under


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


class Gate(nn.Module):
    """The router: (weights [T, K], expert indices [T, K], scores [T, E]) for tokens x [T, hidden]."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.w = {"weight": param(self, "weight", (c.hidden_size, c.n_routed_experts), ("embed", "gate_experts"), c),
                  "e_score_correction_bias": param(self, "e_score_correction_bias", (c.n_routed_experts,),
                                                   ("gate_experts",), c, "zeros")}

    def __call__(self, x):
        return route(self.w, x, self.cfg)


class RoutedExperts(nn.Module):
    """The n_routed_experts SwiGLU experts, stacked: sum_k w[t, k] * Expert_{idx[t, k]}(x_t)."""

    cfg: ModelConfig
    mesh: Any = None

    def setup(self):
        c = self.cfg
        e, d, f = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        up = lambda name: param(self, name, (e, d, f), ("experts", "expert_embed", "expert_mlp"), c)
        self.w = {"gate_proj": up("gate_proj"), "up_proj": up("up_proj"),
                  "down_proj": param(self, "down_proj", (e, f, d), ("experts", "expert_mlp", "expert_embed"), c)}

    def __call__(self, x, w, idx):
        return experts_under(self.mesh, self.cfg)(self.w, x, w, idx)


class MoE(nn.Module):
    """The MoE feed-forward. x [b, s, hidden] -> (y [b, s, hidden], routing statistics).

    Statistics (for balancing and logging; padding tokens excluded via token_mask [b, s]):
      load        [E]     tokens routed to each expert
      seq_count   [b, E]  per sequence, tokens choosing each expert (f_i numerator)
      seq_prob    [b, E]  per sequence, sum over tokens of s_i / sum_j s_j (P_i numerator)
    """

    cfg: ModelConfig
    mesh: Any = None

    def setup(self):
        c = self.cfg
        self.gate = Gate(c)
        self.experts = RoutedExperts(c, self.mesh)
        if c.n_shared_experts > 0:
            self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, c)

    def __call__(self, x, token_mask=None):
        b, s, d = x.shape
        x2 = x.reshape(b * s, d)
        w, idx, scores = self.gate(x2)
        y = self.experts(x2, w, idx)
        if self.cfg.n_shared_experts > 0:
            y = y + self.shared_experts(x2)
        return y.reshape(b, s, d), routing_stats(idx, scores, token_mask, b, self.cfg)


def routing_stats(idx, scores, token_mask, b: int, cfg: ModelConfig) -> dict:
    """MoE's statistics from indices [T, K] and scores [T, E] of T = b*s tokens (token_mask [b, s])."""
    m = jnp.ones(idx.shape[:1], jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    # one-hot sums rather than a scatter (a serial loop on XLA:CPU); top-k indices are distinct
    chosen = jax.nn.one_hot(idx, cfg.n_routed_experts, dtype=jnp.float32).sum(1)
    chosen = chosen * m[:, None]
    probs = scores / scores.sum(-1, keepdims=True) * m[:, None]
    return {"load": chosen.sum(0), "seq_count": chosen.reshape(b, -1, chosen.shape[-1]).sum(1),
            "seq_prob": probs.reshape(b, -1, probs.shape[-1]).sum(1)}


def moe(p: dict, x: jnp.ndarray, cfg: ModelConfig, token_mask: jnp.ndarray | None = None, mesh=None):
    """`MoE` as a pure function of its parameters {gate, experts, shared_experts}."""
    return MoE(cfg, mesh).apply({"params": p}, x, token_mask)
