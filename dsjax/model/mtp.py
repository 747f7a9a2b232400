"""Multi-token prediction (DeepSeek-V3 report, section 2.2).

Depth k (1..D) at position t predicts token t+k+1:
  h'_t = eh_proj([enorm(Emb(token_{t+k})) ; hnorm(h^{k-1}_t)])   (embedding half first, as the released
  weights are used by vLLM/SGLang), h^k = Block_k(h'), logits_k = head(shared_head_norm(h^k)).
h^0 is the main model's hidden state after its final norm. Embedding and head are the main model's.
Where token t+k does not exist in the row (or lies in another packed document) the embedding is zeroed
and the loss masks that position.
"""
from __future__ import annotations

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


def mtp_input(p: dict, e: jnp.ndarray, h_prev: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """h' = eh_proj([enorm(e) ; hnorm(h_prev)]) for the embedded next tokens e and the previous depth's
    hidden state h_prev [b, s, hidden] (cast to e's dtype) -> [b, s, hidden]."""
    cat = jnp.concatenate([rms_norm(p["enorm"], e, cfg.rms_norm_eps),
                           rms_norm(p["hnorm"], h_prev.astype(e.dtype), cfg.rms_norm_eps)], axis=-1)
    return cat @ p["eh_proj"].astype(cat.dtype)
