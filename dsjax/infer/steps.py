"""The generation state machine: prefill into a fresh state, then identical jit-compiled steps.

State (a dict pytree with static shapes; N = max_new_tokens):
  cache     the latent cache (dsjax.infer.cache); cache["lengths"] = tokens already in it per sequence
  token     [b]       the last emitted token, not yet in the cache (the next step feeds it)
  out       [b, N+2]  emitted tokens, pad elsewhere (column N+1 is a write sink for finished rows)
  count     [b]       tokens emitted so far
  done      [b]       stop token emitted or N reached; a done row never changes again
  key, step           PRNG key and step number (the key of step i is fold_in(key, i))
  speculative only:  draft [b] (the MTP block's guess for the token after `token`),
                     forwards / drafted / accepted [b] counters for the acceptance statistics

`plain_step` feeds one token (absorbed MLA, T = 1). `spec_step` (MTP speculative decoding, greedy only)
feeds [token, draft] (T = 2): the main model's argmax at the first position is the true next token y0;
if the draft equals y0, the argmax at the second position is also exact, so 2 tokens are emitted from one
main forward; either way the output is exactly the greedy one. The MTP block then runs over the same 2
positions (inputs (h_t, y0), (h_t+1, y1)) against its own latent cache and drafts from the last kept one.
Entries written for a rejected draft lie past cache["lengths"] and are overwritten by the next step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.infer.decode import extend, mtp_extend, mtp_prefill, prefill
from dsjax.infer.sampling import sample


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Everything static about one generation call (hashable: it keys the compiled functions)."""

    max_new_tokens: int
    # sampling (greedy, temperature, top-k, top-p) and the stop tokens are traced (in the state), not static
    pad_id: int = 0
    speculative: bool = False
    moe_impl: str = "auto"  # expert path in cached passes: auto | gather | blocked | ragged_dot | dense | pallas
    decode_impl: str = "jnp"  # single-token attention: jnp | a pallas_kernels.mla.mla_decode impl


MAX_STOP = 8  # stop-token slots (padded with -1), so changing the stop list does not recompile


def stop_array(stop_tokens) -> jnp.ndarray:
    stop = sorted({int(t) for t in stop_tokens})
    if len(stop) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop tokens, got {len(stop)}")
    return jnp.asarray(stop + [-1] * (MAX_STOP - len(stop)), jnp.int32)


def _is_stop(tok, state):
    return jnp.isin(tok, state["stop"])


def init_state(params, tokens, lengths, key, cache, stop, sampling, cfg: ModelConfig, opts: DecodeOptions, *,
               from_prefix=False):
    """Prefill and emit the first token.

    tokens [b, P] right-padded with lengths [b] real tokens each. from_prefix: cache already holds
    cache["lengths"][b] prefix entries and `tokens` is only the suffix (prefilled with absorbed MLA).
    """
    b, p = tokens.shape
    bi = jnp.arange(b)
    kw = dict(moe_impl=opts.moe_impl)
    if from_prefix:
        start = cache["lengths"]
        logits, h, cache = extend(params, tokens, cache, cfg, decode_impl="jnp", **kw)
    else:
        start = jnp.zeros((b,), jnp.int32)
        logits, h, cache = prefill(params, tokens, cache, cfg, **kw)
    cache = dict(cache, lengths=start + lengths)
    tok = sample(logits[bi, lengths - 1], jax.random.fold_in(key, 0), sampling)
    n = opts.max_new_tokens
    out = jnp.full((b, n + 2), opts.pad_id, jnp.int32).at[:, 0].set(tok)
    state = {"cache": cache, "token": tok, "out": out, "count": jnp.ones((b,), jnp.int32),
             "done": jnp.isin(tok, stop) | (n <= 1), "key": key, "step": jnp.int32(1), "stop": stop,
             "sampling": sampling}
    if opts.speculative:
        # MTP position t sees (h_t, token t+1); the token after the last prompt token is the one just emitted.
        nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1).at[bi, lengths - 1].set(tok)
        mtp_logits, _, cache = mtp_prefill(params, h, nxt, state["cache"], cfg, **kw)
        zeros = jnp.zeros((b,), jnp.int32)
        state.update(cache=cache, draft=jnp.argmax(mtp_logits[bi, lengths - 1], -1).astype(jnp.int32),
                     forwards=zeros, drafted=zeros, accepted=zeros)
    return state


