"""Running a function per device under an explicit mesh (for code XLA cannot partition, such as a
Pallas call), and the mesh axes a token dimension is split over there.

Nothing here reads an ambient mesh: the caller passes the one it runs under, or None for no mesh.
"""
from __future__ import annotations

import jax

# Mesh axes the tokens (batch * seq rows) may be split over inside a shard_map, outermost first.
TOKEN_AXES = ("dcn", "data", "fsdp", "expert")


def token_axes(mesh, t: int) -> tuple[str, ...]:
    """Mesh axes the T tokens are split over inside a shard_map: the batch axes that divide T."""
    sizes = dict(mesh.shape)
    out, prod = [], 1
    for a in TOKEN_AXES:
        n = sizes.get(a, 1)
        if n > 1 and t % (prod * n) == 0:
            out.append(a)
            prod *= n
    return tuple(out)


def per_shard(fn, args, specs, mesh):
    """fn(*args) run per device under `mesh` with shard_map, or directly when mesh is None, has one
    device, or is already manual over all its axes (inside another shard_map).
    specs(mesh) -> (one PartitionSpec per arg (None for a None arg), the output's PartitionSpec)."""
    if mesh is None or mesh.size == 1 or set(mesh.axis_names) <= set(getattr(mesh, "manual_axes", ())):
        return fn(*args)
    in_specs, out_spec = specs(mesh)
    # check_vma off: pallas_call outputs carry no varying-axes type, and fn has no collectives.
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_spec, check_vma=False)(*args)
