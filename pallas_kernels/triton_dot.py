"""The matrix product inside the Pallas Triton kernels (MLA attention, grouped matmuls, FP8 grouped matmuls).

tl.dot with float32 accumulation and an explicit precision: float32 operands at HIGHEST (no TF32, so
the kernels match the other implementations), anything else (bf16, E4M3) at DEFAULT, on tensor cores.
Explicit because the global jax_default_matmul_precision="highest" the tests set would otherwise ask
for a float32 contraction of bf16 operands.
"""
import jax
import jax.numpy as jnp


def dot(a, b, trans_a=False, trans_b=False):
    """a @ b (a^T with trans_a, b^T with trans_b) of two 2-d blocks -> float32."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
