"""Multi-head Latent Attention (SPEC.md section 2), as pure functions over a param dict.

Params (JAX kernels are [in, out]):
  q_a_proj [hidden, q_lora], q_a_layernorm [q_lora], q_b_proj [q_lora, heads*qk_head_dim]   (q-LoRA)
  or q_proj [hidden, heads*qk_head_dim]                                                   (no q-LoRA)
  kv_a_proj_with_mqa [hidden, kv_lora + rope], kv_a_layernorm [kv_lora],
  kv_b_proj [kv_lora, heads*(nope + v)], o_proj [heads*v, hidden]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import rms_norm
from dsjax.model.rope import apply_rope


def project_q(p: dict, x: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Queries before RoPE: [batch, seq, heads, qk_head_dim]."""
    dt = x.dtype
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"].astype(dt)
    else:
        q = rms_norm(p["q_a_layernorm"], x @ p["q_a_proj"].astype(dt), cfg.rms_norm_eps) @ p["q_b_proj"].astype(dt)
    return q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)


def project_latent(p: dict, x: jnp.ndarray, cos, sin, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """What the MLA cache stores per token: normalised latent c [b, s, kv_lora] and roped key [b, s, rope]."""
    kv_a = x @ p["kv_a_proj_with_mqa"].astype(x.dtype)  # [b, s, kv_lora + rope]
    c = rms_norm(p["kv_a_layernorm"], kv_a[..., : cfg.kv_lora_rank], cfg.rms_norm_eps)
    k_pe = apply_rope(kv_a[..., None, cfg.kv_lora_rank:], cos, sin)[:, :, 0]
    return c, k_pe


def rope_query(q: jnp.ndarray, cos, sin, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Split q into (q_nope [b,s,h,nope], roped q_pe [b,s,h,rope])."""
    return q[..., : cfg.qk_nope_head_dim], apply_rope(q[..., cfg.qk_nope_head_dim:], cos, sin)


def attention_mask(seq_q: int, seq_k: int, segment_ids: jnp.ndarray | None, offset: int = 0) -> jnp.ndarray:
    """Causal mask [batch|1, 1, seq_q, seq_k], restricted to equal segment ids when packing."""
    qi = jnp.arange(seq_q)[:, None] + offset
    ki = jnp.arange(seq_k)[None, :]
    mask = (ki <= qi)[None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def _query_block(seq: int) -> int:
    """Query rows per block of the causal attention: enough blocks (<= 16) to skip most of the masked
    upper triangle, big enough to keep the matmuls efficient."""
    return max(64, -(-seq // 16))


def dot_attention(q, k, v, segment_ids, scale: float, block_q: int | None = None) -> jnp.ndarray:
    """Causal attention. q,k [b,s,h,dqk]; v [b,s,h,dv] -> [b,s,h,dv]; softmax in float32.

    Self-attention is computed per block of block_q query rows against only the keys up to the block's
    last row: the skipped keys are all masked, so the result is the full masked softmax, at about half
    the FLOPs and score memory of the [s, s] product for long rows (measured on CPU at 8x512: fwd+bwd
    343 -> 193 ms)."""
    sq, sk = q.shape[1], k.shape[1]
    block_q = block_q or _query_block(sq)
    if sq != sk or sq <= block_q:
        return _attend(q, k, v, attention_mask(sq, sk, segment_ids), scale)
    outs = []
    for i in range(0, sq, block_q):
        e = min(i + block_q, sq)
        seg = None if segment_ids is None else (segment_ids[:, i:e], segment_ids[:, :e])
        mask = _block_mask(i, e, seg)
        outs.append(_attend(q[:, i:e], k[:, :e], v[:, :e], mask, scale))
    return jnp.concatenate(outs, axis=1)


def _block_mask(start: int, end: int, seg) -> jnp.ndarray:
    """Mask [b|1, 1, end-start, end] of query rows start..end-1 over keys 0..end-1."""
    mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
    if seg is not None:
        mask = mask & (seg[0][:, :, None] == seg[1][:, None, :])[:, None]
    return mask


def _attend(q, k, v, mask, scale: float) -> jnp.ndarray:
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.astype(jnp.float32)
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def mla(p: dict, x: jnp.ndarray, cos, sin, segment_ids, cfg: ModelConfig) -> jnp.ndarray:
    """Full (non-absorbed) MLA for training and prefill. x [b, s, hidden] -> [b, s, hidden]."""
    b, s, _ = x.shape
    h = cfg.num_attention_heads
    q_nope, q_pe = rope_query(project_q(p, x, cfg), cos, sin, cfg)
    c, k_pe = project_latent(p, x, cos, sin, cfg)
    kv = (c @ p["kv_b_proj"].astype(x.dtype)).reshape(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    q = jnp.concatenate([q_nope, q_pe], axis=-1)  # [b, s, h, qk_head_dim]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (b, s, h, cfg.qk_rope_head_dim))], axis=-1)
    if cfg.attention_impl == "pallas":
        from pallas_kernels.mla import mla_attention

        o = mla_attention(q, k, v, segment_ids=segment_ids, sm_scale=cfg.softmax_scale, causal=True,
                          impl="pallas", interpret=cfg.kernel_interpret)
    else:
        o = dot_attention(q, k, v, segment_ids, cfg.softmax_scale)
    return o.reshape(b, s, h * cfg.v_head_dim) @ p["o_proj"].astype(x.dtype)
