"""Dropless expert parallelism: tokens travel to the devices that own their experts and come back.

Under a mesh with an "expert" axis of size n > 1 (passed explicitly: `experts_under(mesh, cfg)`
is the routed-experts function a MoE layer uses under that mesh), each device along that axis owns
E/n consecutive routed experts. `routed_experts_ep` runs inside `shard_map`; per device, with its
T local tokens and their top-K choices:

  1. sort the T*K assignments by expert (so by destination device too) and count them;
  2. dispatch: all-to-all over "expert" sends each destination its rows, sorted by local expert.
     TPU/GPU: `jax.lax.ragged_all_to_all` (only the real rows travel). CPU, where it does not
     lower: a padded all-to-all whose per-destination buffers hold the worst case,
     T * min(K, E/n) rows, so nothing is ever dropped;
  3. the local experts over the received rows: dsjax.model.experts.local_experts, the model's own
     expert paths (blocked / ragged_dot / pallas / dense, per cfg.moe_impl);
  4. the reverse all-to-all, then the weighted combine of each token's K outputs.
The receive buffer is sized for the worst case (every source sending all its tokens here), which is
what static shapes cost a dropless scheme: n * T * min(K, E/n) rows per device.

Routing (the gate) and the shared experts stay outside: they are ordinary sharded computations.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.model.fp8 import send_rows
from dsjax.model.experts import (combine, inverse_permutation, local_experts, routed_experts, sort_by_expert,
                                 sorted_rows)
from dsjax.model.layers import vary_together, varying_axes
from dsjax.parallel import ep_capacity
from dsjax.parallel.rules import logical_to_spec, rules_over_dcn
from dsjax.parallel.shard import token_axes

EXPERT_AXIS = "expert"


def expert_axis_size(mesh) -> int:
    """Size of mesh's "expert" axis; 1 for no mesh, a mesh without one, or one already manual over it
    (inside a shard_map)."""
    if mesh is None or EXPERT_AXIS not in mesh.axis_names:
        return 1
    if EXPERT_AXIS in getattr(mesh, "manual_axes", ()):
        return 1
    return dict(mesh.shape)[EXPERT_AXIS]


def experts_under(mesh, cfg: ModelConfig):
    """The routed-experts function experts(p, x [T, hidden], w [T, K], idx [T, K]) -> [T, hidden] of a
    MoE layer run under `mesh` (None: no mesh): expert-parallel when the mesh has an "expert" axis of
    size > 1, else every expert on each device (dsjax.model.experts.routed_experts)."""
    if expert_axis_size(mesh) > 1:
        return lambda p, x, w, idx: routed_experts_ep(p, x, w, idx, cfg, mesh)
    return lambda p, x, w, idx: routed_experts(p, x, w, idx, cfg, mesh)


def routed_experts_ep(p: dict, x: jnp.ndarray, w: jnp.ndarray, idx: jnp.ndarray, cfg: ModelConfig, mesh):
    """Expert-parallel `routed_experts`: x [T, hidden], w/idx [T, K] (global arrays) -> [T, hidden]."""
    n = expert_axis_size(mesh)
    e = cfg.n_routed_experts
    t = x.shape[0]
    if e % n:
        raise ValueError(f"expert parallelism: n_routed_experts={e} is not divisible by the mesh's expert axis ({n})")
    axes = token_axes(mesh, t)
    if EXPERT_AXIS not in axes:
        raise ValueError(f"expert parallelism: {t} tokens cannot be split over the expert axis ({n}); "
                         f"make batch*seq divisible by the batch mesh axes")
    tok = P(axes)
    p = dict(p)  # (a Flax FrozenDict inside the model)
    split = {k: _weight_split(mesh, a.shape, _HIDDEN_DIM[k], cfg.fsdp_over_dcn) for k, a in p.items()}
    wspecs = {k: P(EXPERT_AXIS, *(split[k].get(i) for i in (1, 2))) for k in p}  # [E, in, out]

    def body(p, x, w, idx):
        p = {k: gather_weight(a, split[k], jnp.dtype(x.dtype)) for k, a in p.items()}
        return _local(p, x, w, idx, cfg=cfg, n=n, axes=axes)

    # Pallas calls carry no varying-axes type: shard_map's check has to be off around them.
    fn = jax.shard_map(body, mesh=mesh, in_specs=(wspecs, tok, tok, tok), out_specs=tok,
                       check_vma=cfg.moe_impl != "pallas")
    return fn(p, x, w, idx)


def _local(p, x, w, idx, *, cfg: ModelConfig, n: int, axes: tuple[str, ...] = ()):
    """Per device: x [T, d] local tokens, w/idx [T, K], p = this device's E/n experts."""
    t, k = idx.shape
    e = cfg.n_routed_experts
    el = e // n
    me = jax.lax.axis_index(EXPERT_AXIS)
    order, _, counts = sort_by_expert(idx, e)  # counts [E] for my tokens
    inv = inverse_permutation(order)
    xs = sorted_rows(x, order, inv, k)  # [T*K, d], sorted by expert, hence by destination
    send = counts.reshape(n, el).sum(1)  # rows to each destination
    send_off = jnp.cumsum(send) - send
    all_counts = jax.lax.all_gather(counts, EXPERT_AXIS)  # [n(src), E]
    m = all_counts.reshape(n, n, el).sum(-1)  # [src, dst] rows
    mine = jax.lax.dynamic_slice_in_dim(all_counts, me * el, el, axis=1)  # [src, el] rows for my experts
    recv = mine.sum(1)  # [src]
    if cfg.ep_capacity_factor > 0:  # a buffer of capacity rows, as many rounds as the routing needs
        rows = ep_capacity.buffer_rows(t, k, n, el, cfg.ep_capacity_factor)
        rounds = ep_capacity.rounds_needed(m, rows, axes)
        experts = lambda p, b, ids: local_experts(p, b, ids, el, cfg)
        # The experts' weights in the compute dtype, as local_experts uses them: the per-round weight
        # gradients and their sum are then that size (bf16: half of float32's 3 x 1.75 GiB at 671B).
        leaves, tree = jax.tree.flatten(jax.tree.map(lambda a: a.astype(xs.dtype), p))
        *leaves, xs = vary_together(*leaves, xs)  # weight gradients keep their weights' type
        ys = ep_capacity.dispatch(tree.unflatten(leaves), xs, m, mine, me, rounds, rows=rows, experts=experts,
                                  fp8=bool(cfg.fp8))
        return combine(ys, order, inv, w, t, k)
    cap = t * min(k, el)  # worst-case rows from one source
    args = (xs, send, send_off, m, mine, recv, me, p)
    ys = jax.lax.platform_dependent(*args, cpu=functools.partial(_padded, cfg=cfg, n=n, cap=cap),
                                    default=functools.partial(_ragged, cfg=cfg, n=n, cap=cap))
    return combine(ys, order, inv, w, t, k)


