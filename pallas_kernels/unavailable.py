"""A stand-in for a Pallas kernel on a platform that has no Pallas compiler (CPU).

impl="pallas" without interpret dispatches with lax.platform_dependent: the TPU / CUDA branches are
the kernels, the default branch is `unavailable(...)`, a primitive whose only lowering raises.
platform_dependent lowers just the target platform's branch, so AOT compiles for TPU/GPU from a CPU
host never see it, while running on CPU gets this clear error instead of jax's "platform_index ...
not found for platform cpu".
"""
import functools

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Primitive)
from jax.interpreters import mlir
import jax.numpy as jnp


class PallasUnavailableError(RuntimeError):
    pass


def _raise(ctx, *args, shape, dtype, what):
    del ctx, args, shape, dtype
    raise PallasUnavailableError(
        f"{what}(impl='pallas') was lowered for CPU, which has no Pallas compiler. Pass "
        f"interpret=True to run the kernel in the Pallas interpreter, or use impl='auto' or an XLA "
        f"impl (in a model config: attention_impl=xla, moe_impl=blocked, or kernel_interpret=true).")


_p = jax.extend.core.Primitive("dsjax_pallas_unavailable")
_p.def_abstract_eval(lambda x, *, shape, dtype, what: jax.core.ShapedArray(shape, dtype))
_p.def_impl(lambda x, **kw: _raise(None, x, **kw))
mlir.register_lowering(_p, _raise)


def unavailable(x, shape, dtype, what: str):
    """An array of `shape` / `dtype` that fails to lower, naming kernel `what`; x ties it to inputs.
    Differentiable (zero cotangent), so that a training step traces through to the lowering error."""
    return _differentiable(x, (tuple(shape), jnp.dtype(dtype), what))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _differentiable(x, static):
    shape, dtype, what = static
    return _p.bind(x, shape=shape, dtype=dtype, what=what)


_differentiable.defvjp(lambda x, static: (_differentiable(x, static), x),
                       lambda static, x, g: (jnp.zeros_like(x),))
