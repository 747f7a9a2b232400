"""The device mesh, and the shardings of parameters, trainer state and batches on it.

Mesh axes, outermost (slowest network) first:
  dcn     data parallelism across slices (multislice, over the data-centre network)
  data    pure data parallelism inside a slice (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  expert  expert parallelism: routed experts split across devices, tokens sent by all-to-all
  tensor  tensor parallelism: attention heads, MLP width and vocabulary split
Every parameter carries logical axis names as Flax metadata (dsjax.model.layers.param, read back by
dsjax.model.params.param_specs); dsjax.parallel.rules.RULES maps them to mesh axes, so trying a
different sharding is editing one mapping. The batch is split over every axis but "tensor". With
`mesh.fsdp_over_dcn` the state is sharded over the slices as well (`rules_for`): FSDP across slices, so
a multislice run holds a model that one slice cannot, paying for it with weight gathers and gradient
reduce-scatters over DCN.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.config import ConfigError, ModelConfig

# Re-exported: the mapping lives in dsjax.parallel.rules (no model imports, so the MoE layer can use it).
from dsjax.parallel.rules import AXES, BATCH_AXES, RULES, logical_to_spec, rules_for  # noqa: F401


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on at most one axis means "the rest of the devices"."""

    dcn: int = 1
    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    # Shard parameters, gradients and optimizer state over "dcn" too (outermost), not only inside a
    # slice: each slice holds 1/dcn of the state instead of a full copy.
    fsdp_over_dcn: bool = False

    def __post_init__(self):
        if not isinstance(self.fsdp_over_dcn, bool):
            raise ConfigError(f"mesh config field 'mesh.fsdp_over_dcn': must be true or false, "
                              f"got {self.fsdp_over_dcn!r}")
        wild = []
        for name in AXES:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                raise ConfigError(f"mesh config field 'mesh.{name}': must be a positive integer or -1, got {v!r}")
            if v == -1:
                wild.append(name)
        if len(wild) > 1:
            raise ConfigError(f"mesh config field 'mesh.{wild[1]}': only one axis may be -1 (also mesh.{wild[0]})")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; errors name the field when the sizes do not fit the devices."""
        sizes = {a: getattr(self, a) for a in AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        wild = [a for a, v in sizes.items() if v == -1]
        if wild:
            if num_devices % fixed:
                raise ConfigError(f"mesh config field 'mesh.{wild[0]}': the other axes multiply to {fixed}, "
                                  f"which does not divide the {num_devices} devices")
            sizes[wild[0]] = num_devices // fixed
        elif fixed != num_devices:
            worst = max((a for a in AXES if sizes[a] > 1), key=lambda a: sizes[a], default="fsdp")
            raise ConfigError(f"mesh config field 'mesh.{worst}': the mesh axes multiply to {fixed} "
                              f"({_fmt(sizes)}) but there are {num_devices} devices; set one axis to -1")
        return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={sizes[a]}" for a in AXES)


def make_mesh(mcfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes AXES. Multislice (dcn > 1 and devices know their slice) uses the hybrid
    ICI x DCN layout; TPU/GPU devices get the topology-aware layout; CPU a plain reshape."""
    mcfg = mcfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = mcfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    from jax.experimental import mesh_utils

    arr = None
    if sizes["dcn"] > 1 and hasattr(devices[0], "slice_index"):
        nslices = len({d.slice_index for d in devices})
        if nslices != sizes["dcn"]:
            raise ConfigError(f"mesh config field 'mesh.dcn': {sizes['dcn']} but the devices span {nslices} slice(s)")
        ici = (1,) + shape[1:]
        dcn = (sizes["dcn"],) + (1,) * (len(AXES) - 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform != "cpu":
        try:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = None  # unusual topologies: fall back to device order
    if arr is None:
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def param_specs(mesh, model_cfg: ModelConfig, rules: Mapping[str, Any] | None = None) -> dict:
    """PartitionSpec tree matching the params tree (`rules`: RULES unless given, e.g. rules_for(mcfg))."""
    from dsjax.model.params import is_spec, param_specs as declared

    return jax.tree.map(lambda s: logical_to_spec(s.axes, mesh, s.shape, rules), declared(model_cfg), is_leaf=is_spec)


def param_shardings(mesh: Mesh, model_cfg: ModelConfig, rules: Mapping[str, Any] | None = None) -> dict:
    """NamedSharding tree matching the params tree."""
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_specs(mesh, model_cfg, rules),
                        is_leaf=lambda x: isinstance(x, P))


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(mesh: Mesh, model_cfg: ModelConfig, abstract_state, rules: Mapping[str, Any] | None = None):
    """Shardings for a trainer state (any pytree): a leaf whose dict-key path ends with a parameter's
    path and whose shape equals that parameter's gets the parameter's sharding (params, AdamW moments,
    accumulated grads); everything else (step, rng, counts, scalars) is replicated. `rules`: RULES
    unless given (rules_for(tcfg.mesh) honours mesh.fsdp_over_dcn)."""
    from dsjax.model.params import is_spec, param_specs as declared

    table = {}
    for path, s in jax.tree_util.tree_flatten_with_path(declared(model_cfg), is_leaf=is_spec)[0]:
        table[_dict_keys(path)] = (s.shape, logical_to_spec(s.axes, mesh, s.shape, rules))
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _dict_keys(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(keys)):
            hit = table.get(keys[i:])
            if hit is not None and hit[0] == shape:
                return NamedSharding(mesh, hit[1])
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_axes(mesh, batch_size: int | None = None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (size > 1, dividing batch_size if given)."""
    spec = logical_to_spec(("batch",), mesh, None if batch_size is None else (batch_size,))
    if not spec:
        return ()
    a = spec[0]
    return (a,) if isinstance(a, str) else tuple(a)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Sharding of [batch, seq] arrays: batch over dcn/data/fsdp/expert, sequence whole."""
    ax = batch_axes(mesh, batch_size)
    return NamedSharding(mesh, P(ax if ax else None))
