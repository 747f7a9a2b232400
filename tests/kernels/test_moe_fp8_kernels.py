"""The FP8 grouped-matmul kernels (pallas_kernels/moe/gpu_fp8.py) in the Pallas interpreter, against a
float64 numpy product of the dequantized operands; their use in dsjax.model.fp8.ragged_matmul and the
model (moe_impl=pallas, fp8 native); lowering for CUDA and TPU from this CPU host.

The kernels apply each 128-element tile's scales to a float32 partial product; the reference multiplies
the dequantized operands (q * scale, exact in float64). The two differ only by float32 rounding.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsjax.model import fp8
from pallas_kernels.moe import PallasUnavailableError, gmm_fp8, tgmm_fp8
from tests.model.test_fp8_recipe import _np_deq as _deq  # float64 numpy q * scale, by hand

# Uneven groups: empty first, middle and last ones, a group boundary inside a 64-row kernel tile and
# inside a 128-row weight-gradient tile, 7 rows past the sum (m = 307, not a multiple of 64 or 128);
# k = 200 and n = 150 are not multiples of 128 (ragged last scale tiles).
GROUPS = np.array([0, 30, 0, 100, 150, 20, 0], np.int32)
M, K, N = 307, 200, 150
A1, A128, BLOCKS = fp8.tiles_along(2, -1), fp8.tiles_along(2, -2), fp8.weight_blocks(3)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (M, 1))).astype(np.float32)
    w = (rng.standard_normal((len(GROUPS), K, N)) * 0.1).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)


def _segments():
    ends = np.cumsum(GROUPS)
    return [slice(e - g, e) for g, e in zip(GROUPS, ends)]


def _close(got, want):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gmm_fp8_and_its_transpose_vs_float64():
    x, w, dy = _data()
    qw, sw = fp8.quantize(w, BLOCKS)
    wq = _deq(qw, sw, BLOCKS)
    qx, sx = fp8.quantize(x, A1)
    y = gmm_fp8(qx, sx, qw, sw, jnp.asarray(GROUPS), interpret=True)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    xq = _deq(qx, sx, A1)
    want = np.zeros((M, N))
    for g, r in enumerate(_segments()):
        want[r] = xq[r] @ wq[g]
    _close(y, want)  # rows past the sum included: zeros
    qd, sd = fp8.quantize(dy, A1)  # the input gradient: dY [m, n] tiled along n, the same W blocks
    dx = gmm_fp8(qd, sd, qw, sw, jnp.asarray(GROUPS), transpose_rhs=True, interpret=True)
    dq = _deq(qd, sd, A1)
    want = np.zeros((M, K))
    for g, r in enumerate(_segments()):
        want[r] = dq[r] @ wq[g].T
    _close(dx, want)


def test_tgmm_fp8_vs_float64_with_tiles_straddling_groups():
    x, _, dy = _data(1)
    qx, sx = fp8.quantize(x, A128)
    qd, sd = fp8.quantize(dy, A128)
    dw = tgmm_fp8(qx, sx, qd, sd, jnp.asarray(GROUPS), interpret=True)
    assert dw.shape == (len(GROUPS), K, N)
    xq, dq = _deq(qx, sx, A128), _deq(qd, sd, A128)
    want = np.stack([xq[r].T @ dq[r] for r in _segments()])
    _close(dw, want)
    assert not np.any(np.asarray(dw)[GROUPS == 0]), "empty groups get zeros"


def test_rows_of_other_groups_never_leak():
    """A NaN in a row of group 0 must not reach the products of group 1 sharing its tiles."""
    x, w, dy = _data(2)
    gs = jnp.asarray(np.array([10, 20, 0, 0, 0, 0, 0], np.int32))
    x = x.at[5, 3].set(jnp.nan)
    qx, sx = fp8.quantize(x, A128)
    qx = qx.at[5, 3].set(jnp.nan)  # tile scale of the NaN row's tile is NaN too: keep q's NaN explicit
    dw = np.asarray(tgmm_fp8(qx, jnp.nan_to_num(sx), *fp8.quantize(dy, A128), gs, interpret=True))
    assert np.isnan(dw[0]).any() and not np.isnan(dw[1:]).any()


def test_ragged_matmul_with_the_kernels_equals_the_emulated_one():
    """fp8.ragged_matmul forward and both gradients: the Pallas kernels (interpreted) == XLA's ragged_dot
    on dequantized operands, up to float32 summation order."""
    x, w, dy = _data(3)
    gs = jnp.asarray(GROUPS)

    def run(kernel):
        y, vjp = jax.vjp(lambda a, b: fp8.ragged_matmul(a, b, gs, jnp.float32, kernel), x, w)
        return (y, *vjp(dy))

    for got, want in zip(run("pallas_interpret"), run("xla")):
        want = np.asarray(want, np.float64)
        _close(got, want)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fp8.ragged_matmul(x, w, gs, jnp.float32, "triton")


def test_operand_errors_name_the_shapes():
    x, w, _ = _data()
    qw, sw = fp8.quantize(w, BLOCKS)
    qx, sx = fp8.quantize(x, A1)
    with pytest.raises(ValueError, match=r"want E4M3 \(307, 200\) with scales \(307, 2\); got float32"):
        gmm_fp8(qx.astype(jnp.float32), sx, qw, sw, jnp.asarray(GROUPS), interpret=True)
    with pytest.raises(ValueError, match=r"scales \(7, 2, 2\)"):
        gmm_fp8(qx, sx, qw, sw[:, :1], jnp.asarray(GROUPS), interpret=True)


def test_without_interpret_on_cpu_is_a_clear_error():
    x, w, _ = _data()
    qx, sx = fp8.quantize(x, A1)
    with pytest.raises(PallasUnavailableError, match="gmm_fp8"):
        jax.jit(lambda: gmm_fp8(qx, sx, *fp8.quantize(w, BLOCKS), jnp.asarray(GROUPS)))()


def _train_step(kernel):
    def step(x, w, gs):
        f = lambda a, b: fp8.ragged_matmul(a, b, gs, jnp.bfloat16, kernel).astype(jnp.float32).sum()
        return jax.value_and_grad(f, (0, 1))(x, w)
    return step


_ARGS = (jax.ShapeDtypeStruct((512, 256), jnp.bfloat16), jax.ShapeDtypeStruct((4, 256, 384), jnp.float32),
         jax.ShapeDtypeStruct((4,), jnp.int32))


def test_training_step_lowers_for_cuda_with_the_fp8_kernels(cuda_target):
    from jax import export
    exp = export.export(jax.jit(_train_step("pallas")), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*_ARGS)
    text = exp.mlir_module()
    # forward and input gradient: gmm_fp8 twice; weight gradient: tgmm_fp8
    assert text.count('name = "dsjax_gmm_fp8_gpu"') == 2 and text.count('name = "dsjax_tgmm_fp8_gpu"') == 1
    assert "ragged_dot" not in text


def test_on_tpu_the_pallas_kernel_choice_runs_emulated():
    """No Mosaic FP8 kernel (v4-v6e have no FP8 units): lowered for TPU, the products are XLA's."""
    from jax import export
    exp = export.export(jax.jit(_train_step("pallas")), platforms=["tpu"])(*_ARGS)
    text = exp.mlir_module()
    assert "triton" not in text and "ragged_dot" in text


