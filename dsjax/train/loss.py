"""Training losses: next-token cross-entropy over packed rows, the MTP loss, the sequence-wise
balance loss (V3, alpha tiny) and an optional z-loss."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.mtp import shifted
from dsjax.model.transformer import forward


def cross_entropy(logits, targets, mask):
    """Sum of token losses and the token count. logits [b, s, V] f32, targets/mask [b, s]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((logz - tgt) * m), jnp.sum(m), logz


def chunked_cross_entropy(h, w, targets, mask, chunk: int):
    """cross_entropy(h @ w in float32, targets, mask) for h [b, s, hidden], head w [hidden, V], without
    the [b, s, V] float32 logits: the sequence goes through in chunks of `chunk` tokens (the last one
    padded), and the backward pass recomputes each chunk's logits (a custom VJP), so only one chunk's
    logits and their gradient exist at a time. Same products as model.transformer.head (bf16 h and w,
    float32 accumulation) -> (loss sum, token count, logz [b, s])."""
    s = h.shape[1]
    pad = -s % chunk
    padded = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    m = mask.astype(jnp.float32)
    total, logz = _chunked_ce(padded(h), w.astype(h.dtype), padded(targets), padded(m), chunk)
    return total, jnp.sum(m), logz[:, :s]


def _chunks(a, chunk: int):
    """[b, s, ...] -> [s / chunk, b, chunk, ...] (scan over the chunks; the batch keeps its sharding)."""
    return a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)


def _unchunk(a):
    return a.swapaxes(0, 1).reshape(a.shape[1], -1, *a.shape[3:])


def _chunk_logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)  # [b, chunk, V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(h, w, targets, m, chunk: int):
    return _chunked_ce_fwd(h, w, targets, m, chunk)[0]


def _chunked_ce_fwd(h, w, targets, m, chunk: int):
    def body(total, xs):
        hc, tc, mc = xs
        logits = _chunk_logits(hc, w)
        logz = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum((logz - tgt) * mc), logz

    total, logz = jax.lax.scan(body, jnp.zeros((), jnp.float32), (_chunks(h, chunk), _chunks(targets, chunk),
                                                                  _chunks(m, chunk)))
    logz = _unchunk(logz)
    return (total, logz), (h, w, targets, m, logz)


def _chunked_ce_bwd(chunk: int, res, g):
    h, w, targets, m, logz = res
    dtotal, dlogz = g
    wt = w.T.astype(jnp.float32)

    def body(dw, xs):
        hc, tc, mc, zc, dzc = xs
        logits = _chunk_logits(hc, w)
        coef = dtotal * mc  # d total / d (logz - target logit), per token
        dlogits = (jnp.exp(logits - zc[..., None]) * (coef + dzc)[..., None]
                   - jax.nn.one_hot(tc, w.shape[1], dtype=jnp.float32) * coef[..., None])
        dh = jnp.dot(dlogits, wt).astype(h.dtype)
        dw = dw + jnp.einsum("bcd,bcv->dv", hc.astype(jnp.float32), dlogits)
        return dw, dh

    xs = tuple(_chunks(a, chunk) for a in (h, targets, m, logz, dlogz))
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return _unchunk(dh), dw.astype(w.dtype), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def balance_loss(seq_count, seq_prob, token_count, cfg: ModelConfig):
    """V3's sequence-wise balance loss, summed over MoE layers and averaged over sequences.

    seq_count/seq_prob [layers, b, E] (numerators of f_i and P_i), token_count [b] tokens per sequence.
    f_i = E/(K*T) * #(tokens choosing i); P_i = mean_t s_{i,t}/sum_j s_{j,t}; L = sum_i f_i P_i.
    """
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    t = jnp.maximum(token_count, 1.0)[None, :, None]
    f = e / (k * t) * jax.lax.stop_gradient(seq_count)
    p = seq_prob / t
    return jnp.sum(f * p, axis=-1).mean(axis=-1).sum()


