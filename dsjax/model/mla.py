"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1), as pure functions over a param dict
and as the Flax module `MLA` that declares those params and calls them.

Params (JAX kernels are [in, out]):
  q_a_proj [hidden, q_lora], q_a_layernorm [q_lora], q_b_proj [q_lora, heads*qk_head_dim]   (q-LoRA)
  or q_proj [hidden, heads*qk_head_dim]                                                   (no q-LoRA)
  kv_a_proj_with_mqa [hidden, kv_lora + rope], kv_a_layernorm [kv_lora],
  kv_b_proj [kv_lora, heads*(nope + v)], o_proj [heads*v, hidden]
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import fp8 as fp8_lib
from dsjax.model.layers import dense, param, rms_norm
from dsjax.model.rope import apply_rope
from dsjax.parallel.shard import per_shard, token_axes


def project_q(p: dict, x: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Queries before RoPE: [batch, seq, heads, qk_head_dim]."""
    dt, fp8 = x.dtype, fp8_lib.mode(cfg)
    if cfg.q_lora_rank is None:
        q = dense(x, p["q_proj"].astype(dt), fp8=fp8)
    else:
        q_a = rms_norm(p["q_a_layernorm"], dense(x, p["q_a_proj"].astype(dt), fp8=fp8), cfg.rms_norm_eps)
        q = dense(q_a, p["q_b_proj"].astype(dt), fp8=fp8)
    return q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)


def project_latent(p: dict, x: jnp.ndarray, cos, sin, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """What the MLA cache stores per token: normalised latent c [b, s, kv_lora] and roped key [b, s, rope]."""
    kv_a = dense(x, p["kv_a_proj_with_mqa"].astype(x.dtype), fp8=fp8_lib.mode(cfg))  # [b, s, kv_lora + rope]
    c = rms_norm(p["kv_a_layernorm"], kv_a[..., : cfg.kv_lora_rank], cfg.rms_norm_eps)
    k_pe = apply_rope(kv_a[..., None, cfg.kv_lora_rank:], cos, sin)[:, :, 0]
    return c, k_pe


def rope_query(q: jnp.ndarray, cos, sin, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Split q into (q_nope [b,s,h,nope], roped q_pe [b,s,h,rope])."""
    return q[..., : cfg.qk_nope_head_dim], apply_rope(q[..., cfg.qk_nope_head_dim:], cos, sin)


def attention_mask(seq_q: int, seq_k: int, segment_ids: jnp.ndarray | None, offset: int = 0) -> jnp.ndarray:
    """Causal mask [batch|1, 1, seq_q, seq_k], restricted to equal segment ids when packing."""
    qi = jnp.arange(seq_q)[:, None] + offset
    ki = jnp.arange(seq_k)[None, :]
    mask = (ki <= qi)[None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def _query_block(seq: int) -> int:
    """Query rows per block of the causal attention: enough blocks (<= 16) to skip most of the masked
    upper triangle, big enough to keep the matmuls efficient and the per-block slicing few. An MLA
    layer fwd+bwd at 8 x 512 on CPU: blocks of 32 rows 85 ms, 64 62 ms, 128 51 ms, 256 65 ms, 512 86 ms."""
    return max(128, -(-seq // 16))


def dot_attention(q, k, v, segment_ids, scale: float, block_q: int | None = None) -> jnp.ndarray:
    """Causal attention. q,k [b,s,h,dqk]; v [b,s,h,dv] -> [b,s,h,dv]; softmax in float32.

    Self-attention is computed per block of block_q query rows against only the keys up to the block's
    last row: the skipped keys are all masked, so the result is the full masked softmax, at about half
    the FLOPs and score memory of the [s, s] product for long rows (measured on CPU at 8x512: fwd+bwd
    343 -> 193 ms)."""
    sq, sk = q.shape[1], k.shape[1]
    block_q = block_q or _query_block(sq)
    # Heads-major [b, h, s, d]: every product below batches over (b, h) with no transposes; the
    # scale goes on q ([b, s, h, d] numbers) rather than on the [b, h, q, k] scores.
    q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if sq != sk or sq <= block_q:
        return jnp.swapaxes(_attend(q, k, v, attention_mask(sq, sk, segment_ids)), 1, 2)
    outs = []
    for i in range(0, sq, block_q):
        e = min(i + block_q, sq)
        seg = None if segment_ids is None else (segment_ids[:, i:e], segment_ids[:, :e])
        qi = q[:, :, i:e]
        if outs:  # block i starts after block i-1 ends (and, transposed, its backward before i-1's):
            # otherwise XLA may schedule every block's scores at once (TPU: 17 GiB per layer at 4 x 4096).
            _, qi = jax.lax.optimization_barrier((outs[-1], qi))
        outs.append(_attend(qi, k[:, :, :e], v[:, :, :e], _block_mask(i, e, seg)))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


def _block_mask(start: int, end: int, seg) -> jnp.ndarray:
    """Mask [b|1, 1, end-start, end] of query rows start..end-1 over keys 0..end-1."""
    mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
    if seg is not None:
        mask = mask & (seg[0][:, :, None] == seg[1][:, None, :])[:, None]
    return mask


_NEG = float(jnp.finfo(jnp.float32).min)
_F32 = jnp.float32


@jax.custom_vjp
def _attend(q, k, v, mask) -> jnp.ndarray:
    """Masked softmax attention of one query block, heads-major: q [b,h,q,d] (already scaled),
    k [b,h,k,d], v [b,h,k,dv], mask [b|1, 1, q, k] -> [b,h,q,dv]; softmax in float32.

    A hand-written VJP in the flash-attention manner: the forward pass keeps only the output and the
    softmax's log-normaliser lse [b,h,q,1]; the backward pass recomputes the scores, takes the
    probabilities as exp(s - lse), and uses dS = P * (dP - rowsum(dO * O)). No [b, h, q, k] array
    outlives its block: saving the probabilities instead costs 4 bytes x batch x heads x q x k per
    block, 16 GiB per layer for 4 x 4096 tokens and 128 heads (DeepSeek-V3 on one chip), for one
    matmul fewer in the backward pass."""
    return _attend_fwd(q, k, v, mask)[0]


def _scores(q, k, mask):
    return jnp.where(mask, jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=_F32), _NEG)


def _attend_fwd(q, k, v, mask):
    s = _scores(q, k, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)  # unnormalised; 0 where masked
    l = jnp.sum(p, axis=-1, keepdims=True)  # [b, h, q, 1]
    # The softmax is normalised on the [.., q, dv] output rather than on the probabilities.
    o = (jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=_F32) / l).astype(v.dtype)
    return o, (q, k, v, mask, o, m + jnp.log(l))


def _attend_bwd(res, do):
    # The barrier keeps XLA from merging this recomputation with the forward pass's identical one
    # (common-subexpression elimination), which would keep the forward's scores alive until here.
    q, k, v, mask, o, lse = jax.lax.optimization_barrier(res)
    p = jnp.exp(_scores(q, k, mask) - lse)  # the normalised probabilities P; 0 where masked
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), do.astype(v.dtype))
    dp = jnp.einsum("bhqd,bhkd->bhqk", do.astype(v.dtype), v, preferred_element_type=_F32)
    rows = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1, keepdims=True)
    ds = (p * (dp - rows)).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


