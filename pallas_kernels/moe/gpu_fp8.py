"""Pallas Triton grouped matmuls on E4M3 operands with DeepSeek-V3's fine-grained scales, for CUDA GPUs
with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell).

The products of an MoE layer's experts under V3's FP8 recipe (DeepSeek-V3 technical report, 3.3), the
grouped forms of gpu.py's gmm / tgmm. Every operand comes quantized: E4M3 values and float32 scales,
x ~= q * scale per tile. Each kernel steps through the contraction axis one 128-wide scale tile at a
time: an FP8 tensor-core product accumulated in float32, multiplied by the tile's two scales and added
to a float32 accumulator in registers ("promotion every 128 elements", as V3 and DeepGEMM do), so no
partial product goes through memory.

  gmm_fp8   out[rows of g] = lhs[rows of g] @ rhs[g]       (forward; lhs rows tiled 1x128 along k,
            rhs in 128x128 blocks; with transpose_rhs, rhs[g]^T: the input gradient dY W^T, where the
            same blocks serve W and W^T)
  tgmm_fp8  out[g] = lhs[rows of g]^T @ dout[rows of g]     (weight gradient; both operands tiled
            128x1: 128 rows of one channel, tiles counted from row 0 of the buffer, so a tile may
            straddle two groups and its scale is shared by both; rows of other groups are masked to
            zero before the product)
Both return float32. Scales are the shapes `quantize` gives for those tiles (see each function).
Rows are scheduled as in gpu.py (schedule.py's work items; masked stores, no atomics).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.moe.gpu import work_item
from pallas_kernels.moe.schedule import make_schedule, mask_rows_past, max_items, pad_to, round_up
from pallas_kernels.triton_dot import dot

TILE = 128  # the scale tile along the contraction axis: one k-step of the kernels
TM = 64  # rows per program in gmm_fp8 (the n-tile is one 128-wide weight block)
TN_T = 128  # tgmm_fp8's k- and n-tiles (any size works: its scales are per channel)
COMPILER_PARAMS = dict(num_warps=4, num_stages=3)
E4M3 = jnp.float8_e4m3fn


def _check(name, q, s, want_q, want_s):
    if q.dtype != E4M3 or q.shape != want_q or s.shape != want_s:
        raise ValueError(f"{name}: want E4M3 {want_q} with scales {want_s}; got {q.dtype} {q.shape}, "
                         f"scales {s.shape}")


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "interpret"))
def gmm_fp8(lhs, lhs_scale, rhs, rhs_scale, group_sizes, *, transpose_rhs=False, interpret=False):
    """lhs [m, k] E4M3 with lhs_scale [m, ceil(k/128)] (1x128 tiles); rhs [groups, k, n] E4M3 with
    rhs_scale [groups, ceil(k/128), ceil(n/128)] (128x128 blocks). With transpose_rhs, rhs and its
    scales are the same arrays and the product is lhs @ rhs[g]^T: lhs [m, n] with scales
    [m, ceil(n/128)] -> [m, k]. Returns float32; rows at or past sum(group_sizes) are zero."""
    m = lhs.shape[0]
    groups, kw, nw = rhs.shape
    kb, nb = -(-kw // TILE), -(-nw // TILE)
    k, n = (nw, kw) if transpose_rhs else (kw, nw)  # contraction, output width
    _check("gmm_fp8 lhs", lhs, lhs_scale, (m, k), (m, -(-k // TILE)))
    _check("gmm_fp8 rhs", rhs, rhs_scale, (groups, kw, nw), (groups, kb, nb))
    m_pad = round_up(m, TM)
    lhs_p = pad_to(lhs, (m_pad, round_up(k, TILE)))
    ls_p = pad_to(lhs_scale, (m_pad, lhs_scale.shape[1]))
    rhs_p = pad_to(rhs, (groups, kb * TILE, nb * TILE))
    sched = make_schedule(group_sizes, m_pad, TM, visit_empty=False)
    steps = -(-k // TILE)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, nitems_ref, lhs_ref, ls_ref, rhs_ref, rs_ref, out_ref):
        item, ni = pl.program_id(0), pl.program_id(1)

        @pl.when(item < nitems_ref[0])
        def _():
            g, tile, in_group = work_item(gid_ref, tile_ref, start_ref, end_ref, item, TM)
            row_sl, col_sl = pl.ds(tile * TM, TM), pl.ds(ni * TILE, TILE)

            def body(kk, acc):
                k_sl = pl.ds(kk * TILE, TILE)
                a = plgpu.load(lhs_ref.at[row_sl, k_sl])  # [TM, 128] E4M3
                sa = plgpu.load(ls_ref.at[row_sl, kk])[:, None]  # [TM, 1]: each row's tile scale
                if transpose_rhs:
                    b = plgpu.load(rhs_ref.at[g, col_sl, k_sl])  # [128, 128] of W[g] = W^T's block
                    sb = rs_ref[g, ni, kk]
                else:
                    b = plgpu.load(rhs_ref.at[g, k_sl, col_sl])
                    sb = rs_ref[g, kk, ni]
                return acc + dot(a, b, trans_b=transpose_rhs) * (sa * sb)

            acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((TM, TILE), jnp.float32))
            plgpu.store(out_ref.at[row_sl, col_sl], acc, mask=in_group[:, None] & jnp.ones((1, TILE), bool))

    n_tiles = -(-n // TILE)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_tiles * TILE), jnp.float32),
        grid=(max_items(m_pad, TM, groups), n_tiles),
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
        name="dsjax_gmm_fp8_gpu",
    )(*sched, lhs_p, ls_p, rhs_p, rhs_scale.astype(jnp.float32))
    return mask_rows_past(out[:m, :n], group_sizes)


@functools.partial(jax.jit, static_argnames=("interpret",))
def tgmm_fp8(lhs, lhs_scale, dout, dout_scale, group_sizes, *, interpret=False):
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: lhs [m, k] E4M3 with lhs_scale [ceil(m/128), k],
    dout [m, n] E4M3 with dout_scale [ceil(m/128), n] (128x1 tiles) -> [groups, k, n] float32
    (empty groups: zeros)."""
    m, k = lhs.shape
    n = dout.shape[1]
    groups = group_sizes.shape[0]
    mt = -(-m // TILE)
    _check("tgmm_fp8 lhs", lhs, lhs_scale, (m, k), (mt, k))
    _check("tgmm_fp8 dout", dout, dout_scale, (m, n), (mt, n))
    k_pad, n_pad = round_up(k, TN_T), round_up(n, TN_T)
    lhs_p = pad_to(lhs, (mt * TILE, k_pad))
    dout_p = pad_to(dout, (mt * TILE, n_pad))
    ls_p = pad_to(lhs_scale.astype(jnp.float32), (mt, k_pad))
    ds_p = pad_to(dout_scale.astype(jnp.float32), (mt, n_pad))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes

    def kernel(start_ref, end_ref, lhs_ref, ls_ref, dout_ref, ds_ref, out_ref):
        g, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = start_ref[g], end_ref[g]
        first = start // TILE
        last = jnp.where(end > start, (end - 1) // TILE + 1, first)  # empty group: no iterations
        k_sl, n_sl = pl.ds(ki * TN_T, TN_T), pl.ds(ni * TN_T, TN_T)

        def body(tile, acc):
            rows = tile * TILE + jnp.arange(TILE)
            in_group = ((rows >= start) & (rows < end))[:, None]  # [128, 1]
            row_sl = pl.ds(tile * TILE, TILE)
            a = plgpu.load(lhs_ref.at[row_sl, k_sl])  # [128, TN_T] E4M3
            a = jnp.where(in_group, a, jnp.zeros((), a.dtype))  # a select: other groups' rows never leak
            d = plgpu.load(dout_ref.at[row_sl, n_sl])  # [128, TN_T] E4M3
            sa = plgpu.load(ls_ref.at[tile, k_sl])  # [TN_T]: this row tile's channel scales
            sd = plgpu.load(ds_ref.at[tile, n_sl])  # [TN_T]
            return acc + dot(a, d, trans_a=True) * (sa[:, None] * sd[None, :])

        acc = jax.lax.fori_loop(first, last, body, jnp.zeros((TN_T, TN_T), jnp.float32))
        plgpu.store(out_ref.at[g, k_sl, n_sl], acc)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, k_pad, n_pad), jnp.float32),
        grid=(groups, k_pad // TN_T, n_pad // TN_T),
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
        name="dsjax_tgmm_fp8_gpu",
    )(starts, ends, lhs_p, ls_p, dout_p, ds_p)
    return out[:, :k, :n]
