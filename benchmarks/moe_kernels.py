"""Grouped-matmul benchmark: gmm impls vs jax.lax.ragged_dot vs a dense matmul of the same FLOPs.

    JAX_PLATFORMS=cpu python benchmarks/moe_kernels.py            # scaled-down V3, < 2 min on CPU
    python benchmarks/moe_kernels.py --preset v3                   # hidden 7168, expert 2048, 256 x top-8

Group sizes come from real routing (route() on random gate logits, V3 gate), so they are uneven.
Each row: median wall time of the jitted forward (and forward+backward), TFLOP/s counting only the
useful 2*m*k*n, the ratio to the dense matmul [m, k] @ [k, n] (the roofline a perfect grouped
kernel would match) and, when tokamax is installed (`pip install tokamax`, a maintained Pallas kernel
library), the ratio to tokamax.ragged_dot (its own choice of implementation: Triton on GPUs, Mosaic on
TPUs, XLA elsewhere), forward and forward+backward. On GPU/TPU the peak is the published bf16 number
(H100/H200 989 TF).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gmm, route
from tokamax_peer import load_tokamax  # benchmarks/, on sys.path when run as a script

PRESETS = {
    # tokens, hidden, expert_dim, experts, top_k, n_group, topk_group
    "cpu": (256, 1024, 256, 32, 8, 4, 2),
    "v3": (4096, 7168, 2048, 256, 8, 8, 4),
}
PEAK_TFLOPS = {"gpu": 989.0, "tpu": None, "cpu": None}


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--tilings", nargs="*", default=[], metavar="TM,TK,TN",
                    help="extra Pallas tilings to time (accelerator only), e.g. 128,128,128")
    args = ap.parse_args()
    backend = jax.default_backend()
    preset = args.preset or ("cpu" if backend == "cpu" else "v3")
    tokens, hidden, ffn, experts, top_k, n_group, topk_group = PRESETS[preset]
    tokens = args.tokens or tokens
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))

    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    logits = jax.random.normal(k1, (tokens, experts), jnp.float32)
    bias = 0.1 * jax.random.normal(k2, (experts,), jnp.float32)
    r = route(logits, top_k=top_k, e_score_correction_bias=bias, n_group=n_group,
              topk_group=topk_group, routed_scaling_factor=2.5)
    group_sizes = r.expert_counts  # [experts]
    m = tokens * top_k
    lhs = jax.random.normal(k3, (m, hidden), dtype)  # rows already grouped (permute's output)
    rhs = (jax.random.normal(k4, (experts, hidden, ffn), dtype) / np.sqrt(hidden)).astype(dtype)
    flops = 2 * m * hidden * ffn
    gs_np = np.asarray(group_sizes)
    print(f"backend={backend} preset={preset} dtype={dtype.name} tokens={tokens} m={m} "
          f"k={hidden} n={ffn} experts={experts} top_k={top_k}; group sizes min/mean/max "
          f"{gs_np.min()}/{gs_np.mean():.1f}/{gs_np.max()}, empty {int((gs_np == 0).sum())}")

    # b[0] is an argument slice, not a closed-over constant (XLA would constant-fold it).
    candidates = {"dense matmul (same FLOPs)": lambda a, b, g: jnp.dot(a, b[0]),
                  "jax.lax.ragged_dot": lambda a, b, g: jax.lax.ragged_dot(a, b, g)}
    if backend == "cpu":
        for block in (None, 64):
            candidates[f"gmm xla_blocked block={block or 'auto'}"] = (
                lambda a, b, g, block=block: gmm(a, b, g, impl="xla_blocked", block=block))
        candidates["gmm auto"] = lambda a, b, g: gmm(a, b, g)
    else:  # ragged_dot last: at V3 size XLA:GPU may lower it densely and run out of memory
        candidates = {"dense matmul (same FLOPs)": candidates["dense matmul (same FLOPs)"],
                      "gmm pallas": lambda a, b, g: gmm(a, b, g, impl="pallas"),
                      "gmm xla_blocked": lambda a, b, g: gmm(a, b, g, impl="xla_blocked"),
                      **{f"gmm pallas {spec}": functools.partial(_pallas_tiled, spec=spec)
                         for spec in args.tilings},
                      "jax.lax.ragged_dot": candidates["jax.lax.ragged_dot"]}

    tokamax = load_tokamax()
    if tokamax is not None:  # second, so that every later row has its ratio to it
        dense = candidates.pop("dense matmul (same FLOPs)")
        candidates = {"dense matmul (same FLOPs)": dense,
                      "tokamax.ragged_dot": lambda a, b, g: tokamax.ragged_dot(a, b, g), **candidates}
    peak = PEAK_TFLOPS.get(backend)
    base = {}  # forward / forward+backward seconds of "dense" and "tokamax", the ratios' bases
    print(f"{'impl':34s} {'fwd ms':>9s} {'TF/s':>7s} {'vs dense':>8s} {'vs tokamax':>10s}"
          + ("" if args.no_backward else f" {'fwd+bwd ms':>11s} {'TF/s':>7s} {'vs dense':>8s} {'vs tokamax':>10s}")
          + ("" if peak is None else f" {'% peak':>7s}"))
    for name, fn in candidates.items():
        try:
            row, times = _row(name, fn, lhs, rhs, group_sizes, flops, peak, args, base)
        except Exception as e:  # one impl failing (e.g. out of memory) must not hide the others
            print(f"{name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        for kind in ("dense", "tokamax"):
            if name.startswith(kind):
                base[kind] = times
        print(row, flush=True)


def _pallas_tiled(a, b, g, spec):
    return gmm(a, b, g, impl="pallas", tiling=tuple(int(x) for x in spec.split(",")))


def _row(name, fn, lhs, rhs, group_sizes, flops, peak, args, base):
    """(printed row, (forward, forward+backward seconds)) of one candidate; ratios to base's rows
    ("-" where a base is missing: itself, or tokamax not installed)."""
    ratio = lambda kind, i, t: f"{base[kind][i] / t:.2f}" if kind in base and base[kind][i] else "-"
    t = _time(jax.jit(fn), lhs, rhs, group_sizes, reps=args.reps)
    row = f"{name:34s} {t * 1e3:9.2f} {flops / t / 1e12:7.3f} {ratio('dense', 0, t):>8s} {ratio('tokamax', 0, t):>10s}"
    tb = None
    if not args.no_backward:
        loss = lambda a, b, g: jnp.sum(fn(a, b, g).astype(jnp.float32))
        tb = _time(jax.jit(jax.value_and_grad(loss, (0, 1))), lhs, rhs, group_sizes, reps=args.reps)
        row += (f" {tb * 1e3:11.2f} {3 * flops / tb / 1e12:7.3f} {ratio('dense', 1, tb):>8s}"
                f" {ratio('tokamax', 1, tb):>10s}")
    if peak is not None:
        row += f" {100 * flops / t / 1e12 / peak:6.1f}%"
    return row, (t, tb)


if __name__ == "__main__":
    main()
