"""Per-array checksums (dsjax.checkpoint.checksums) against a numpy implementation of the formula, the
same under any sharding, and changed by every single bit flip."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.checkpoint import checksums


def _reference(a: np.ndarray) -> str:
    """h_k = sum_i word_i * ((i * K_k) | 1) mod 2^32 over the array's 32-bit words, in numpy."""
    if a.dtype.itemsize == 8:
        w = a.view(np.uint32).reshape(-1).astype(np.uint64)
    else:
        w = a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize]).reshape(-1).astype(np.uint64)
    i = np.arange(w.size, dtype=np.uint64)
    out = []
    for k in (2654435761, 0x85EBCA6B):
        weight = ((i * k) % 2 ** 32) | 1
        out.append(int(np.sum((w * weight) % 2 ** 32, dtype=np.uint64) % 2 ** 32))
    return f"{out[0]:08x}{out[1]:08x}"


def _arrays():
    rng = np.random.default_rng(0)
    return {"f32": rng.standard_normal((16, 12)).astype(np.float32),
            "bf16": rng.standard_normal((8, 6)).astype(ml_dtypes.bfloat16),
            "i32": rng.integers(-9, 9, (8, 3, 2)).astype(np.int32),
            "u8": rng.integers(0, 255, (40,)).astype(np.uint8),
            "scalar": np.float32(3.5)}


def test_matches_numpy_reference_and_any_sharding():
    arrs = _arrays()
    got = checksums.checksums(arrs)
    assert got == {k: _reference(np.asarray(v)) for k, v in arrs.items()}
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("x") if np.ndim(v) and v.shape[0] % 8 == 0 else P()))
               for k, v in arrs.items()}
    assert checksums.checksums(sharded) == got
    key = jax.random.key(3)  # typed PRNG keys are checksummed through their key data
    assert checksums.checksums({"k": key})["k"] == _reference(np.asarray(jax.random.key_data(key)))


def test_every_single_bit_flip_changes_it():
    a = _arrays()["bf16"]
    base = checksums.checksums({"a": a})["a"]
    raw = a.view(np.uint8).reshape(-1)
    for byte in range(raw.size):
        for bit in range(8):
            b = raw.copy()
            b[byte] ^= 1 << bit
            assert checksums.checksums({"a": b.view(a.dtype).reshape(a.shape)})["a"] != base, (byte, bit)
    assert checksums.mismatches({"a": jnp.asarray(a)}, {"a": base}) == []
