"""Run the compiled Pallas kernels on the accelerator at hand and compare them with the references.

    python benchmarks/device_check.py            # on a GPU or TPU host; exits 1 if any check fails

CI checks the kernels in the Pallas interpreter on CPU and lowers them for CUDA/TPU from the CPU;
only a real device shows that they compile in Triton/Mosaic and give the same numbers there. Each
check prints max |kernel - reference| next to its tolerance. References are the pure-jnp paths
(pallas_kernels/*/reference.py and the model's XLA paths, which tests/model/test_hf_parity.py
holds to HF transformers), run at float32 "highest" matmul precision so that TF32 does not blur
the comparison. Shapes are V3's head dims with lengths that are not multiples of the tiles.
"""
from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from pallas_kernels.mla import mla_attention, mla_decode  # noqa: E402
from pallas_kernels.moe import gmm  # noqa: E402
from pallas_kernels.moe import reference as moe_ref  # noqa: E402

TOL = {"float32": 2e-4, "bfloat16": 3e-2}  # relative to the reference's max |value|
FAILED: list[str] = []


def report(name, got, want, dtype):
    got = [np.asarray(g, np.float32) for g in jax.tree.leaves(got)]
    want = [np.asarray(w, np.float32) for w in jax.tree.leaves(want)]
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            FAILED.append(name)
            print(f"FAIL {name}: shape {g.shape} != {w.shape}", flush=True)
            return
        worst = max(worst, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)))
    ok = np.isfinite(worst) and worst <= TOL[dtype]
    if not ok:
        FAILED.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|diff|/max|ref| {worst:.2e} (tol {TOL[dtype]:.0e})",
          flush=True)


def guarded(fn):
    @functools.wraps(fn)
    def run(*a, **kw):
        t = time.perf_counter()
        try:
            fn(*a, **kw)
        except Exception as e:  # keep going: one broken kernel must not hide the others' results
            FAILED.append(fn.__name__)
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        print(f"     ({fn.__name__} {time.perf_counter() - t:.1f} s)", flush=True)
    return run


@guarded
def check_attention(dtype):
    b, s, h, dqk, dv = 2, 1000, 4, 192, 128
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = (jax.random.normal(kk, (b, s, h, dqk), jnp.float32).astype(dtype) for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, s, h, dv), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, s, h, dv), jnp.float32).astype(dtype)
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [300, 517, 183]), np.ones(s, int)]), jnp.int32)

    # Inputs are jit arguments, never closed-over constants (XLA would try to constant-fold).
    def out_and_grads(q, k, v, do, seg, impl, causal):
        f = functools.partial(mla_attention, segment_ids=seg, causal=causal, impl=impl)
        out, vjp = jax.vjp(f, q, k, v)
        return (out,) + vjp(do)

    for causal in (True, False):
        run = jax.jit(out_and_grads, static_argnums=(5, 6))
        want = run(q, k, v, do, seg, "xla", causal)
        got = run(q, k, v, do, seg, "pallas", causal)
        report(f"mla_attention {jnp.dtype(dtype).name} causal={causal} o,dq,dk,dv", got, want,
               jnp.dtype(dtype).name)


@guarded
def check_decode(dtype):
    b, h, r, rope, t = 3, 16, 512, 64, 1000
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    ql = jax.random.normal(ks[0], (b, h, r), jnp.float32).astype(dtype)
    qp = jax.random.normal(ks[1], (b, h, rope), jnp.float32).astype(dtype)
    c = jax.random.normal(ks[2], (b, t, r), jnp.float32).astype(dtype)
    kpe = jax.random.normal(ks[3], (b, t, rope), jnp.float32).astype(dtype)
    lengths = jnp.array([1, 517, 1000], jnp.int32)
    name = jnp.dtype(dtype).name
    for splits in (1, 4):
        f = functools.partial(mla_decode, sm_scale=0.1, num_splits=splits)
        want = jax.jit(functools.partial(f, impl="xla"))(ql, qp, c, kpe, lengths)
        got = jax.jit(functools.partial(f, impl="pallas"))(ql, qp, c, kpe, lengths)
        report(f"mla_decode contiguous {name} splits={splits}", got, want, name)
    page, pool = 64, 60
    pc = jax.random.normal(ks[4], (pool, page, r), jnp.float32).astype(dtype)
    ppe = jax.random.normal(ks[5], (pool, page, rope), jnp.float32).astype(dtype)
    table = jnp.asarray(np.random.RandomState(0).permutation(pool)[: b * 16].reshape(b, 16), jnp.int32)
    f = functools.partial(mla_decode, sm_scale=0.1, page_table=table)
    want = jax.jit(functools.partial(f, impl="xla"))(ql, qp, pc, ppe, lengths)
    got = jax.jit(functools.partial(f, impl="pallas"))(ql, qp, pc, ppe, lengths)
    report(f"mla_decode paged {name}", got, want, name)


