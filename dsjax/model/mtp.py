"""Multi-token prediction (SPEC.md section 4).

Depth k (1..D) at position t predicts token t+k+1:
  h'_t = eh_proj([enorm(Emb(token_{t+k})) ; hnorm(h^{k-1}_t)])   (embedding half first, as the released
  weights are used by vLLM/SGLang), h^k = Block_k(h'), logits_k = head(shared_head_norm(h^k)).
h^0 is the main model's hidden state after its final norm. Embedding and head are the main model's.
Where token t+k does not exist in the row (or lies in another packed document) the embedding is zeroed
and the loss masks that position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import rms_norm


def shifted(tokens, segment_ids, k: int):
    """tokens shifted left by k with a validity mask [b, s]: t+k inside the row and the same segment."""
    b, s = tokens.shape
    nxt = jnp.concatenate([tokens[:, k:], jnp.zeros((b, min(k, s)), tokens.dtype)], axis=1)[:, :s]
    valid = jnp.arange(s)[None, :] + k < s
    if segment_ids is not None:
        seg_next = jnp.concatenate([segment_ids[:, k:], jnp.zeros((b, min(k, s)), segment_ids.dtype)], axis=1)[:, :s]
        valid = valid & (seg_next == segment_ids) & (segment_ids != 0)
    return nxt, jnp.broadcast_to(valid, (b, s))


def mtp_forward(params, h_main, tokens, cos, sin, segment_ids, token_mask, cfg: ModelConfig) -> dict:
    from dsjax.model.transformer import block, embed, head

    h_prev = h_main
    logits, loads = [], []
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        p = jax.tree.map(lambda a: a[k - 1], params["mtp_layers"])
        nxt, valid = shifted(tokens, segment_ids, k)
        e = embed(params, nxt, cfg) * valid[..., None].astype(h_main.dtype)
        cat = jnp.concatenate([rms_norm(p["enorm"], e, cfg.rms_norm_eps),
                               rms_norm(p["hnorm"], h_prev, cfg.rms_norm_eps)], axis=-1)
        x = cat @ p["eh_proj"].astype(cat.dtype)
        x, stats = block(p, x, cos, sin, segment_ids, token_mask, cfg, cfg.mtp_is_moe)
        logits.append(head(params, rms_norm(p["shared_head_norm"], x, cfg.rms_norm_eps), cfg))
        if stats is not None:
            loads.append(stats["load"])
        h_prev = x
    out = {"mtp_logits": jnp.stack(logits)}
    if loads:
        out["mtp_expert_load"] = jnp.stack(loads)
    return out
