"""The GRPO training loop (DeepSeekMath / R1-Zero, SPEC §7).

Per step:  P prompts -> G sampled completions each (dsjax.infer.generate, temperature ~1)
  -> rule rewards (any registered rewards, weighted) -> group-normalised advantages
  -> logp_old (the sampling policy, once) and logp_ref (the frozen reference, once)
  -> mu optimisation steps of `grpo_loss` (clipped ratio, beta * k3 KL) on that batch.
Logged per step (metrics.jsonl; the R1-Zero curves): reward, accuracy, format rate, response length, KL,
clip fraction, plus held-out greedy accuracy every eval_every steps; a PNG of the curves at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.errors import DataError
from dsjax.rl.grpo import group_advantages, grpo_loss
from dsjax.rl.rewards import accuracy_reward, combine_rewards, format_reward, resolve_reward
from dsjax.rl.rollout import (PROMPT_STYLES, decode_completions, encode_prompt, logprob_fn, pack_rollouts,
                              sample_completions)
from dsjax.rl.sft import FINAL_DIR, _check_positive, config_to_yaml, load_policy
from dsjax.rl.toy_task import check_max_value, make_problems
from dsjax.train.step import jit_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    init: str = "random"  # start policy: "random", a checkpoint dir, or a dsjax train/sft/grpo workdir
    ref: str | None = None  # frozen reference; None = the start policy
    tokenizer: str | None = None
    # problems: "toy" (dsjax.rl.toy_task) or a JSONL of {"prompt" or "question", "answer"}
    task: str = "toy"
    eval_task: str | None = None  # JSONL for held-out eval (toy: its test split)
    difficulty: int = 2
    max_value: int = 99
    num_train_problems: int = 2000
    num_eval_problems: int = 200
    prompt_style: str = "chat"  # chat | raw (see dsjax.rl.rollout.encode_prompt)
    # sampling
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # objective
    mu: int = 2  # optimisation steps per batch of rollouts
    clip_eps: float = 0.2
    beta: float = 0.04
    aggregation: str = "sequence"  # sequence (GRPO) | token (DAPO)
    scale_by_std: bool = True
    rewards: tuple = ("accuracy", "format")
    reward_weights: tuple = (1.0, 0.5)
    # optimiser (constant lr after warm-up by default)
    lr: float = 1e-4
    warmup_steps: int = 0
    decay_start_fraction: float = 1.0
    decay_end_fraction: float = 1.0
    final_lr_ratio: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    moment_dtype: str = "float32"
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only before the first and after the last step
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    plot: bool = True
    progress: bool = True
    model: ModelConfig = dataclasses.field(default_factory=lambda: load_config("tiny"))

    def __post_init__(self):
        _check_positive(self, ("steps", "prompts_per_step", "group_size", "max_new_tokens", "mu", "log_every",
                               "checkpoint_every", "keep_checkpoints", "difficulty"))
        check_max_value(self)
        if self.group_size < 2:
            raise ConfigError("GRPOConfig field 'group_size': needs >= 2 completions per prompt to compare")
        if self.aggregation not in ("sequence", "token"):
            raise ConfigError(f"GRPOConfig field 'aggregation': sequence or token, got {self.aggregation!r}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"GRPOConfig field 'prompt_style': one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.temperature <= 0:
            raise ConfigError(f"GRPOConfig field 'temperature': must be > 0 for sampling, got {self.temperature}")
        if len(self.rewards) != len(self.reward_weights):
            raise ConfigError(f"GRPOConfig: {len(self.rewards)} rewards but {len(self.reward_weights)} reward_weights")
        for r in self.rewards:
            try:
                resolve_reward(r)
            except KeyError as e:
                raise ConfigError(f"GRPOConfig field 'rewards': {e.args[0]}") from None


# ---------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------

def load_problems(task: str, split: str, n: int, *, seed: int, difficulty: int, max_value: int) -> list[dict]:
    """Problem dicts with "prompt"/"question" and "answer" (usable as a reward's reference)."""
    if task == "toy":
        return make_problems(n, seed, difficulty, split=split, max_value=max_value)
    if not os.path.isfile(task):
        raise DataError(f"task: {task} is neither 'toy' nor a JSONL file")
    out = []
    with open(task, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{task}:{k}: invalid JSON: {e}") from None
            if not isinstance(obj, dict) or "answer" not in obj or not ("prompt" in obj or "question" in obj):
                raise DataError(f"{task}:{k}: need 'answer' and 'prompt' or 'question'")
            obj.setdefault("prompt", obj.get("question"))
            obj["answer"] = str(obj["answer"])
            out.append(obj)
    if not out:
        raise DataError(f"{task}: no problems")
    return out


# ---------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------

def optimizer_config(gcfg: GRPOConfig, model_cfg: ModelConfig):
    """What dsjax.train.optim.make_optimizer reads; its `steps` counts optimiser updates (steps * mu)."""
    names = ("lr", "warmup_steps", "decay_start_fraction", "decay_end_fraction", "final_lr_ratio", "b1", "b2", "eps",
             "weight_decay", "clip_norm", "moment_dtype", "seed")
    return types.SimpleNamespace(**{k: getattr(gcfg, k) for k in names}, steps=gcfg.steps * gcfg.mu, model=model_cfg)


def make_update(model_cfg: ModelConfig, gcfg: GRPOConfig):
    """update(state, batch) -> (state, metrics): one optimiser step on the GRPO loss.

    batch: tokens/segment_ids [B, L], mask [B, L-1], advantages [B], logp_old/logp_ref [B, L-1].
    The metrics (loss, clip_frac, kl, ratio) are those of the parameters *before* the update."""
    from dsjax.rl.rollout import sequence_logprobs
    from dsjax.train.optim import make_optimizer
    from dsjax.train.step import TrainState

    tx = make_optimizer(optimizer_config(gcfg, model_cfg))

    def loss_fn(params, b):
        logp_new = sequence_logprobs(params, b["tokens"], b["segment_ids"], model_cfg, gcfg.temperature)
        return grpo_loss(logp_new, b["logp_old"], b["logp_ref"], b["advantages"], b["mask"], clip_eps=gcfg.clip_eps,
                         beta=gcfg.beta, aggregation=gcfg.aggregation)

    def update(state, b):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, b)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        m = dict(m, loss=loss, grad_norm=optax.global_norm(g))
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.rng), m

    return update


