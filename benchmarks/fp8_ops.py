"""Per-op FP8 vs BF16 speed (forward + both backward products) for DeepSeek-V3-shaped matmuls.

    python benchmarks/fp8_ops.py                  # on a GPU with FP8 units (H100/H200): native FP8
    python benchmarks/fp8_ops.py --small --impl emulated   # a quick CPU check that it runs

Ops: a dense projection (tokens x hidden 7168 -> 2048, as MLA's q_a / the shared expert), the routed
experts' batched gmm (8 local experts x rows, 7168 -> 2048; moe_impl blocked) and their grouped gmm on
uneven groups (moe_impl pallas: pallas_kernels.moe.gmm in BF16 vs the FP8 grouped kernels gmm_fp8 /
tgmm_fp8). For each: seconds per fwd+bwd (best of --iters after a compiled warm-up), BF16 vs
dsjax.model.fp8 (--impl native: FP8 products with float32 promotion every 128 elements), and the ratio.
With --impl emulated the grouped op runs XLA's ragged_dot on both sides (no Pallas on CPU). Not yet run
on a GPU: no device was lent when it was written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsjax.model import fp8  # noqa: E402
from dsjax.model.layers import dense  # noqa: E402
from pallas_kernels.moe import gmm  # noqa: E402


def _time(fn, args, iters: int) -> float:
    f = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1)))
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="native", choices=["native", "emulated"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    a = ap.parse_args()
    t, d, f, e = (256, 512, 256, 2) if a.small else (8192, 7168, 2048, 8)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (t, d), jnp.bfloat16)
    w = jax.random.normal(k[1], (d, f), jnp.float32) * 0.02
    xe = jax.random.normal(k[2], (e, t // e * 4, d), jnp.bfloat16)
    we = jax.random.normal(k[3], (e, d, f), jnp.float32) * 0.02
    # uneven groups as a router gives them: expert loads from a skewed draw, summing to the row count
    rows = t // e * 4 * e
    share = jax.random.dirichlet(k[0], jnp.full((e,), 2.0))
    sizes = jnp.floor(share * rows).astype(jnp.int32)
    sizes = sizes.at[0].add(rows - sizes.sum())
    xg = xe.reshape(rows, d)
    bf16_impl, fp8_kernel = ("pallas", "pallas") if a.impl == "native" else ("xla", "xla")
    ops = {
        f"dense {t}x{d} -> {f}": (lambda x, w: dense(x, w.astype(x.dtype)),
                                  lambda x, w: fp8.matmul(x, w, a.impl, jnp.bfloat16), (x, w)),
        f"expert gmm {e} x {t // e * 4} rows, {d} -> {f}": (
            lambda x, w: jnp.einsum("erd,edf->erf", x, w.astype(x.dtype)),
            lambda x, w: fp8.batched_matmul(x, w, a.impl, jnp.bfloat16), (xe, we)),
        f"expert grouped gmm {e} groups {[int(v) for v in sizes]}, {d} -> {f}": (
            lambda x, w: gmm(x, w.astype(x.dtype), sizes, impl=bf16_impl),
            lambda x, w: fp8.ragged_matmul(x, w, sizes, jnp.bfloat16, fp8_kernel), (xg, we)),
    }
    dev = jax.devices()[0]
    print(f"# {dev.platform} {dev.device_kind}; fp8 impl {a.impl}; fwd+bwd seconds, best of {a.iters}")
    for name, (bf16, q8, args) in ops.items():
        tb, tq = _time(bf16, args, a.iters), _time(q8, args, a.iters)
        print(f"{name}: bf16 {tb * 1e3:.3f} ms, fp8 {tq * 1e3:.3f} ms, speed-up {tb / tq:.2f}x")


if __name__ == "__main__":
    main()