class MLA(nn.Module):
    """Multi-head latent attention: queries through the q-LoRA bottleneck (or q_proj), keys and values
    from one latent c = RMSNorm(kv_a(x)) shared by every head plus one roped key, causal softmax,
    o_proj. Parameter names are HF's (`model.layers.N.self_attn.*`); mesh: the mesh the caller runs
    under (the Pallas kernel runs per device on it)."""

    cfg: ModelConfig
    mesh: Any = None

    def setup(self):
        c = self.cfg
        d, h = c.hidden_size, c.num_attention_heads
        w = {}
        if c.q_lora_rank is None:
            w["q_proj"] = param(self, "q_proj", (d, h * c.qk_head_dim), ("embed", "heads"), c)
        else:
            w["q_a_proj"] = param(self, "q_a_proj", (d, c.q_lora_rank), ("embed", "q_lora"), c)
            w["q_a_layernorm"] = param(self, "q_a_layernorm", (c.q_lora_rank,), ("norm",), c, "ones")
            w["q_b_proj"] = param(self, "q_b_proj", (c.q_lora_rank, h * c.qk_head_dim), ("q_lora", "heads"), c)
        w["kv_a_proj_with_mqa"] = param(self, "kv_a_proj_with_mqa", (d, c.kv_lora_rank + c.qk_rope_head_dim),
                                        ("embed", "kv_lora"), c)
        w["kv_a_layernorm"] = param(self, "kv_a_layernorm", (c.kv_lora_rank,), ("norm",), c, "ones")
        w["kv_b_proj"] = param(self, "kv_b_proj", (c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim)),
                               ("kv_lora", "heads"), c)
        w["o_proj"] = param(self, "o_proj", (h * c.v_head_dim, d), ("heads", "embed"), c)
        self.w = w

    def __call__(self, x, cos, sin, segment_ids):
        """x [b, s, hidden] -> [b, s, hidden] (full, non-absorbed attention: training and prefill)."""
        return mla(self.w, x, cos, sin, segment_ids, self.cfg, self.mesh)