def token_denominators(batch: dict, mtp_depth: int) -> jnp.ndarray:
    """Predicted-token counts [1 + mtp_depth] of a whole batch: the LM target (t+1) and each MTP depth.

    Gradient accumulation divides every micro-batch's loss sums by the full batch's counts, so the
    accumulated gradient equals the one-batch gradient exactly, however padding falls.
    """
    tokens, seg = batch["tokens"], batch.get("segment_ids")
    return jnp.stack([shifted(tokens, seg, k + 1)[1].sum() for k in range(1 + mtp_depth)]).astype(jnp.float32)


def loss_fn(params, batch: dict, cfg: ModelConfig, *, mtp_lambda: float, balance_alpha: float, z_loss: float,
            denoms: jnp.ndarray | None = None, mesh=None, ce_chunk: int = 0):
    """Scalar loss and metrics for one batch {tokens, segment_ids, positions} ([b, s] int32 each).
    mesh: the mesh the step runs under (the model runs expert parallelism over its "expert" axis).

    denoms: optional [1 + mtp depth] token counts to normalise by (default: this batch's own).
    ce_chunk > 0: the LM and MTP cross-entropies over sequence chunks (chunked_cross_entropy)."""
    tokens, seg = batch["tokens"], batch.get("segment_ids")
    logits, aux = forward(params, tokens, cfg, positions=batch.get("positions"), segment_ids=seg,
                          with_mtp=mtp_lambda > 0, mesh=mesh, with_logits=ce_chunk == 0)
    if ce_chunk:
        ce = lambda h, t, v: chunked_cross_entropy(h, params["lm_head"], t, v, ce_chunk)
        head_inputs = aux.pop("mtp_hidden", None)
        logits = aux["hidden"]
    else:
        ce = cross_entropy
        head_inputs = aux.get("mtp_logits")
    targets, valid = shifted(tokens, seg, 1)
    lm_sum, n, logz = ce(logits, targets, valid)
    denom = lambda i, count: jnp.maximum(count if denoms is None else denoms[i], 1.0)
    lm_loss = lm_sum / denom(0, n)
    loss = lm_loss
    metrics = {"lm_loss": lm_loss, "tokens": n}
    mtp_loss = jnp.zeros((), jnp.float32)
    if head_inputs is not None:  # MTP logits, or the MTP heads' inputs when chunked
        depth = head_inputs.shape[0]
        for k in range(1, depth + 1):  # depth k at t predicts t+k+1
            tk, vk = shifted(tokens, seg, k + 1)
            s_k, n_k, _ = ce(head_inputs[k - 1], tk, vk)
            mtp_loss = mtp_loss + s_k / denom(k, n_k) / depth
        loss = loss + mtp_lambda * mtp_loss
    metrics["mtp_loss"] = mtp_loss
    bal = jnp.zeros((), jnp.float32)
    if "seq_count" in aux and balance_alpha > 0:
        tok_per_seq = jnp.sum(seg != 0, axis=1).astype(jnp.float32) if seg is not None else jnp.full(
            (tokens.shape[0],), tokens.shape[1], jnp.float32)
        bal = balance_loss(aux["seq_count"], aux["seq_prob"], tok_per_seq, cfg)
        loss = loss + balance_alpha * bal
    metrics["balance_loss"] = bal
    if z_loss > 0:
        zl = jnp.sum(jnp.square(logz) * valid) / denom(0, n)
        loss = loss + z_loss * zl
        metrics["z_loss"] = zl
    loads = [aux["expert_load"]] if "expert_load" in aux else []
    if "mtp_expert_load" in aux:
        loads.append(aux["mtp_expert_load"])
    if loads:
        metrics["expert_load"] = jnp.concatenate(loads, axis=0)  # [moe layers (+ mtp), E]
    metrics["loss"] = loss
    return loss, metrics
