"""mesh.fsdp_over_dcn: parameters and optimizer state sharded over the slices as well as fsdp.
References: the same state without the option (each device's shards are exactly half as large on a
dcn=2 mesh, measured on placed arrays) and the one-device run (the same losses, float32 1e-5)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsjax.config import ConfigError, load_config
from dsjax.model.params import abstract_params, init_params
from dsjax.parallel import mesh as pm
from dsjax.train.config import load_train_config


def test_rules_put_dcn_before_fsdp_on_parameters_only():
    assert pm.rules_for(pm.MeshConfig()) is pm.RULES and pm.rules_for(None) is pm.RULES  # default unchanged
    r = pm.rules_for(pm.MeshConfig(fsdp_over_dcn=True))
    assert r["embed"] == ("dcn", "fsdp", "expert") and r["expert_embed"] == ("dcn", "fsdp")
    assert r["batch"] == pm.RULES["batch"]  # activations: the batch already takes dcn
    assert r["experts"] == ("expert",) and r["layers"] is None
    mesh = AbstractMesh((2, 1, 2, 2, 1), pm.AXES)
    assert pm.logical_to_spec(("embed", "heads"), mesh, (8, 8), r) == P(("dcn", "fsdp", "expert"))
    assert pm.logical_to_spec(("embed",), mesh, (4,), r) == P(("dcn", "fsdp"))  # 8 does not divide 4
    with pytest.raises(ConfigError, match="mesh.fsdp_over_dcn"):
        pm.MeshConfig(fsdp_over_dcn="yes")


def _state(cfg, params):
    return {"params": params, "opt": optax.adamw(1e-3).init(params), "step": np.int32(0)}


def test_state_shards_are_half_as_large_on_two_slices():
    cfg = load_config("configs/tiny.yaml")
    mesh = pm.make_mesh(pm.MeshConfig(dcn=2, fsdp=4))
    state = _state(cfg, init_params(cfg))

    def per_device_bytes(mcfg):
        sh = pm.state_shardings(mesh, cfg, jax.eval_shape(lambda: state), pm.rules_for(mcfg))
        placed = jax.device_put(state, sh)
        nbytes = {d: 0 for d in mesh.devices.flat}
        for leaf in jax.tree.leaves(placed):
            for s in leaf.addressable_shards:
                nbytes[s.device] += s.data.nbytes
        assert len(set(nbytes.values())) == 1  # every device holds the same amount
        return placed, next(iter(nbytes.values()))

    off, b_off = per_device_bytes(pm.MeshConfig(dcn=2, fsdp=4))
    on, b_on = per_device_bytes(pm.MeshConfig(dcn=2, fsdp=4, fsdp_over_dcn=True))
    scalars = sum(x.nbytes for x in jax.tree.leaves(state) if x.size == 1)  # step, count: replicated
    assert b_on - scalars == pytest.approx((b_off - scalars) / 2, rel=0.01), (b_on, b_off)
    # the arrays themselves are unchanged, only where they live
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any("dcn" in str(x.sharding.spec) for x in jax.tree.leaves(on))


def test_671b_state_on_two_v6e256_slices_is_half_of_one():
    """The shipped two-slice config: 671B's state per chip halves (19.88 GiB -> 9.94 GiB)."""
    from dsjax.parallel.aot import state_bytes

    tcfg = load_train_config("configs/pretrain_v3_671b_v6e256x2.yaml")
    assert tcfg.mesh.dcn == 2 and tcfg.mesh.fsdp_over_dcn
    mesh = AbstractMesh(tuple(getattr(tcfg.mesh, a) for a in pm.AXES), pm.AXES)
    params = abstract_params(tcfg.model)
    state = jax.eval_shape(lambda p: {"params": p, "mu": jax.tree.map(lambda x: x.astype("bfloat16"), p),
                                      "nu": jax.tree.map(lambda x: x.astype("bfloat16"), p)}, params)

    def gib(rules):
        sh = pm.state_shardings(mesh, tcfg.model, state, rules)
        return state_bytes(state, sh) / 2**30

    one, two = gib(pm.RULES), gib(pm.rules_for(tcfg.mesh))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert one == pytest.approx(n * 8 / 256 / 2**30, rel=0.01)  # fp32 weights + 2 bf16 moments over 256
    assert two == pytest.approx(one / 2, rel=0.01), (one, two)


