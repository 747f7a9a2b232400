"""Helpers shared by the TPU and GPU kernels."""
import jax


def out_struct(shape, dtype, like):
    """ShapeDtypeStruct for a pallas_call output that varies like the input `like`.

    Inside `shard_map(check_vma=True)` Pallas needs each output's manual-axis type; the kernels'
    outputs vary over exactly the mesh axes their (query) inputs vary over.
    """
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