def _segment_ids(sizes, total: int, el: int):
    """Row r of a buffer laid out as consecutive segments of `sizes` (flattened [.., el], segment j
    belonging to local expert j % el) -> its local expert, or el past the last segment."""
    flat = sizes.reshape(-1)
    ends = jnp.cumsum(flat)
    seg = jnp.searchsorted(ends, jnp.arange(total), side="right")
    return jnp.where(seg < flat.shape[0], seg % el, el).astype(jnp.int32)


def _padded(xs, send, send_off, m, mine, recv, me, p, *, cfg, n, cap):
    """CPU: fixed-size all-to-all. Buffer [n(dst), cap, d]; source s's rows land in slot s."""
    nk, d = xs.shape
    el = cfg.n_routed_experts // n
    dest = jnp.searchsorted(jnp.cumsum(send), jnp.arange(nk), side="right")  # destination of sorted row i
    slot = dest * cap + (jnp.arange(nk) - send_off[dest])
    buf = jnp.zeros((n * cap, d), xs.dtype).at[slot].set(xs).reshape(n, cap, d)
    got = _dispatch(buf, lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=False), cfg)  # [n(src), cap, d]
    # rows from source s: sorted by my local experts, mine[s] rows each; then padding
    ids = jax.vmap(lambda c: _segment_ids(c, cap, el))(mine)  # [n, cap]
    y = local_experts(p, got.reshape(n * cap, d), ids.reshape(-1), el, cfg).reshape(n, cap, d)
    back = jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0, tiled=False)  # [n(dst), cap, d]: my rows, returned
    return back.reshape(n * cap, d)[slot]


def _ragged(xs, send, send_off, m, mine, recv, me, p, *, cfg, n, cap):
    """TPU/GPU: ragged all-to-all; only real rows travel. Receive buffer [n * cap, d]."""
    nk, d = xs.shape
    el = cfg.n_routed_experts // n
    before = jnp.cumsum(m, axis=0) - m  # [src, dst]: rows other sources put ahead of src at dst
    out_off = before[me]  # where my rows land at each destination
    recv_off = jnp.cumsum(recv) - recv  # where each source's rows sit in my buffer
    got = _dispatch(xs, lambda a, *routing: jax.lax.ragged_all_to_all(a, _like(a, (n * cap, a.shape[-1])), *routing,
                                                                      axis_name=EXPERT_AXIS),
                    cfg, send_off, send, out_off, recv)
    ids = _segment_ids(mine, n * cap, el)  # consecutive (source, local expert) segments
    y = local_experts(p, got, ids, el, cfg)
    # reverse: my rows from source s go back to s at the offset s used for me
    sent_before = jnp.cumsum(m, axis=1) - m  # [src, dst]: each source's own send offsets
    back_off = jax.lax.dynamic_index_in_dim(sent_before, me, axis=1, keepdims=False)
    return jax.lax.ragged_all_to_all(y, _like(y, (nk, d)), recv_off, recv, back_off, send,
                                     axis_name=EXPERT_AXIS)