RUN = ["model.num_hidden_layers=2", "seq_len=32", "batch_size=8", "steps=2", "log_every=1", "eval_every=1000",
       "checkpoint_every=1000", "progress=false", "async_checkpointing=false", "lr=0.01", "warmup_steps=1"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([r["loss"] for r in map(json.loads, f)])


def test_training_over_dcn_and_fsdp_equals_one_device(tmp_path, monkeypatch):
    """With expert parallelism too (dcn 2 x fsdp 2 x expert 2): the routed experts' weights are gathered
    inside the expert-parallel shard_map over the axes they are stored on, here ("dcn", "fsdp")."""
    from dsjax.train.trainer import train

    assert len(jax.devices()) == 8
    train(load_train_config(None, RUN + ["mesh.fsdp=1"]), str(tmp_path / "one"))
    placed = []
    orig = pm.state_shardings
    monkeypatch.setattr(pm, "state_shardings", lambda *a, **k: placed.append(orig(*a, **k)) or placed[-1])
    tcfg = load_train_config(None, RUN + ["mesh.dcn=2", "mesh.fsdp=2", "mesh.expert=2", "mesh.fsdp_over_dcn=true"])
    assert tcfg.model.fsdp_over_dcn  # the model's copy of the mesh's state layout
    train(tcfg, str(tmp_path / "two"))
    specs = [str(s.spec) for s in jax.tree.leaves(placed[0])]
    assert any("'dcn', 'fsdp'" in s for s in specs), "the state was not sharded over dcn"
    got, want = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(got) == len(want) == 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_expert_stacks_do_not_cross_the_slices_whole():
    """The step compiled for dcn 2 x fsdp 2 x expert 2 with fsdp_over_dcn (8 CPU devices): no collective
    moves a whole layer stack. Before the expert-parallel layer gathered its weights over ("dcn", "fsdp"),
    XLA all-gathered and collective-permuted the whole float32 [layers, experts, ...] stacks across the
    slices in every step of the layer scan (on 671B over two v5p slices: 204 s of DCN per step)."""
    from dsjax.parallel.aot import compile_report

    layers = 5  # MoE layers: no other array of this step has a leading 5
    tcfg = load_train_config(None, [f"model.num_hidden_layers={layers + 1}", "mesh.dcn=2", "mesh.fsdp=2",
                                    "mesh.expert=2", "mesh.fsdp_over_dcn=true", "batch_size=8", "seq_len=32"])
    rep = compile_report(tcfg, "v5p-8", devices=jax.devices())  # the topology only names the report's chip
    sites = rep.hlo.sites(1000)
    assert any(kind == "all-gather" for kind, *_ in sites)  # the per-layer weight gathers are there
    whole = [s for s in sites if s[1].split("[")[1].startswith(f"{layers},")]
    assert not whole, whole


def test_weight_gathered_one_axis_at_a_time_is_the_stored_weight():
    """gather_weight over ("dcn", "fsdp") gathers "dcn" first, then "fsdp", and transposes the blocks
    back into the stored order: the same weight as one all_gather over both axes, and its gradient (a
    reduce-scatter over "fsdp", then over "dcn") the same as that gather's, against numpy."""
    from dsjax.parallel.expert_parallel import gather_weight

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dcn", "fsdp"))
    names = ("dcn", "fsdp")
    w = jax.random.normal(jax.random.key(1), (3, 16, 5))  # [experts, hidden (split 8 ways), out]
    t = jax.random.normal(jax.random.key(2), (8, 3, 16, 5))  # one factor per device

    def run(gather):
        def body(a, tt):  # a device's loss: its gathered weight against its own factor
            g = gather(a)
            return jnp.sum(g * tt[0] * jnp.sin(g)).reshape(1), g[None]
        f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, names), P(names)), out_specs=(P(names), P(names)))
        whole = jax.jit(lambda a, tt: f(a, tt)[1])(w, t)
        grad = jax.jit(jax.grad(lambda a, tt: f(a, tt)[0].sum()))(w, t)
        return whole, grad

    whole, grad = run(lambda a: gather_weight(a, {1: names}, jnp.float32))
    whole1, grad1 = run(lambda a: jax.lax.all_gather(a, names, axis=1, tiled=True))
    np.testing.assert_array_equal(np.asarray(whole), np.broadcast_to(np.asarray(w), (8, 3, 16, 5)))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(whole1))
    wn, tn = np.asarray(w, np.float64), np.asarray(t, np.float64)
    want = (tn * (np.sin(wn) + wn * np.cos(wn))).sum(0)  # d/dw of sum_devices t_d * w * sin(w)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad1), rtol=1e-5, atol=1e-6)
