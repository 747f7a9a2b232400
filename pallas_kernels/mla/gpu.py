"""Pallas-Triton (CUDA) kernels for MLA: flash forward, backward (dq and dk/dv), absorbed decode.

Same head-major layout as tpu.py ([batch, heads, seq_pad, dim]). Triton tiles must be powers of
two and tl.dot needs every dimension >= 16, so head dims are zero-padded to the next power of
two here (qk_dim 192 -> 256: zero columns leave q.k unchanged; padded v columns are sliced off).
That costs 33% extra qk FLOPs at 192; splitting nope (128) + rope (64) into two dots would avoid
it and is the next optimisation.

Tiling: one program per (batch, head, q block) holds the q tile and its float32 accumulator in
registers and loops over kv blocks with fori_loop (causal: only up to the diagonal), as in
FlashAttention-2. Defaults block_q = block_k = 64 forward (a [64, 256] q tile + [64, 64] scores
fit the register file with 4-8 warps), 32/32 backward where each program holds two float32
accumulators (dk [32, 256] and dv [32, 128]). The backward is two kernels: dk/dv (one program per
kv block, looping over q blocks from the diagonal) and dq (one program per q block), each
recomputing p from the saved log-sum-exp; no atomics.

Decode: one program per (batch, head block, split) multiplies q [<=64 heads, kv_lora_rank] by
[block_t, rank] tiles of its cache range (heads share the latent cache, so this is a real
matmul), with masked loads past the length; paged caches read one page per step through the page
table. Heads are padded to a power of two >= 16 and blocked by 64 (FlashMLA's choice): a
[64, 512] float32 accumulator is what fits in registers; 128 heads then read the cache twice.
"""
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mla.common import out_struct
from pallas_kernels.mla.reference import MASK_VALUE
from pallas_kernels.triton_dot import dot

_F32 = jnp.float32


def _pow2(n, floor=16):
    return max(floor, 1 << (n - 1).bit_length())


def _pad_last(x, size):
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _params(num_warps):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _mask(q_start, k_start, bq, bk, causal, kv_len, q_seg, kv_seg):
    mask = None
    rows = q_start + jnp.arange(bq)[:, None]
    cols = k_start + jnp.arange(bk)[None, :]
    if causal:
        mask = rows >= cols
    if kv_len is not None:
        mask = (cols < kv_len) if mask is None else mask & (cols < kv_len)
    if q_seg is not None:
        same = q_seg[:, None] == kv_seg[None, :]
        mask = same if mask is None else mask & same
    return mask


def _fwd_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    qi = pl.program_id(2)
    q = q_ref[...]  # [bq, dqk]
    q_seg = qs_ref[...] if has_seg else None

    def body(j, carry):
        acc, m, l = carry
        kv = pl.ds(j * bk, bk)
        s = dot(q, k_ref[kv, :], trans_b=True) * sm_scale  # [bq, bk]
        mask = _mask(qi * bq, j * bk, bq, bk, causal, kv_len, q_seg,
                     ks_ref[kv] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[kv, :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    n_kv = k_ref.shape[0] // bk
    upper = lax.div((qi + 1) * bq + bk - 1, bk) if causal else n_kv
    init = (jnp.zeros((bq, o_ref.shape[-1]), _F32), jnp.full((bq,), -jnp.inf, _F32),
            jnp.zeros((bq,), _F32))
    acc, m, l = lax.fori_loop(0, upper, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _layout(q, k, v, q_seg):
    """Pad head dims to powers of two >= 16; segment ids stay [b, s]."""
    dqk, dv = _pow2(q.shape[-1]), _pow2(v.shape[-1])
    return _pad_last(q, dqk), _pad_last(k, dqk), _pad_last(v, dv), q_seg is not None


def flash_fwd(q, k, v, q_seg, kv_seg, *, sm_scale, causal, kv_len, block_q, block_k, interpret):
    """Same contract as tpu.flash_fwd (segment ids here [b, s]); lse [b, h, s, 1] float32."""
    b, h, s, _ = q.shape
    dv_real = v.shape[-1]
    q, k, v, has_seg = _layout(q, k, v, q_seg)
    dqk, dv = q.shape[-1], v.shape[-1]
    bq, bk = block_q, block_k
    blk = lambda rows, d: pl.BlockSpec((None, None, rows, d), lambda bi, hi, qi: (bi, hi, qi, 0))
    full = lambda d: pl.BlockSpec((None, None, s, d), lambda bi, hi, qi: (bi, hi, 0, 0))
    in_specs = [blk(bq, dqk), full(dqk), full(dv)]
    args = [q, k, v]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
                     pl.BlockSpec((None, s), lambda bi, hi, qi: (bi, 0))]
        args += [q_seg, kv_seg]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, kv_len=kv_len, bq=bq,
                          bk=bk, has_seg=has_seg),
        grid=(b, h, s // bq),
        in_specs=in_specs,
        out_specs=[blk(bq, dv), pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi))],
        out_shape=[out_struct((b, h, s, dv), q.dtype, q), out_struct((b, h, s), _F32, q)],
        compiler_params=_params(4 if dqk <= 64 else 8),
        interpret=interpret,
        name="mla_flash_fwd",
    )(*args)
    return o[..., :dv_real], lse[..., None]


