"""Mesh construction, config validation and the logical-to-mesh rules.
Reference for the replication walk: the 671B parameter tree itself (abstract, never materialised)."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsjax.config import ConfigError, load_config
from dsjax.model.params import abstract_params, init_params, logical_axes
from dsjax.parallel import mesh as pm


def test_make_mesh_fills_the_rest():
    m = pm.make_mesh(pm.MeshConfig(expert=4))
    assert m.axis_names == pm.AXES
    assert dict(m.shape) == {"dcn": 1, "data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    m = pm.make_mesh(pm.MeshConfig(dcn=2, fsdp=1, data=-1, tensor=2))
    assert dict(m.shape)["data"] == 2


@pytest.mark.parametrize("kw, field", [
    (dict(fsdp=3, expert=2), "mesh.fsdp"),  # 6 != 8
    (dict(fsdp=-1, expert=3), "mesh.fsdp"),  # 3 does not divide 8
    (dict(fsdp=-1, expert=-1), "mesh.expert"),
    (dict(tensor=0), "mesh.tensor"),
    (dict(data=2.5), "mesh.data"),
])
def test_mesh_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        pm.make_mesh(pm.MeshConfig(**kw))


def test_logical_to_spec_drops_size_one_used_and_non_dividing_axes():
    mesh = AbstractMesh((1, 2, 2, 2, 1), pm.AXES)
    assert pm.logical_to_spec(("embed", "heads"), mesh, (8, 8)) == P(("fsdp", "expert"))  # tensor has size 1
    assert pm.logical_to_spec(("embed", "q_lora"), mesh, (8, 8)) == P(("fsdp", "expert"))  # each axis once
    assert pm.logical_to_spec(("embed", "q_lora"), mesh, (2, 8)) == P("fsdp", "expert")
    assert pm.logical_to_spec(("batch", None), mesh, (8, 3)) == P(("data", "fsdp", "expert"))
    assert pm.logical_to_spec(("batch",), mesh, (4,)) == P(("data", "fsdp"))  # 8 does not divide 4
    assert pm.logical_to_spec(("experts", "expert_embed", "expert_mlp"), mesh, (6, 5, 4)) == P("expert")
    with pytest.raises(KeyError, match="no sharding rule"):
        pm.logical_to_spec(("nonsense",), mesh)


@pytest.mark.parametrize("sizes", [(1, 1, 256, 1, 1), (1, 1, 32, 8, 1), (1, 1, 16, 8, 2), (2, 1, 16, 8, 1)])
def test_671b_no_large_array_is_replicated(sizes):
    cfg = load_config("configs/deepseek_v3_671b.yaml")
    mesh = AbstractMesh(sizes, pm.AXES)
    specs = pm.param_specs(mesh, cfg)
    shapes = abstract_params(cfg)
    threshold = 16 * 2**20  # elements (64 MiB in float32)
    per_device = 0
    for (path, spec), shp in zip(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0],
                                 jax.tree.leaves(shapes)):
        n = math.prod(shp.shape)
        split = math.prod(dict(mesh.shape)[a] for d in spec if d for a in ((d,) if isinstance(d, str) else d))
        if n > threshold:
            assert split > 1, f"{jax.tree_util.keystr(path)} {shp.shape} is fully replicated"
        per_device += n / split
    # params are ~685B, replicated only over dcn/data: each device keeps about 1/(fsdp*expert*tensor)
    assert per_device < 1.02 * 685e9 / math.prod(sizes[2:]), per_device / 1e9


def test_state_shardings_follow_params():
    import optax

    cfg = load_config("configs/tiny.yaml")
    mesh = pm.make_mesh(pm.MeshConfig(fsdp=2, expert=4))
    params = jax.eval_shape(lambda: init_params(cfg))
    state = jax.eval_shape(lambda p: {"params": p, "opt": optax.adamw(1e-3).init(p), "step": np.int32(0)}, params)
    sh = pm.state_shardings(mesh, cfg, state)
    want = pm.param_shardings(mesh, cfg)
    assert sh["params"] == want
    assert sh["opt"][0].mu == want and sh["opt"][0].nu == want
    assert sh["step"].spec == P() and sh["opt"][0].count.spec == P()
    assert jax.tree.structure(logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(want)


def test_batch_sharding():
    mesh = pm.make_mesh(pm.MeshConfig(data=2, expert=2, tensor=2, fsdp=1))
    assert pm.batch_sharding(mesh).spec == P(("data", "expert"))


@pytest.mark.parametrize("path, topology", [("configs/pretrain_v3_671b_v5p512.yaml", "v5p-512"),
                                            ("configs/pretrain_small_moe_v5p8.yaml", "v5p-8")])
def test_shipped_pod_meshes_cover_their_topology(path, topology):
    """The recommended run configs name every chip of their slice once and split the batch evenly."""
    from dsjax.parallel.aot import parse_topology
    from dsjax.train.config import load_train_config

    tcfg = load_train_config(path)
    sizes = [getattr(tcfg.mesh, a) for a in ("dcn", "data", "fsdp", "expert", "tensor")]
    chips = parse_topology(topology).chips
    assert -1 not in sizes and int(np.prod(sizes)) == chips
    assert tcfg.batch_size % (chips // tcfg.mesh.tensor) == 0
    assert tcfg.model.n_routed_experts % tcfg.mesh.expert == 0
