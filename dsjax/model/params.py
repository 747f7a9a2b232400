"""Parameter declarations: every leaf once, with its shape, logical axes and initialiser.

The tree mirrors the HF checkpoint names (so the safetensors map is nearly the identity), with the
decoder layers stacked along a leading "layers" axis for `jax.lax.scan`:
  embed_tokens [vocab, hidden]   norm [hidden]   lm_head [hidden, vocab]
  dense_layers / moe_layers / mtp_layers: {input_layernorm, self_attn{...}, post_attention_layernorm, mlp{...}}
  mtp_layers additionally: enorm, hnorm, eh_proj [2*hidden, hidden], shared_head_norm.
Logical axis names are mapped to mesh axes by dsjax.parallel (sharding as data).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _w(shape, axes):
    return ParamSpec(tuple(shape), tuple(axes))


def _norm(n):
    return ParamSpec((n,), ("norm",), "ones")


def attention_specs(cfg: ModelConfig) -> dict:
    h, d = cfg.num_attention_heads, cfg.hidden_size
    p = {}
    if cfg.q_lora_rank is None:
        p["q_proj"] = _w((d, h * cfg.qk_head_dim), ("embed", "heads"))
    else:
        p["q_a_proj"] = _w((d, cfg.q_lora_rank), ("embed", "q_lora"))
        p["q_a_layernorm"] = _norm(cfg.q_lora_rank)
        p["q_b_proj"] = _w((cfg.q_lora_rank, h * cfg.qk_head_dim), ("q_lora", "heads"))
    p["kv_a_proj_with_mqa"] = _w((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"))
    p["kv_a_layernorm"] = _norm(cfg.kv_lora_rank)
    p["kv_b_proj"] = _w((cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)), ("kv_lora", "heads"))
    p["o_proj"] = _w((h * cfg.v_head_dim, d), ("heads", "embed"))
    return p


def mlp_specs(d: int, inter: int) -> dict:
    return {"gate_proj": _w((d, inter), ("embed", "mlp")), "up_proj": _w((d, inter), ("embed", "mlp")),
            "down_proj": _w((inter, d), ("mlp", "embed"))}


def moe_specs(cfg: ModelConfig) -> dict:
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    p = {
        "gate": {"weight": _w((d, e), ("embed", "gate_experts")),
                 "e_score_correction_bias": ParamSpec((e,), ("gate_experts",), "zeros")},
        "experts": {"gate_proj": _w((e, d, f), ("experts", "expert_embed", "expert_mlp")),
                    "up_proj": _w((e, d, f), ("experts", "expert_embed", "expert_mlp")),
                    "down_proj": _w((e, f, d), ("experts", "expert_mlp", "expert_embed"))},
    }
    if cfg.n_shared_experts > 0:
        p["shared_experts"] = mlp_specs(d, f * cfg.n_shared_experts)
    return p


def block_specs(cfg: ModelConfig, is_moe: bool) -> dict:
    d = cfg.hidden_size
    return {"input_layernorm": _norm(d), "self_attn": attention_specs(cfg), "post_attention_layernorm": _norm(d),
            "mlp": moe_specs(cfg) if is_moe else mlp_specs(d, cfg.intermediate_size)}


def _stack(tree: dict, n: int) -> dict:
    return jax.tree.map(lambda s: ParamSpec((n,) + s.shape, ("layers",) + s.axes, s.init), tree,
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def param_specs(cfg: ModelConfig) -> dict:
    d, v = cfg.hidden_size, cfg.vocab_size
    specs: dict[str, Any] = {"embed_tokens": _w((v, d), ("vocab", "embed")), "norm": _norm(d),
                             "lm_head": _w((d, v), ("embed", "vocab"))}
    if cfg.num_dense_layers:
        specs["dense_layers"] = _stack(block_specs(cfg, False), cfg.num_dense_layers)
    if cfg.num_moe_layers:
        specs["moe_layers"] = _stack(block_specs(cfg, True), cfg.num_moe_layers)
    if cfg.num_nextn_predict_layers:
        mtp = block_specs(cfg, cfg.mtp_is_moe)
        mtp.update(enorm=_norm(d), hnorm=_norm(d), eh_proj=_w((2 * d, d), ("mtp_concat", "embed")),
                   shared_head_norm=_norm(d))
        specs["mtp_layers"] = _stack(mtp, cfg.num_nextn_predict_layers)
    return specs


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
