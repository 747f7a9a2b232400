"""The hand-written VJPs (written for XLA:CPU speed) against jax autodiff of the plain formulas."""
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import experts
from dsjax.model.layers import dense, swiglu


def _autodiff(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    ct = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape), out.dtype)
    return out, vjp(ct), ct


def test_dense_and_swiglu_hand_written_vjps_equal_autodiff():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)) * 0.3, jnp.float32)
    p = {"gate_proj": w, "up_proj": jnp.asarray(rng.standard_normal((16, 24)) * 0.3, jnp.float32),
         "down_proj": jnp.asarray(rng.standard_normal((24, 16)) * 0.3, jnp.float32)}
    plain_swiglu = lambda p, x: (jax.nn.silu(x @ p["gate_proj"]) * (x @ p["up_proj"])) @ p["down_proj"]
    for fn, ref, args in [(dense, lambda x, w: x @ w, (x, w)), (swiglu, plain_swiglu, (p, x))]:
        want, want_grads, ct = _autodiff(ref, *args)
        got, vjp = jax.vjp(jax.jit(fn), *args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(vjp(ct)), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # bf16 operands with a float32 result (the lm head): float32 gradients of the bf16 inputs, cast back
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got, vjp = jax.vjp(lambda x, w: dense(x, w, jnp.float32), xb, wb)
    want, want_grads, ct = _autodiff(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32), xb, wb)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp(ct), want_grads):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_blocked_experts_mlp_vjp_equals_autodiff():
    rng = np.random.default_rng(3)
    e, d, f, blocks, rows = 4, 8, 6, 5, 3
    wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32)
    xb = jnp.asarray(rng.standard_normal((blocks, rows, d)), jnp.float32)
    block_expert = jnp.array([0, 0, 2, 3, 3], jnp.int32)  # sorted; expert 1 has no block

    def plain(wg, wu, wd, xb):
        g = jnp.einsum("nbd,ndf->nbf", xb, wg[block_expert])
        u = jnp.einsum("nbd,ndf->nbf", xb, wu[block_expert])
        return jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, wd[block_expert])

    want, want_grads, ct = _autodiff(plain, wg, wu, wd, xb)
    got, vjp = jax.vjp(lambda *a: experts._block_mlp(*a, block_expert, e), wg, wu, wd, xb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grads = vjp(ct)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[0][1]).max()) == 0.0  # the blockless expert: exactly zero gradient


def test_capacity_experts_mlp_vjp_equals_autodiff():
    rng = np.random.default_rng(4)
    e, d, f, cap = 3, 8, 6, 5
    wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32)
    xc = jnp.asarray(rng.standard_normal((e, cap, d)), jnp.float32)

    def plain(wg, wu, wd, xc):
        return jnp.einsum("ecf,efd->ecd", jax.nn.silu(jnp.einsum("ecd,edf->ecf", xc, wg)) *
                          jnp.einsum("ecd,edf->ecf", xc, wu), wd)

    want, want_grads, ct = _autodiff(plain, wg, wu, wd, xc)
    got, vjp = jax.vjp(experts._capacity_mlp, wg, wu, wd, xc)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(vjp(ct), want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
