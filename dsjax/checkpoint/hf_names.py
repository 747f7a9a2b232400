"""The map between HF checkpoint tensor names and dsjax's parameter tree.

Each entry says where one HF tensor lives in the params: a path of dict keys, optional leading indices
(layer in a stack, expert in a stack) and whether the matrix is transposed ([out, in] in PyTorch vs
[in, out] in JAX). Entries flagged `copy_of_shared` are the MTP module's copies of the embedding and
head, which the released checkpoints store per MTP layer and which dsjax shares with the main model.
"""
from __future__ import annotations

import dataclasses

from dsjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # HF tensor name
    path: tuple[str, ...]  # keys into the params tree
    index: tuple[int, ...] = ()  # leading indices into the stacked leaf
    transpose: bool = False
    copy_of_shared: bool = False  # an MTP copy of embed_tokens / lm_head: written on export, checked on import


_ATTN_MATS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_ATTN_NORMS = ("q_a_layernorm", "kv_a_layernorm")


def _block_entries(cfg: ModelConfig, prefix: str, group: str, li: int, is_moe: bool) -> list[Entry]:
    out = []
    for n in ("input_layernorm", "post_attention_layernorm"):
        out.append(Entry(f"{prefix}.{n}.weight", (group, n), (li,)))
    attn = ("q_proj",) if cfg.q_lora_rank is None else ("q_a_proj", "q_b_proj")
    for n in attn + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        out.append(Entry(f"{prefix}.self_attn.{n}.weight", (group, "self_attn", n), (li,), True))
    norms = ("kv_a_layernorm",) if cfg.q_lora_rank is None else _ATTN_NORMS
    for n in norms:
        out.append(Entry(f"{prefix}.self_attn.{n}.weight", (group, "self_attn", n), (li,)))
    if not is_moe:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{prefix}.mlp.{n}.weight", (group, "mlp", n), (li,), True))
        return out
    out.append(Entry(f"{prefix}.mlp.gate.weight", (group, "mlp", "gate", "weight"), (li,), True))
    if cfg.topk_method == "noaux_tc":
        out.append(Entry(f"{prefix}.mlp.gate.e_score_correction_bias", (group, "mlp", "gate", "e_score_correction_bias"), (li,)))
    for e in range(cfg.n_routed_experts):
        for n in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{prefix}.mlp.experts.{e}.{n}.weight", (group, "mlp", "experts", n), (li, e), True))
    if cfg.n_shared_experts > 0:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{prefix}.mlp.shared_experts.{n}.weight", (group, "mlp", "shared_experts", n), (li,), True))
    return out


def hf_entries(cfg: ModelConfig, include_mtp: bool = True) -> list[Entry]:
    """Every tensor of the HF layout, in checkpoint order (layer by layer)."""
    out = [Entry("model.embed_tokens.weight", ("embed_tokens",))]
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        if i < cfg.num_dense_layers:
            out += _block_entries(cfg, prefix, "dense_layers", i, False)
        else:
            out += _block_entries(cfg, prefix, "moe_layers", i - cfg.num_dense_layers, True)
    out.append(Entry("model.norm.weight", ("norm",)))
    out.append(Entry("lm_head.weight", ("lm_head",), (), True))
    if include_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            prefix = f"model.layers.{cfg.num_hidden_layers + j}"
            out.append(Entry(f"{prefix}.embed_tokens.weight", ("embed_tokens",), (), False, True))
            for n in ("enorm", "hnorm"):
                out.append(Entry(f"{prefix}.{n}.weight", ("mtp_layers", n), (j,)))
            out.append(Entry(f"{prefix}.eh_proj.weight", ("mtp_layers", "eh_proj"), (j,), True))
            out += _block_entries(cfg, prefix, "mtp_layers", j, cfg.mtp_is_moe)
            out.append(Entry(f"{prefix}.shared_head.norm.weight", ("mtp_layers", "shared_head_norm"), (j,)))
            out.append(Entry(f"{prefix}.shared_head.head.weight", ("lm_head",), (), True, True))
    return out


def hf_shape(entry: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor for an entry given the full stacked leaf shape."""
    shape = tuple(leaf_shape[len(entry.index):])
    return shape[::-1] if entry.transpose else shape
