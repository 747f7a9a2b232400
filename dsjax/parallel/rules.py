"""Logical axis names -> mesh axes: the one mapping every sharding in dsjax comes from.

Every parameter carries logical axis names (dsjax.model.layers.param); `RULES` maps each to a mesh
axis or a tuple of them, so trying a different sharding is editing one mapping. Kept free of model
imports so that both the model side (dsjax.parallel.expert_parallel, inside the model's MoE layer) and
the state side (dsjax.parallel.mesh) pick axes with the same code.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from jax.sharding import PartitionSpec as P

AXES = ("dcn", "data", "fsdp", "expert", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp", "expert")

# Each logical name maps to a mesh axis or a tuple of them (tried in order). A mesh axis is used at
# most once per array: a later dimension asking for an axis already taken gets none.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": BATCH_AXES,
    "seq": None,
    # parameters (the modules of dsjax.model declare them)
    "vocab": "tensor",
    # Dense weights are also split over "expert": outside the routed experts that axis is more FSDP.
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "q_lora": ("fsdp", "expert"),  # q_b_proj [q_lora, heads]: fsdp here, tensor on heads
    "kv_lora": ("fsdp", "expert"),  # kv_b_proj [kv_lora, heads]
    "mlp": "tensor",
    "experts": "expert",
    "expert_embed": "fsdp",
    "expert_mlp": "tensor",
    "gate_experts": None,
    "mtp_concat": ("fsdp", "expert"),
    "norm": None,
    "layers": None,  # scanned: each step needs the whole layer axis locally
}


def rules_for(mcfg) -> Mapping[str, Any]:
    """RULES for this mesh config (a dsjax.parallel.mesh.MeshConfig or None)."""
    return rules_over_dcn(mcfg is not None and mcfg.fsdp_over_dcn)


def rules_over_dcn(over_dcn: bool) -> Mapping[str, Any]:
    """RULES, or with over_dcn (mesh.fsdp_over_dcn) every parameter dimension split over "fsdp" split
    over ("dcn", "fsdp") instead (dcn outermost, as in the mesh); activations are unchanged."""
    if not over_dcn:
        return RULES

    def widen(want):
        want = (want,) if isinstance(want, str) else tuple(want or ())
        return tuple(a for w in want for a in (("dcn", w) if w == "fsdp" else (w,)))

    return {k: v if k == "batch" or v is None else widen(v) for k, v in RULES.items()}


def logical_to_spec(axes: Sequence[str | None], mesh, shape: Sequence[int] | None = None,
                    rules: Mapping[str, Any] | None = None) -> P:
    """PartitionSpec for an array with these logical axes. Mesh axes of size 1, missing from the mesh,
    already used by an earlier dimension, or (given `shape`) not dividing the dimension are dropped."""
    rules = RULES if rules is None else rules
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule in dsjax.parallel.rules.RULES")
        want = rules.get(name) if name is not None else None
        want = (want,) if isinstance(want, str) else tuple(want or ())
        picked, prod = [], 1
        for a in want:
            n = sizes.get(a, 1)
            if n == 1 or a in used:
                continue
            if shape is not None and shape[i] % (prod * n):
                continue
            picked.append(a)
            prod *= n
        used.update(picked)
        out.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    while out and out[-1] is None:
        out.pop()
    return P(*out)
