"""Mosaic TPU grouped matmuls: gmm (forward / lhs gradient) and tgmm (rhs gradient).

Both walk the work-item schedule of `schedule.py` as a grid axis, with the item -> (group, m-tile)
tables in SMEM via scalar prefetch so the BlockSpec index maps can pick each step's blocks:
  gmm  grid (n-tiles, items, k-tiles): acc[tm, tn] += lhs[tile, k] @ rhs[group, k, n]; at the last
       k step store the rows of this group only (a tile shared by two groups is finished by the
       second visit; the output block stays resident in VMEM between consecutive visits).
  tgmm grid (k-tiles, n-tiles, items): acc[tk, tn] += lhs[rows of group]^T @ dout[rows of group];
       zero it at a group's first item, write out[group] at its last.
Tiles are per TPU generation (`TILING`); inputs are zero-padded to tile multiples when needed.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.moe.schedule import (make_schedule, mask_rows_past, max_items, pad_to,
                                         round_up)

# (tm, tk, tn) per device kind. v5p: 128x128 MXUs, 95 MiB VMEM budget shared by two cores;
# v6e: 256x256 MXUs, so wider k/n tiles keep it fed. Both stay under 32 MiB scoped VMEM in bf16:
# 2x lhs + 2x rhs + 2x out double buffers + the f32 accumulator.
TILING = {
    "v5p": (512, 512, 1024),
    "v6e": (512, 1024, 1024),
    "default": (512, 512, 512),
}
VMEM_LIMIT_BYTES = 64 * 1024 * 1024


def default_tiling(device_kind: str | None = None):
    kind = (device_kind or "").lower().replace(" ", "")
    if "v6" in kind:
        return TILING["v6e"]
    if "v5p" in kind or kind == "tpuv5":
        return TILING["v5p"]
    return TILING["default"]


def _fit_tiles(m, k, n, tiling, dtype):
    """Clamp tiles to the (padded) problem: rows in sublane multiples, k/n in lane multiples."""
    tm, tk, tn = tiling
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    tm = min(tm, round_up(m, sub))
    tk = min(tk, round_up(k, 128))
    tn = min(tn, round_up(n, 128))
    return tm, tk, tn


def _precision(dtype):
    # Explicit, so a global jax_default_matmul_precision="highest" (our tests) does not ask the MXU
    # for an fp32 contraction of bf16 operands, which Mosaic rejects.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _row_mask(tile, start, end, tm, width):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= start) & (rows < end)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiling", "interpret"))
def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, tiling=None, interpret=False):
    """lhs [m, k], rhs [groups, k, n] (or [groups, n, k] with transpose_rhs) -> [m, n] lhs.dtype."""
    m, k = lhs.shape
    groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _fit_tiles(m, k, n, tiling or default_tiling(), lhs.dtype)
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(lhs, (m_pad, k_pad))
    rhs_p = pad_to(rhs, (groups, n_pad, k_pad) if transpose_rhs else (groups, k_pad, n_pad))
    sched = make_schedule(group_sizes, m_pad, tm, visit_empty=False)
    nk = k_pad // tk
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, nitems_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        item, kk = pl.program_id(1), pl.program_id(2)
        active = item < nitems_ref[0]

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active)
        def _():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...].astype(compute_dtype), rhs_ref[...].astype(compute_dtype), dims,
                precision=_precision(compute_dtype), preferred_element_type=jnp.float32)

        @pl.when(active & (kk == nk - 1))
        def _():
            g = gid_ref[item]
            mask = _row_mask(tile_ref[item], start_ref[g], end_ref[g], tm, tn)
            out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)
                                     ).astype(out_ref.dtype)

    def lhs_map(ni, item, kk, gid, tile, *_):
        return tile[item], kk

    def rhs_map(ni, item, kk, gid, tile, *_):
        return (gid[item], ni, kk) if transpose_rhs else (gid[item], kk, ni)

    def out_map(ni, item, kk, gid, tile, *_):
        return tile[item], ni

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(n_pad // tn, max_items(m_pad, tm, groups), nk),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0,
            bytes_accessed=(m * k * (n_pad // tn) + groups * k * n + m * n) * lhs.dtype.itemsize),
        interpret=interpret,
        name="dsjax_gmm_tpu",
    )(*sched, lhs_p, rhs_p)
    return mask_rows_past(out[:m, :n], group_sizes)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def tgmm(lhs, dout, group_sizes, *, tiling=None, interpret=False):
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: lhs [m, k], dout [m, n] -> [groups, k, n] f32."""
    m, k = lhs.shape
    n = dout.shape[1]
    groups = group_sizes.shape[0]
    tm, tk, tn = _fit_tiles(m, k, n, tiling or default_tiling(), lhs.dtype)
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(lhs, (m_pad, k_pad))
    dout_p = pad_to(dout, (m_pad, n_pad))
    sched = make_schedule(group_sizes, m_pad, tm, visit_empty=True)
    n_items = max_items(m_pad, tm, groups)
    compute_dtype = jnp.promote_types(lhs.dtype, dout.dtype)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, nitems_ref, lhs_ref, dout_ref, out_ref,
               acc_ref):
        item = pl.program_id(2)
        nitems = nitems_ref[0]
        active = item < nitems
        g = gid_ref[item]
        first = (item == 0) | (g != gid_ref[jnp.maximum(item - 1, 0)])
        last = (item == nitems - 1) | (g != gid_ref[jnp.minimum(item + 1, n_items - 1)])

        @pl.when(active & first)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active)
        def _():
            mask = _row_mask(tile_ref[item], start_ref[g], end_ref[g], tm, tk)
            # where, not multiply: rows of other groups must not leak even if they hold inf/nan.
            x = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype)).astype(compute_dtype)
            acc_ref[...] += jax.lax.dot_general(
                x, dout_ref[...].astype(compute_dtype), (((0,), (0,)), ((), ())),
                precision=_precision(compute_dtype), preferred_element_type=jnp.float32)

        @pl.when(active & last)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(ki, ni, item, gid, tile, *_):
        return tile[item], ki

    def dout_map(ki, ni, item, gid, tile, *_):
        return tile[item], ni

    def out_map(ki, ni, item, gid, tile, *_):
        return gid[item], ki, ni

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, k_pad, n_pad), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(k_pad // tk, n_pad // tn, n_items),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0,
            bytes_accessed=(m * k * (n_pad // tn) + m * n * (k_pad // tk)) * lhs.dtype.itemsize
            + groups * k * n * 4),
        interpret=interpret,
        name="dsjax_tgmm_tpu",
    )(*sched, lhs_p, dout_p)
    return out[:, :k, :n]
