"""The "xla_blocked" grouped matmul: pad groups to blocks, then one batched matmul. For CPU.

XLA's CPU ragged_dot multiplies every row by every group's weights (O(groups) extra work). Here
each group's rows are cut into blocks of `block` rows (the last one zero-padded) and gathered into
[blocks, block, k]; a loop over the *used* blocks (a dynamic trip count) multiplies each by its
expert's weights, read in place: work O(m + groups * block) rows instead of O(m * groups). The block
count is data dependent, so buffers are sized by the static bound cdiv(m, block) + groups.
Measured on the 2-core CPU (benchmarks/moe_kernels.py): a loop over blocks beats one batched
matmul over gathered per-block weights ([blocks, k, n] copies) by ~2x, and ragged_dot by ~10x.
"""
import jax
import jax.numpy as jnp


def default_block(m: int, groups: int) -> int:
    """Rows per block: the mean group size rounded down to a power of 2 in [8, 256].

    Smaller blocks waste less on padding (<= block - 1 rows per group); larger ones run fewer, more
    efficient matmuls. At the CPU preset of benchmarks/moe_kernels.py (mean 64) block 64 beat 16.
    """
    mean = max(1, m // max(groups, 1))
    b = 8
    while b * 2 <= mean and b < 256:
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
    return dict(block_group=bgc, spare=bg >= groups, used=blk_end[-1], rows=rows, row_block=blk_start[rgc] + off // block,
                row_slot=off % block, row_valid=rg < groups)


def _gather_rows(x, rows):
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)  # [nb, block, width]


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, block=None):
    """lhs [m, k], rhs [groups, k, n] ([groups, n, k] if transpose_rhs) -> [m, n] lhs.dtype."""
    m = lhs.shape[0]
    block = block or default_block(m, rhs.shape[0])
    lay = _layout(group_sizes, m, block)
    xb = _gather_rows(lhs, lay["rows"])  # [nb, block, k]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def body(b, yb):
        y = jax.lax.dot_general(xb[b], rhs[lay["block_group"][b]], dims,
                                preferred_element_type=jnp.float32)  # [block, n]
        return yb.at[b].set(y)

    yb = jnp.zeros((xb.shape[0], block, n), jnp.float32)
    yb = jax.lax.fori_loop(0, lay["used"], body, yb)  # [nb, block, n]; spare blocks stay zero
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

    def body(b, out):
        g = lay["block_group"][b]
        return out.at[g].add(jnp.dot(xb[b].T, db[b], preferred_element_type=jnp.float32))

    out = jnp.zeros((groups, lhs.shape[1], dout.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, lay["used"], body, out)  # empty groups stay zero