def test_model_with_the_pallas_fp8_kernels_equals_the_emulated_model():
    """moe_impl=pallas (the FP8 kernels, interpreted) vs moe_impl=ragged_dot (XLA on dequantized
    operands), both with fp8 native for the dense projections, on one MoE layer: the same loss and every
    gradient within 1e-5 (relative Frobenius; measured <= 3.3e-7). With more layers a float32 summation
    difference can flip an E4M3 rounding that later layers compound (measured on the 3-layer model: the
    routed experts' gradients 3.4e-6, q_a_proj 7.6e-4); the expert-parallel version of this check
    (tests/parallel/test_expert_parallel.py, slow) bounds the whole model that way."""
    from dsjax.config import load_config
    from dsjax.model.params import init_params
    from dsjax.model.transformer import forward

    # one MoE layer, no MTP: the path under test, at a third of the compile time
    cfg = load_config("configs/tiny.yaml").replace(fp8=True, num_hidden_layers=1, first_k_dense_replace=0,
                                                   num_nextn_predict_layers=0)
    params = init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, cfg.vocab_size)

    def run(**kw):
        c = cfg.replace(**kw)

        def loss(p):
            logp = jax.nn.log_softmax(forward(p, tokens, c)[0][:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0) = run(moe_impl="ragged_dot", fp8_impl="native")
    (l1, g1) = run(moe_impl="pallas", fp8_impl="native", kernel_interpret=True)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30)
        assert err <= 1e-5, (jax.tree_util.keystr(path), err)
