"""Rollouts for GRPO and distillation: prompts -> G sampled completions each -> a fixed-shape batch.

Sampling is `dsjax.infer.generate` (one jit-compiled while_loop over the decode steps, MLA latent
cache). A batch row is `prompt + completion + pad`; `mask` [B, L-1] marks the *targets* that belong to
the completion (its tokens, the stop token included), aligned with `sequence_logprobs`, which scores
tokens[:, 1:] with the logits at [:, :-1]. The G completions of one prompt are contiguous rows, the
layout `dsjax.rl.grpo.group_advantages` expects. Rows are padded to a fixed length so the jitted
log-prob / update functions compile once per run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.transformer import forward
from dsjax.rl.grpo import token_logprobs

PROMPT_STYLES = ("chat", "raw")


def encode_prompt(problem: Mapping, tokenizer, style: str = "chat") -> list[int]:
    """The prompt ids of a problem: "chat" = the chat template around problem["question"] (or "prompt"),
    ending with the assistant marker; "raw" = bos + problem["prompt"] (e.g. the R1-Zero template)."""
    from dsjax.infer.chat import chat_prompt

    if style == "chat":
        return chat_prompt(problem.get("question", problem.get("prompt")), tokenizer)
    if style == "raw":
        return [tokenizer.bos_id] + tokenizer.encode(problem["prompt"])
    raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sample_completions(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       stop_tokens: Sequence[int], pad_id: int = 0, prompt_bucket: int = 32) -> list[list[int]]:
    """One completion per prompt (token ids up to and including the stop token, if reached).

    Prompts are right-padded to a multiple of `prompt_bucket` so that generate compiles once per bucket."""
    from dsjax.infer.generate import generate

    width = _round_up(max(len(p) for p in prompts), prompt_bucket)
    arr = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
    out, info = generate(model, arr, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop_tokens=list(stop_tokens),
                         prompt_lengths=[len(p) for p in prompts], pad_id=pad_id, return_info=True)
    return [out[i, :n].tolist() for i, n in enumerate(info["new_tokens"])]


@dataclasses.dataclass
class RolloutBatch:
    tokens: np.ndarray  # [B, L] int32: prompt + completion + pad
    segment_ids: np.ndarray  # [B, L] int32: 1 on prompt and completion, 0 on padding
    mask: np.ndarray  # [B, L-1] float32: 1 where target tokens[:, t+1] is a completion token
    prompt_lens: np.ndarray  # [B]
    completion_lens: np.ndarray  # [B]


def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int,
                  pad_id: int = 0) -> RolloutBatch:
    """Rows `prompt_i + completion_i`, right-padded to `length`."""
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    seg = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length - 1), np.float32)
    pl = np.array([len(p) for p in prompts], np.int32)
    cl = np.array([len(c) for c in completions], np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        if n > length:
            raise ValueError(f"rollout {i}: prompt {len(p)} + completion {len(c)} tokens exceed the row length {length}")
        tokens[i, :n] = list(p) + list(c)
        seg[i, :n] = 1
        mask[i, len(p) - 1:n - 1] = 1.0  # logits at t score token t+1: completion tokens are targets p..n-1
    return RolloutBatch(tokens, seg, mask, pl, cl)


def sequence_logprobs(params, tokens, segment_ids, cfg: ModelConfig, temperature: float = 1.0, mesh=None):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) for t < L-1 -> [B, L-1] float32, with the logits divided
    by the sampling temperature (the distribution the completions were drawn from). mesh: the mesh
    the caller runs under (expert parallelism over its "expert" axis)."""
    logits, _ = forward(params, tokens, cfg, segment_ids=segment_ids, with_mtp=False, mesh=mesh)
    logits = logits[:, :-1]
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return token_logprobs(logits, tokens[:, 1:])


@functools.lru_cache(maxsize=8)
def logprob_fn(cfg: ModelConfig, temperature: float, mesh=None) -> Callable:
    """A jitted `sequence_logprobs(params, tokens, segment_ids)` for one config, temperature and mesh."""
    return jax.jit(functools.partial(sequence_logprobs, cfg=cfg, temperature=temperature, mesh=mesh))


def decode_completions(completions: Sequence[Sequence[int]], tokenizer) -> list[str]:
    """Completion ids -> text (the stop token and other specials without text vanish)."""
    return [tokenizer.decode(c) for c in completions]

