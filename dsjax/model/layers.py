"""The small building blocks every layer uses: RMSNorm, a dense projection and the SwiGLU MLP, as
pure functions and as the Flax modules RMSNorm and MLP; and `param`, how every module of the model
declares a weight (shape, logical axes, initialiser).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dsjax.model import fp8 as fp8_lib


def rms_norm(weight: jnp.ndarray, x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF's DeepseekV3RMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(var + eps)
    return weight.astype(dtype) * xf.astype(dtype)


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over inside a shard_map (none outside one)."""
    aval = jax.typeof(x)
    return frozenset(getattr(aval, "vma", None) or getattr(getattr(aval, "mat", None), "varying", ()))


def vary_together(*xs):
    """Each array cast to vary over the union of their manual mesh axes. Inputs of a hand-written VJP
    go through this: under shard_map, a weight gradient then has its weight's type, and autodiff of
    the cast sums it over the token axes."""
    axes = frozenset().union(*map(varying_axes, xs))
    cast = lambda x, missing: jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
    return tuple(cast(x, axes - varying_axes(x)) for x in xs)


def dense(x: jnp.ndarray, w: jnp.ndarray, out_dtype=None, fp8: str | None = None) -> jnp.ndarray:
    """x [..., in] @ w [in, out] (accumulated and returned in out_dtype, default x's), with a
    hand-written VJP that takes the weight gradient as (dy^T x)^T: XLA:CPU transposes the second
    operand of a weight-gradient dot, and dy is usually a fusion of elementwise work (softmax, norm or
    silu derivatives) that it then recomputes in a strided, transposed loop, where x is a plain array.
    lm head + cross-entropy fwd+bwd at cpu_bench shapes: 47 -> 37 ms; an MLA layer 68 -> 63 ms.

    fp8 ("emulated" | "native", from fp8_lib.mode(cfg)): DeepSeek-V3's FP8 product (dsjax.model.fp8)."""
    if fp8:
        return fp8_lib.matmul(*vary_together(x, w), fp8, out_dtype)
    return _dense(*vary_together(x, w), jnp.dtype(out_dtype or x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, out_dtype):
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _dense_fwd(x, w, out_dtype):
    return _dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, res, dy):
    x, w = res
    dx = jnp.dot(dy, w.T.astype(dy.dtype)).astype(x.dtype)
    return dx, _weight_grad(x.astype(dy.dtype), dy).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _weight_grad(x, dy):
    """sum over rows of x^T dy for x [..., in], dy [..., out] -> [in, out]."""
    rows = lambda a: a.reshape(-1, a.shape[-1])
    return (rows(dy).T @ rows(x)).T


def swiglu(params: dict, x: jnp.ndarray, fp8: str | None = None) -> jnp.ndarray:
    """down(silu(gate(x)) * up(x)); kernels are [in, out]. fp8: the three products in FP8 (as `dense`),
    differentiated through their FP8 VJPs."""
    dt = x.dtype
    if fp8:
        mm = lambda a, name: dense(a, params[name].astype(dt), fp8=fp8)
        return mm(jax.nn.silu(mm(x, "gate_proj")) * mm(x, "up_proj"), "down_proj")
    return _swiglu(*vary_together(params["gate_proj"].astype(dt), params["up_proj"].astype(dt),
                                  params["down_proj"].astype(dt), x))


@jax.custom_vjp
def _swiglu(wg, wu, wd, x):
    return _swiglu_fwd(wg, wu, wd, x)[0]


def _swiglu_fwd(wg, wu, wd, x):
    g, u = x @ wg, x @ wu
    return (jax.nn.silu(g) * u) @ wd, (wg, wu, wd, x, g, u)


def _swiglu_bwd(res, dy):
    # Written out because XLA:CPU fuses autodiff's silu derivative into a transposed copy feeding the
    # weight-gradient dots (a strided, unvectorised loop): 83 -> 51 ms fwd+bwd at [4096, 256] x 512.
    wg, wu, wd, x, g, u = res
    h, dg, du = swiglu_hidden_grads(g, u, dy @ wd.T)
    return _weight_grad(x, dg), _weight_grad(x, du), _weight_grad(h, dy), dg @ wg.T + du @ wu.T


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_hidden_grads(g, u, dh):
    """For h = silu(g) * u and its cotangent dh: (h, dg, du), with silu'(g) = s + g s (1 - s)."""
    s = jax.nn.sigmoid(g)
    sg = g * s  # silu(g)
    return sg * u, dh * u * (s + sg * (1 - s)), dh * sg


# ----------------------------------------------------------------------------- parameters and modules


class Param(nn.LogicallyPartitioned):
    """A parameter's Flax metadata: its logical axis names (`names`, mapped to mesh axes by
    dsjax.parallel.rules.RULES) and how `dsjax.model.params.init_params` draws it (`init`: normal |
    ones | zeros). Unboxing never constrains: shardings come from the one rules table."""

    init: str = struct.field(default="normal", pytree_node=False)

    def unbox(self, apply_constraint=True) -> Any:
        return self.value


_INITS = {"ones": nn.initializers.ones, "zeros": nn.initializers.zeros}


def param(module: nn.Module, name: str, shape, axes, cfg, init: str = "normal") -> jnp.ndarray:
    """Declare the weight `name` of `module` (inside setup): shape, logical axes and initialiser
    (normal(0, cfg.init_std): the V3 report's 0.006; ones; zeros), stored in cfg.param_dtype."""
    fn = nn.initializers.normal(cfg.init_std) if init == "normal" else _INITS[init]
    dtype = jnp.dtype(cfg.param_dtype)
    return module.param(name, lambda key, shape: Param(fn(key, shape, dtype), tuple(axes), init=init), tuple(shape))


class RMSNorm(nn.Module):
    """HF's DeepseekV3RMSNorm. Its weight is the leaf `param_name` of the parent module's parameters (the
    parent shares its scope with it: `nn.share_scope`), so the parameter tree keeps the checkpoint's
    names: `model.layers.N.input_layernorm.weight` is params[...]["input_layernorm"]."""

    dim: int
    param_name: str
    cfg: Any

    def setup(self):
        self.w = param(self, self.param_name, (self.dim,), ("norm",), self.cfg, "ones")

    def __call__(self, x):
        return rms_norm(self.w, x, self.cfg.rms_norm_eps)


class MLP(nn.Module):
    """The SwiGLU feed-forward down(silu(gate(x)) * up(x)) of the dense layers and the shared experts."""

    dim: int
    inter: int
    cfg: Any

    def setup(self):
        d, f, c = self.dim, self.inter, self.cfg
        self.w = {"gate_proj": param(self, "gate_proj", (d, f), ("embed", "mlp"), c),
                  "up_proj": param(self, "up_proj", (d, f), ("embed", "mlp"), c),
                  "down_proj": param(self, "down_proj", (f, d), ("mlp", "embed"), c)}

    def __call__(self, x):
        return swiglu(self.w, x, fp8=fp8_lib.mode(self.cfg))