def _bwd_tile(q, k, v, do, lse, delta, mask, sm_scale):
    """p and ds for one [bq, bk] tile, recomputed from the log-sum-exp."""
    p = jnp.exp(dot(q, k, trans_b=True) * sm_scale - lse[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    return p, ds


def _dkv_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dk_ref, dv_ref = refs[-2:]
    kj = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kv_seg = ks_ref[...] if has_seg else None

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = _mask(i * bq, kj * bk, bq, bk, causal, kv_len,
                     qs_ref[rows] if has_seg else None, kv_seg)
        p, ds = _bwd_tile(q, k, v, do, lse_ref[rows], delta_ref[rows], mask, sm_scale)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True) * sm_scale
        return dk, dv

    start = lax.div(kj * bk, bq) if causal else 0
    init = (jnp.zeros(dk_ref.shape, _F32), jnp.zeros(dv_ref.shape, _F32))
    dk, dv = lax.fori_loop(start, q_ref.shape[0] // bq, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, sm_scale, causal, kv_len, bq, bk, has_seg):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qs_ref, ks_ref = refs[6:8] if has_seg else (None, None)
    dq_ref = refs[-1]
    qi = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qs_ref[...] if has_seg else None

    def body(j, dq):
        kv = pl.ds(j * bk, bk)
        k = k_ref[kv, :]
        mask = _mask(qi * bq, j * bk, bq, bk, causal, kv_len, q_seg,
                     ks_ref[kv] if has_seg else None)
        _, ds = _bwd_tile(q, k, v_ref[kv, :], do, lse, delta, mask, sm_scale)
        return dq + dot(ds.astype(k.dtype), k) * sm_scale

    upper = lax.div((qi + 1) * bq + bk - 1, bk) if causal else k_ref.shape[0] // bk
    dq = lax.fori_loop(0, upper, body, jnp.zeros(dq_ref.shape, _F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def flash_bwd(q, k, v, q_seg, kv_seg, lse, delta, do, *, sm_scale, causal, kv_len, block_q,
              block_k, interpret):
    """Same contract as tpu.flash_bwd; returns dq, dk, dv."""
    b, h, s, dqk_real = q.shape
    dv_real = v.shape[-1]
    q, k, v, has_seg = _layout(q, k, v, q_seg)
    do = _pad_last(do, v.shape[-1])
    lse, delta = lse[..., 0], delta[..., 0]  # [b, h, s]
    dqk, dv = q.shape[-1], v.shape[-1]
    bq, bk = block_q, block_k
    static = dict(sm_scale=sm_scale, causal=causal, kv_len=kv_len, bq=bq, bk=bk, has_seg=has_seg)
    args = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if has_seg else [])

    def specs(q_rows, k_rows):
        """Blocks of q_rows query rows / k_rows key rows (= s for the whole sequence)."""
        qm = lambda bi, hi, i: (bi, hi, 0 if q_rows == s else i, 0)
        km = lambda bi, hi, i: (bi, hi, 0 if k_rows == s else i, 0)
        vec = lambda bi, hi, i: (bi, hi, 0 if q_rows == s else i)
        out = [pl.BlockSpec((None, None, q_rows, dqk), qm), pl.BlockSpec((None, None, k_rows, dqk), km),
               pl.BlockSpec((None, None, k_rows, dv), km), pl.BlockSpec((None, None, q_rows, dv), qm),
               pl.BlockSpec((None, None, q_rows), vec), pl.BlockSpec((None, None, q_rows), vec)]
        if has_seg:
            out += [pl.BlockSpec((None, q_rows), lambda bi, hi, i: (bi, 0 if q_rows == s else i)),
                    pl.BlockSpec((None, k_rows), lambda bi, hi, i: (bi, 0 if k_rows == s else i))]
        return out

    row_out = lambda rows, d: pl.BlockSpec((None, None, rows, d), lambda bi, hi, i: (bi, hi, i, 0))
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid=(b, h, s // bk),
        in_specs=specs(s, bk),
        out_specs=[row_out(bk, dqk), row_out(bk, dv)],
        out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
        compiler_params=_params(8),
        interpret=interpret,
        name="mla_flash_bwd_dkv",
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(b, h, s // bq),
        in_specs=specs(bq, s),
        out_specs=row_out(bq, dqk),
        out_shape=out_struct(q.shape, q.dtype, q),
        compiler_params=_params(8),
        interpret=interpret,
        name="mla_flash_bwd_dq",
    )(*args)
    return dq[..., :dqk_real], dk[..., :dqk_real], dv_[..., :dv_real]


def _decode_kernel(lengths_ref, pages_ref, ql_ref, qp_ref, c_ref, kpe_ref, o_ref, lse_ref, *,
                   sm_scale, block_t, blocks_per_split, n_blocks, cache_len, paged):
    bi, sp = pl.program_id(0), pl.program_id(2)
    length = jnp.minimum(lengths_ref[bi], cache_len)
    ql, qp = ql_ref[...], qp_ref[...]  # [heads, rank], [heads, rope]
    heads = ql.shape[0]

    def body(blk, carry):
        acc, m, l = carry
        start = blk * block_t
        t = start + jnp.arange(block_t)
        valid = t < length
        if paged:
            page = pages_ref[bi * n_blocks + blk]
            c = plgpu.load(c_ref.at[page], mask=valid[:, None], other=0.0)
            kpe = plgpu.load(kpe_ref.at[page], mask=valid[:, None], other=0.0)
        else:
            c = plgpu.load(c_ref.at[bi, pl.ds(start, block_t)], mask=valid[:, None], other=0.0)
            kpe = plgpu.load(kpe_ref.at[bi, pl.ds(start, block_t)], mask=valid[:, None], other=0.0)
        s = (dot(ql, c, trans_b=True) + dot(qp, kpe, trans_b=True)) * sm_scale  # [heads, bt]
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + dot(p.astype(c.dtype), c)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    first = sp * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(length + block_t - 1, block_t))
    init = (jnp.zeros((heads, ql.shape[1]), _F32), jnp.full((heads,), -jnp.inf, _F32),
            jnp.zeros((heads,), _F32))
    acc, m, l = lax.fori_loop(first, jnp.maximum(last, first), body, init)
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def decode_partials(q_latent, q_pe, latent_cache, rope_cache, lengths, page_table, *, sm_scale,
                    num_splits, block_t, interpret):
    """Same contract as tpu.decode_partials. block_t (contiguous) is rounded to a power of two;
    a paged cache's page_size must be a power of two (>= 16 for tl.dot on a real GPU)."""
    b, heads, rank = q_latent.shape
    hp, rp, rope_p = _pow2(heads), _pow2(rank), _pow2(q_pe.shape[-1])
    ql = jnp.pad(_pad_last(q_latent, rp), ((0, 0), (0, hp - heads), (0, 0)))
    qp = jnp.pad(_pad_last(q_pe, rope_p), ((0, 0), (0, hp - heads), (0, 0)))
    c, kpe = _pad_last(latent_cache, rp), _pad_last(rope_cache, rope_p)
    if page_table is None:
        cache_len = c.shape[1]
        block_t = min(_pow2(block_t), _pow2(cache_len))
        n_blocks = -(-cache_len // block_t)
        pages = jnp.zeros((1,), jnp.int32)
    else:
        block_t = c.shape[1]
        n_blocks = page_table.shape[1]
        cache_len = n_blocks * block_t
        pages = page_table.reshape(-1).astype(jnp.int32)
    bps = -(-n_blocks // num_splits)
    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, block_t=block_t,
                               blocks_per_split=bps, n_blocks=n_blocks, cache_len=cache_len,
                               paged=page_table is not None)
    whole = pl.BlockSpec()  # whole array: the kernel indexes it (pages, lengths) itself
    hb = min(hp, 64)  # head block: a [64, 512] float32 accumulator is the register budget
    q_spec = lambda d: pl.BlockSpec((None, hb, d), lambda bi, hi, sp: (bi, hi, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hp // hb, num_splits),
        in_specs=[whole, whole, q_spec(rp), q_spec(rope_p), whole, whole],
        out_specs=[pl.BlockSpec((None, None, hb, rp), lambda bi, hi, sp: (bi, sp, hi, 0)),
                   pl.BlockSpec((None, None, hb), lambda bi, hi, sp: (bi, sp, hi))],
        out_shape=[out_struct((b, num_splits, hp, rp), _F32, q_latent),
                   out_struct((b, num_splits, hp), _F32, q_latent)],
        compiler_params=_params(8),
        interpret=interpret,
        name="mla_decode",
    )(lengths.astype(jnp.int32), pages, ql, qp, c, kpe)
    return o[:, :, :heads, :rank], lse[:, :, :heads, None]