def mla(p: dict, x: jnp.ndarray, cos, sin, segment_ids, cfg: ModelConfig, mesh=None) -> jnp.ndarray:
    """Full (non-absorbed) MLA for training and prefill. x [b, s, hidden] -> [b, s, hidden].
    mesh: the mesh the caller runs under (None: none); the Pallas kernel then runs per device."""
    b, s, _ = x.shape
    h = cfg.num_attention_heads
    q_nope, q_pe = rope_query(project_q(p, x, cfg), cos, sin, cfg)
    c, k_pe = project_latent(p, x, cos, sin, cfg)
    kv = dense(c, p["kv_b_proj"].astype(x.dtype), fp8=fp8_lib.mode(cfg)).reshape(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    q = jnp.concatenate([q_nope, q_pe], axis=-1)  # [b, s, h, qk_head_dim]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (b, s, h, cfg.qk_rope_head_dim))], axis=-1)
    if cfg.attention_impl == "pallas":
        o = _pallas_attention(q, k, v, segment_ids, cfg, mesh)
    else:
        o = dot_attention(q, k, v, segment_ids, cfg.softmax_scale)
    # o_proj stays out of FP8: DeepSeek-V3 keeps the input of the projection after attention in higher
    # precision (it also feeds attention's backward pass).
    return dense(o.reshape(b, s, h * cfg.v_head_dim), p["o_proj"].astype(x.dtype))


def _pallas_attention(q, k, v, segment_ids, cfg: ModelConfig, mesh) -> jnp.ndarray:
    """The Pallas flash kernel, per device under a mesh (Mosaic/Triton calls are not partitioned by
    XLA): batch over the token axes that divide it, heads over "tensor" when it divides them."""
    from pallas_kernels.mla import mla_attention

    def attend(q, k, v, seg):
        return mla_attention(q, k, v, segment_ids=seg, sm_scale=cfg.softmax_scale, causal=True,
                             impl="pallas", interpret=cfg.kernel_interpret)

    def specs(mesh):
        tensor = dict(mesh.shape).get("tensor", 1)
        batch = token_axes(mesh, q.shape[0]) or None
        heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 else None
        spec = jax.sharding.PartitionSpec(batch, None, heads, None)
        seg_spec = None if segment_ids is None else jax.sharding.PartitionSpec(batch, None)
        return (spec, spec, spec, seg_spec), spec

    return per_shard(attend, (q, k, v, segment_ids), specs, mesh)