@guarded
def check_gmm(dtype):
    sizes = np.array([0, 517, 0, 1203, 31, 2000, 0, 300], np.int32)  # empty groups, ragged edges
    m, k, n = int(sizes.sum()) + 37, 1024, 384  # rows past the sum must come out zero
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
    dout = jnp.asarray(rng.normal(size=(m, n)), dtype)
    gs = jnp.asarray(sizes)

    def out_and_grads(lhs, rhs, dout, gs):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, impl="pallas"), lhs, rhs)
        return (out,) + vjp(dout)

    name = jnp.dtype(dtype).name
    got = jax.jit(out_and_grads)(lhs, rhs, dout, gs)
    f32 = lambda x: x.astype(jnp.float32)
    want = (moe_ref.gmm_reference(f32(lhs), f32(rhs), gs),
            moe_ref.gmm_reference(f32(dout), jnp.swapaxes(f32(rhs), 1, 2), gs),
            moe_ref.tgmm_reference(f32(lhs), f32(dout), gs))
    report(f"gmm {name} out,dlhs,drhs vs gmm_reference", got, want, name)
    if np.any(np.asarray(got[0][int(sizes.sum()):], np.float32)):
        FAILED.append("gmm tail")
        print("FAIL gmm: rows past sum(group_sizes) are not zero", flush=True)


@guarded
def check_gmm_fp8():
    """The FP8 grouped kernels (GPUs with FP8 tensor cores only) vs XLA's ragged_dot on the dequantized
    operands, through dsjax.model.fp8.ragged_matmul: forward, input and weight gradients. Both sides use
    the same E4M3 values and scales; only float32 summation order differs."""
    from dsjax.model import fp8

    if not fp8.has_fp8_units(jax.devices()[0].platform, jax.devices()[0].device_kind,
                             getattr(jax.devices()[0], "compute_capability", None)):
        print("     (gmm_fp8: this device has no FP8 units; skipped)", flush=True)
        return
    sizes = np.array([0, 517, 0, 1203, 31, 2000, 0, 300], np.int32)
    m, k, n = int(sizes.sum()) + 37, 1000, 384  # k not a multiple of 128: a ragged last scale tile
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray(sizes)

    def out_and_grads(x, w, dy, gs, kernel):
        y, vjp = jax.vjp(lambda a, b: fp8.ragged_matmul(a, b, gs, jnp.float32, kernel), x, w)
        return (y,) + vjp(dy)

    run = jax.jit(out_and_grads, static_argnums=4)
    want = run(x, w, dy, gs, "xla")
    got = run(x, w, dy, gs, "pallas")
    report("gmm_fp8/tgmm_fp8 out,dx,dw vs ragged_dot on dequantized operands", got[::2], want[::2], "float32")
    report("gmm_fp8 dx (bfloat16 like x)", got[1], want[1], "bfloat16")


@guarded
def check_model(dtype):
    """Whole model: loss and gradients with both Pallas kernels vs the XLA paths."""
    from dsjax.config import load_config
    from dsjax.model.params import init_params
    from dsjax.model.transformer import forward

    cfg = load_config("tiny").replace(dtype=jnp.dtype(dtype).name, param_dtype="float32")
    params = init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 200), 3, cfg.vocab_size)

    def loss_and_grads(params, tokens, c):
        def loss(p):
            logits, _ = forward(p, tokens, c, with_mtp=False)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
                logits, tokens[..., None], -1)[..., 0])
        return jax.value_and_grad(loss)(params)

    run = jax.jit(loss_and_grads, static_argnums=2)
    want = run(params, tokens, cfg)
    got = run(params, tokens, cfg.replace(attention_impl="pallas", moe_impl="pallas"))
    name = jnp.dtype(dtype).name
    if name == "float32":
        report("tiny model float32 loss + all grads, pallas vs xla", got, want, name)
    else:  # bf16 rounding differences flip a few top-k choices, which moves single experts' grads
        report("tiny model bfloat16 loss, pallas vs xla", got[0], want[0], name)


def main() -> int:
    backend = jax.default_backend()
    print(f"jax {jax.__version__}, backend {backend}, {jax.devices()[0].device_kind}", flush=True)
    if backend not in ("gpu", "tpu"):
        print("no GPU/TPU: nothing to check (CPU runs the kernels in interpret mode in tests/kernels)")
        return 2
    for dtype in (jnp.float32, jnp.bfloat16):
        check_attention(dtype)
        check_decode(dtype)
        check_gmm(dtype)
        check_model(dtype)
    check_gmm_fp8()
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
