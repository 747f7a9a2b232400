"""MLA attention against the latent cache.

prefill_attention: the full (non-absorbed) MLA of the model core over a whole prompt, plus the cache
  entries (c, k_pe) it implies. Same numerics as `forward`.
absorbed_attention: new tokens attend to the cache with the absorbed projections (MLA, DeepSeek-V2 paper):
  q_lat = q_nope @ W_UK                        per head, [nope] -> [kv_lora_rank]
  score_t = (q_lat . c_t + q_pe . k_pe_t) * softmax_scale
  o_lat = sum_t p_t c_t;  out_head = o_lat @ W_UV;  out = o_proj(concat heads)
  Keys and values are never materialised per head; the cache stays [kv_lora_rank + rope] per token.

`decode_impl` picks who computes the single-token (T = 1) attention: "jnp" (this file, the default)
or a `pallas_kernels.mla.mla_decode` impl string ("auto", "pallas", "xla", ...). Multi-token extends
(speculative verify, prefix-cache suffix prefill) always use the jnp path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.mla import mla, project_latent, project_q, rope_query

_NEG = jnp.finfo(jnp.float32).min


def prefill_attention(p: dict, x, cos, sin, cfg: ModelConfig):
    """Full causal MLA over x [b, s, hidden] (right-padded rows are fine: causal masking keeps the
    padding out of every real position). Returns (out [b, s, hidden], {"c": [b,s,r], "k_pe": [b,s,rope]})."""
    out = mla(p, x, cos, sin, None, cfg)
    c, k_pe = project_latent(p, x, cos, sin, cfg)
    return out, {"c": c, "k_pe": k_pe}


def absorbed_weights(p: dict, cfg: ModelConfig):
    """W_UK [kv_lora, heads, nope] and W_UV [kv_lora, heads, v]: the two column blocks of kv_b_proj."""
    w = p["kv_b_proj"].reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]


def absorbed_attention(p: dict, x, cos, sin, cache_c, cache_kpe, lengths, cfg: ModelConfig,
                       decode_impl: str = "jnp"):
    """T new tokens per sequence attend to the valid cache entries and causally to each other.

    x [b, T, hidden] at positions lengths[b] + 0..T-1; cache_c [b, S, r], cache_kpe [b, S, rope] (this
    layer; entries t < lengths[b] valid). Returns (out [b, T, hidden], new entries {"c", "k_pe"} [b, T, .]).
    """
    dt = x.dtype
    b, t, _ = x.shape
    q_nope, q_pe = rope_query(project_q(p, x, cfg), cos, sin, cfg)  # [b,T,h,nope], [b,T,h,rope]
    c_new, kpe_new = project_latent(p, x, cos, sin, cfg)  # [b,T,r], [b,T,rope]
    w_uk, w_uv = absorbed_weights(p, cfg)
    q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk.astype(dt))  # [b, T, h, r]
    scale = cfg.softmax_scale
    if decode_impl != "jnp" and t == 1:
        o_lat = _kernel_decode(q_lat, q_pe, c_new, kpe_new, cache_c, cache_kpe, lengths, scale, decode_impl, cfg)
    else:
        # Scores against the cache (mask t < lengths) and against the new tokens (causal), one softmax.
        s_old = (jnp.einsum("bthr,bsr->bhts", q_lat, cache_c.astype(dt))
                 + jnp.einsum("bthe,bse->bhts", q_pe, cache_kpe.astype(dt))) * scale
        s_new = (jnp.einsum("bthr,bsr->bhts", q_lat, c_new)
                 + jnp.einsum("bthe,bse->bhts", q_pe, kpe_new)) * scale
        valid_old = jnp.arange(cache_c.shape[1])[None, :] < lengths[:, None]  # [b, S]
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, T]
        s_old = jnp.where(valid_old[:, None, None, :], s_old.astype(jnp.float32), _NEG)
        s_new = jnp.where(causal[None, None], s_new.astype(jnp.float32), _NEG)
        w = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1).astype(dt)
        s = cache_c.shape[1]
        o_lat = (jnp.einsum("bhts,bsr->bthr", w[..., :s], cache_c.astype(dt))
                 + jnp.einsum("bhts,bsr->bthr", w[..., s:], c_new))
    out = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv.astype(dt))  # [b, T, h, v]
    out = out.reshape(b, t, cfg.num_attention_heads * cfg.v_head_dim) @ p["o_proj"].astype(dt)
    return out, {"c": c_new, "k_pe": kpe_new}


def _kernel_decode(q_lat, q_pe, c_new, kpe_new, cache_c, cache_kpe, lengths, scale, impl, cfg):
    """Hook for the Pallas decode kernel: write the new entry into this layer's cache, attend to t <= lengths."""
    from pallas_kernels.mla import mla_decode

    bi = jnp.arange(q_lat.shape[0])
    cc = cache_c.at[bi, lengths].set(c_new[:, 0].astype(cache_c.dtype), mode="drop")
    ck = cache_kpe.at[bi, lengths].set(kpe_new[:, 0].astype(cache_kpe.dtype), mode="drop")
    o = mla_decode(q_lat[:, 0], q_pe[:, 0], cc, ck, lengths + 1, sm_scale=scale, impl=impl,
                   interpret=cfg.kernel_interpret)
    return o[:, None].astype(q_lat.dtype)
