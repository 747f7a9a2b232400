"""Benchmark the MLA attention kernels against XLA paths in the same run.

    python benchmarks/mla_kernels.py                 # CPU: reference vs jax.nn.dot_product_attention
    python benchmarks/mla_kernels.py --seq 4096 ...  # GPU/TPU: also the Pallas kernels

On CPU there are no compiled kernels (the interpreter is a correctness tool), so it times the
pure-jnp reference (what impl="auto" runs there) against XLA's fused dot_product_attention (v
zero-padded to qk_dim, as that API requires equal head dims) and prints ms and the ratio. On an
accelerator it reports prefill forward / forward+backward TFLOP/s of the Pallas kernel and of the
XLA reference against the bf16 peak (published: H100 989 TF, v5p 459, v6e 918) and decode
GB/s against HBM bandwidth (H100 3.35 TB/s, H200 4.8). With tokamax installed (`pip install
tokamax`), its dot_product_attention (its own choice of implementation) is timed too, and every prefill
line gives its speed relative to it. FLOPs count the causal half: forward
2*b*h*s^2/2*(qk+v), backward 2*b*h*s^2/2*(3*qk+2*v) (recomputed q.k, dp, dv, dk, dq).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp

from pallas_kernels.mla import BlockSizes, mla_attention, mla_decode
from tokamax_peer import load_tokamax  # benchmarks/, on sys.path when run as a script

PEAK = {"gpu": (989e12, 3.35e12), "tpu": (459e12, 2.77e12), "cpu": (None, None)}


def bench(fn, *args, iters=5):
    """Median wall seconds of a jitted call (after one compile+warm-up run)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def xla_fused(q, k, v):
    """jax.nn.dot_product_attention needs v_dim == qk_dim: pad v, slice the output."""
    pad = q.shape[-1] - v.shape[-1]
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)))
    o = jax.nn.dot_product_attention(q, k, vp, is_causal=True, implementation="xla")
    return o[..., : v.shape[-1]]


def fwd_bwd(attn):
    def f(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(jnp.ones_like(out))
    return jax.jit(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--qk-dim", type=int, default=192)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--cache-len", type=int, default=4096)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--decode-block-t", type=int, nargs="*", default=[None], metavar="T",
                    help="decode cache tiles to time (default: the kernel's own)")
    ap.add_argument("--blocks", nargs="*", default=[], metavar="BQ,BK,BQ_BWD,BK_BWD",
                    help="extra Pallas tile sets to time (accelerator only), e.g. 128,64,64,64")
    args = ap.parse_args()
    backend = jax.default_backend()
    on_accel = backend in ("gpu", "tpu")
    dtype = jnp.bfloat16 if on_accel else jnp.float32
    peak_flops, peak_bw = PEAK.get(backend, (None, None))
    if "H200" in jax.devices()[0].device_kind:
        peak_bw = 4.8e12  # HBM3e; same bf16 peak as the H100
    b, s, h, dqk, dv = args.batch, args.seq, args.heads, args.qk_dim, args.v_dim
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, s, h, dqk), dtype)
    k = jax.random.normal(kk, (b, s, h, dqk), dtype)
    v = jax.random.normal(kv, (b, s, h, dv), dtype)
    print(f"backend={backend} dtype={jnp.dtype(dtype).name} b={b} s={s} h={h} qk={dqk} v={dv}")

    flops = {"fwd": b * h * s * s * (dqk + dv), "fwd+bwd": b * h * s * s * (4 * dqk + 3 * dv)}
    paths = {"reference": functools.partial(mla_attention, impl="xla"), "xla_fused": xla_fused}
    if on_accel:
        paths["pallas"] = functools.partial(mla_attention, impl="pallas")
        for spec in args.blocks:
            tiles = BlockSizes(*(int(x) for x in spec.split(",")))
            paths[f"pallas {spec}"] = functools.partial(mla_attention, impl="pallas", block_sizes=tiles)
    tokamax = load_tokamax()
    if tokamax is not None:
        paths["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True)
    for phase in ("fwd", "fwd+bwd"):
        results = {}
        for name, attn in paths.items():
            fn = jax.jit(attn) if phase == "fwd" else fwd_bwd(attn)
            try:
                results[name] = bench(fn, q, k, v, iters=args.iters)
            except Exception as e:  # a tile set too big for shared memory: report, go on
                print(f"  {phase:8s} {name:10s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        base = results["reference"]
        for name, sec in results.items():
            line = f"  {phase:8s} {name:10s} {sec * 1e3:9.2f} ms  x{base / sec:5.2f} vs reference"
            if "tokamax" in results:
                line += f"  x{results['tokamax'] / sec:5.2f} vs tokamax"
            if peak_flops:
                tf = flops[phase] / sec
                line += f"  {tf / 1e12:7.1f} TFLOP/s ({100 * tf / peak_flops:.1f}% of peak)"
            print(line)

    # Absorbed decode: the cache read dominates (576 numbers per token).
    bd, heads, rank, rope, t = args.decode_batch, 16, 512, 64, args.cache_len
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    ql = jax.random.normal(ks[0], (bd, heads, rank), dtype)
    qp = jax.random.normal(ks[1], (bd, heads, rope), dtype)
    c = jax.random.normal(ks[2], (bd, t, rank), dtype)
    kpe = jax.random.normal(ks[3], (bd, t, rope), dtype)
    lengths = jnp.full((bd,), t, jnp.int32)
    nbytes = bd * t * (rank + rope) * jnp.dtype(dtype).itemsize
    print(f"decode b={bd} heads={heads} cache={t} rank={rank}+{rope}")
    runs = [("xla", None)] + [("pallas", t) for t in args.decode_block_t if on_accel]
    for impl, block_t in runs:
        fn = jax.jit(functools.partial(mla_decode, sm_scale=0.1, impl=impl, block_t=block_t))
        sec = bench(fn, ql, qp, c, kpe, lengths, iters=args.iters)
        name = impl if block_t is None else f"{impl} t={block_t}"
        line = f"  decode   {name:10s} {sec * 1e3:9.3f} ms  {nbytes / sec / 1e9:8.1f} GB/s"
        if peak_bw:
            line += f" ({100 * nbytes / sec / peak_bw:.1f}% of HBM)"
        print(line)


if __name__ == "__main__":
    main()
