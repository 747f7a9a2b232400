"""The "xla_blocked" grouped matmul: pad groups to blocks, then one batched matmul. For CPU.

XLA's CPU ragged_dot multiplies every row by every group's weights (O(groups) extra work). Here
each group's rows are cut into blocks of `block` rows (the last one zero-padded), gathered into
[blocks, block, k], and multiplied by each block's expert weights with one batched matmul:
work O(m + groups * block) rows instead of O(m * groups). The block count is data dependent, so it
is bounded statically by cdiv(m, block) + groups; spare blocks compute on zeros.
"""
import jax
import jax.numpy as jnp


def default_block(m: int, groups: int) -> int:
  """Rows per block: about half the mean group size (power of 2 in [8, 256]).

  Smaller blocks waste less on padding; larger ones make each batched matmul more efficient and
  gather fewer weight matrices. Half the mean keeps the static padding bound <= ~1.5x of m.
  """
  mean = max(1, m // max(groups, 1))
  b = 8
  while b * 4 <= mean and b < 256:
    b *= 2
  return b


def _layout(group_sizes, m: int, block: int):
  """Block -> (group, rows) and row -> (block, slot) maps."""
  groups = group_sizes.shape[0]
  nb = -(-m // block) + groups  # static bound on sum_g cdiv(size_g, block)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  nblk = -(-sizes // block)  # [groups]
  blk_end = jnp.cumsum(nblk)
  blk_start = blk_end - nblk
  b = jnp.arange(nb, dtype=jnp.int32)
  bg = jnp.searchsorted(blk_end, b, side="right")  # [nb]; == groups for spare blocks
  bgc = jnp.minimum(bg, groups - 1)
  local = (b - blk_start[bgc])[:, None] * block + jnp.arange(block)[None, :]  # [nb, block]
  valid = (bg < groups)[:, None] & (local < sizes[bgc][:, None])
  rows = jnp.where(valid, starts[bgc][:, None] + local, m)  # m: out of range -> zero fill
  r = jnp.arange(m, dtype=jnp.int32)
  rg = jnp.searchsorted(ends, r, side="right")  # [m]; == groups past the sum
  rgc = jnp.minimum(rg, groups - 1)
  off = r - starts[rgc]
  return dict(block_group=bgc, spare=bg >= groups, rows=rows, row_block=blk_start[rgc] + off // block,
              row_slot=off % block, row_valid=rg < groups)


def _gather_rows(x, rows):
  return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)  # [nb, block, width]


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, block=None):
  """lhs [m, k], rhs [groups, k, n] ([groups, n, k] if transpose_rhs) -> [m, n] lhs.dtype."""
  m = lhs.shape[0]
  block = block or default_block(m, rhs.shape[0])
  lay = _layout(group_sizes, m, block)
  xb = _gather_rows(lhs, lay["rows"])  # [nb, block, k]
  w = rhs[lay["block_group"]]  # [nb, k, n]: each block's expert weights
  spec = "bik,bnk->bin" if transpose_rhs else "bik,bkn->bin"
  yb = jnp.einsum(spec, xb, w, preferred_element_type=jnp.float32)  # [nb, block, n]
  out = yb[lay["row_block"], lay["row_slot"]]  # [m, n]: a gather, no scatter conflicts
  return jnp.where(lay["row_valid"][:, None], out, 0.0).astype(lhs.dtype)


def tgmm(lhs, dout, group_sizes, *, block=None):
  """out[g] = lhs[rows of g]^T @ dout[rows of g] -> [groups, k, n] float32."""
  m = lhs.shape[0]
  groups = group_sizes.shape[0]
  block = block or default_block(m, groups)
  lay = _layout(group_sizes, m, block)
  xb = _gather_rows(lhs, lay["rows"])  # [nb, block, k]
  db = _gather_rows(dout, lay["rows"])  # [nb, block, n]
  per_block = jnp.einsum("bik,bin->bkn", xb, db, preferred_element_type=jnp.float32)
  seg = jnp.where(lay["spare"], groups, lay["block_group"])  # spare blocks -> dropped segment
  return jax.ops.segment_sum(per_block, seg, num_segments=groups + 1,
                             indices_are_sorted=True)[:groups]
