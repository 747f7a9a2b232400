"""A checksum per array, recorded when a checkpoint is saved and verified when it is restored, so a
bit flip in a checkpoint's data files (disk, network copy, bucket) is found instead of restored as
wrong numbers.

The checksum of an array is computed on the devices from its bits, in the array's own sharding (no
gather; on a pod every host gets the same value): two weighted sums of its 32-bit words modulo 2^32,
    h = sum_i word_i * w_i,   w_i = (i * K) | 1   (odd)
with two multipliers K. Flipping bit k of word i changes h by +-2^k * w_i, which is never 0 modulo 2^32
because w_i is odd: any single bit flip is always caught, other corruption with probability 1 - 2^-64.
Sums of integers wrap identically in any order, so the value does not depend on the sharding or the
device count (a checkpoint saved on 4 devices verifies when restored onto 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_K = (np.uint32(2654435761), np.uint32(0x85EBCA6B))


def _words(a: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (16- and 8-bit types zero-extended; 64-bit split in two)."""
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    if a.dtype == jnp.bool_:
        a = a.astype(jnp.uint8)
    size = a.dtype.itemsize
    if size == 4:
        return lax.bitcast_convert_type(a, jnp.uint32)
    if size == 8:
        return lax.bitcast_convert_type(a, jnp.uint32)  # [..., 2]
    return lax.bitcast_convert_type(a, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _checksum(a: jax.Array) -> jax.Array:
    w = _words(a)
    idx = jnp.zeros(w.shape, jnp.uint32)  # row-major element index, built from iotas (keeps the sharding)
    stride = 1
    for d in reversed(range(w.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride % 2 ** 32)
        stride *= w.shape[d]
    return jnp.stack([jnp.sum(w * ((idx * k) | np.uint32(1)), dtype=jnp.uint32) for k in _K])


@functools.partial(jax.jit)
def _tree_checksums(tree):
    return jax.tree.map(_checksum, tree)


def leaf_name(path) -> str:
    """'opt_state.1.inner_states.decay...': the dotted key path (Orbax names saved arrays the same way)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def checksums(tree) -> dict[str, str]:
    """{dotted leaf name: 16 hex digits} of every array leaf of `tree`."""
    sums = jax.device_get(_tree_checksums(tree))
    flat = jax.tree_util.tree_leaves_with_path(sums)
    return {leaf_name(p): f"{int(v[0]):08x}{int(v[1]):08x}" for p, v in flat}


def mismatches(tree, recorded: dict[str, str]) -> list[str]:
    """Names of the leaves whose checksum differs from `recorded` (leaves absent there are not checked)."""
    got = checksums(tree)
    return [k for k, v in got.items() if k in recorded and recorded[k] != v]
