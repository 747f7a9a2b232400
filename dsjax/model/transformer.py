"""The decoder stack: embedding, scanned dense and MoE blocks, final norm, head, and MTP.

`forward(params, tokens, cfg)` is pure: same inputs, same outputs; jit, grad and shard it freely.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import dense, rms_norm, swiglu
from dsjax.model.mla import mla
from dsjax.model.moe import moe
from dsjax.model.mtp import mtp_input, shifted
from dsjax.model.rope import rope_tables
from dsjax.parallel.expert_parallel import experts_under


def block(p: dict, x, cos, sin, segment_ids, token_mask, cfg: ModelConfig, is_moe: bool, mesh=None):
    """One decoder layer: x + MLA(norm(x)), then + MLP or MoE(norm(.)). Returns (x, moe stats | None).
    mesh: the mesh the caller runs under (None: none); expert parallelism when it has an expert axis."""
    h = x + mla(p["self_attn"], rms_norm(p["input_layernorm"], x, cfg.rms_norm_eps), cos, sin, segment_ids, cfg,
                mesh)
    y = rms_norm(p["post_attention_layernorm"], h, cfg.rms_norm_eps)
    if is_moe:
        m, stats = moe(p["mlp"], y, cfg, token_mask, experts_under(mesh, cfg))
        return h + m, stats
    return h + swiglu(p["mlp"], y), None


def _remat(fn, cfg: ModelConfig):
    if cfg.remat_policy == "full":
        return jax.checkpoint(fn)
    if cfg.remat_policy == "dots_saveable":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def _scan_blocks(stacked: dict, x, cos, sin, segment_ids, token_mask, cfg: ModelConfig, is_moe: bool, mesh):
    """Run a stack of identical layers with lax.scan: compile time does not grow with depth."""

    def body(carry, lp):
        out, stats = block(lp, carry, cos, sin, segment_ids, token_mask, cfg, is_moe, mesh)
        return out, stats

    return jax.lax.scan(_remat(body, cfg), x, stacked, unroll=cfg.scan_unroll)


def head(params, h, cfg: ModelConfig):
    """Logits in float32 from normalised hidden states h [b, s, hidden]."""
    return dense(h, params["lm_head"].astype(h.dtype), jnp.float32)


def embed(params, tokens, cfg: ModelConfig):
    return params["embed_tokens"][tokens].astype(jnp.dtype(cfg.dtype))


def forward(params: dict, tokens: jnp.ndarray, cfg: ModelConfig, *, positions=None, segment_ids=None,
            with_mtp: bool = True, mesh=None):
    """DeepSeek-V3 forward. tokens [batch, seq] int -> (logits [batch, seq, vocab] float32, aux).

    mesh: the mesh the caller runs under (None: none). Under a mesh with an "expert" axis of size > 1
    the MoE layers run expert parallelism over it; Pallas kernels run per device under any mesh.
    positions [batch, seq] default to 0..seq-1; segment_ids [batch, seq] (packed rows: attention stays
    inside a segment; id 0 marks padding, which is left out of the routing statistics).
    aux: expert_load [moe_layers, E], seq_count/seq_prob [moe_layers, batch, E] (balance loss inputs),
         hidden [batch, seq, hidden] (after the final norm), and, when the config has MTP and
         with_mtp, mtp_logits [depth, batch, seq, vocab] (depth k at position t predicts token t+k+1)
         plus mtp_expert_load [depth, E] when the MTP blocks are MoE.
    """
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    token_mask = None if segment_ids is None else (segment_ids != 0)
    cos, sin = rope_tables(cfg, positions)
    x = embed(params, tokens, cfg)
    aux = {}
    if cfg.num_dense_layers:
        x, _ = _scan_blocks(params["dense_layers"], x, cos, sin, segment_ids, token_mask, cfg, False, mesh)
    if cfg.num_moe_layers:
        x, stats = _scan_blocks(params["moe_layers"], x, cos, sin, segment_ids, token_mask, cfg, True, mesh)
        aux["expert_load"], aux["seq_count"], aux["seq_prob"] = stats["load"], stats["seq_count"], stats["seq_prob"]
    h = rms_norm(params["norm"], x, cfg.rms_norm_eps)
    logits = head(params, h, cfg)
    aux["hidden"] = h
    if cfg.num_nextn_predict_layers and with_mtp:
        aux.update(mtp_forward(params, h, tokens, cos, sin, segment_ids, token_mask, cfg, mesh))
    return logits, aux


def mtp_forward(params, h_main, tokens, cos, sin, segment_ids, token_mask, cfg: ModelConfig, mesh=None) -> dict:
    """The MTP depths (dsjax.model.mtp) after the main model: mtp_logits [depth, b, s, vocab] and, when
    the MTP blocks are MoE, mtp_expert_load [depth, E]."""
    h_prev = h_main
    logits, loads = [], []
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        p = jax.tree.map(lambda a: a[k - 1], params["mtp_layers"])
        nxt, valid = shifted(tokens, segment_ids, k)
        e = embed(params, nxt, cfg) * valid[..., None].astype(h_main.dtype)
        x = mtp_input(p, e, h_prev, cfg)
        x, stats = block(p, x, cos, sin, segment_ids, token_mask, cfg, cfg.mtp_is_moe, mesh)
        logits.append(head(params, rms_norm(p["shared_head_norm"], x, cfg.rms_norm_eps), cfg))
        if stats is not None:
            loads.append(stats["load"])
        h_prev = x
    out = {"mtp_logits": jnp.stack(logits)}
    if loads:
        out["mtp_expert_load"] = jnp.stack(loads)
    return out
