"""Mosaic (TPU) Pallas kernels for MLA: flash forward, backward (dq and dk/dv), absorbed decode.

Layout: the attention kernels take head-major arrays, q/k [batch, heads, seq_pad, qk_dim] and
v [batch, heads, seq_pad, v_dim], so each block is a dense [rows, dim] tile (8 x 128 VMEM tiles);
with heads in the second-to-last position a block would be a strided 1-row DMA. The head dims are
used whole (block dim == array dim is always legal in Mosaic), so qk_dim=192, v_dim=128 need no
padding; only the sequence is padded by the caller to a multiple of the block sizes.

Tiling: grid (batch, heads, q_blocks, kv_blocks) for the forward and dq kernels, (batch, heads,
kv_blocks, q_blocks) for dk/dv; the last grid axis is the reduction ("arbitrary") and carries the
running max / sum / accumulator in float32 VMEM scratch, the others are "parallel" (megacore
splits them). Causal blocks above the diagonal are skipped with `pl.when`, and their index maps
are clamped to the last useful block so the pipeline does not DMA them either. Defaults
(block_q=block_k=256 forward, 256/256 backward) keep the working set under ~2 MiB at
qk_dim=192: q/k/v tiles (bf16, double-buffered) plus one [256, 256] float32 score tile, and give
the MXU 256-deep contractions on v6e (128 on v5p, still full). Segment ids come as [b, seq, 1]
(query side, one sublane per row) and [b, 1, seq] (key side, lanes), so the segment mask is a
single broadcast compare without a relayout.

Decode: all heads of one sequence share the latent cache (MQA-like after absorption), so each
grid step multiplies q [heads, kv_lora_rank] by a [block_t, kv_lora_rank] cache tile: one MXU
matmul per tile instead of one matvec per head. Grid (batch, splits, blocks_per_split); lengths
and the page table are scalar-prefetched into SMEM and drive the index maps (paged: block = one
page; blocks past the length are clamped to the last valid one, so they cost no DMA, and
skipped). Each split writes its partial output (normalised within the split) and its
log-sum-exp; the caller combines the splits in XLA.
"""
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.common import out_struct
from pallas_kernels.mla.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_F32 = jnp.float32


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    """MXU matmul with float32 accumulation. Explicit precision: a global "highest" default
    would ask Mosaic for fp32 contraction of bf16 operands, which it rejects."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _params(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


def _block_mask(q_start, k_start, bq, bk, causal, kv_len, qs_ref, ks_ref):
    """[bq, bk] bool mask for one tile, or None when nothing needs masking (static)."""
    mask = None
    if causal or kv_len is not None:
        rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        if causal:
            mask = rows >= cols
        if kv_len is not None:
            in_seq = cols < kv_len
            mask = in_seq if mask is None else mask & in_seq
    if qs_ref is not None:
        same = qs_ref[...] == ks_ref[...]  # [bq, 1] == [1, bk]
        mask = same if mask is None else mask & same
    return mask


def _split_refs(refs, n_in, has_seg):
    ins = list(refs[:n_in])
    segs = (refs[n_in], refs[n_in + 1]) if has_seg else (None, None)
    return ins, segs, refs[n_in + (2 if has_seg else 0):]


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), rest = _split_refs(refs, 3, has_seg)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    def _step():
        s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
        mask = _block_mask(qi * bq, ki * bk, bq, bk, causal, kv_len, qs_ref, ks_ref)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a fully masked row stays exactly zero
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        pv = _dot(p.astype(v_ref.dtype), v_ref[...])
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    if causal:
        pl.when(ki * bk <= qi * bq + bq - 1)(_step)
    else:
        _step()

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_safe)


def _seg_specs(block_rows, block_cols, row_map, col_map):
    return [pl.BlockSpec((None, block_rows, 1), row_map), pl.BlockSpec((None, 1, block_cols), col_map)]


def flash_fwd(q, k, v, q_seg, kv_seg, *, sm_scale, causal, kv_len, block_q, block_k, interpret):
    """q, k [b, h, s, dqk]; v [b, h, s, dv]; q_seg [b, s, 1], kv_seg [b, 1, s] or None.

    kv_len: real length when s is padded (keys >= kv_len are masked), else None.
    Returns o [b, h, s, dv] (q.dtype) and lse [b, h, s, 1] float32.
    """
    b, h, s, dqk = q.shape
    dv = v.shape[-1]
    bq, bk = block_q, block_k
    grid = (b, h, s // bq, s // bk)

    def kv_block(qi, ki):
        return jnp.minimum(ki, (qi * bq + bq - 1) // bk) if causal else ki

    in_specs = [
        pl.BlockSpec((None, None, bq, dqk), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
        pl.BlockSpec((None, None, bk, dqk), lambda bi, hi, qi, ki: (bi, hi, kv_block(qi, ki), 0)),
        pl.BlockSpec((None, None, bk, dv), lambda bi, hi, qi, ki: (bi, hi, kv_block(qi, ki), 0)),
    ]
    args = [q, k, v]
    has_seg = q_seg is not None
    if has_seg:
        in_specs += _seg_specs(bq, bk, lambda bi, hi, qi, ki: (bi, qi, 0),
                               lambda bi, hi, qi, ki: (bi, 0, kv_block(qi, ki)))
        args += [q_seg, kv_seg]
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, kv_len=kv_len,
                               bq=bq, bk=bk, has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
        ],
        out_shape=[out_struct((b, h, s, dv), q.dtype, q), out_struct((b, h, s, 1), _F32, q)],
        scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32),
                        pltpu.VMEM((bq, dv), _F32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="mla_flash_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward


def _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, q_start, k_start,
                  *, sm_scale, causal, kv_len, bq, bk):
    """Recompute p = exp(s - lse) for one tile and ds = p * (do v^T - delta)."""
    s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
    p = jnp.exp(s - lse_ref[...])  # [bq, bk]
    mask = _block_mask(q_start, k_start, bq, bk, causal, kv_len, qs_ref, ks_ref)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - delta_ref[...])
    return p, ds


def _dkv_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qs_ref, ks_ref), rest = _split_refs(
        refs, 6, has_seg)
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    ki, qi = pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    def _step():
        p, ds = _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
                              qi * bq, ki * bk, sm_scale=sm_scale, causal=causal, kv_len=kv_len,
                              bq=bq, bk=bk)
        dv_sc[...] += _dot(p.astype(do_ref.dtype), do_ref[...], _TN)
        dk_sc[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], _TN) * sm_scale

    if causal:
        pl.when(qi * bq + bq - 1 >= ki * bk)(_step)
    else:
        _step()

    @pl.when(qi == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qs_ref, ks_ref), rest = _split_refs(
        refs, 6, has_seg)
    dq_ref, dq_sc = rest
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    def _step():
        _, ds = _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
                              qi * bq, ki * bk, sm_scale=sm_scale, causal=causal, kv_len=kv_len,
                              bq=bq, bk=bk)
        dq_sc[...] += _dot(ds.astype(k_ref.dtype), k_ref[...]) * sm_scale

    if causal:
        pl.when(ki * bk <= qi * bq + bq - 1)(_step)
    else:
        _step()

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def flash_bwd(q, k, v, q_seg, kv_seg, lse, delta, do, *, sm_scale, causal, kv_len, block_q,
              block_k, interpret):
    """Gradients of flash_fwd. lse, delta (= sum(o * do, -1)): [b, h, s, 1] float32.

    Returns dq [b, h, s, dqk], dk [b, h, s, dqk], dv [b, h, s, dv] in the input dtypes.
    """
    b, h, s, dqk = q.shape
    dv = v.shape[-1]
    bq, bk = block_q, block_k
    has_seg = q_seg is not None
    static = dict(sm_scale=sm_scale, causal=causal, kv_len=kv_len, bq=bq, bk=bk, has_seg=has_seg)
    sem = _params("parallel", "parallel", "parallel", "arbitrary")

    def specs(q_map, k_map):
        """Input specs given index maps (grid -> q block, grid -> kv block)."""
        qs = lambda d: pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, q_map(i, j), 0))
        ks = lambda d: pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j: (bi, hi, k_map(i, j), 0))
        out = [qs(dqk), ks(dqk), ks(dv), qs(dv), qs(1), qs(1)]
        if has_seg:
            out += _seg_specs(bq, bk, lambda bi, hi, i, j: (bi, q_map(i, j), 0),
                              lambda bi, hi, i, j: (bi, 0, k_map(i, j)))
        return out

    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if has_seg else [])

    # dk, dv: grid (b, h, kv_blocks, q_blocks); q blocks before the diagonal are clamped away.
    def q_for_kv(ki, qi):
        return jnp.maximum(qi, (ki * bk) // bq) if causal else qi

    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid=(b, h, s // bk, s // bq),
        in_specs=specs(lambda i, j: q_for_kv(i, j), lambda i, j: i),
        out_specs=[pl.BlockSpec((None, None, bk, dqk), lambda bi, hi, i, j: (bi, hi, i, 0)),
                   pl.BlockSpec((None, None, bk, dv), lambda bi, hi, i, j: (bi, hi, i, 0))],
        out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
        scratch_shapes=[pltpu.VMEM((bk, dqk), _F32), pltpu.VMEM((bk, dv), _F32)],
        compiler_params=sem,
        interpret=interpret,
        name="mla_flash_bwd_dkv",
    )(*args)

    # dq: grid (b, h, q_blocks, kv_blocks); kv blocks past the diagonal are clamped away.
    def kv_for_q(qi, ki):
        return jnp.minimum(ki, (qi * bq + bq - 1) // bk) if causal else ki

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(b, h, s // bq, s // bk),
        in_specs=specs(lambda i, j: i, lambda i, j: kv_for_q(i, j)),
        out_specs=pl.BlockSpec((None, None, bq, dqk), lambda bi, hi, i, j: (bi, hi, i, 0)),
        out_shape=out_struct(q.shape, q.dtype, q),
        scratch_shapes=[pltpu.VMEM((bq, dqk), _F32)],
        compiler_params=sem,
        interpret=interpret,
        name="mla_flash_bwd_dq",
    )(*args)
    return dq, dk, dv_


# ----------------------------------------------------------------------------- decode


def _decode_kernel(lengths_ref, pages_ref, ql_ref, qp_ref, c_ref, kpe_ref, o_ref, lse_ref,
                   m_sc, l_sc, acc_sc, *, sm_scale, block_t, blocks_per_split, cache_len):
    del pages_ref  # only used by the index maps
    bi, sp, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = (sp * blocks_per_split + j) * block_t
    length = jnp.minimum(lengths_ref[bi], cache_len)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(start < length)
    def _step():
        c = c_ref[...]  # [block_t, rank]
        heads = ql_ref.shape[0]
        valid_t = start + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0) < length
        c = jnp.where(valid_t, c, jnp.zeros_like(c))  # tail rows may hold garbage (NaN * 0 = NaN)
        s = _dot(ql_ref[...], c, _NT)
        s += _dot(qp_ref[...], kpe_ref[...], _NT)
        s *= sm_scale  # [heads, block_t]
        valid = start + lax.broadcasted_iota(jnp.int32, (heads, block_t), 1) < length
        s = jnp.where(valid, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(c.dtype), c)
        m_sc[...] = m_new

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        o_ref[...] = acc_sc[...] / jnp.where(empty, 1.0, l)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def decode_partials(q_latent, q_pe, latent_cache, rope_cache, lengths, page_table, *, sm_scale,
                    num_splits, block_t, interpret):
    """Per-split partial results of the absorbed decode.

    Contiguous caches [b, t, dim] (page_table None) are read in block_t tiles; paged caches
    [num_pages, page_size, dim] one page per step. Returns o [b, splits, heads, rank] float32
    (normalised within its split) and lse [b, splits, heads, 1] (-inf for an empty split).
    """
    b, heads, rank = q_latent.shape
    rope = q_pe.shape[-1]
    if page_table is None:
        cache_len = latent_cache.shape[1]
        block_t = min(block_t, cache_len)
        n_blocks = pl.cdiv(cache_len, block_t)
        pages = jnp.zeros((1,), jnp.int32)
    else:
        block_t = latent_cache.shape[1]  # page_size
        n_blocks = page_table.shape[1]
        cache_len = n_blocks * block_t
        pages = page_table.reshape(-1).astype(jnp.int32)
    bps = pl.cdiv(n_blocks, num_splits)

    def block_index(bi, sp, j, lengths_ref):
        last = jnp.maximum(pl.cdiv(jnp.minimum(lengths_ref[bi], cache_len), block_t) - 1, 0)
        return jnp.minimum(jnp.minimum(sp * bps + j, n_blocks - 1), last)

    if page_table is None:
        def cache_map(bi, sp, j, lengths_ref, pages_ref):
            return bi, block_index(bi, sp, j, lengths_ref), 0
    else:
        def cache_map(bi, sp, j, lengths_ref, pages_ref):
            return pages_ref[bi * n_blocks + block_index(bi, sp, j, lengths_ref)], 0, 0

    q_map = lambda bi, sp, j, *_: (bi, 0, 0)
    out_map = lambda bi, sp, j, *_: (bi, sp, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, num_splits, bps),
        in_specs=[pl.BlockSpec((None, heads, rank), q_map),
                  pl.BlockSpec((None, heads, rope), q_map),
                  pl.BlockSpec((None, block_t, rank), cache_map),
                  pl.BlockSpec((None, block_t, rope), cache_map)],
        out_specs=[pl.BlockSpec((None, None, heads, rank), out_map),
                   pl.BlockSpec((None, None, heads, 1), out_map)],
        scratch_shapes=[pltpu.VMEM((heads, 1), _F32), pltpu.VMEM((heads, 1), _F32),
                        pltpu.VMEM((heads, rank), _F32)],
    )
    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, block_t=block_t,
                               blocks_per_split=bps, cache_len=cache_len)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[out_struct((b, num_splits, heads, rank), _F32, q_latent),
                   out_struct((b, num_splits, heads, 1), _F32, q_latent)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="mla_decode",
    )(lengths.astype(jnp.int32), pages, q_latent, q_pe, latent_cache, rope_cache)
