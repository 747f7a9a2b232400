"""GRPO (the DeepSeekMath paper): group-relative advantages, the k3 KL estimator and the clipped loss.

Pure jax.numpy and jit-able. The trainer supplies per-token log-probs of the *sampled* tokens under
three policies: the one being optimised (`logp_new`, differentiable), the one that sampled the
completions (`logp_old`, constant) and the frozen reference (`logp_ref`, constant). Layout: the G
completions of a prompt are contiguous, so rewards [P*G] reshape to [P, G] and advantages flatten back
to [B = P*G].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards, eps: float = 1e-6, *, scale_by_std: bool = True):
    """A_i = (R_i - mean_g R) / (std_g R + eps) within each group. rewards [P, G] -> [P, G] float32.

    std is the population std (ddof=0), as in DeepSeekMath's outcome supervision. A group whose rewards
    are all equal gets advantage 0 everywhere (it carries no learning signal). scale_by_std=False keeps
    only the mean-centring (Dr. GRPO).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"group_advantages: rewards must be [num_prompts, group_size], got shape {r.shape}")
    centred = r - r.mean(axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    return centred / (r.std(axis=-1, keepdims=True) + eps)


def k3_kl(logp_policy, logp_ref):
    """Per-token unbiased KL(pi || ref) estimator (Schulman's k3), >= 0 everywhere.

    k3 = ref/pi - log(ref/pi) - 1 = exp(d) - d - 1 with d = logp_ref - logp_policy; its expectation
    under tokens sampled from pi is exactly KL(pi || ref).
    """
    d = jnp.asarray(logp_ref, jnp.float32) - jnp.asarray(logp_policy, jnp.float32)
    return jnp.exp(d) - d - 1.0


def token_logprobs(logits, tokens):
    """log pi(tokens[b, t] | ...) from logits [B, T, V] aligned with tokens [B, T] -> [B, T] float32.

    `logits[:, t]` must be the prediction for `tokens[:, t]`, i.e. the caller has already shifted
    (model logits at position t-1 score the token at t).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def grpo_loss(logp_new, logp_old, logp_ref, advantages, mask, *, clip_eps: float = 0.2, beta: float = 0.04,
              aggregation: str = "sequence"):
    """The GRPO loss to minimise (= -objective) and metrics.

    logp_new/logp_old/logp_ref [B, T]: log-probs of the sampled tokens (only logp_new gets gradient);
    advantages [B]: one per completion, applied to all its tokens; mask [B, T]: 1 on completion tokens.

    Per token:  J_t = min(r_t A, clip(r_t, 1-eps, 1+eps) A) - beta * k3_t,  r_t = exp(logp_new - logp_old).
    aggregation="sequence" (DeepSeekMath): 1/G sum_i 1/|o_i| sum_t J_t, where G counts the
      completions with at least one token (rows with an all-zero mask are padding and drop out).
    aggregation="token" (DAPO): sum of J_t over all completion tokens / number of completion tokens.

    Metrics (all token means over the mask): clip_frac (tokens where the clip is active, i.e. the
    gradient through r_t is zero), kl (mean k3), ratio (mean r_t), and objective (= -loss).
    Values at masked positions (and advantages of all-masked rows) are ignored, even if inf or NaN.
    """
    if aggregation not in ("sequence", "token"):
        raise ValueError(f"grpo_loss: aggregation must be 'sequence' or 'token', got {aggregation!r}")
    m = jnp.asarray(mask, jnp.float32)  # [B, T]
    valid = m > 0
    # Padding may hold anything (-inf, NaN from an out-of-range gather): replace it *before* the math so
    # that neither the loss nor its gradient can pick up inf * 0 = NaN.
    clean = lambda x: jnp.where(valid, jnp.asarray(x, jnp.float32), 0.0)  # noqa: E731
    logp_new = clean(logp_new)
    logp_old = jax.lax.stop_gradient(clean(logp_old))
    logp_ref = jax.lax.stop_gradient(clean(logp_ref))
    adv = jnp.where(valid.any(axis=-1), jnp.asarray(advantages, jnp.float32), 0.0)
    adv = jax.lax.stop_gradient(adv)[:, None]  # [B, 1]

    ratio = jnp.exp(logp_new - logp_old)  # [B, T]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = jnp.minimum(unclipped, clipped)
    kl = k3_kl(logp_new, logp_ref)
    per_token = surrogate - beta * kl  # [B, T]

    n_tokens = jnp.maximum(m.sum(), 1.0)
    if aggregation == "sequence":
        seq_len = m.sum(axis=-1)  # [B]
        per_seq = (per_token * m).sum(axis=-1) / jnp.maximum(seq_len, 1.0)
        n_seq = jnp.maximum((seq_len > 0).sum(), 1).astype(jnp.float32)
        objective = per_seq.sum() / n_seq
    else:
        objective = (per_token * m).sum() / n_tokens

    clip_active = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    token_mean = lambda x: (x * m).sum() / n_tokens  # noqa: E731
    metrics = {
        "objective": objective,
        "clip_frac": token_mean(clip_active.astype(jnp.float32)),
        "kl": token_mean(kl),
        "ratio": token_mean(ratio),
    }
    return -objective, jax.tree.map(jax.lax.stop_gradient, metrics)