def plain_step(params, state: dict, cfg: ModelConfig, opts: DecodeOptions) -> dict:
    done, count, cache = state["done"], state["count"], state["cache"]
    logits, _, cache = extend(params, state["token"][:, None], cache, cfg, moe_impl=opts.moe_impl,
                              decode_impl=opts.decode_impl)
    live = (~done).astype(jnp.int32)
    cache = dict(cache, lengths=cache["lengths"] + live)
    tok = sample(logits[:, 0], jax.random.fold_in(state["key"], state["step"]), state["sampling"])
    tok = jnp.where(done, opts.pad_id, tok)
    sink = state["out"].shape[1] - 1
    out = state["out"].at[jnp.arange(tok.shape[0]), jnp.where(done, sink, count)].set(tok)
    count = count + live
    done = done | _is_stop(tok, state) | (count >= opts.max_new_tokens)
    return dict(state, cache=cache, token=jnp.where(state["done"], state["token"], tok), out=out, count=count,
                done=done, step=state["step"] + 1)


def spec_step(params, state: dict, cfg: ModelConfig, opts: DecodeOptions) -> dict:
    done, count, cache, draft = state["done"], state["count"], state["cache"], state["draft"]
    b = draft.shape[0]
    bi = jnp.arange(b)
    kw = dict(moe_impl=opts.moe_impl)
    logits, h, cache = extend(params, jnp.stack([state["token"], draft], 1), cache, cfg, **kw)  # verify
    y = jnp.argmax(logits, -1).astype(jnp.int32)  # [b, 2]: y[:,0] exact; y[:,1] exact iff draft == y[:,0]
    hit = draft == y[:, 0]
    take2 = hit & ~_is_stop(y[:, 0], state) & (count + 1 < opts.max_new_tokens)
    mtp_logits, _, cache = mtp_extend(params, h, y, cache, cfg, **kw)
    new_draft = jnp.argmax(mtp_logits[bi, take2.astype(jnp.int32)], -1).astype(jnp.int32)
    live = ~done
    sink = state["out"].shape[1] - 1
    out = state["out"].at[bi, jnp.where(live, count, sink)].set(y[:, 0])
    out = out.at[bi, jnp.where(live & take2, count + 1, sink)].set(y[:, 1])
    out = out.at[:, sink].set(opts.pad_id)
    n = jnp.where(live, 1 + take2.astype(jnp.int32), 0)
    cache = dict(cache, lengths=cache["lengths"] + n)
    count = count + n
    new_done = done | _is_stop(y[:, 0], state) | (take2 & _is_stop(y[:, 1], state)) | (count >= opts.max_new_tokens)
    li = live.astype(jnp.int32)
    return dict(state, cache=cache, token=jnp.where(live, jnp.where(take2, y[:, 1], y[:, 0]), state["token"]),
                draft=jnp.where(live, new_draft, draft), out=out, count=count, done=new_done,
                step=state["step"] + 1, forwards=state["forwards"] + li, drafted=state["drafted"] + li,
                accepted=state["accepted"] + (live & hit).astype(jnp.int32))


def step_fn(opts: DecodeOptions):
    return spec_step if opts.speculative else plain_step


def run_loop(params, state: dict, cfg: ModelConfig, opts: DecodeOptions) -> dict:
    """Steps until every sequence is done, inside one lax.while_loop (one compilation for all tokens)."""
    step = step_fn(opts)
    return jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), lambda s: step(params, s, cfg, opts), state)
