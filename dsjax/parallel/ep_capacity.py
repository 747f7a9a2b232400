"""Expert-parallel dispatch through a receive buffer sized by a capacity factor, still dropless.

With n devices on the "expert" axis, T local tokens and top-K routing, a device receives T*K rows on
average but up to n*T*min(K, E/n) in the worst case (every source sending all its tokens here). A
buffer sized for the worst case (64 T rows at expert 8, top-8) makes the expert MLP's intermediates
cover all of them. Here the buffer holds R = ceil(capacity_factor * T * K) rows, and routing that
overflows it is not dropped: it takes more rounds.

The schedule: destination j's incoming rows form one stream, ordered by (source, local expert) as the
sources sorted them. Round r carries stream positions [r R, (r+1) R) of every destination. Every
device knows the whole [source, destination] count matrix (all-gathered), so every device computes
the same schedule; the number of rounds is the longest stream over R, rounded up (1 while routing is
within capacity), maximised over the mesh so that all devices run the same loop.

A while loop with a data-dependent trip count has no reverse-mode autodiff, so the dispatch has a
hand-written VJP: the backward pass re-dispatches the rows and their output cotangents round by round
and takes each round's local-experts VJP (the experts run once more forward, as under remat).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsjax.model import fp8 as fp8_lib
from dsjax.model.layers import varying_axes

EXPERT_AXIS = "expert"


def buffer_rows(t: int, k: int, n: int, el: int, factor: float) -> int:
    """Rows of the receive buffer: factor x the mean share T*K, a multiple of 8, at most the worst case."""
    worst = n * t * min(k, el)
    return max(1, min(worst, -(-math.ceil(factor * t * k) // 8) * 8))


def _varying_zeros(shape, dtype, like):
    """Zeros that vary over the same manual mesh axes as `like` (shard_map's type check)."""
    z = jnp.zeros(shape, dtype)
    vma = tuple(sorted(varying_axes(like)))
    return jax.lax.pcast(z, vma, to="varying") if vma else z


def _window(start, size, lo, hi):
    """[start, start + size) intersected with [lo, hi): (first position, count); arrays broadcast."""
    a = jnp.clip(start, lo, hi)
    return a, jnp.clip(start + size, lo, hi) - a


def _schedule(m, me, r, rows: int):
    """Round r's ragged all-to-all arguments, forward (sources -> experts) and reverse.

    m [src, dst]: rows each source sends each destination (sorted by destination, then local expert).
    Returns two tuples (input_offsets, send_sizes, output_offsets, recv_sizes), each [n]."""
    before = jnp.cumsum(m, axis=0) - m  # [src, dst]: stream position of src's first row at dst
    sent_before = jnp.cumsum(m, axis=1) - m  # [src, dst]: where src's rows for dst start in its send buffer
    lo, cnt = _window(before, m, r * rows, (r + 1) * rows)  # [src, dst] this round's part
    skip = lo - before  # rows of the pair already sent in earlier rounds
    zero = lambda off, c: jnp.where(c > 0, off, 0)
    fwd = (zero(sent_before[me] + skip[me], cnt[me]), cnt[me], zero(lo[me] - r * rows, cnt[me]), cnt[:, me])
    rev = (zero(lo[:, me] - r * rows, cnt[:, me]), cnt[:, me],
           zero(sent_before[:, me] + skip[:, me], cnt[:, me]), cnt[me])
    return fwd, rev


def _ragged_emulated(operand, output, in_off, send, out_off, recv, *, width: int):
    """jax.lax.ragged_all_to_all over "expert" from a fixed-size all_to_all (CPU, where the ragged one
    does not lower). width: the most rows any pair exchanges."""
    n = send.shape[0]
    i = jnp.arange(width)
    src = jnp.clip(in_off[:, None] + i, 0, operand.shape[0] - 1)  # [n(dst), width]
    got = jax.lax.all_to_all(operand[src], EXPERT_AXIS, 0, 0, tiled=False)  # [n(src), width, d]
    offs = jax.lax.all_to_all(out_off[:, None], EXPERT_AXIS, 0, 0, tiled=False)[:, 0]  # [n(src)] in my output
    dst = jnp.where(i < recv[:, None], offs[:, None] + i, output.shape[0])  # out of range: dropped
    return output.at[dst.reshape(-1)].set(got.reshape(n * width, -1), mode="drop")


def _exchange(operand, output, args, width: int):
    def ragged(operand, output, *a):
        return jax.lax.ragged_all_to_all(operand, output, *a, axis_name=EXPERT_AXIS)

    def emulated(operand, output, *a):
        return _ragged_emulated(operand, output, *a, width=width)

    return jax.lax.platform_dependent(operand, output, *args, cpu=emulated, default=ragged)


def _buffer_ids(mine, r, rows: int, el: int):
    """Local expert of each row of round r's buffer: the stream is (source, local expert) segments of
    sizes mine [src, el]; el past its end (padding)."""
    ends = jnp.cumsum(mine.reshape(-1))
    seg = jnp.searchsorted(ends, r * rows + jnp.arange(rows), side="right")
    return jnp.where(seg < ends.shape[0], seg % el, el).astype(jnp.int32)


def rounds_needed(m, rows: int, axes: tuple[str, ...]):
    """Rounds for the longest destination stream, the same on every device of the mesh."""
    r = (jnp.max(jnp.sum(m, axis=0)) + rows - 1) // rows
    return jax.lax.pmax(r, axes) if axes else r


def dispatch(p, xs, m, mine, me, num_rounds, *, rows: int, experts, fp8: bool = False):
    """Send the sorted rows xs [T*K, d] to their experts' devices, run `experts(p, buffer [rows, d],
    local ids [rows]) -> [rows, d]` there, bring the outputs back -> [T*K, d] in xs's order.

    m [src, dst] row counts, mine [src, el] rows for my local experts, me my index on the axis,
    num_rounds from rounds_needed. Differentiable in p and xs; over several rounds the weight
    gradients add up in p's dtype (the caller passes the compute dtype's copy of the weights).
    fp8: the rows travel as E4M3 plus their float32 1x128 tile scales, dequantized on arrival (V3's FP8
    dispatch, as dsjax.model.fp8.send_rows); outputs and cotangents travel in xs's dtype."""
    nk = xs.shape[0]
    el = mine.shape[1]
    width = min(rows, nk)

    def round_buffer(src, r, m, me):  # round r's rows (or cotangents) of src, arrived at their experts
        fwd, _ = _schedule(m, me, r, rows)
        return _exchange(src, _varying_zeros((rows, src.shape[-1]), src.dtype, src), fwd, width)

    def sendable(xs):  # what the rows travel as: themselves, or (E4M3 rows, scales), quantized once
        return fp8_lib.quantize(xs, fp8_lib.tiles_along(2, -1)) if fp8 else xs

    def arrived(sent, r, m, me):  # round r's rows of xs at their experts, in xs's dtype
        if not fp8:
            return round_buffer(sent, r, m, me)
        q, s = (round_buffer(a, r, m, me) for a in sent)
        return fp8_lib.dequantize(q, s, fp8_lib.tiles_along(2, -1), xs.dtype)

    def send_back(y, out, r, m, me):
        _, rev = _schedule(m, me, r, rows)
        return _exchange(y, out, rev, width)

    # The routing arrays are arguments, not closed over: a custom VJP must not capture tracers.
    @jax.custom_vjp
    def run(p, xs, plan):
        m, mine, me, num_rounds = plan
        sent = sendable(xs)

        def one(r, out):
            y = experts(p, arrived(sent, r, m, me), _buffer_ids(mine, r, rows, el))
            return send_back(y, out, r, m, me)

        return jax.lax.fori_loop(0, num_rounds, one, _varying_zeros(xs.shape, xs.dtype, xs))

    def run_fwd(p, xs, plan):
        return run(p, xs, plan), (p, xs, plan)

    def run_bwd(res, dy):
        p, xs, plan = res
        m, mine, me, num_rounds = plan
        sent = sendable(xs)

        def one(r, carry):
            dp, dxs = carry
            ids = _buffer_ids(mine, r, rows, el)
            _, vjp = jax.vjp(lambda p, b: experts(p, b, ids), p, arrived(sent, r, m, me))
            dp_r, db = vjp(round_buffer(dy, r, m, me))
            return jax.tree.map(jnp.add, dp, dp_r), send_back(db, dxs, r, m, me)

        zeros = (jax.tree.map(lambda a: _varying_zeros(a.shape, a.dtype, a), p),
                 _varying_zeros(xs.shape, xs.dtype, xs))
        dp, dxs = jax.lax.fori_loop(0, num_rounds, one, zeros)
        return dp, dxs, None

    run.defvjp(run_fwd, run_bwd)
    return run(p, xs, (m, mine, me, num_rounds))
