"""Forward passes that read and write the latent cache. All pure, all jit-able, static shapes.

  prefill(params, tokens, cache, cfg)        full MLA over a right-padded prompt [b, P]; writes entries 0..P-1
  extend(params, tokens, cache, cfg, ...)    absorbed MLA for T new tokens per sequence at positions
                                             lengths[b] + 0..T-1 (T = 1: decode; T = 2: speculative verify;
                                             T = suffix: prefix-cache prefill); writes their entries
  mtp_prefill / mtp_extend                   the same for the first MTP block (its own latent cache)

None of them moves cache["lengths"]: the caller decides how many of the written entries to keep
(speculative decoding keeps 1 or 2). Each returns (logits [b, T, vocab] f32, hidden [b, T, hidden], cache);
hidden is the main model's state after the final norm (the MTP block's input), or the MTP block's output.

The decoder stacks are scanned (lax.scan over the layer axis of params and cache together), so compile
time does not grow with depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.infer.attention import absorbed_attention, prefill_attention
from dsjax.infer.cache import write_entries
from dsjax.model.layers import rms_norm
from dsjax.model.mtp import mtp_input
from dsjax.model.rope import rope_tables
from dsjax.model.transformer import Block, embed, head


def moe_config(cfg: ModelConfig, n_tokens: int, moe_impl: str = "auto") -> ModelConfig:
    """The expert path for a pass over n_tokens. "auto", on CPU: when the n_tokens*top_k assignments are
    fewer than the experts, the blocked path with 1-row blocks ("gather") reads only the chosen experts'
    weights; for a few more tokens, all experts densely (dense work E*n beats the blocked path's padding of
    every expert to moe_block_size rows, n*K + E*block); otherwise, and off CPU, cfg.moe_impl."""
    if moe_impl == "auto":
        e, k, bs = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_block_size
        moe_impl = cfg.moe_impl
        if jax.default_backend() == "cpu":
            if n_tokens * k < e:
                moe_impl = "gather"
            elif n_tokens * max(e - k, 1) < e * bs:
                moe_impl = "dense"
    if moe_impl == "gather":
        return cfg.replace(moe_impl="blocked", moe_block_size=1)
    return cfg if moe_impl == cfg.moe_impl else cfg.replace(moe_impl=moe_impl)


def _layer(p: dict, x, attn, cfg: ModelConfig, is_moe: bool, moe_cfg: ModelConfig):
    """One decoder block (the model's transformer.Block: its norms and feed-forward half, with moe_cfg's
    expert path) around an attention attn(mla params, normed x) -> (out, cache entries)."""
    blk, variables = Block(moe_cfg, is_moe), {"params": p}
    a, entries = attn(p["self_attn"], blk.apply(variables, x, method=lambda m, x: m.input_norm(x)))
    out, _ = blk.apply(variables, x + a, method=Block.feed_forward)
    return out, entries


def _stacks(params, cfg):
    out = []
    if cfg.num_dense_layers:
        out.append(("dense", params["dense_layers"], False))
    if cfg.num_moe_layers:
        out.append(("moe", params["moe_layers"], True))
    return out


def _positions(lengths, t):
    return lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def prefill(params: dict, tokens, cache: dict, cfg: ModelConfig, moe_impl: str = "auto"):
    """tokens [b, P] (right-padded) -> logits [b, P, V], hidden [b, P, d], cache with entries 0..P-1."""
    b, s = tokens.shape
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    mcfg = moe_config(cfg, b * s, moe_impl)
    attn = lambda p, x: prefill_attention(p, x, cos, sin, cfg)
    x = embed(params, tokens, cfg)
    cache = dict(cache)
    zero = jnp.zeros((b,), jnp.int32)
    for name, stacked, is_moe in _stacks(params, cfg):
        x, entries = jax.lax.scan(lambda c, lp: _layer(lp, c, attn, cfg, is_moe, mcfg), x, stacked)
        cache[name] = write_entries(cache[name], entries, zero)
    h = rms_norm(params["norm"], x, cfg.rms_norm_eps)
    return head(params, h, cfg), h, cache


def extend(params: dict, tokens, cache: dict, cfg: ModelConfig, *, moe_impl: str = "auto",
           decode_impl: str = "jnp"):
    """tokens [b, T] at positions lengths[b] + 0..T-1 -> logits [b, T, V], hidden [b, T, d], cache with
    their entries written (lengths unchanged)."""
    b, t = tokens.shape
    lengths = cache["lengths"]
    cos, sin = rope_tables(cfg, _positions(lengths, t))
    mcfg = moe_config(cfg, b * t, moe_impl)
    x = embed(params, tokens, cfg)
    cache = dict(cache)
    for name, stacked, is_moe in _stacks(params, cfg):
        def body(carry, xs, is_moe=is_moe):
            lp, cc, ck = xs
            attn = lambda p, y: absorbed_attention(p, y, cos, sin, cc, ck, lengths, cfg, decode_impl)
            return _layer(lp, carry, attn, cfg, is_moe, mcfg)

        x, entries = jax.lax.scan(body, x, (stacked, cache[name]["c"], cache[name]["k_pe"]))
        cache[name] = write_entries(cache[name], entries, lengths)
    h = rms_norm(params["norm"], x, cfg.rms_norm_eps)
    return head(params, h, cfg), h, cache


# ----------------------------------------------------------------------------- MTP (first block)

def _mtp_params(params):
    return jax.tree.map(lambda a: a[0], params["mtp_layers"])


def _mtp_input(params, p, h_main, next_tokens, cfg: ModelConfig):
    """h' = eh_proj([enorm(Emb(token_{t+1})) ; hnorm(h_t)]), as in the model's MTP depth 1."""
    return mtp_input(p, embed(params, next_tokens, cfg), h_main, cfg)


def _mtp_out(params, p, x, entries, cache, start, cfg):
    cache = dict(cache)
    cache["mtp"] = write_entries(cache["mtp"], jax.tree.map(lambda a: a[None], entries), start)
    return head(params, rms_norm(p["shared_head_norm"], x, cfg.rms_norm_eps), cfg), x, cache


def mtp_prefill(params: dict, h_main, next_tokens, cache: dict, cfg: ModelConfig, moe_impl: str = "auto"):
    """MTP block over positions 0..P-1: h_main [b, P, d] (main hidden at t), next_tokens [b, P] (token t+1).
    Logits at t are the draft for token t+2."""
    b, s = next_tokens.shape
    p = _mtp_params(params)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    x = _mtp_input(params, p, h_main, next_tokens, cfg)
    attn = lambda pa, y: prefill_attention(pa, y, cos, sin, cfg)
    x, entries = _layer(p, x, attn, cfg, cfg.mtp_is_moe, moe_config(cfg, b * s, moe_impl))
    return _mtp_out(params, p, x, entries, cache, jnp.zeros((b,), jnp.int32), cfg)


def mtp_extend(params: dict, h_main, next_tokens, cache: dict, cfg: ModelConfig, *, moe_impl: str = "auto",
               decode_impl: str = "jnp"):
    """MTP block for T positions lengths[b] + 0..T-1 against its own latent cache (cache["mtp"])."""
    b, t = next_tokens.shape
    p = _mtp_params(params)
    lengths = cache["lengths"]
    cos, sin = rope_tables(cfg, _positions(lengths, t))
    x = _mtp_input(params, p, h_main, next_tokens, cfg)
    cc, ck = cache["mtp"]["c"][0], cache["mtp"]["k_pe"][0]
    attn = lambda pa, y: absorbed_attention(pa, y, cos, sin, cc, ck, lengths, cfg, decode_impl)
    x, entries = _layer(p, x, attn, cfg, cfg.mtp_is_moe, moe_config(cfg, b * t, moe_impl))
    return _mtp_out(params, p, x, entries, cache, lengths, cfg)
