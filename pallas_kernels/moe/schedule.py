"""Tile schedule shared by the TPU and GPU grouped-matmul kernels.

The lhs rows are grouped contiguously, so group g covers rows [start_g, end_g). A kernel walks
"work items" (group, m-tile) in row order: every non-empty group visits each tm-row tile it touches,
so a tile shared by two groups is visited twice (once per group, each storing only its own rows).
The number of items is data dependent but bounded by tiles_m + groups - 1, which is the static
grid size; items past the real count repeat the last real item and are skipped by the kernel, so
they cost a grid step but no memory traffic (same block indices => no new DMA on TPU).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    group_ids: jax.Array  # [max_items] int32: group of each work item
    tile_ids: jax.Array  # [max_items] int32: m-tile of each work item
    starts: jax.Array  # [groups] int32: first row of each group
    ends: jax.Array  # [groups] int32: one past the last row of each group
    num_items: jax.Array  # [1] int32: real work items (<= max_items)


def max_items(m_pad: int, tm: int, groups: int) -> int:
    return m_pad // tm + groups - 1


def make_schedule(group_sizes, m_pad: int, tm: int, *, visit_empty: bool) -> Schedule:
    """Work items for lhs rows padded to m_pad (a multiple of tm).

    visit_empty: give every empty group one item too (tgmm must write zeros for its group's
    gradient; gmm has no output for it and skips it).
    """
    group_sizes = group_sizes.astype(jnp.int32)
    groups = group_sizes.shape[0]
    tiles_m = m_pad // tm
    ends = jnp.cumsum(group_sizes)  # [groups]
    starts = ends - group_sizes
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = (ends - 1) // tm
    ntiles = jnp.where(group_sizes > 0, last_tile - first_tile + 1, 1 if visit_empty else 0)
    item_end = jnp.cumsum(ntiles)  # [groups]: exclusive end of each group's items
    num_items = item_end[-1]
    n = max_items(m_pad, tm, groups)
    i = jnp.clip(jnp.arange(n, dtype=jnp.int32), 0, jnp.maximum(num_items - 1, 0))
    gid = jnp.minimum(jnp.searchsorted(item_end, i, side="right"), groups - 1).astype(jnp.int32)
    tile = first_tile[gid] + i - (item_end[gid] - ntiles[gid])
    tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
    return Schedule(gid, tile, starts, ends, num_items.reshape(1).astype(jnp.int32))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_to(x, shape):
    """Zero-pad x at the end of every axis up to shape (no copy when already there)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def mask_rows_past(out, group_sizes):
    """Zero rows at or past sum(group_sizes): kernels never write them (dropless contract)."""
    total = jnp.sum(group_sizes)
    rows = jnp.arange(out.shape[0])[:, None]
    return jnp.where(rows < total, out, jnp.zeros((), out.dtype))
