"""MLA Pallas kernels vs the pure-jnp reference (pallas_kernels/mla/reference.py).

The kernels run in the Pallas interpreter on CPU (numerics of forward, dq/dk/dv and decode);
the TPU kernels are additionally compiled through Mosaic for v5p and v6e topologies when libtpu
is installed, and the GPU kernels are lowered for CUDA with jax.export.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.mla import BlockSizes, mla_attention, mla_decode
from pallas_kernels.unavailable import PallasUnavailableError

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _qkv(key, b, s, h, dqk, dv, dtype):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, s, h, dqk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, h, dqk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, h, dv), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (b, s, h, dv), jnp.float32).astype(dtype)
    return q, k, v, do


def _segments(b, s, cuts):
    """[b, s] ids that change at the given positions (first row), second row one segment."""
    row = np.zeros(s, np.int32)
    for c in cuts:
        row[c:] += 1
    return jnp.asarray(np.stack([row] + [np.zeros(s, np.int32)] * (b - 1)))


def _out_and_grads(impl, q, k, v, do, **kw):
    fn = functools.partial(mla_attention, impl=impl, interpret=(impl != "xla"), **kw)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(do)


def _assert_close(got, want, dtype):
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   err_msg=name, **TOL[dtype])


# seq not a multiple of the blocks; segment boundaries inside blocks; dqk != dv;
# forward and backward tiles that differ.
ATTN_CASES = [
    dict(b=2, s=40, h=2, dqk=24, dv=16, causal=True, cuts=(13, 33), blocks=(16, 16, 16, 16)),
    dict(b=1, s=29, h=2, dqk=16, dv=8, causal=False, cuts=(), blocks=(16, 16, 8, 16)),
    dict(b=1, s=24, h=1, dqk=12, dv=20, causal=True, cuts=(), blocks=(8, 16, 16, 8)),
    dict(b=2, s=20, h=1, dqk=16, dv=8, causal=False, cuts=(5,), blocks=(8, 8, 8, 8)),
]


# The interpreter compiles every kernel call (~10 s each on a 2-core CI box): CI runs the case that
# covers the most (causal + segments + padding + dqk != dv) per backend, the rest are `slow`.
SLOW = pytest.mark.slow
BACKENDS = ["pallas_tpu", "pallas_gpu"]
FP32_PARAMS = [pytest.param(b, c, marks=() if c == 0 else SLOW)
               for b in BACKENDS for c in range(len(ATTN_CASES))]


@pytest.mark.parametrize("backend,case", FP32_PARAMS)
def test_attention_fp32_matches_reference(backend, case):
    c = ATTN_CASES[case]
    q, k, v, do = _qkv(jax.random.PRNGKey(case), c["b"], c["s"], c["h"], c["dqk"], c["dv"],
                       jnp.float32)
    seg = _segments(c["b"], c["s"], c["cuts"]) if c["cuts"] else None
    kw = dict(segment_ids=seg, causal=c["causal"])
    got = _out_and_grads(backend, q, k, v, do, block_sizes=BlockSizes(*c["blocks"]), **kw)
    _assert_close(got, _out_and_grads("xla", q, k, v, do, **kw), jnp.float32)


@pytest.mark.parametrize("backend", ["pallas_tpu", pytest.param("pallas_gpu", marks=SLOW)])
def test_attention_bf16_matches_reference(backend):
    q, k, v, do = _qkv(jax.random.PRNGKey(7), 1, 36, 2, 24, 16, jnp.bfloat16)
    seg = _segments(1, 36, (10,))
    kw = dict(segment_ids=seg, causal=True, sm_scale=0.3)
    got = _out_and_grads(backend, q, k, v, do, block_sizes=BlockSizes(16, 16, 16, 16), **kw)
    # Reference in float32 from the same bf16 inputs, compared after the cast to bf16.
    want = _out_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v, do)), **kw)
    _assert_close(got, tuple(w.astype(jnp.bfloat16) for w in want), jnp.bfloat16)


def test_auto_is_reference_on_cpu_and_pallas_needs_interpret():
    q, k, v, _ = _qkv(jax.random.PRNGKey(1), 1, 8, 1, 8, 4, jnp.float32)
    np.testing.assert_array_equal(mla_attention(q, k, v), mla_attention(q, k, v, impl="xla"))
    with pytest.raises(PallasUnavailableError, match="interpret=True"):  # never the reference
        mla_attention(q, k, v, impl="pallas")
    with pytest.raises(PallasUnavailableError, match="mla_attention"):
        jax.jit(functools.partial(mla_attention, impl="pallas"))(q, k, v)
    with pytest.raises(ValueError, match="impl="):
        mla_attention(q, k, v, impl="cuda")


def _decode_inputs(key, b, h, r, rope, t, dtype=jnp.float32):
    ks = jax.random.split(key, 4)
    ql = jax.random.normal(ks[0], (b, h, r), jnp.float32).astype(dtype)
    qp = jax.random.normal(ks[1], (b, h, rope), jnp.float32).astype(dtype)
    c = jax.random.normal(ks[2], (b, t, r), jnp.float32).astype(dtype)
    kpe = jax.random.normal(ks[3], (b, t, rope), jnp.float32).astype(dtype)
    return ql, qp, c, kpe


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=SLOW)])
def test_decode_contiguous_and_paged_match_reference(backend, full):
    b, h, r, rope, t = 3, 4, 32, 8, 40
    ql, qp, c, kpe = _decode_inputs(jax.random.PRNGKey(3), b, h, r, rope, t)
    lengths = jnp.array([1, 17, 40], jnp.int32)
    run = functools.partial(mla_decode, sm_scale=0.1, impl=backend, interpret=True)
    want = mla_decode(ql, qp, c, kpe, lengths, sm_scale=0.1, impl="xla")
    for splits in (1, 3) if full else (3,):  # split-KV off / on (a split past a short length is empty)
        got = run(ql, qp, c, kpe, lengths, num_splits=splits, block_t=16)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"splits={splits}")

    # Paged: 8-token pages scattered over a pool of 20.
    page, pages_per_seq = 8, 5
    pool_c = jax.random.normal(jax.random.PRNGKey(4), (20, page, r))
    pool_pe = jax.random.normal(jax.random.PRNGKey(5), (20, page, rope))
    table = jnp.asarray(np.random.RandomState(0).permutation(20)[: b * pages_per_seq]
                        .reshape(b, pages_per_seq), jnp.int32)
    want = mla_decode(ql, qp, pool_c, pool_pe, lengths, sm_scale=0.1, page_table=table,
                      impl="xla")
    for splits in (1, 2) if full else (1,):
        got = run(ql, qp, pool_c, pool_pe, lengths, page_table=table, num_splits=splits)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"paged {splits}")


def test_decode_reference_matches_hand_softmax():
    """The decode reference itself vs a direct per-token loop (independent oracle)."""
    ql, qp, c, kpe = _decode_inputs(jax.random.PRNGKey(9), 1, 2, 4, 2, 5)
    n = 3
    s = (np.einsum("hr,tr->ht", ql[0], c[0, :n]) + np.einsum("hp,tp->ht", qp[0], kpe[0, :n])) * 0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ np.asarray(c[0, :n])
    got = mla_decode(ql, qp, c, kpe, jnp.array([n]), sm_scale=0.5, impl="xla")
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- TPU AOT


def _tpu_mesh(topology):
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed (pip install the project's `tpu` extra)")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    return Mesh(np.array(devices), ("data",))


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_tpu_kernels_compile(topology):
    """Mosaic compiles forward+backward (with segments, 192/128 dims) and both decodes."""
    mesh = _tpu_mesh(topology)
    n = mesh.devices.size
    shard = NamedSharding(mesh, P("data"))
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)

    def grads(q, k, v, seg):
        loss = lambda q, k, v: mla_attention(q, k, v, segment_ids=seg, impl="pallas_tpu").astype(
            jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    b, s, h = n, 640, 2  # 640: padded to 768, so the kv_len mask is compiled too
    fn = jax.shard_map(grads, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))
    jax.jit(fn).lower(spec((b, s, h, 192)), spec((b, s, h, 192)), spec((b, s, h, 128)),
                      spec((b, s), jnp.int32)).compile()

    r, rope, t = 512, 64, 1024
    decode = lambda ql, qp, c, kpe, lens: mla_decode(ql, qp, c, kpe, lens, sm_scale=0.1,
                                                     impl="pallas_tpu", num_splits=2)
    fn = jax.shard_map(decode, mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data"))
    jax.jit(fn).lower(spec((b, 16, r)), spec((b, 16, rope)), spec((b, t, r)), spec((b, t, rope)),
                      spec((b,), jnp.int32)).compile()

    paged = lambda ql, qp, c, kpe, lens, table: mla_decode(
        ql, qp, c, kpe, lens, sm_scale=0.1, page_table=table, impl="pallas_tpu")
    rep = NamedSharding(mesh, P())
    fn = jax.shard_map(paged, mesh=mesh, in_specs=(P("data"), P("data"), P(), P(), P("data"),
                                                   P("data")), out_specs=P("data"))
    jax.jit(fn).lower(spec((b, 16, r)), spec((b, 16, rope)),
                      jax.ShapeDtypeStruct((64, 64, r), jnp.bfloat16, sharding=rep),
                      jax.ShapeDtypeStruct((64, 64, rope), jnp.bfloat16, sharding=rep),
                      spec((b,), jnp.int32), spec((b, 16), jnp.int32)).compile()


def test_auto_lowers_the_tpu_kernel_for_tpu():
    """impl="auto" picks the kernel by lowering platform (AOT for TPU from a CPU host)."""
    mesh = _tpu_mesh("v5p:2x2x1")
    spec = jax.ShapeDtypeStruct((4, 128, 1, 64), jnp.bfloat16,
                                sharding=NamedSharding(mesh, P("data")))
    fn = jax.shard_map(lambda q, k, v: mla_attention(q, k, v), mesh=mesh,
                       in_specs=(P("data"),) * 3, out_specs=P("data"))
    text = jax.jit(fn).lower(spec, spec, spec).as_text()
    assert "tpu_custom_call" in text and "mla_flash_fwd" in text


def test_model_with_both_pallas_impls_lowers_for_tpu():
    """attention_impl=pallas / moe_impl=pallas: a training step lowers to the Mosaic kernels for TPU
    from this CPU host (AOT), although the same step cannot run here."""
    from dsjax.config import load_config
    from dsjax.model.params import init_params
    from dsjax.model.transformer import forward

    mesh = _tpu_mesh("v5p:2x2x1")  # skips without libtpu
    cfg = load_config("tiny").replace(attention_impl="pallas", moe_impl="pallas", dtype="bfloat16")
    on_tpu = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
    params = jax.tree.map(on_tpu, jax.eval_shape(lambda: init_params(cfg, 0)))
    tokens = on_tpu(jax.ShapeDtypeStruct((2, 128), jnp.int32))
    grad = jax.grad(lambda p, t: forward(p, t, cfg, with_mtp=False, mesh=mesh)[0].astype(jnp.float32).mean())
    with jax.set_mesh(mesh):  # as `dsjax compile` does: Mosaic reads the TPU kind off the mesh
        text = jax.jit(grad).lower(params, tokens).as_text()
    for name in ("mla_flash_fwd", "mla_flash_bwd", "tpu_custom_call"):
        assert name in text, name


# ----------------------------------------------------------------------------- GPU export


def test_gpu_kernels_lower_for_cuda(cuda_target):
    """The Triton kernels (forward, dq, dk/dv, both decodes) lower for CUDA with jax.export."""
    from jax import export

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    sds = jax.ShapeDtypeStruct

    def grads(q, k, v, seg):
        loss = lambda q, k, v: mla_attention(q, k, v, segment_ids=seg, impl="pallas_gpu").astype(
            jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    b, s, h = 2, 200, 2
    exp = export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[triton])(
        sds((b, s, h, 192), jnp.bfloat16), sds((b, s, h, 192), jnp.bfloat16),
        sds((b, s, h, 128), jnp.bfloat16), sds((b, s), jnp.int32))
    text = exp.mlir_module()
    for name in ("mla_flash_fwd", "mla_flash_bwd_dq", "mla_flash_bwd_dkv"):
        assert name in text, name

    def decode(ql, qp, c, kpe, lens, table):
        return mla_decode(ql, qp, c, kpe, lens, sm_scale=0.1, page_table=table, impl="pallas_gpu")

    r, rope = 512, 64
    for cache, table in [((b, 1000, None), None), ((64, 64, None), sds((b, 16), jnp.int32))]:
        n, t, _ = cache
        exp = export.export(jax.jit(decode), platforms=["cuda"], disabled_checks=[triton])(
            sds((b, 16, r), jnp.bfloat16), sds((b, 16, rope), jnp.bfloat16),
            sds((n, t, r), jnp.bfloat16), sds((n, t, rope), jnp.bfloat16),
            sds((b,), jnp.int32), table)
        assert "mla_decode" in exp.mlir_module()


@SLOW
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_many_heads(backend):
    """80 heads: the GPU kernel pads to 128 and runs two 64-head blocks."""
    ql, qp, c, kpe = _decode_inputs(jax.random.PRNGKey(11), 2, 80, 32, 16, 40)
    lengths = jnp.array([7, 40], jnp.int32)
    got = mla_decode(ql, qp, c, kpe, lengths, sm_scale=0.1, impl=backend, interpret=True,
                     num_splits=2, block_t=16)
    want = mla_decode(ql, qp, c, kpe, lengths, sm_scale=0.1, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
