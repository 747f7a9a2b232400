"""Pallas Triton grouped matmuls for CUDA GPUs: gmm (forward / lhs gradient), tgmm (rhs gradient).

gmm: one program per (work item, n-tile) of the `schedule.py` schedule; it loops over k with an f32
accumulator and stores only its group's rows (masked store), so the two programs that share a
boundary tile write disjoint rows and need no atomics. Padding items (past the real count) exit.
tgmm: one program per (group, k-tile, n-tile); it loops over the group's m-tiles (a data-dependent
trip count) accumulating lhs^T @ dout, rows outside the group masked to zero, and writes the block
once: deterministic, and empty groups get zeros for free.
Inputs are zero-padded to tile multiples so only the row masks are needed.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.moe.schedule import (make_schedule, mask_rows_past, max_items, pad_to,
                                         round_up)
from pallas_kernels.triton_dot import dot

# (tm, tk, tn): H100-class tensor-core tiles for bf16 (Triton's usual 128x128x64 GEMM config).
TILING = (128, 64, 128)
COMPILER_PARAMS = dict(num_warps=8, num_stages=3)


def _fit_tiles(m, k, n, tiling):
    tm, tk, tn = tiling or TILING
    # Triton blocks must be powers of two >= 16 for tl.dot.
    fit = lambda t, d: max(16, min(t, pl.next_power_of_2(d)))
    return fit(tm, m), fit(tk, k), fit(tn, n)


def work_item(gid_ref, tile_ref, start_ref, end_ref, item, tm):
    """Work item `item` of a schedule.py schedule: its group g, its m-tile, and which of the tile's tm rows
    belong to g ([tm] bool: the rows the item may store)."""
    g, tile = gid_ref[item], tile_ref[item]
    rows = tile * tm + jnp.arange(tm)
    return g, tile, (rows >= start_ref[g]) & (rows < end_ref[g])


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiling", "interpret"))
def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, tiling=None, interpret=False):
    """lhs [m, k], rhs [groups, k, n] (or [groups, n, k] with transpose_rhs) -> [m, n] lhs.dtype."""
    m, k = lhs.shape
    groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _fit_tiles(m, k, n, tiling)
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(lhs, (m_pad, k_pad))
    rhs_p = pad_to(rhs, (groups, n_pad, k_pad) if transpose_rhs else (groups, k_pad, n_pad))
    sched = make_schedule(group_sizes, m_pad, tm, visit_empty=False)
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, nitems_ref, lhs_ref, rhs_ref, out_ref):
        item, ni = pl.program_id(0), pl.program_id(1)

        @pl.when(item < nitems_ref[0])
        def _():
            g, tile, in_group = work_item(gid_ref, tile_ref, start_ref, end_ref, item, tm)
            row_sl, col_sl = pl.ds(tile * tm, tm), pl.ds(ni * tn, tn)

            def body(kk, acc):
                k_sl = pl.ds(kk * tk, tk)
                a = plgpu.load(lhs_ref.at[row_sl, k_sl]).astype(compute_dtype)  # [tm, tk]
                if transpose_rhs:
                    b = plgpu.load(rhs_ref.at[g, col_sl, k_sl]).astype(compute_dtype)  # [tn, tk]
                else:
                    b = plgpu.load(rhs_ref.at[g, k_sl, col_sl]).astype(compute_dtype)  # [tk, tn]
                return acc + dot(a, b, trans_b=transpose_rhs)

            acc = jax.lax.fori_loop(0, k_pad // tk, body, jnp.zeros((tm, tn), jnp.float32))
            plgpu.store(out_ref.at[row_sl, col_sl], acc.astype(out_ref.dtype),
                        mask=in_group[:, None] & jnp.ones((1, tn), bool))

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), lhs.dtype),
        grid=(max_items(m_pad, tm, groups), n_pad // tn),
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
        name="dsjax_gmm_gpu",
    )(*sched, lhs_p, rhs_p)
    return mask_rows_past(out[:m, :n], group_sizes)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def tgmm(lhs, dout, group_sizes, *, tiling=None, interpret=False):
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: lhs [m, k], dout [m, n] -> [groups, k, n] f32."""
    m, k = lhs.shape
    n = dout.shape[1]
    groups = group_sizes.shape[0]
    tm, tk, tn = _fit_tiles(m, k, n, tiling)
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(lhs, (m_pad, k_pad))
    dout_p = pad_to(dout, (m_pad, n_pad))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    compute_dtype = jnp.promote_types(lhs.dtype, dout.dtype)

    def kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref):
        g, ki, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = start_ref[g], end_ref[g]
        first_tile = start // tm
        last_tile = jnp.where(end > start, (end - 1) // tm + 1, first_tile)  # empty: no iterations

        def body(tile, acc):
            rows = tile * tm + jnp.arange(tm)
            in_group = ((rows >= start) & (rows < end))[:, None]  # [tm, 1]
            row_sl = pl.ds(tile * tm, tm)
            a = plgpu.load(lhs_ref.at[row_sl, pl.ds(ki * tk, tk)])  # [tm, tk]
            # where, not multiply: rows of other groups must not leak even if they hold inf/nan.
            a = jnp.where(in_group, a, jnp.zeros((), a.dtype)).astype(compute_dtype)
            d = plgpu.load(dout_ref.at[row_sl, pl.ds(ni * tn, tn)]).astype(compute_dtype)  # [tm, tn]
            return acc + dot(a, d, trans_a=True)

        acc = jax.lax.fori_loop(first_tile, last_tile, body, jnp.zeros((tk, tn), jnp.float32))
        plgpu.store(out_ref.at[g, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)], acc)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, k_pad, n_pad), jnp.float32),
        grid=(groups, k_pad // tk, n_pad // tn),
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
        name="dsjax_tgmm_gpu",
    )(starts, ends, lhs_p, dout_p)
    return out[:, :k, :n]
