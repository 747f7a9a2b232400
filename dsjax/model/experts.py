"""The routed experts of DeepSeekMoE behind one boundary: every expert's SwiGLU on the rows routed
to it, weighted and summed per token. The gate and the layer itself are dsjax.model.moe.

Expert kernels are stacked: gate_proj/up_proj [experts, hidden, moe_inter], down_proj [experts, moe_inter, hidden].

Four interchangeable expert paths (`cfg.moe_impl`), all dropless and numerically equal:
  blocked     sort assignments by expert, pad each expert's rows to a multiple of `moe_block_size`,
              gather into [blocks, block, hidden] and batch-matmul with each block's expert weights.
              Work is O(tokens*top_k + experts*block): the fast path on CPU, where ragged_dot
              degenerates into a dense expansion over all experts (its HLO expands every group).
  ragged_dot  sort by expert + jax.lax.ragged_dot (the natural TPU/GPU XLA path).
  pallas      sort by expert + the grouped-matmul Pallas kernel of pallas_kernels.moe.
  dense       every expert on every token, weighted by the (mostly zero) combine matrix. A reference.

`routed_experts` runs them with every expert on this device; `local_experts` runs a device's share
on rows already routed to it (dsjax.parallel.expert_parallel sends the rows there and back).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import fp8 as fp8_lib
from dsjax.model.layers import swiglu_hidden_grads, vary_together
from dsjax.parallel.shard import per_shard, token_axes


def sort_by_expert(idx: jnp.ndarray, num_experts: int):
    """Flatten [T, K] assignments and sort them by expert (stable)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # sorted position -> flat assignment
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, flat[order], group_sizes


def inverse_permutation(order):
    """inv with inv[order[j]] = j: where each assignment went in the sorted order."""
    n = order.shape[0]
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def sorted_rows(x, order, inv, k: int):
    """Each token's row once per assignment, in sorted order: x[order // k] -> [T*K, hidden]. A gather
    whose transpose (the sum of each token's K row cotangents) is a gather too: with the autodiff
    scatter-add, TPU XLA widens 16-bit rows to 32 bits, a 2x copy of the whole [T*K, hidden] array."""
    return _take_rows(x, order // k, inv.reshape(-1, k), False)


def combine(y_sorted, order, inv, w, t: int, k: int):
    """Undo the sort and add each token's K expert outputs, weighted. y_sorted [T*K, hidden]; inv the
    inverse of `order` (as sorted_rows takes it). The unsort is a gather through inv (not a scatter, for
    the reason in sorted_rows)."""
    y = _take_rows(y_sorted, inv, order[:, None], False).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, w.astype(y.dtype))


def _experts_dense(p, x, w, idx, num_experts: int, fp8: str | None = None):
    dt = x.dtype
    t = x.shape[0]
    weights = jnp.zeros((t, num_experts), jnp.float32).at[jnp.arange(t)[:, None], idx].add(w)
    if fp8:  # every expert on every token: x repeated per expert
        xe = jnp.broadcast_to(x, (num_experts, *x.shape))
        y = _swiglu_batched_fp8(p["gate_proj"].astype(dt), p["up_proj"].astype(dt), p["down_proj"].astype(dt), xe, fp8)
        return jnp.einsum("etd,te->td", y, weights.astype(dt))
    g = jnp.einsum("td,edf->etf", x, p["gate_proj"].astype(dt))
    u = jnp.einsum("td,edf->etf", x, p["up_proj"].astype(dt))
    y = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, p["down_proj"].astype(dt))
    return jnp.einsum("etd,te->td", y, weights.astype(dt))


def _experts_grouped(p, x, w, idx, num_experts: int, matmul):
    """Sort tokens by expert, run a grouped matmul `matmul(lhs, rhs, group_sizes)`, combine."""
    t, k = idx.shape
    order, _, group_sizes = sort_by_expert(idx, num_experts)
    inv = inverse_permutation(order)
    xs = sorted_rows(x, order, inv, k)  # [T*K, hidden] grouped by expert
    dt = x.dtype
    g = matmul(xs, p["gate_proj"].astype(dt), group_sizes)
    u = matmul(xs, p["up_proj"].astype(dt), group_sizes)
    y = matmul(jax.nn.silu(g) * u, p["down_proj"].astype(dt), group_sizes)
    return combine(y, order, inv, w, t, k)


def _ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _ragged_fp8(lhs, rhs, group_sizes):
    return fp8_lib.ragged_matmul(lhs, rhs, group_sizes, lhs.dtype)


