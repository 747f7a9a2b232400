"""Rotary position embedding with YaRN, in DeepSeek's interleaved-pair convention.

Frequencies are computed in float32 numpy with the same operation order as HF transformers'
`_compute_yarn_parameters` (the numerics oracle), so the tables agree to the last bit.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, yarn_get_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """(low, high) of the YaRN ramp over the rope_dim/2 frequencies (V3: 10, 23)."""
    rs, dim = cfg.rope_scaling, cfg.qk_rope_head_dim
    low = _correction_dim(rs.beta_fast, dim, cfg.rope_theta, rs.original_max_position_embeddings)
    high = _correction_dim(rs.beta_slow, dim, cfg.rope_theta, rs.original_max_position_embeddings)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [rope_dim/2] (float32) and the cos/sin attention factor."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_extra, 1.0
    factor = rs.factor
    inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid a singular ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra_factor = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
    inv = (inv_inter * (1 - extra_factor) + inv_extra * extra_factor).astype(np.float32)
    if rs.attention_factor is not None:
        att = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
        att = float(yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim))
    else:
        att = yarn_get_mscale(factor)
    return inv, att


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [*positions.shape, rope_dim/2] in float32."""
    inv, att = inv_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    return jnp.cos(freqs) * att, jnp.sin(freqs) * att


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i; emit [rotated evens | rotated odds].

    x: [batch, seq, heads, rope_dim]; cos/sin: [batch, seq, rope_dim/2]. The de-interleaved output
    (HF's layout) differs from the official complex-number layout by one fixed permutation applied to
    both q and k, so attention scores are identical.
    """
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
