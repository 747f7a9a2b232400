"""MoE kernels: grouped matmul (`gmm`), routing, dropless permutation. Public entry + dispatch.

    from pallas_kernels.moe import gmm, route, permute, unpermute_combine

`gmm(lhs [m, k], rhs [groups, k, n], group_sizes [groups] int32, *, impl="auto", interpret=False)`
-> [m, n] in lhs.dtype, f32 accumulation; rows of lhs are grouped contiguously by group_sizes and
rows past sum(group_sizes) give zeros. Differentiable in lhs and rhs (custom VJP:
dlhs = gmm(dout, rhs^T), drhs = tgmm(lhs, dout)), both through the same implementation.

impl:
  "auto"        Pallas on TPU (Mosaic, tpu.py) and CUDA GPU (Triton, gpu.py); XLA ("xla_blocked")
                elsewhere. Chosen by the platform the computation is *lowered* for
                (lax.platform_dependent), so AOT compiles for TPU from a CPU host get the kernel.
  "pallas"      The Pallas kernel, never anything else. On CPU only with interpret=True (runs the
                TPU kernel, or the GPU one with interpret_kernel="gpu"); without interpret,
                lowering for CPU raises PallasUnavailableError.
  "xla"         jax.lax.ragged_dot (tgmm: ragged_dot_general with ragged contraction). On CPU
                XLA expands it over every group: O(groups) extra work.
  "xla_blocked" Pad each group to a multiple of `block` rows, gather into [blocks, block, k] and
                batch-matmul with each block's expert weights: O(m + groups * block) work. The
                fastest path on CPU (benchmarks/moe_kernels.py).
Routing and permutation are XLA on every backend; routing.py's docstring says why.

`gmm_fp8` / `tgmm_fp8`: the same two products on E4M3 operands with DeepSeek-V3's tile scales, for GPUs
with FP8 tensor cores (gpu_fp8.py; Triton). No VJP: dsjax.model.fp8 composes the three products of a
training step (each operand quantized along its own contraction axis). Lowered for CUDA they are the
kernels; with interpret=True the GPU kernel runs in the Pallas interpreter; lowered for anything else
they raise PallasUnavailableError (there is no Mosaic FP8 kernel: the TPUs in use have no FP8 units).
"""
import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.moe import blocked
from pallas_kernels.moe.permute import permute, unpermute_combine
from pallas_kernels.moe.routing import Routing, gate_logits, route
from pallas_kernels.unavailable import PallasUnavailableError, unavailable

__all__ = ["gmm", "tgmm", "gmm_fp8", "tgmm_fp8", "route", "gate_logits", "Routing", "permute", "unpermute_combine",
           "PallasUnavailableError"]

Impl = Literal["auto", "pallas", "xla", "xla_blocked"]


def _xla_gmm(lhs, rhs, group_sizes, transpose_rhs):
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _xla_tgmm(lhs, dout, group_sizes):
    # Ragged contracting dimension: rows (dim 0) of both operands, one output per group.
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims,
                                      preferred_element_type=jnp.float32)


def _unavailable_gmm(lhs, rhs, group_sizes, t):
    n = rhs.shape[1] if t else rhs.shape[2]
    return unavailable(lhs, (lhs.shape[0], n), lhs.dtype, "gmm")


def _unavailable_tgmm(lhs, dout, group_sizes):
    return unavailable(lhs, (group_sizes.shape[0], lhs.shape[1], dout.shape[1]), jnp.float32, "tgmm")


def _kernels(impl, interpret, interpret_kernel, tiling, block):
    """(gmm_fn(lhs, rhs, gs, transpose_rhs), tgmm_fn(lhs, dout, gs)) for one implementation."""
    from pallas_kernels.moe import gpu, tpu  # imported lazily: they pull in Pallas backends

    def tpu_gmm(l, r, g, t):
        return tpu.gmm(l, r, g, transpose_rhs=t, tiling=tiling, interpret=interpret)

    def tpu_tgmm(l, d, g):
        return tpu.tgmm(l, d, g, tiling=tiling, interpret=interpret)

    def gpu_gmm(l, r, g, t):
        return gpu.gmm(l, r, g, transpose_rhs=t, tiling=tiling, interpret=interpret)

    def gpu_tgmm(l, d, g):
        return gpu.tgmm(l, d, g, tiling=tiling, interpret=interpret)

    def blocked_gmm(l, r, g, t):
        return blocked.gmm(l, r, g, transpose_rhs=t, block=block)

    def blocked_tgmm(l, d, g):
        return blocked.tgmm(l, d, g, block=block)

    if impl == "xla":
        return _xla_gmm, _xla_tgmm
    if impl == "xla_blocked":
        return blocked_gmm, blocked_tgmm
    if impl == "pallas" and interpret:
        return (gpu_gmm, gpu_tgmm) if interpret_kernel == "gpu" else (tpu_gmm, tpu_tgmm)
    if impl == "pallas":
        default_gmm, default_tgmm = _unavailable_gmm, _unavailable_tgmm
    elif impl == "auto":
        default_gmm, default_tgmm = blocked_gmm, blocked_tgmm
    else:
        raise ValueError(f"gmm: unknown impl {impl!r}; expected one of auto, pallas, xla, xla_blocked")

    def gmm_fn(l, r, g, t):
        return jax.lax.platform_dependent(
            l, r, g, tpu=functools.partial(tpu_gmm, t=t), cuda=functools.partial(gpu_gmm, t=t),
            default=functools.partial(default_gmm, t=t))

    def tgmm_fn(l, d, g):
        return jax.lax.platform_dependent(l, d, g, tpu=tpu_tgmm, cuda=gpu_tgmm, default=default_tgmm)

    return gmm_fn, tgmm_fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, config):
    gmm_fn, _ = _kernels(*config)
    return gmm_fn(lhs, rhs, group_sizes, False)