def grpo_inner_steps(update_fn, state, batch: Mapping, mu: int):
    """mu updates on one batch of rollouts -> (state, [metrics of each inner step])."""
    out = []
    for _ in range(mu):
        state, m = update_fn(state, batch)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, out


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def evaluate(model, problems: Sequence[dict], tokenizer, *, max_new_tokens: int, prompt_style: str = "chat",
             batch_size: int = 256) -> dict:
    """Greedy decoding on `problems` -> {"accuracy", "format", "response_length"} (means)."""
    acc, fmt, length = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [encode_prompt(p, tokenizer, prompt_style) for p in chunk]
        comps = sample_completions(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                   stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id)
        for p, text, c in zip(chunk, decode_completions(comps, tokenizer), comps):
            acc.append(accuracy_reward(p["prompt"], text, p))
            fmt.append(format_reward(p["prompt"], text, p))
            length.append(len(c))
    return {"accuracy": float(np.mean(acc)), "format": float(np.mean(fmt)), "response_length": float(np.mean(length))}


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------

def train_grpo(gcfg: GRPOConfig, workdir: str, *, model=None, ref_model=None, problems=None, eval_problems=None,
               tokenizer=None, verbose: bool = True) -> tuple:
    """Run (or resume) GRPO in `workdir` -> (Model, rows). Writes metrics.jsonl, checkpoints, grpo.png and
    the final model (workdir/final). `model`/`ref_model`/`problems` override the config's sources."""
    from dsjax.api import Model
    from dsjax.checkpoint import native
    from dsjax.train.checkpointing import Checkpointer, abstract_of
    from dsjax.train.metrics import MetricsLogger
    from dsjax.train.step import init_state
    from dsjax.train.tokenizer import load_tokenizer

    os.makedirs(workdir, exist_ok=True)
    tok = tokenizer or load_tokenizer(gcfg.tokenizer)
    kw = dict(seed=gcfg.seed, difficulty=gcfg.difficulty, max_value=gcfg.max_value)
    if problems is None:  # the data first: a bad path fails before any model is built
        problems = load_problems(gcfg.task, "train", gcfg.num_train_problems, **kw)
    if eval_problems is None and (gcfg.eval_task or gcfg.task == "toy"):
        eval_problems = load_problems(gcfg.eval_task or "toy", "test", gcfg.num_eval_problems, **kw)
    policy = model if model is not None else load_policy(gcfg.init, gcfg.model, gcfg.seed)
    cfg = policy.config
    ref = ref_model if ref_model is not None else (load_policy(gcfg.ref, cfg, gcfg.seed) if gcfg.ref else policy)
    # Frozen. A copy, because the update donates (reuses) the policy's buffers, which the reference may share.
    ref_params = jax.tree.map(jnp.copy, ref.params)
    with open(os.path.join(workdir, "run_config.yaml"), "w") as f:
        f.write(config_to_yaml(dataclasses.replace(gcfg, model=cfg)))

    reward_fn = combine_rewards(list(gcfg.rewards), list(gcfg.reward_weights))
    prompt_ids = [encode_prompt(p, tok, gcfg.prompt_style) for p in problems]
    row_len = -(-(max(len(p) for p in prompt_ids) + gcfg.max_new_tokens) // 32) * 32
    if row_len > cfg.max_position_embeddings:
        raise ConfigError(f"longest prompt + max_new_tokens ({row_len}) exceeds max_position_embeddings")

    state = init_state(jax.tree.map(jnp.copy, policy.params), optimizer_config(gcfg, cfg))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=gcfg.keep_checkpoints, async_save=False)
    start = 0
    restored = ckpt.restore(abstract_of(state))
    if restored is not None:
        start, state, _ = restored
        if verbose:
            print(f"grpo: resumed from {ckpt.directory}/{start}", file=sys.stderr)
    logger = MetricsLogger(workdir, start)
    update = jit_step(make_update(cfg, gcfg), donate_argnums=0)
    logp = logprob_fn(cfg, float(gcfg.temperature))
    order_rng = np.random.default_rng([gcfg.seed, 7])
    rows: list[dict] = []

    def run_eval(step, row):
        if eval_problems:
            e = evaluate(Model(state.params, cfg), eval_problems, tok, max_new_tokens=gcfg.max_new_tokens,
                         prompt_style=gcfg.prompt_style)
            row.update({f"eval_{k}": v for k, v in e.items()})
            if verbose:
                print(f"grpo step {step}: held-out accuracy {e['accuracy']:.3f} format {e['format']:.3f}",
                      file=sys.stderr)

    try:
        if start == 0 and eval_problems:
            row = {"step": 0}
            run_eval(0, row)
            logger.log(row)
            rows.append(row)
        for step in range(start + 1, gcfg.steps + 1):
            t0 = time.perf_counter()
            # The prompt order is a fixed function of (seed, step): a resumed run sees the same prompts.
            pick = np.random.default_rng([gcfg.seed, step]).choice(len(problems), gcfg.prompts_per_step,
                                                                   replace=len(problems) < gcfg.prompts_per_step)
            probs = [problems[i] for i in pick]
            rep_prompts = [prompt_ids[i] for i in pick for _ in range(gcfg.group_size)]
            rep_probs = [p for p in probs for _ in range(gcfg.group_size)]
            comps = sample_completions(Model(state.params, cfg), rep_prompts, max_new_tokens=gcfg.max_new_tokens,
                                       temperature=gcfg.temperature, top_k=gcfg.top_k, top_p=gcfg.top_p,
                                       seed=gcfg.seed * 1_000_003 + step, stop_tokens=[tok.eos_id],
                                       pad_id=tok.pad_id)
            t_sample = time.perf_counter() - t0
            texts = decode_completions(comps, tok)
            rewards = np.array([reward_fn(p["prompt"], t, p) for p, t in zip(rep_probs, texts)], np.float32)
            acc = np.array([accuracy_reward(p["prompt"], t, p) for p, t in zip(rep_probs, texts)])
            fmt = np.array([format_reward(p["prompt"], t, p) for p, t in zip(rep_probs, texts)])
            adv = group_advantages(rewards.reshape(gcfg.prompts_per_step, gcfg.group_size),
                                   scale_by_std=gcfg.scale_by_std).reshape(-1)
            rb = pack_rollouts(rep_prompts, comps, row_len, tok.pad_id)
            tokens, seg, mask = jnp.asarray(rb.tokens), jnp.asarray(rb.segment_ids), jnp.asarray(rb.mask)
            logp_old = logp(state.params, tokens, seg)
            logp_ref = logp(ref_params, tokens, seg) if gcfg.beta else logp_old
            batch = {"tokens": tokens, "segment_ids": seg, "mask": mask, "advantages": adv,
                     "logp_old": logp_old, "logp_ref": logp_ref}
            state, inner = grpo_inner_steps(update, state, batch, gcfg.mu)
            dt = time.perf_counter() - t0
            n_new = int(rb.completion_lens.sum())
            row = {"step": step, "reward": float(rewards.mean()), "accuracy": float(acc.mean()),
                   "format": float(fmt.mean()), "response_length": float(rb.completion_lens.mean()),
                   "kl": inner[0]["kl"], "clip_frac": float(np.mean([m["clip_frac"] for m in inner])),
                   "loss": inner[0]["loss"], "loss_last_inner": inner[-1]["loss"],
                   "grad_norm": inner[0]["grad_norm"],
                   "zero_std_groups": float((rewards.reshape(gcfg.prompts_per_step, -1).std(-1) == 0).mean()),
                   "rollout_tokens": n_new, "rollout_seconds": t_sample,
                   "rollout_tokens_per_sec": n_new / max(t_sample, 1e-9), "step_time": dt}
            if gcfg.eval_every and step % gcfg.eval_every == 0 and step != gcfg.steps:
                run_eval(step, row)
            if step == gcfg.steps:
                run_eval(step, row)
            if step % gcfg.log_every == 0 or step == gcfg.steps or "eval_accuracy" in row:
                logger.log(row)
                rows.append(row)
                if verbose and gcfg.progress:
                    print(f"grpo step {step}/{gcfg.steps}: reward {row['reward']:.3f} acc {row['accuracy']:.3f} "
                          f"fmt {row['format']:.3f} len {row['response_length']:.1f} kl {row['kl']:.4f} "
                          f"clip {row['clip_frac']:.3f} ({dt:.1f}s)", file=sys.stderr)
            if step % gcfg.checkpoint_every == 0 or step == gcfg.steps:
                ckpt.save(step, state, {"step": step})
    finally:
        ckpt.close()
        logger.close()
    final = Model(state.params, cfg)
    native.save(final.params, cfg, os.path.join(workdir, FINAL_DIR))
    if gcfg.plot:
        from dsjax.rl.plot import plot_grpo

        plot_grpo(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "grpo.png"))
    return final, rows
