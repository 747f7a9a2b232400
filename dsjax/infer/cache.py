"""The MLA latent cache (MLA, DeepSeek-V2 paper): per layer, sequence and token only the normalised latent
c [kv_lora_rank] and the roped shared key k_pe [qk_rope_head_dim] — never per-head keys or values.

Layout (a plain dict pytree, static shapes, so one compiled decode step serves every token):
  lengths [batch] int32          valid entries per sequence (entries t < lengths[b] are real)
  dense / moe / mtp: {"c": [layers, batch, max_len, kv_lora_rank], "k_pe": [layers, batch, max_len, rope]}
The layer axis matches the stacked parameters, so decode scans over (layer params, layer cache) together.

Padding convention: prompts are RIGHT-padded. Sequence b's token at cache index t has position t, so
positions are correct per sequence with no offset bookkeeping; a decode step writes each sequence's new
entry at its own index lengths[b]. Entries at t >= lengths[b] are garbage and always masked.
"""
from __future__ import annotations

import jax.numpy as jnp

from dsjax.config import ModelConfig

STACKS = ("dense", "moe", "mtp")


def stack_layers(cfg: ModelConfig, with_mtp: bool = False) -> dict[str, int]:
    """Layers per cache stack, in forward order."""
    n = {}
    if cfg.num_dense_layers:
        n["dense"] = cfg.num_dense_layers
    if cfg.num_moe_layers:
        n["moe"] = cfg.num_moe_layers
    if with_mtp:
        n["mtp"] = 1  # speculative decoding drafts with the first MTP block only
    return n


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, with_mtp: bool = False, dtype=None) -> dict:
    dt = jnp.dtype(dtype or cfg.dtype)
    cache = {"lengths": jnp.zeros((batch,), jnp.int32)}
    for name, n in stack_layers(cfg, with_mtp).items():
        cache[name] = {"c": jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dt),
                       "k_pe": jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dt)}
    return cache


def write_entries(stack: dict, entries: dict, start: jnp.ndarray) -> dict:
    """Write new entries {"c": [L, b, T, r], "k_pe": [L, b, T, rope]} at indices start[b] + 0..T-1.

    Indices past max_len are dropped (a finished sequence may keep stepping until the batch is done)."""
    b, t = entries["c"].shape[1:3]
    bi = jnp.arange(b)[:, None]
    pos = start[:, None] + jnp.arange(t)[None, :]  # [b, T]
    return {k: stack[k].at[:, bi, pos].set(entries[k].astype(stack[k].dtype), mode="drop") for k in stack}


def numbers_per_token(cfg: ModelConfig) -> int:
    """Cached numbers per token per layer: kv_lora_rank + qk_rope_head_dim (V3: 576)."""
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def mha_numbers_per_token(cfg: ModelConfig) -> int:
    """What a standard multi-head cache of the same model stores: heads x (qk_head_dim + v_head_dim)."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def bytes_per_token(cfg: ModelConfig, dtype=None, *, mha: bool = False) -> int:
    """Cache bytes per token over all main-model layers."""
    n = mha_numbers_per_token(cfg) if mha else numbers_per_token(cfg)
    return n * cfg.num_hidden_layers * jnp.dtype(dtype or cfg.dtype).itemsize
