"""FP8 matmuls with DeepSeek-V3's fine-grained scaling (DeepSeek-V3 technical report, section 3.3).

Every GEMM input is E4M3 (float8_e4m3fn, max 448) with float32 scales computed online from the amax of
its tile (scale = amax / 448, so the tile's largest magnitude lands on 448):
  activations  one scale per 1x128 tile: per row (token), per 128 channels of the contraction axis;
  weights      one scale per 128x128 block (the layout of the official FP8 checkpoint's
               `weight_scale_inv`, here on [in, out] kernels);
and products accumulate in float32. The backward products are FP8 too, each operand tiled along the
contraction axis of its product:
  input gradient   dX = dY W^T   dY in 1x128 tiles along the output channels, W's 128x128 blocks reused
                                 (square blocks are the same tiles for W and W^T);
  weight gradient  dW = X^T dY   X and dY in 128x1 tiles (128 tokens of one channel).
Master weights and their gradients stay float32 (the caller's dtypes); the saved activation is the
unquantized input, requantized for the weight gradient (V3 keeps that input in higher precision too).

Two implementations of the scaled product, chosen explicitly (`ModelConfig.fp8_impl`, "auto" resolved
from the backend by `resolve_impl`), never by what the traced function sees:
  emulated  dequantize (q * scale, exact in float32) and one float32 dot. Numerically the recipe, on any
            hardware: the FP8 rounding is the same; only the summation order inside a 128-chunk differs.
            Used where there are no FP8 units: CPU, TPU v4/v5e/v5p/v6e.
  native    the dot on float8 operands per 128-wide chunk of the contraction axis, each chunk's float32
            partial product scaled by its two tiles' scales and summed in float32: the "promotion every
            128 elements" of V3, written as XLA ops (a batched FP8 dot that XLA lowers to cuBLASLt FP8
            GEMMs on Hopper; FP8 MXUs on TPU7x). Not a fused kernel: the [chunks, rows, out] partials go
            through memory.
The grouped expert product (`ragged_matmul`, moe_impl ragged_dot or pallas) has its own choice: XLA's
ragged_dot on dequantized operands (emulated, any backend), or pallas_kernels.moe's FP8 grouped kernels
on CUDA GPUs (Triton; the per-128 promotion in registers, as DeepGEMM does).

Qwix (google/qwix 0.1.8, the quantization library MaxText uses) was considered and not used:
  - its weights are scaled per output channel with optional sub-channel tiles of the contraction axis;
    there is no 128x128 block scale, the one that is the same tile for W and W^T in the input gradient;
  - under training (QtProvider) the backward products reuse the forward pass's quantized residuals, so
    the weight gradient contracts tokens of an activation that was tiled along channels, where V3 tiles
    both weight-gradient operands along tokens;
  - it finds weights by intercepting Flax modules' dot_general/einsum calls, while dsjax's dense, SwiGLU
    and expert products are pure functions with hand-written VJPs that interception would bypass.
So the recipe is written here in plain jnp, with every piece tested against values
derived by hand and a float64 numpy reference (tests/model/test_fp8_recipe.py).
"""
from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
IMPLS = ("auto", "emulated", "native")


# --- which implementation runs where ------------------------------------------------------------------

def has_fp8_units(platform: str, device_kind: str = "", compute_capability: str | None = None) -> bool:
    """Whether a device has FP8 matrix units: NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell),
    TPU7x (Ironwood). TPU v4/v5e/v5p/v6e and CPUs have none."""
    if platform in ("cuda", "gpu"):
        try:
            major, minor = (int(v) for v in str(compute_capability).split(".")[:2])
        except ValueError:
            return False
        return (major, minor) >= (8, 9)
    if platform == "tpu":
        kind = device_kind.lower().replace(" ", "")
        return kind.startswith(("tpu7", "tpuv7")) or "ironwood" in kind
    return False