def _dispatch(x, move, cfg: ModelConfig, *routing):
    """move(x, *routing): the rows to their experts' devices; under cfg.fp8 as E4M3 plus 1x128 scales
    (V3's FP8 dispatch; the combine stays in x's dtype). move closes over no traced value."""
    return send_rows(x, move, *routing) if cfg.fp8 else move(x, *routing)


def _like(x, shape):
    """A zero output buffer that varies over the same manual mesh axes as x (shard_map's type check)."""
    z = jnp.zeros(shape, x.dtype)
    vma = tuple(sorted(varying_axes(x)))
    return jax.lax.pcast(z, vma, to="varying") if vma else z


# Which dimension of each stacked expert weight is the hidden one (split over "fsdp" by the rules'
# expert_embed, over ("dcn", "fsdp") with mesh.fsdp_over_dcn). Only those axes, token axes, are gathered
# inside: the gradient's sum over them is the reduce-scatter. The MLP dimension's "tensor" split is
# gathered by the shard_map's entry, whose transpose over an axis the tokens do not vary on is a slice.
_HIDDEN_DIM = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}


def _weight_split(mesh, shape, hidden: int, over_dcn: bool) -> dict[int, tuple[str, ...]]:
    """{dimension: mesh axes} an expert weight [E, ., .] stays split over inside the shard_map: its
    hidden dimension over the axes the parameter is stored split over (the same rules as the stored
    state: dsjax.parallel.rules, "fsdp", with over_dcn ("dcn", "fsdp")), so that entering costs no
    resharding. Measured on 671B over two v5p slices with fsdp_over_dcn: gathering over "fsdp" only
    made XLA move the whole 58-layer float32 expert stacks across the slices in every layer step
    (204 s of DCN per step, 6 x 3.17 GiB buffers)."""
    spec = logical_to_spec(("expert_embed",), mesh, (shape[hidden],), rules_over_dcn(over_dcn))
    if not spec:
        return {}
    return {hidden: (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])}


def gather_weight(a, split: dict[int, tuple[str, ...]], dtype):
    """This device's experts' whole weight from its shard, all-gathered over the axes in `split`, then
    cast to the compute dtype. Gathered here, not by the shard_map's entry, so that the gradient comes
    back reduce-scattered: the entry's transpose is an all-reduce of the whole gradient over the same
    axes, sliced afterwards (twice the bytes, and the whole gradient on every device). Gathered in the
    parameter's dtype, so the gradient is summed in it (float32) too."""
    for dim, names in sorted(split.items()):  # (at most one: the hidden dimension)
        a = _gather_slow_axes_first(a, names, dim, dtype)
    return a.astype(dtype)


def _gather_slow_axes_first(a, names: tuple[str, ...], dim: int, dtype):
    """all_gather(a, names, axis=dim, tiled=True).astype(dtype), with the axes gathered one at a time,
    the first (outermost: "dcn" before "fsdp") first, then cast, and the blocks put back in the stored
    order by a local transpose. The transpose of this is a reduce-scatter over the last axis on the
    whole gradient (inside a slice), then over the first on what is left. Gathered in one call over
    ("dcn", "fsdp"), XLA:TPU lowered its transpose as an all-reduce over "fsdp" (twice a reduce-scatter's
    bytes, the whole gradient on every chip) and a slice. 671B on two v6e-256 slices (launch/README.md):
    135 GiB of all-reduce per chip per step -> 68 GiB of reduce-scatter, estimate 9.20 -> 9.03 s not overlapped,
    29.91 -> 29.50 GiB per chip; the local transpose adds ~1% of HBM traffic."""
    if len(names) == 1:
        return jax.lax.all_gather(a, names[0], axis=dim, tiled=True)
    for name in names:  # the stored order is names[0] major; gathering in order makes it minor
        a = jax.lax.all_gather(a, name, axis=dim, tiled=True)
    a = a.astype(dtype)
    sizes = [jax.lax.axis_size(n) for n in names]
    shard = a.shape[dim] // math.prod(sizes)
    # blocks are now indexed [i_last, ..., i_first]: reverse to [i_first, ..., i_last]
    a = a.reshape(*a.shape[:dim], *sizes[::-1], shard, *a.shape[dim + 1:])
    k = len(names)
    perm = list(range(dim)) + [dim + k - 1 - i for i in range(k)] + list(range(dim + k, a.ndim))
    a = jnp.transpose(a, perm)
    return a.reshape(*a.shape[:dim], -1, *a.shape[dim + k + 1:])  # blocks and shard: one axis again
