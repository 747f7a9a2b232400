"""DeepSeek-V3 as a functional Flax model: the decoder block, the MTP depth and the whole stack.

Flax Linen, used through init/apply: `forward(params, tokens, cfg)` is `DeepseekV3(cfg).apply` on a
plain params pytree, so the model stays a pure function of its parameters (jit, grad, shard freely),
nothing hides state, and `nn.scan` keeps each stack of identical layers one scanned step (compile time
flat in depth) with the layer axis a leading axis of every stacked parameter. Linen rather than NNX:
NNX's modules are mutable objects that have to be split into a graph and a state and merged back
around every transformed call; Linen's apply takes and returns exactly the pytree that checkpoints,
optimizers and shardings already use.

Every parameter is declared by the module that uses it, with HF's name, its logical axes and its
initialiser (dsjax.model.layers.param); the mesh shardings follow from those axes and the one rules
table in dsjax.parallel.mesh. The tree (HF names, layers stacked along a leading axis):
  embed_tokens [vocab, hidden]   norm [hidden]   lm_head [hidden, vocab]
  dense_layers / moe_layers / mtp_layers: {input_layernorm, self_attn{...}, post_attention_layernorm, mlp{...}}
  mtp_layers additionally: enorm, hnorm, eh_proj [2*hidden, hidden], shared_head_norm.
The modules compute with the pure functions of dsjax.model.{layers, mla, moe, mtp}.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import remat
from dsjax.model.layers import MLP, RMSNorm, dense, param
from dsjax.model.mla import MLA
from dsjax.model.moe import MoE
from dsjax.model.mtp import mtp_input, shifted
from dsjax.model.rope import rope_tables


class Block(nn.Module):
    """One decoder layer: h = x + MLA(norm(x)), then h + MLP(norm(h)) or h + MoE(norm(h)).
    Returns (output, MoE statistics or None). mesh: the mesh the caller runs under (None: none);
    expert parallelism when it has an "expert" axis."""

    cfg: ModelConfig
    is_moe: bool
    mesh: Any = None

    def setup(self):
        c = self.cfg
        self.input_norm = RMSNorm(c.hidden_size, "input_layernorm", c)
        self.self_attn = MLA(c, self.mesh)
        self.post_attention_norm = RMSNorm(c.hidden_size, "post_attention_layernorm", c)
        self.mlp = MoE(c, self.mesh) if self.is_moe else MLP(c.hidden_size, c.intermediate_size, c)
        nn.share_scope(self, self.input_norm)
        nn.share_scope(self, self.post_attention_norm)

    def __call__(self, x, cos, sin, segment_ids, token_mask):
        x = remat.tag_layer_input(x)  # what remat_policy=offload_inputs keeps in host memory
        h = x + self.self_attn(self.input_norm(x), cos, sin, segment_ids)
        return self.feed_forward(h, token_mask)

    def feed_forward(self, h, token_mask=None):
        """The second half: h + MLP(norm(h)) or h + MoE(norm(h)) -> (output, MoE statistics or None)."""
        y = self.post_attention_norm(h)
        if self.is_moe:
            m, stats = self.mlp(y, token_mask)
            return h + m, stats
        return h + self.mlp(y), None


class MTP(nn.Module):
    """One multi-token-prediction depth k (DeepSeek-V3 report, section 2.2), a scan step over depths:
    h'_t = eh_proj([enorm(Emb(token_{t+k})) ; hnorm(h^{k-1}_t)]), h^k = Block(h'),
    logits_k = head(shared_head_norm(h^k)), with the main model's embedding and head (shared, passed in).
    Carries h^k; emits (the head's input shared_head_norm(h^k) [b, s, hidden], MoE load [E] or None):
    the caller applies the head (or a chunked loss does)."""

    cfg: ModelConfig
    mesh: Any = None

    def setup(self):
        c, d = self.cfg, self.cfg.hidden_size
        self.block = Block(c, c.mtp_is_moe, self.mesh)
        self.w = {"enorm": param(self, "enorm", (d,), ("norm",), c, "ones"),
                  "hnorm": param(self, "hnorm", (d,), ("norm",), c, "ones"),
                  "eh_proj": param(self, "eh_proj", (2 * d, d), ("mtp_concat", "embed"), c)}
        self.head_norm = RMSNorm(d, "shared_head_norm", c)
        nn.share_scope(self, self.block)
        nn.share_scope(self, self.head_norm)

    def __call__(self, h_prev, shifted_k, shared, cos, sin, segment_ids, token_mask):
        nxt, valid = shifted_k  # token t+k [b, s] and whether it exists in t's row and segment
        e = embed(shared, nxt, self.cfg) * valid[..., None].astype(h_prev.dtype)
        x, stats = self.block(mtp_input(self.w, e, h_prev, self.cfg), cos, sin, segment_ids, token_mask)
        return x, (self.head_norm(x), None if stats is None else stats["load"])


def _scanned(layer, n: int, in_axes=nn.broadcast, unroll: int = 1):
    """`layer` repeated n times as one nn.scan over a leading "layers" axis of its parameters; its
    arguments after the carry are the same at every step unless in_axes says otherwise."""
    return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=n, unroll=unroll, metadata_params={nn.PARTITION_NAME: "layers"})


def _remat(layer, cfg: ModelConfig):
    """The scanned layer under cfg.remat_policy (the table in dsjax.model.remat)."""
    if cfg.remat_policy == "none":
        return layer
    return nn.remat(layer, policy=remat.checkpoint_policy(cfg.remat_policy))


class DeepseekV3(nn.Module):
    """DeepSeek-V3: embedding, scanned dense then MoE decoder layers, final norm, head, and the MTP depths.

    __call__(tokens [batch, seq] int, positions=None, segment_ids=None, with_mtp=True)
      -> (logits [batch, seq, vocab] float32, aux); see `forward`."""

    cfg: ModelConfig
    mesh: Any = None

    def setup(self):
        c = self.cfg
        d, v = c.hidden_size, c.vocab_size
        self.embed_tokens = param(self, "embed_tokens", (v, d), ("vocab", "embed"), c)
        layer = _remat(Block, c)
        if c.num_dense_layers:
            self.dense_layers = _scanned(layer, c.num_dense_layers, unroll=c.scan_unroll)(c, False, self.mesh)
        if c.num_moe_layers:
            self.moe_layers = _scanned(layer, c.num_moe_layers, unroll=c.scan_unroll)(c, True, self.mesh)
        self.final_norm = RMSNorm(d, "norm", c)
        nn.share_scope(self, self.final_norm)
        self.lm_head = param(self, "lm_head", (d, v), ("embed", "vocab"), c)
        if c.num_nextn_predict_layers:
            self.mtp_layers = _scanned(MTP, c.num_nextn_predict_layers, in_axes=(0,) + (nn.broadcast,) * 5)(
                c, self.mesh)

    def __call__(self, tokens, positions=None, segment_ids=None, with_mtp: bool = True, with_logits: bool = True):
        c = self.cfg
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        token_mask = None if segment_ids is None else (segment_ids != 0)
        cos, sin = rope_tables(c, positions)
        shared = {"embed_tokens": self.embed_tokens, "lm_head": self.lm_head}
        x = embed(shared, tokens, c)
        aux = {}
        if c.num_dense_layers:
            x, _ = self.dense_layers(x, cos, sin, segment_ids, token_mask)
        if c.num_moe_layers:
            x, stats = self.moe_layers(x, cos, sin, segment_ids, token_mask)
            aux["expert_load"], aux["seq_count"], aux["seq_prob"] = stats["load"], stats["seq_count"], stats["seq_prob"]
        h = self.final_norm(x)
        logits = head(shared, h, c) if with_logits else None
        aux["hidden"] = h
        if c.num_nextn_predict_layers and with_mtp:
            nxt = _all_shifted(tokens, segment_ids, c.num_nextn_predict_layers)
            _, (mtp_hidden, loads) = self.mtp_layers(h, nxt, shared, cos, sin, segment_ids, token_mask)
            if with_logits:
                aux["mtp_logits"] = head(shared, mtp_hidden, c)  # [depth, b, s, vocab]
            else:
                aux["mtp_hidden"] = mtp_hidden
            if loads is not None:
                aux["mtp_expert_load"] = loads
        return logits, aux


def _all_shifted(tokens, segment_ids, depth: int):
    """(tokens t+k [depth, b, s], valid [depth, b, s]) for k = 1..depth: the MTP scan's inputs."""
    pairs = [shifted(tokens, segment_ids, k) for k in range(1, depth + 1)]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def head(params, h, cfg: ModelConfig):
    """Logits in float32 from normalised hidden states h [b, s, hidden]."""
    return dense(h, params["lm_head"].astype(h.dtype), jnp.float32)


def embed(params, tokens, cfg: ModelConfig):
    return params["embed_tokens"][tokens].astype(jnp.dtype(cfg.dtype))


def forward(params: dict, tokens: jnp.ndarray, cfg: ModelConfig, *, positions=None, segment_ids=None,
            with_mtp: bool = True, mesh=None, with_logits: bool = True):
    """DeepSeek-V3 forward: `DeepseekV3(cfg, mesh).apply` on a params pytree. tokens [batch, seq] int
    -> (logits [batch, seq, vocab] float32, aux).

    mesh: the mesh the caller runs under (None: none). Under a mesh with an "expert" axis of size > 1
    the MoE layers run expert parallelism over it; Pallas kernels run per device under any mesh.
    positions [batch, seq] default to 0..seq-1; segment_ids [batch, seq] (packed rows: attention stays
    inside a segment; id 0 marks padding, which is left out of the routing statistics).
    aux: expert_load [moe_layers, E], seq_count/seq_prob [moe_layers, batch, E] (balance loss inputs),
         hidden [batch, seq, hidden] (after the final norm), and, when the config has MTP and
         with_mtp, mtp_logits [depth, batch, seq, vocab] (depth k at position t predicts token t+k+1)
         plus mtp_expert_load [depth, E] when the MTP blocks are MoE.
    with_logits=False skips the head (logits None): a chunked loss applies it to aux["hidden"] and
    aux["mtp_hidden"] [depth, batch, seq, hidden] (after each depth's shared_head_norm) itself.
    """
    return DeepseekV3(cfg, mesh).apply({"params": params}, tokens, positions, segment_ids, with_mtp,
                                                        with_logits)


def block(p: dict, x, cos, sin, segment_ids, token_mask, cfg: ModelConfig, is_moe: bool, mesh=None):
    """`Block` as a pure function of one layer's parameters. Returns (x, MoE statistics | None)."""
    return Block(cfg, is_moe, mesh).apply({"params": p}, x, cos, sin, segment_ids, token_mask)
