"""The two small building blocks every layer uses: RMSNorm and the SwiGLU MLP."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(weight: jnp.ndarray, x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF's DeepseekV3RMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(var + eps)
    return weight.astype(dtype) * xf.astype(dtype)


def swiglu(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """down(silu(gate(x)) * up(x)); kernels are [in, out]."""
    dt = x.dtype
    g = x @ params["gate_proj"].astype(dt)
    u = x @ params["up_proj"].astype(dt)
    return (jax.nn.silu(g) * u) @ params["down_proj"].astype(dt)
