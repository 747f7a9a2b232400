"""Pure-jnp MLA attention: the numerics oracle for the Pallas kernels and the CPU path.

Everything is computed in float32 and cast back to the query dtype, so the kernels (which also
accumulate in float32) can be compared against it with tight tolerances.
"""
import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row then gives a finite (ignored) value instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_len, kv_len, segment_ids=None, causal=True):
    """Boolean [batch or 1, q_len, kv_len] mask: True where query i may attend to key j."""
    qi = jnp.arange(q_len)[:, None]
    kj = jnp.arange(kv_len)[None, :]
    mask = (qi >= kj) if causal else jnp.ones((q_len, kv_len), bool)
    mask = mask[None]
    if segment_ids is not None:  # [batch, seq]
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def mla_attention(q, k, v, *, segment_ids=None, sm_scale=None, causal=True):
    """softmax(q k^T * sm_scale, masked) v per head.

    q, k: [batch, seq, heads, qk_dim]; v: [batch, seq, heads, v_dim];
    segment_ids: [batch, seq] int32 or None. Returns [batch, seq, heads, v_dim] in q.dtype.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    mask = attention_mask(q.shape[1], k.shape[1], segment_ids, causal)  # [b|1, q, k]
    s = jnp.where(mask[:, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return o.astype(q.dtype)


def gather_pages(cache, page_table):
    """Paged cache [num_pages, page_size, dim] + page_table [batch, pages] -> [batch, pages*page_size, dim]."""
    pages = cache[page_table]  # [batch, pages_per_seq, page_size, dim]
    return pages.reshape(pages.shape[0], -1, pages.shape[-1])


def mla_decode(q_latent, q_pe, latent_cache, rope_cache, lengths, *, sm_scale, page_table=None):
    """Absorbed MLA decode: one new query token per sequence attends to the compressed cache.

    q_latent: [batch, heads, kv_lora_rank] (q_nope already multiplied by W_UK);
    q_pe: [batch, heads, rope_dim]; caches [batch, cache_len, dim] (or paged, see gather_pages);
    lengths: [batch] int32 valid cache entries. Returns o_latent [batch, heads, kv_lora_rank]
    (multiply by W_UV^T outside); a sequence with length 0 gets zeros.
    """
    if page_table is not None:
        latent_cache = gather_pages(latent_cache, page_table)
        rope_cache = gather_pages(rope_cache, page_table)
    f32 = jnp.float32
    s = jnp.einsum("bhr,btr->bht", q_latent.astype(f32), latent_cache.astype(f32))
    s = s + jnp.einsum("bhp,btp->bht", q_pe.astype(f32), rope_cache.astype(f32))
    s = s * sm_scale
    valid = jnp.arange(latent_cache.shape[1])[None, :] < lengths[:, None]  # [batch, t]
    s = jnp.where(valid[:, None, :], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1) * valid[:, None, :]
    o = jnp.einsum("bht,btr->bhr", p, latent_cache.astype(f32))
    return o.astype(q_latent.dtype)
