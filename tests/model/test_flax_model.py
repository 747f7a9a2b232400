"""The model as Flax modules: DeepseekV3's init declares exactly the parameter tree the rest of dsjax
uses (HF names, stacked layers, logical axes as Flax metadata), the shardings come from that metadata
through the one rules table, `forward` is DeepseekV3.apply, a module runs on hand-made arrays, and
init_params draws what its contract says. References: the tree and axis names written out by hand
from the HF checkpoint layout, jax.random drawn directly in the test, and the pure functions the
modules wrap."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import load_config
from dsjax.model import DeepseekV3
from dsjax.model.layers import Param
from dsjax.model.mla import MLA, mla
from dsjax.model.params import init_params, logical_axes, param_specs
from dsjax.model.rope import rope_tables
from dsjax.model.transformer import forward
from dsjax.parallel import mesh as pm

CFG = load_config("configs/tiny.yaml")


def _boxes(cfg):
    return jax.eval_shape(DeepseekV3(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]


def test_init_declares_the_hf_tree_with_logical_axes():
    boxes = _boxes(CFG)
    assert all(isinstance(b, Param) for b in jax.tree.leaves(boxes, is_leaf=lambda x: isinstance(x, Param)))
    names = jax.tree.map(lambda b: b.names, boxes, is_leaf=lambda x: isinstance(x, Param))
    # Written out from the HF layout: model.layers.N.{input_layernorm, self_attn.*, mlp.*} stacked.
    moe = names["moe_layers"]
    assert moe["input_layernorm"] == ("layers", "norm")
    assert moe["self_attn"]["q_a_proj"] == ("layers", "embed", "q_lora")
    assert moe["self_attn"]["kv_b_proj"] == ("layers", "kv_lora", "heads")
    assert moe["mlp"]["gate"]["weight"] == ("layers", "embed", "gate_experts")
    assert moe["mlp"]["experts"]["down_proj"] == ("layers", "experts", "expert_mlp", "expert_embed")
    assert moe["mlp"]["shared_experts"]["up_proj"] == ("layers", "embed", "mlp")
    assert names["dense_layers"]["mlp"]["down_proj"] == ("layers", "mlp", "embed")
    assert names["mtp_layers"]["eh_proj"] == ("layers", "mtp_concat", "embed")
    assert names["mtp_layers"]["shared_head_norm"] == ("layers", "norm")
    assert names["embed_tokens"] == ("vocab", "embed") and names["lm_head"] == ("embed", "vocab")
    assert names["norm"] == ("norm",)
    n_moe = CFG.num_hidden_layers - CFG.first_k_dense_replace
    e, d, f = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    assert boxes["moe_layers"]["mlp"]["experts"]["gate_proj"].value.shape == (n_moe, e, d, f)
    assert jax.tree.map(lambda b: b.names, boxes, is_leaf=lambda x: isinstance(x, Param)) == logical_axes(CFG)


def test_shardings_come_from_the_metadata_and_the_rules_table():
    mesh = pm.make_mesh(pm.MeshConfig(fsdp=2, expert=2, tensor=2))
    specs = pm.param_specs(mesh, CFG)
    boxes = _boxes(CFG)
    flat = jax.tree_util.tree_flatten_with_path(boxes, is_leaf=lambda x: isinstance(x, Param))[0]
    for path, b in flat:
        want = pm.logical_to_spec(b.names, mesh, b.value.shape)  # the flax names through RULES
        got = specs
        for k in path:
            got = got[k.key]
        assert got == want, jax.tree_util.keystr(path)
    assert specs["moe_layers"]["mlp"]["experts"]["gate_proj"][1] == "expert"
    assert "tensor" in str(specs["moe_layers"]["self_attn"]["q_b_proj"])


def test_init_params_is_one_flat_normal_draw_cut_in_path_order():
    """The contract checkpoints and pinned tests rely on: normal(0, init_std) leaves cut, in sorted path
    order, from one normal vector of the seed's key; norms ones; the balancing bias zeros."""
    params = init_params(CFG, 3)
    specs = param_specs(CFG)
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "init"))[0]
    sizes = [int(np.prod(s.shape)) if s.init == "normal" else 0 for _, s in leaves]
    flat = np.asarray(jax.random.normal(jax.random.key(3), (sum(sizes),), jnp.float32)) * CFG.init_std
    off = 0
    got = dict((jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(params)[0])
    for (path, s), n in zip(leaves, sizes):
        a = np.asarray(got[jax.tree_util.keystr(path)])
        if s.init == "normal":
            # the order of the cut is the contract; XLA may fold the scale into the draw (1 ulp)
            np.testing.assert_allclose(a, flat[off:off + n].reshape(s.shape), rtol=1e-6, atol=0)
            off += n
        else:
            np.testing.assert_array_equal(a, np.full(s.shape, 1.0 if s.init == "ones" else 0.0, np.float32))
    assert off == flat.size


def test_forward_is_the_module_and_module_init_gives_the_same_tree():
    params = init_params(CFG, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)
    logits, aux = forward(params, tokens, CFG)
    logits2, aux2 = DeepseekV3(CFG).apply({"params": params}, tokens)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(aux["mtp_logits"], aux2["mtp_logits"])
    flax_init = nn.unbox(jax.eval_shape(DeepseekV3(CFG).init, jax.random.key(0), tokens)["params"])
    assert jax.tree.structure(flax_init) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, flax_init) == jax.tree.map(jnp.shape, params)


def test_mla_module_runs_on_hand_made_arrays():
    """A test can call one block's MLA with arrays it made: the module and the pure function agree."""
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, jnp.float32),
                     jax.eval_shape(MLA(CFG).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4, CFG.hidden_size),
                                    jnp.float32), *rope_tables(CFG, jnp.zeros((1, 4), jnp.int32)), None)["params"])
    p = nn.unbox(p)
    x = jnp.asarray(rng.standard_normal((1, 4, CFG.hidden_size)), jnp.float32)
    cos, sin = rope_tables(CFG, jnp.arange(4)[None])
    np.testing.assert_array_equal(MLA(CFG).apply({"params": p}, x, cos, sin, None), mla(p, x, cos, sin, None, CFG))
    assert sorted(p) == ["kv_a_layernorm", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_layernorm", "q_a_proj",
                         "q_b_proj"]