def _gmm_fwd(lhs, rhs, group_sizes, config):
    return _gmm(lhs, rhs, group_sizes, config), (lhs, rhs, group_sizes)


def _gmm_bwd(config, res, dout):
    lhs, rhs, group_sizes = res
    gmm_fn, tgmm_fn = _kernels(*config)
    dout = dout.astype(lhs.dtype)
    dlhs = gmm_fn(dout, rhs, group_sizes, True)  # dout @ rhs[g]^T, no transposed copy of rhs
    drhs = tgmm_fn(lhs, dout, group_sizes).astype(rhs.dtype)  # [groups, k, n]
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, impl: Impl = "auto", interpret: bool = False,
        interpret_kernel: Literal["tpu", "gpu"] = "tpu",
        tiling: Optional[tuple[int, int, int]] = None, block: Optional[int] = None):
    """Grouped matmul: out[rows of group g] = lhs[rows of g] @ rhs[g]; see the module docstring.

    tiling: (tm, tk, tn) for the Pallas kernels (None: per-backend defaults in tpu.py / gpu.py).
    block: rows per block for impl="xla_blocked" (None: chosen from m / groups).
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"gmm: want lhs [m, k] and rhs [groups, k, n]; got {lhs.shape}, {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],) or group_sizes.dtype != jnp.int32:
        raise ValueError(f"gmm: group_sizes must be int32 [{rhs.shape[0]}]; "
                         f"got {group_sizes.dtype} {group_sizes.shape}")
    if impl not in ("auto", "pallas", "xla", "xla_blocked"):
        raise ValueError(f"gmm: unknown impl {impl!r}; expected one of auto, pallas, xla, xla_blocked")
    return _gmm(lhs, rhs, group_sizes, (impl, interpret, interpret_kernel, tiling, block))


def tgmm(lhs, dout, group_sizes, *, impl: Impl = "auto", interpret: bool = False,
         interpret_kernel: Literal["tpu", "gpu"] = "tpu",
         tiling: Optional[tuple[int, int, int]] = None, block: Optional[int] = None):
    """out[g] = lhs[rows of g]^T @ dout[rows of g] -> [groups, k, n] float32 (gmm's rhs gradient)."""
    _, tgmm_fn = _kernels(impl, interpret, interpret_kernel, tiling, block)
    return tgmm_fn(lhs, dout, group_sizes)


def gmm_fp8(lhs, lhs_scale, rhs, rhs_scale, group_sizes, *, transpose_rhs: bool = False, interpret: bool = False):
    """FP8 grouped matmul -> float32: see gpu_fp8.gmm_fp8 for the operands and their scale shapes."""
    from pallas_kernels.moe import gpu_fp8

    kernel = functools.partial(gpu_fp8.gmm_fp8, transpose_rhs=transpose_rhs, interpret=interpret)
    if interpret:
        return kernel(lhs, lhs_scale, rhs, rhs_scale, group_sizes)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    missing = lambda l, *_: unavailable(l, (l.shape[0], n), jnp.float32, "gmm_fp8")
    return jax.lax.platform_dependent(lhs, lhs_scale, rhs, rhs_scale, group_sizes, cuda=kernel, default=missing)


def tgmm_fp8(lhs, lhs_scale, dout, dout_scale, group_sizes, *, interpret: bool = False):
    """FP8 out[g] = lhs[rows of g]^T @ dout[rows of g] -> [groups, k, n] float32: see gpu_fp8.tgmm_fp8."""
    from pallas_kernels.moe import gpu_fp8

    kernel = functools.partial(gpu_fp8.tgmm_fp8, interpret=interpret)
    if interpret:
        return kernel(lhs, lhs_scale, dout, dout_scale, group_sizes)
    shape = (group_sizes.shape[0], lhs.shape[1], dout.shape[1])
    missing = lambda l, *_: unavailable(l, shape, jnp.float32, "tgmm_fp8")
    return jax.lax.platform_dependent(lhs, lhs_scale, dout, dout_scale, group_sizes, cuda=kernel, default=missing)