def _pallas_gmm(interpret, fp8: str | None = None):
    """The Pallas grouped matmul. Under FP8 (fp8.ragged_matmul): pallas_kernels.moe's FP8 kernels where
    the products are native, XLA's ragged_dot on dequantized operands where they are emulated."""
    if fp8:
        kernel = "xla" if fp8 == "emulated" else "pallas_interpret" if interpret else "pallas"
        return lambda lhs, rhs, gs: fp8_lib.ragged_matmul(lhs, rhs, gs, lhs.dtype, kernel)
    from pallas_kernels.moe import gmm

    return lambda lhs, rhs, gs: gmm(lhs, rhs, gs, impl="pallas", interpret=interpret)


def _gather_rows(x, idx):
    """x[idx] for idx in [0, len(x)], len(x) reading a zero row (appended: "fill" mode costs a select
    over the whole output)."""
    return _rows(jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)]), idx)


def _rows(x, idx):
    """x[idx] along axis 0 for indices known to be in range: no clamping or wrapping arithmetic,
    which XLA:CPU would evaluate for every element gathered."""
    dims = jax.lax.GatherDimensionNumbers(offset_dims=tuple(range(1, x.ndim)), collapsed_slice_dims=(0,),
                                          start_index_map=(0,))
    return jax.lax.gather(x, idx[:, None], dims, (1, *x.shape[1:]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _swiglu_batched(wg, wu, wd, x):
    """SwiGLU per batch entry n: x [n, rows, hidden], wg/wu [n, hidden, inter], wd [n, inter, hidden]
    -> (y [n, rows, hidden], and the gate and up activations g, u [n, rows, inter])."""
    g = jnp.einsum("nbd,ndf->nbf", x, wg)
    u = jnp.einsum("nbd,ndf->nbf", x, wu)
    return jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, wd), g, u


def _swiglu_batched_fp8(wg, wu, wd, x, fp8: str):
    """_swiglu_batched's output with the three products in FP8, differentiated through their FP8 VJPs."""
    mm = lambda a, w: fp8_lib.batched_matmul(a, w, fp8)
    return mm(jax.nn.silu(mm(x, wg)) * mm(x, wu), wd)


def _swiglu_batched_grads(wg, wu, wd, x, g, u, dy):
    """The VJP of _swiglu_batched -> per-entry weight gradients (dwg, dwu, dwd) and dx. Written out (as
    layers.swiglu's) so that XLA:CPU gets each product once, with no fused transposed copies."""
    h, dg, du = swiglu_hidden_grads(g, u, jnp.einsum("nbd,nfd->nbf", dy, wd))
    dx = jnp.einsum("nbf,ndf->nbd", dg, wg) + jnp.einsum("nbf,ndf->nbd", du, wu)
    return (jnp.einsum("nbd,nbf->ndf", x, dg), jnp.einsum("nbd,nbf->ndf", x, du),
            jnp.einsum("nbf,nbd->nfd", h, dy), dx)


def _flat(a):
    """[n, rows, width] -> [n * rows, width]. Residuals are saved flat: the capacity and blocked
    branches of a lax.cond then share residual slots (JAX merges them by shape) when their row counts
    agree, instead of each zero-filling the other's."""
    return a.reshape(-1, a.shape[-1])


@jax.custom_vjp
def _capacity_mlp(wg, wu, wd, xc):
    """The experts' SwiGLU on a [experts, capacity, hidden] buffer (expert e's rows in slot e)."""
    return _swiglu_batched(wg, wu, wd, xc)[0]


def _capacity_mlp_fwd(wg, wu, wd, xc):
    y, g, u = _swiglu_batched(wg, wu, wd, xc)
    return y, (wg, wu, wd, _flat(xc), _flat(g), _flat(u))


def _capacity_mlp_bwd(res, dy):
    wg, wu, wd, x, g, u = res
    x, g, u = (a.reshape(*dy.shape[:2], -1) for a in (x, g, u))
    return _swiglu_batched_grads(wg, wu, wd, x, g, u, dy)


_capacity_mlp.defvjp(_capacity_mlp_fwd, _capacity_mlp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_mlp(wg, wu, wd, xb, block_expert, num_experts: int):
    """The experts' SwiGLU on blocks of rows: xb [blocks, block, hidden], block_expert [blocks] sorted
    (each block's expert) -> [blocks, block, hidden]."""
    return _block_mlp_fwd(wg, wu, wd, xb, block_expert, num_experts)[0]


def _block_weights(wg, wu, wd, block_expert):
    return _rows(wg, block_expert), _rows(wu, block_expert), _rows(wd, block_expert)  # [blocks, in, out]


def _block_mlp_fwd(wg, wu, wd, xb, block_expert, num_experts: int):
    y, g, u = _swiglu_batched(*_block_weights(wg, wu, wd, block_expert), xb)
    # The per-block weights are gathered again in the backward pass rather than saved: the capacity
    # branch (the usual one on CPU) would zero-fill them as residuals in every forward pass.
    return y, (wg, wu, wd, _flat(xb), _flat(g), _flat(u), block_expert)


def _block_mlp_bwd(num_experts: int, res, dy):
    # The per-block weight gradients add up per expert in a sorted segment sum.
    wg, wu, wd, x, g, u, block_expert = res
    x, g, u = (a.reshape(*dy.shape[:2], -1) for a in (x, g, u))
    *dws, dx = _swiglu_batched_grads(*_block_weights(wg, wu, wd, block_expert), x, g, u, dy)
    per_expert = lambda a: jax.ops.segment_sum(a, block_expert, num_experts, indices_are_sorted=True)
    return (*map(per_expert, dws), dx, None)


_block_mlp.defvjp(_block_mlp_fwd, _block_mlp_bwd)


def _through_rows(x, w, dest, rows: int, mlp):
    """Run `mlp` on a [rows, hidden] buffer holding assignment a (token a // K, slot a % K) in row
    dest[a] and zero-cotangent padding elsewhere; add each token's K outputs weighted by w [T, K]
    -> [T, hidden]."""
    (t, k), n = w.shape, dest.shape[0]
    # XLA:CPU fuses index arithmetic into the gather that reads it, and such a gather ran 7x slower
    # on 2 threads (20480 x 256 rows, measured alone: 5.4 vs 0.7 ms): every gather index is
    # materialised first, by a scatter or a barrier.
    assign_row = jax.lax.optimization_barrier(dest.astype(jnp.int32))
    a = jnp.arange(n, dtype=jnp.int32)
    row_assign = jnp.full((rows,), n, jnp.int32).at[assign_row].set(a)  # n: padding
    # Padding rows copy token 0 rather than a zero row (which costs a select per element gathered):
    # their outputs are never read, so their cotangents are zero and they add nothing to any gradient.
    row_token = jnp.zeros((rows,), jnp.int32).at[assign_row].set(a // k)
    y = mlp(_take_rows(x, row_token, assign_row.reshape(t, k), False))
    yk = _take_rows(y, assign_row, row_assign[:, None], True).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", yk, w.astype(yk.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _take_rows(x, idx, readers, some_unread: bool):
    """x[idx] over rows (idx in range) whose transpose is a gather too.

    readers [len(x), m]: the output rows that read each row of x (m per row; len(idx) = none, which
    only occurs when `some_unread`). The plain gather's transpose is a scatter-add, which XLA:CPU runs
    as a serial loop; with the readers known (the routing is a permutation), dx is a gather and a sum."""
    return _rows(x, idx)


def _take_rows_fwd(x, idx, readers, some_unread: bool):
    return _rows(x, idx), readers


def _take_rows_bwd(some_unread: bool, readers, g):
    take = _gather_rows if some_unread else _rows
    return take(g, readers.reshape(-1)).reshape(*readers.shape, -1).sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _num_blocks(num_assignments: int, num_experts: int, bs: int) -> int:
    """Static upper bound on the blocks of the blocked path: each expert pads to a whole block of bs rows."""
    return -(-(num_assignments + num_experts * (bs - 1)) // bs)


def _capacity(num_assignments: int, num_experts: int, bs: int) -> int:
    return _num_blocks(num_assignments, num_experts, bs) * bs // num_experts


def expert_capacity(num_assignments: int, cfg: ModelConfig) -> int:
    """Rows per expert of the capacity buffer: the blocked buffer's rows split evenly over the experts
    (so both buffers have the same rows and, under the lax.cond, share residual slots)."""
    return _capacity(num_assignments, cfg.n_routed_experts, cfg.moe_block_size)


def _experts_blocked(p, x, w, idx, num_experts: int, bs: int, capacity: bool = True, fp8: str | None = None):
    """Dropless experts on buffers of rows grouped by expert (in token order within an expert).

    With `capacity`, when no expert has more rows than the blocked buffer divided evenly over the
    experts (C = rows // E), the rows go to a [E, C] buffer: one batched-matmul entry per expert, no
    per-block weight gathers. Otherwise, exactly, to blocks of moe_block_size rows. Expert MLP
    fwd+bwd at cpu_bench shapes: [16 x 1280] 72-80 ms vs 80 blocks of 256 rows 106 ms."""
    t, k = idx.shape
    e = num_experts
    n = t * k
    flat = idx.reshape(-1)
    onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)  # [T*K, E]
    group_sizes = onehot.sum(0)
    # Place of each assignment among its expert's: a cumulative count, where a stable sort by expert
    # cost 3.1 vs 0.8 ms at cpu_bench shapes.
    rank = ((jnp.cumsum(onehot, axis=0) - onehot) * onehot).sum(1)
    num_blocks = _num_blocks(n, e, bs)
    rows = num_blocks * bs
    dt = x.dtype
    weights = vary_together(p["gate_proj"].astype(dt), p["up_proj"].astype(dt), p["down_proj"].astype(dt), x)
    # Under FP8 the batched SwiGLU is differentiated through the FP8 products' VJPs (block weights:
    # through their gather) instead of the hand-written float VJPs.
    block_mlp = (lambda wg, wu, wd, xb, be, _: _swiglu_batched_fp8(*_block_weights(wg, wu, wd, be), xb, fp8)) \
        if fp8 else _block_mlp
    capacity_mlp = functools.partial(_swiglu_batched_fp8, fp8=fp8) if fp8 else _capacity_mlp

    def blocked(wg, wu, wd, x):
        padded = (group_sizes + bs - 1) // bs * bs
        pad_end = jnp.cumsum(padded)
        block_expert = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(num_blocks) * bs, side="right"), e - 1)
        mlp = lambda xr: block_mlp(wg, wu, wd, xr.reshape(num_blocks, bs, -1), block_expert, e).reshape(rows, -1)
        return _through_rows(x, w, (pad_end - padded)[flat] + rank, rows, mlp)

    cap = _capacity(n, e, bs)
    if capacity and cap > 0:
        def by_capacity(wg, wu, wd, x):
            mlp = lambda xr: capacity_mlp(wg, wu, wd, xr.reshape(e, cap, -1)).reshape(e * cap, -1)
            return _through_rows(x, w, flat * cap + rank, e * cap, mlp)

        return jax.lax.cond(group_sizes.max() <= cap, by_capacity, blocked, *weights)
    return blocked(*weights)


def routed_experts(p: dict, x: jnp.ndarray, w, idx, cfg: ModelConfig, mesh=None) -> jnp.ndarray:
    """sum_k w[t, k] * Expert_{idx[t, k]}(x_t) for x [T, hidden], w/idx [T, K], every expert on this
    device (no expert parallelism: dsjax.parallel.expert_parallel wraps `local_experts` for that).
    mesh: the mesh the caller runs under (None: none); the Pallas kernel then runs per device."""
    e, fp8 = cfg.n_routed_experts, fp8_lib.mode(cfg)
    if cfg.moe_impl == "dense":
        return _experts_dense(p, x, w, idx, e, fp8)
    if cfg.moe_impl == "ragged_dot":
        return _experts_grouped(p, x, w, idx, e, _ragged_fp8 if fp8 else _ragged)
    if cfg.moe_impl == "pallas":  # per device under a mesh: XLA does not partition Pallas calls
        def specs(mesh):  # experts replicated (gathered), tokens split over the batch axes
            tok = jax.sharding.PartitionSpec(token_axes(mesh, x.shape[0]) or None)
            return (jax.sharding.PartitionSpec(), tok, tok, tok), tok

        fn = lambda p, x, w, idx: _experts_grouped(p, x, w, idx, e, _pallas_gmm(cfg.kernel_interpret, fp8))
        return per_shard(fn, (p, x, w, idx), specs, mesh)
    return _experts_blocked(p, x, w, idx, e, cfg.moe_block_size, fp8=fp8)


def local_experts(p: dict, rows: jnp.ndarray, ids: jnp.ndarray, num_experts: int, cfg: ModelConfig) -> jnp.ndarray:
    """Expert_{ids[r]}(rows[r]) for rows [R, hidden] and ids [R] in 0..num_experts, where num_experts
    marks a padding row: the experts of p (num_experts of them, a device's share under expert
    parallelism) on rows that are already routed. Returns unweighted outputs [R, hidden], zero on
    padding rows. The expert path is cfg.moe_impl's, as in `routed_experts`."""
    valid = ids < num_experts
    ones = valid[:, None].astype(jnp.float32)  # [R, 1]: padding rows get weight 0
    fp8 = fp8_lib.mode(cfg)
    if cfg.moe_impl in ("ragged_dot", "pallas"):
        # ids == num_experts sort last and fall outside every group: the grouped matmul skips them.
        mm = (_ragged_fp8 if fp8 else _ragged) if cfg.moe_impl == "ragged_dot" else _pallas_gmm(cfg.kernel_interpret, fp8)
        return _experts_grouped(p, rows, ones, ids[:, None], num_experts, mm)
    safe = jnp.where(valid, ids, num_experts - 1)[:, None]  # padding rides along in the last expert
    if cfg.moe_impl == "dense":
        return _experts_dense(p, rows, ones, safe, num_experts, fp8)
    return _experts_blocked(p, rows, ones, safe, num_experts, cfg.moe_block_size, capacity=False, fp8=fp8)
