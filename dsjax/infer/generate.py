"""Batched generation with the MLA latent cache: the public entry points.

    generate(model, tokens, max_new_tokens=32, temperature=0.0, ...) -> np.ndarray [batch, max_new_tokens]
    stream(model, tokens, ...) -> iterator of np.ndarray [batch, k] (the tokens each step emitted)

`tokens` is [batch, prompt_len] ints (right-padded when `prompt_lengths` is given), or a list of
token lists of different lengths (right-padded here). Sequence b's prompt occupies cache indices
0..len_b-1 and its new tokens follow at len_b, len_b+1, ...: positions are exact per sequence.
The output holds each sequence's new tokens, the stop token included; after it, and after
max_new_tokens, `pad_id`. Temperature 0 is greedy (equal to HF transformers' greedy `generate`).
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ConfigError, ModelConfig
from dsjax.infer.cache import init_cache
from dsjax.infer.prefix_cache import PrefixCache
from dsjax.infer.sampling import Sampler
from dsjax.infer.steps import MAX_STOP, DecodeOptions, init_state, run_loop, step_fn, stop_array

MOE_IMPLS = ("auto", "gather", "blocked", "ragged_dot", "dense", "pallas")


def prepare_prompts(tokens, prompt_lengths, cfg: ModelConfig, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens [b, P] int32 right-padded, lengths [b] int32), validated against the config."""
    if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
        rows = [np.asarray(r, np.int64).reshape(-1) for r in tokens]
        if prompt_lengths is None:
            prompt_lengths = [len(r) for r in rows]
        width = max(len(r) for r in rows)
        arr = np.full((len(rows), width), pad_id, np.int64)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
    else:
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ConfigError(f"tokens must be a non-empty [batch, prompt_len] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"tokens must be integer ids, got dtype {arr.dtype}")
    b, p = arr.shape
    lengths = np.full((b,), p, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths, np.int64).reshape(-1)
    if lengths.shape != (b,):
        raise ConfigError(f"prompt_lengths must have one entry per sequence ({b}), got {lengths.shape[0]}")
    if (lengths < 1).any() or (lengths > p).any():
        raise ConfigError(f"prompt_lengths must lie in [1, {p}], got {lengths.tolist()}")
    valid = np.arange(p)[None, :] < lengths[:, None]
    bad = valid & ((arr < 0) | (arr >= cfg.vocab_size))
    if bad.any():
        raise ConfigError(f"token ids must lie in [0, vocab_size={cfg.vocab_size}); got {int(arr[bad][0])}")
    arr = np.where(valid, arr, pad_id)
    return arr.astype(np.int32), lengths.astype(np.int32)


def _options(cfg: ModelConfig, max_new_tokens, temperature, top_k, top_p, stop_tokens, speculative, pad_id,
             moe_impl, decode_impl):
    """-> (static DecodeOptions, traced sampling params, traced stop array)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    sampler = Sampler(float(temperature) if isinstance(temperature, (int, float)) else temperature, top_k, top_p)
    if stop_tokens is None:
        stop_tokens = () if cfg.eos_token_id is None else (cfg.eos_token_id,)
    stop = sorted({int(t) for t in stop_tokens})
    if len(stop) > MAX_STOP:
        raise ConfigError(f"at most {MAX_STOP} stop tokens, got {len(stop)}: {stop}")
    if speculative:
        if cfg.num_nextn_predict_layers < 1:
            raise ConfigError("speculative decoding drafts with the MTP block, but num_nextn_predict_layers is 0")
        if not sampler.greedy:
            raise ConfigError(f"speculative decoding is greedy only (temperature 0), got temperature {temperature}")
    if moe_impl not in MOE_IMPLS:
        raise ConfigError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}; got {moe_impl!r}")
    opts = DecodeOptions(int(max_new_tokens), int(pad_id), bool(speculative), moe_impl, decode_impl)
    return opts, sampler.params(), stop_array(stop)


@functools.lru_cache(maxsize=32)
def _init_fn(cfg: ModelConfig, opts: DecodeOptions, from_prefix: bool):
    return jax.jit(lambda params, toks, lens, key, cache, stop, sp: init_state(
        params, toks, lens, key, cache, stop, sp, cfg, opts, from_prefix=from_prefix))


@functools.lru_cache(maxsize=32)
def _loop_fn(cfg: ModelConfig, opts: DecodeOptions):
    """All decode steps in one lax.while_loop: compiled once per shapes, never per token."""
    return jax.jit(lambda params, state: run_loop(params, state, cfg, opts), donate_argnums=1)


@functools.lru_cache(maxsize=32)
def _step_fn(cfg: ModelConfig, opts: DecodeOptions):
    """One decode step, for Python-driven streaming; the state is donated (updated in place)."""
    return jax.jit(lambda params, state: step_fn(opts)(params, state, cfg, opts), donate_argnums=1)


def _start(model, tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, speculative,
           prompt_lengths, pad_id, prefix_cache, moe_impl, decode_impl):
    cfg: ModelConfig = model.config
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    opts, sp, stop = _options(cfg, max_new_tokens, temperature, top_k, top_p, stop_tokens, speculative, pad, moe_impl,
                    decode_impl)
    toks, lens = prepare_prompts(tokens, prompt_lengths, cfg, pad)
    b, p = toks.shape
    longest = int(lens.max())
    if longest + opts.max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt of {longest} tokens + max_new_tokens {opts.max_new_tokens} exceeds "
                          f"max_position_embeddings {cfg.max_position_embeddings}")
    if prefix_cache is not None and opts.speculative:
        raise ConfigError("prefix_cache is not supported with speculative=True (the MTP cache is not stored)")
    max_len = p + opts.max_new_tokens + 1  # +1: the speculative verify writes one entry past the last token
    cache = init_cache(cfg, b, max_len, with_mtp=opts.speculative)
    key = jax.random.key(seed)
    params = model.params
    info = {"prefix_reused_tokens": 0}
    if prefix_cache is not None:
        found = [prefix_cache.lookup(toks[i, : lens[i]], max_len=int(lens[i]) - 1) for i in range(b)]
        if any(m for m, _ in found):
            cache, toks_in, lens_in = _seed_from_prefix(cache, toks, lens, found, pad)
            info["prefix_reused_tokens"] = int(sum(m for m, _ in found))
            state = _init_fn(cfg, opts, True)(params, toks_in, lens_in, key, cache, stop, sp)
            _store_prefixes(prefix_cache, state["cache"], toks, lens)
            return cfg, opts, params, state, info
    state = _init_fn(cfg, opts, False)(params, jnp.asarray(toks), jnp.asarray(lens), key, cache, stop, sp)
    if prefix_cache is not None:
        _store_prefixes(prefix_cache, state["cache"], toks, lens)
    return cfg, opts, params, state, info


def _seed_from_prefix(cache, toks, lens, found, pad):
    """Copy each sequence's cached prefix into its cache rows; the suffixes become the tokens to prefill."""
    host = jax.tree.map(np.array, cache)
    b = toks.shape[0]
    starts = np.array([m for m, _ in found], np.int32)
    for i, (m, entries) in enumerate(found):
        if m:
            for stack, arrs in entries.items():
                for name, a in arrs.items():
                    host[stack][name][:, i, :m] = a
    host["lengths"] = starts
    suf = lens - starts
    toks_in = np.full((b, int(suf.max())), pad, np.int32)
    for i in range(b):
        toks_in[i, : suf[i]] = toks[i, starts[i]: lens[i]]
    return jax.tree.map(jnp.asarray, host), jnp.asarray(toks_in), jnp.asarray(suf)


def _store_prefixes(prefix_cache: PrefixCache, cache, toks, lens):
    stacks = {k: v for k, v in cache.items() if k != "lengths" and k != "mtp"}
    for i in range(toks.shape[0]):
        row = toks[i, : lens[i]]
        if row.tolist() in prefix_cache:
            continue
        prefix_cache.insert(row, {k: {n: np.asarray(a[:, i, : lens[i]]) for n, a in v.items()}
                                  for k, v in stacks.items()})


def _finish_info(info, state, opts):
    count = np.asarray(state["count"])
    info["new_tokens"] = count.tolist()
    if opts.speculative:
        fwd, drafted, acc = (int(np.asarray(state[k]).sum()) for k in ("forwards", "drafted", "accepted"))
        info.update(main_forwards=fwd, drafted=drafted, accepted=acc,
                    acceptance_rate=acc / drafted if drafted else 0.0,
                    tokens_per_forward=float((count - 1).sum()) / fwd if fwd else 1.0)
    return info


def generate(model, tokens, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] | None = None,
             speculative: bool = False, prompt_lengths=None, *, pad_id: int | None = None,
             prefix_cache: PrefixCache | None = None, moe_impl: str = "auto", decode_impl: str = "jnp",
             return_info: bool = False):
    """Generate up to max_new_tokens per sequence -> np.ndarray [batch, max_new_tokens] of new token ids.

    stop_tokens: default (eos_token_id,); [] disables stopping. speculative: MTP draft + verify (greedy,
    output identical to plain greedy). prefix_cache: reuse stored latent caches of shared prompt prefixes
    (and store these prompts). moe_impl: expert path for decode passes ("auto": dense for few tokens on CPU).
    decode_impl: "jnp" or a pallas_kernels.mla.mla_decode impl for single-token attention.
    return_info: also return a dict (new_tokens per sequence; with speculative: main_forwards, drafted,
    accepted, acceptance_rate, tokens_per_forward; prefix_reused_tokens).
    """
    cfg, opts, params, state, info = _start(model, tokens, max_new_tokens, temperature, top_k, top_p,
                                                     seed, stop_tokens, speculative, prompt_lengths, pad_id,
                                                     prefix_cache, moe_impl, decode_impl)
    if opts.max_new_tokens == 0:
        out = np.zeros((state["out"].shape[0], 0), np.int32)
        return (out, _finish_info(info, state, opts)) if return_info else out
    state = _loop_fn(cfg, opts)(params, state)
    out = np.asarray(state["out"])[:, : opts.max_new_tokens]
    return (out, _finish_info(info, state, opts)) if return_info else out


def stream(model, tokens, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None, seed=0,
           stop_tokens=None, speculative=False, prompt_lengths=None, *, pad_id=None, moe_impl="auto",
           decode_impl="jnp") -> Iterator[np.ndarray]:
    """Like generate, but a Python loop over the jitted step: yields each step's new tokens [batch, k]
    (k = 1, or 1..2 with speculative; finished sequences yield pad). Same tokens as generate."""
    cfg, opts, params, state, _ = _start(model, tokens, max_new_tokens, temperature, top_k, top_p, seed,
                                                  stop_tokens, speculative, prompt_lengths, pad_id, None,
                                                  moe_impl, decode_impl)
    if opts.max_new_tokens == 0:
        return
    step = _step_fn(cfg, opts)
    seen = np.zeros(state["out"].shape[0], np.int64)
    while True:
        out, count, done = (np.asarray(state[k]) for k in ("out", "count", "done"))
        k = int((count - seen).max())
        if k > 0:
            chunk = np.full((out.shape[0], k), opts.pad_id, np.int32)
            for i in range(out.shape[0]):
                new = out[i, seen[i]: count[i]]
                chunk[i, : len(new)] = new
            seen = count.astype(np.int64)
            yield chunk
        if done.all():
            return
        state = step(params, state)
