"""Parameter declarations: every leaf once, with its shape, logical axes and initialiser, as the Flax
modules of dsjax.model.transformer declare them (read off an abstract `DeepseekV3.init`).

The tree mirrors the HF checkpoint names (so the safetensors map is nearly the identity), with the
decoder layers stacked along a leading "layers" axis for the scanned stacks:
  embed_tokens [vocab, hidden]   norm [hidden]   lm_head [hidden, vocab]
  dense_layers / moe_layers / mtp_layers: {input_layernorm, self_attn{...}, post_attention_layernorm, mlp{...}}
  mtp_layers additionally: enorm, hnorm, eh_proj [2*hidden, hidden], shared_head_norm.
Logical axis names are mapped to mesh axes by dsjax.parallel.rules.RULES (sharding as data).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import RUNTIME_ONLY, ModelConfig
from dsjax.model.layers import Param
from dsjax.model.transformer import DeepseekV3


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def param_specs(cfg: ModelConfig) -> dict:
    """The ParamSpec tree of cfg's model: the Flax metadata (`layers.Param`) of every parameter."""
    # Fields that do not change the parameters are reset, so every variant shares one trace.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUNTIME_ONLY}
    # "dense" experts: the cheapest expert path to trace, on the one token the declaration runs.
    defaults["moe_impl"] = "dense"
    return jax.tree.map(lambda s: s, _param_specs(cfg.replace(**defaults)), is_leaf=is_spec)  # a fresh tree


@functools.lru_cache(maxsize=32)
def _param_specs(cfg: ModelConfig) -> dict:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxes = jax.eval_shape(DeepseekV3(cfg).init, jax.random.key(0), tokens)["params"]
    spec = lambda b: ParamSpec(tuple(b.value.shape), tuple(b.names), b.init)
    return _plain(jax.tree.map(spec, boxes, is_leaf=lambda x: isinstance(x, Param)))


def _plain(tree):
    """Nested plain dicts (Flax may hand back FrozenDicts)."""
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(cfg: ModelConfig) -> dict:
    """The tree of logical axis-name tuples, one per parameter."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=is_spec)


def abstract_params(cfg: ModelConfig) -> dict:
    dt = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), param_specs(cfg), is_leaf=is_spec)


def init_params(cfg: ModelConfig, seed: int | jax.Array = 0) -> dict:
    """Random parameters: normal(0, cfg.init_std) for matrices (V3 report: 0.006), ones for norms,
    zeros for the balancing bias."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return _init_params_jit(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: ModelConfig, key) -> dict:
    # One compiled program drawing one flat normal vector that is cut into the leaves. Per-leaf random
    # draws cost one threefry computation each to compile (seconds apiece on a loaded CPU, tens of
    # seconds for the tiny test model); a single draw compiles in about a second.
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    dt = jnp.dtype(cfg.param_dtype)
    sizes = [int(np.prod(s.shape)) if s.init == "normal" else 0 for s in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32) * cfg.init_std
    out, off = [], 0
    for s, n in zip(leaves, sizes):
        if s.init == "ones":
            out.append(jnp.ones(s.shape, dt))
        elif s.init == "zeros":
            out.append(jnp.zeros(s.shape, dt))
        else:
            out.append(flat[off:off + n].reshape(s.shape).astype(dt))
            off += n
    return jax.tree.unflatten(treedef, out)


def count_params(cfg: ModelConfig) -> dict:
    """Total and per-token-active parameter counts (main model, MTP separately)."""
    specs = param_specs(cfg)
    size = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree, is_leaf=is_spec))
    main = {k: v for k, v in specs.items() if k != "mtp_layers"}
    total = size(main)
    mtp = size(specs.get("mtp_layers", {}))
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.num_moe_layers * (e - k) * per_expert
    return {"total": total, "active": total - inactive, "mtp": mtp,
            "mtp_active": mtp - ((e - k) * per_expert if cfg.mtp_is_moe and mtp else 0)}