def resolve_impl(impl: str, device=None) -> str:
    """"auto" -> "native" where the device (default: the first one) has FP8 units, else "emulated"."""
    if impl not in IMPLS:
        raise ValueError(f"fp8_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    device = device or jax.devices()[0]
    return "native" if has_fp8_units(device.platform, getattr(device, "device_kind", ""),
                                     getattr(device, "compute_capability", None)) else "emulated"


def mode(cfg) -> str | None:
    """The FP8 implementation a model config asks for: None (off), "emulated" or "native"."""
    return resolve_impl(cfg.fp8_impl) if cfg.fp8 else None


def startup_line(cfg) -> str:
    """One line for a run's start: whether FP8 is on, whether it runs natively or emulated here, and
    which kernel the routed experts' grouped products take."""
    if not cfg.fp8:
        return "fp8: off (bf16/fp32 matmuls)"
    d = jax.devices()[0]
    how = resolve_impl(cfg.fp8_impl, d)
    units = "has FP8 units" if has_fp8_units(d.platform, d.device_kind, getattr(d, "compute_capability", None)) \
        else "has no FP8 units"
    pallas = "XLA ragged_dot, emulated" if how == "emulated" else \
        "XLA ragged_dot, emulated (no Mosaic FP8 kernel)" if d.platform == "tpu" else "the Pallas FP8 grouped kernels"
    experts = {"pallas": pallas,
               "ragged_dot": "XLA ragged_dot, emulated",
               "blocked": f"{how} FP8 dots per expert block", "dense": f"{how} FP8 dots"}.get(cfg.moe_impl, cfg.moe_impl)
    return (f"fp8: on (E4M3, 1x128 activation tiles, 128x128 weight blocks), {how} on {d.platform} "
            f"({d.device_kind}, which {units}); routed experts: {experts}")


# --- quantize / dequantize ----------------------------------------------------------------------------

def quantize(x: jnp.ndarray, tile: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x -> (q E4M3 of x's shape, scale float32 [ceil(n_i / tile_i)]) with x ~= q * scale per tile.

    A ragged last tile is padded with zeros (which do not change its amax). An all-zero tile gets scale
    1 (not 0/448, which would divide by zero); values are clipped to +-448 before the cast, where
    float8_e4m3fn has no infinity and would give NaN."""
    if len(tile) != x.ndim:
        raise ValueError(f"quantize: tile {tile} has {len(tile)} axes, x has shape {x.shape}")
    xf, split = _tiled(x.astype(jnp.float32), tile)
    amax = jnp.max(jnp.abs(xf), axis=tuple(range(1, 2 * x.ndim, 2)), keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return _untiled(to_e4m3(xf / scale), split, x.shape), scale.reshape(split[::2])


def to_e4m3(x: jnp.ndarray) -> jnp.ndarray:
    """Round to E4M3, saturating at +-448 (a plain cast turns anything >= 464 into NaN)."""
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def dequantize(q: jnp.ndarray, scale: jnp.ndarray, tile: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
    """q * scale of its tile, in dtype (float32 is exact: 3 mantissa bits times a float32)."""
    return (q.astype(jnp.float32) * expand_scale(scale, tile, q.shape)).astype(dtype)


def expand_scale(scale, tile, shape, keep: int | None = None):
    """Each tile's scale repeated over its tile, cropped to shape; axis `keep` is left per tile.

    A broadcast and a reshape (jnp.repeat's fast path), which XLA partitions along a sharded axis. Not
    jnp.repeat(..., total_repeat_length=n): that takes the general path, a gather, and for a gather XLA
    makes the operand whole on every device: on 671B (v5p-512, 4-layer cut) the 128x1 scales of the
    weight-gradient operands were summed over all 256 chips, f32[32768, C] per product; with the
    broadcast, all-reduce per chip per step 307.7 -> 189.5 GiB and temporaries 79.3 -> 69.8 GiB."""
    for ax, t in enumerate(tile):
        if t > 1 and ax != keep:
            scale = jnp.repeat(scale, t, axis=ax)
    return scale[tuple(slice(None) if ax == keep else slice(0, n) for ax, n in enumerate(shape))]


def _tiled(x, tile):
    """Pad each axis to a multiple of its tile and split it: [n_0, ...] -> [n_0/t_0, t_0, ...]."""
    padded = [-(-n // t) * t for n, t in zip(x.shape, tile)]
    x = jnp.pad(x, [(0, p - n) for p, n in zip(padded, x.shape)])
    split = [v for p, t in zip(padded, tile) for v in (p // t, t)]
    return x.reshape(split), split


def _untiled(q, split, shape):
    q = q.reshape([split[i] * split[i + 1] for i in range(0, len(split), 2)])
    return q[tuple(slice(0, n) for n in shape)]


def tiles_along(ndim: int, axis: int) -> tuple[int, ...]:
    """1 everywhere but TILE along `axis`: 1x128 activation tiles (axis -1), 128x1 ones (axis -2)."""
    return tuple(TILE if ax == axis % ndim else 1 for ax in range(ndim))


def weight_blocks(ndim: int) -> tuple[int, ...]:
    """128x128 blocks over the last two axes of a [..., in, out] kernel (one set per expert)."""
    return (1,) * (ndim - 2) + (TILE, TILE)


# --- the scaled product -------------------------------------------------------------------------------

def scaled_einsum(spec: str, qa, sa, ta, qb, sb, tb, impl: str) -> jnp.ndarray:
    """einsum(spec) of two quantized operands (q, scale, tile) -> float32, with one contraction letter."""
    la, lb = spec.split("->")[0].split(",")
    if impl == "emulated":
        return jnp.einsum(spec, dequantize(qa, sa, ta), dequantize(qb, sb, tb), preferred_element_type=jnp.float32)
    out = spec.split("->")[1]
    (c,) = set(la) & set(lb) - set(out)
    z = next(ch for ch in string.ascii_letters if ch not in spec)  # the chunk index
    ca, cb = la.index(c), lb.index(c)
    if ta[ca] != TILE or tb[cb] != TILE:
        raise ValueError(f"native FP8 product {spec}: the contraction axis must be tiled by {TILE}, got {ta}, {tb}")

    def chunks(q, ax):  # [.., C, ..] -> [.., C/128, 128, ..] (zero-padded)
        n = -(-q.shape[ax] // TILE) * TILE
        q = jnp.pad(q, [(0, n - s if i == ax else 0) for i, s in enumerate(q.shape)])
        return q.reshape(*q.shape[:ax], n // TILE, TILE, *q.shape[ax + 1:])

    part = jnp.einsum(f"{la.replace(c, z + c)},{lb.replace(c, z + c)}->{z}{out}", chunks(qa, ca), chunks(qb, cb),
                      preferred_element_type=jnp.float32)  # [chunks, *out]: FP8 products, float32 sums
    sa = expand_scale(sa, ta, qa.shape, keep=ca)
    sb = expand_scale(sb, tb, qb.shape, keep=cb)
    return jnp.einsum(f"{z}{out},{la.replace(c, z)},{lb.replace(c, z)}->{out}", part, sa, sb)


def _quantized_product(spec, a, ta, b, tb, impl):
    return scaled_einsum(spec, *quantize(a, ta), ta, *quantize(b, tb), tb, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, impl: str, out_dtype):
    """x [rows, in] @ w [in, out] or, batched, x [n, rows, in] @ w [n, in, out]."""
    return _matmul_fwd(x, w, impl, out_dtype)[0]


def _specs(ndim: int):
    """(forward, input-gradient, weight-gradient) einsum specs for 2-d or batched 3-d operands."""
    n = "e" if ndim == 3 else ""
    return f"{n}rk,{n}kd->{n}rd", f"{n}rd,{n}kd->{n}rk", f"{n}rk,{n}rd->{n}kd"


def _matmul_fwd(x, w, impl, out_dtype):
    fwd, _, _ = _specs(x.ndim)
    tw = weight_blocks(w.ndim)
    qw, sw = quantize(w, tw)
    y = scaled_einsum(fwd, *quantize(x, tiles_along(x.ndim, -1)), tiles_along(x.ndim, -1), qw, sw, tw, impl)
    return y.astype(out_dtype), (x, qw, sw, jnp.zeros((), w.dtype))


def _matmul_bwd(impl, out_dtype, res, dy):
    x, qw, sw, w_dtype = res
    _, dgrad, wgrad = _specs(x.ndim)
    along_out, along_rows = tiles_along(dy.ndim, -1), tiles_along(dy.ndim, -2)
    dx = scaled_einsum(dgrad, *quantize(dy, along_out), along_out, qw, sw, weight_blocks(qw.ndim), impl)
    dw = _quantized_product(wgrad, x, along_rows, dy, along_rows, impl)
    return dx.astype(x.dtype), dw.astype(w_dtype.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jnp.ndarray, w: jnp.ndarray, impl: str, out_dtype=None) -> jnp.ndarray:
    """FP8 x [..., in] @ w [in, out] -> [..., out] in out_dtype (default x's). Gradients come back in
    x's and w's dtypes: pass the float32 master weight for a float32 weight gradient."""
    y = _matmul(x.reshape(-1, x.shape[-1]), w, impl, jnp.dtype(out_dtype or x.dtype))
    return y.reshape(*x.shape[:-1], w.shape[-1])


def batched_matmul(x: jnp.ndarray, w: jnp.ndarray, impl: str, out_dtype=None) -> jnp.ndarray:
    """FP8 per-entry x [n, rows, in] @ w [n, in, out] -> [n, rows, out] (one weight per expert/block)."""
    return _matmul(x, w, impl, jnp.dtype(out_dtype or x.dtype))


GROUPED_KERNELS = ("xla", "pallas", "pallas_interpret")


def ragged_matmul(x, w, group_sizes, out_dtype, kernel: str = "xla"):
    """FP8 grouped matmul: rows of x [rows, in] in consecutive groups, group g times w[g] [in, out];
    rows at or past sum(group_sizes) give zeros. Weight-gradient tiles of 128 rows may straddle two
    experts' groups: their scale is then shared by two experts' rows (coarser, still exact to dequantize).

    kernel: who runs the three products (forward, input gradient, weight gradient):
      "xla"               emulated: dequantize to float32 and XLA's ragged_dot, on any backend;
      "pallas"            pallas_kernels.moe's FP8 grouped kernels (E4M3 tensor-core products with the
                          scales applied every 128 elements) when lowered for CUDA; emulated when lowered
                          for TPU (no Mosaic FP8 kernel; v4-v6e have no FP8 units); an error for CPU;
      "pallas_interpret"  the CUDA kernels in the Pallas interpreter (CPU tests)."""
    if kernel not in GROUPED_KERNELS:
        raise ValueError(f"ragged_matmul: kernel must be one of {GROUPED_KERNELS}, got {kernel!r}")
    return _ragged(x, w, group_sizes, jnp.dtype(out_dtype), kernel)


def _emulated_gmm(qa, sa, qw, sw, group_sizes, transpose_rhs=False):
    wd = dequantize(qw, sw, weight_blocks(3))
    wd = jnp.swapaxes(wd, 1, 2) if transpose_rhs else wd
    a = dequantize(qa, sa, tiles_along(2, -1))
    return jax.lax.ragged_dot(a, wd, group_sizes, preferred_element_type=jnp.float32)


def _emulated_tgmm(qa, sa, qb, sb, group_sizes):
    from pallas_kernels.moe import tgmm  # XLA's ragged_dot_general with ragged contraction (impl "xla")

    rows = tiles_along(2, -2)
    return tgmm(dequantize(qa, sa, rows), dequantize(qb, sb, rows), group_sizes, impl="xla")


def _grouped_products(kernel: str):
    """(gmm(qa, sa, qw, sw, gs, transpose_rhs), tgmm(qa, sa, qb, sb, gs)) for one ragged_matmul kernel."""
    if kernel == "xla":
        return _emulated_gmm, _emulated_tgmm
    from pallas_kernels import moe

    interpret = kernel == "pallas_interpret"

    def on_cuda(pallas, emulated):  # interpreted: the kernel; else the kernel lowered for CUDA, XLA for TPU
        return pallas if interpret else lambda *a: jax.lax.platform_dependent(*a, tpu=emulated, default=pallas)

    def gmm(qa, sa, qw, sw, gs, transpose_rhs=False):
        return on_cuda(functools.partial(moe.gmm_fp8, transpose_rhs=transpose_rhs, interpret=interpret),
                       functools.partial(_emulated_gmm, transpose_rhs=transpose_rhs))(qa, sa, qw, sw, gs)

    return gmm, on_cuda(functools.partial(moe.tgmm_fp8, interpret=interpret), _emulated_tgmm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged(x, w, group_sizes, out_dtype, kernel):
    return _ragged_fwd(x, w, group_sizes, out_dtype, kernel)[0]


def _ragged_fwd(x, w, group_sizes, out_dtype, kernel):
    gmm, _ = _grouped_products(kernel)
    qw, sw = quantize(w, weight_blocks(3))
    y = gmm(*quantize(x, tiles_along(2, -1)), qw, sw, group_sizes)
    # the weight is saved as E4M3 + block scales (1 byte per element, not a float32 copy)
    return y.astype(out_dtype), (x, qw, sw, group_sizes, jnp.zeros((), w.dtype))


def _ragged_bwd(out_dtype, kernel, res, dy):
    x, qw, sw, group_sizes, w_dtype = res
    gmm, tgmm = _grouped_products(kernel)
    along_out, along_rows = tiles_along(2, -1), tiles_along(2, -2)
    dx = gmm(*quantize(dy, along_out), qw, sw, group_sizes, True)  # dY W_g^T per group
    dw = tgmm(*quantize(x, along_rows), *quantize(dy, along_rows), group_sizes)
    return dx.astype(x.dtype), dw.astype(w_dtype.dtype), np.zeros(group_sizes.shape, jax.dtypes.float0)


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


# --- FP8 rows over the network (the MoE dispatch) ----------------------------------------------------

def send_rows(x: jnp.ndarray, move, *operands) -> jnp.ndarray:
    """move(x, *operands), a linear movement of rows (an all-to-all), with x [..., d] travelling as E4M3
    plus its float32 1x128 tile scales (about half of BF16's bytes) and arriving dequantized in x's dtype:
    V3's FP8 dispatch. The cotangent goes back through move's transpose in its own dtype (the BF16
    combine). The experts quantize the rows again with the same tiles, which gives back the same E4M3
    values. `move` must close over no traced value (a custom VJP cannot capture one): pass the routing
    (offsets, sizes) as operands, integer arrays that get no gradient."""
    return _send(x, move, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _send(x, move, *operands):
    q, s = quantize(x, tiles_along(x.ndim, -1))
    got_q, got_s = move(q, *operands), move(s, *operands)
    return dequantize(got_q, got_s, tiles_along(got_q.ndim, -1), x.dtype)


def _send_fwd(x, move, *operands):
    return _send(x, move, *operands), (operands, x[..., :0])  # no bytes: x's rows, dtype and mesh-axis type


def _send_bwd(move, res, ct):
    operands, like = res
    zero = jnp.pad(like, [(0, 0)] * (like.ndim - 1) + [(0, ct.shape[-1])])  # zeros typed like x
    (dx,) = jax.vjp(lambda a: move(a, *operands), zero)[1](ct.astype(like.dtype))
    return (dx, *(np.zeros(o.shape, jax.dtypes.float0) for o in operands))


_send.defvjp(_send_fwd, _send_bwd)
