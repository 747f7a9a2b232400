"""The GRPO training loop (the DeepSeekMath and DeepSeek-R1 papers).

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
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ConfigError, ModelConfig
from dsjax.errors import DataError
from dsjax.rl.grpo import group_advantages, grpo_loss
from dsjax.rl.rewards import accuracy_reward, combine_rewards, format_reward, resolve_reward
from dsjax.rl.rollout import (PROMPT_STYLES, decode_completions, encode_prompt, logprob_fn, pack_rollouts,
                              sample_completions)
from dsjax.rl.sft import FINAL_DIR, load_policy
from dsjax.rl.toy_task import check_max_value, make_problems
from dsjax.train import engine, workdir_io
from dsjax.train.config import RunConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(RunConfig):
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
    plot: bool = True
    # RunConfig defaults that differ for GRPO: constant lr after (no) warm-up, Adam b2 0.99, no decay
    steps: int = 50
    lr: float = 1e-4
    warmup_steps: int = 0
    decay_start_fraction: float = 1.0
    decay_end_fraction: float = 1.0
    final_lr_ratio: float = 1.0
    b2: float = 0.99
    weight_decay: float = 0.0
    log_every: int = 1
    eval_every: int = 0  # 0: only before the first and after the last step
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    @property
    def updates_per_step(self) -> int:
        return self.mu

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("prompts_per_step", "group_size", "max_new_tokens", "mu", "difficulty")
        # grpo_loss normalises by the whole batch's completion and token counts: not split into micro-batches.
        self.need(self.grad_accum == 1, "grad_accum", f"GRPO takes its batch of rollouts whole (1), got {self.grad_accum}")
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

def optimizer_config(gcfg: GRPOConfig, model_cfg: ModelConfig) -> GRPOConfig:
    """The config dsjax.train.step / optim read for a policy with `model_cfg` (its schedule spans
    optimizer_steps = steps * mu updates)."""
    return dataclasses.replace(gcfg, model=model_cfg)


def grpo_objective(model_cfg: ModelConfig, gcfg: GRPOConfig, mesh=None):
    """loss(params, batch) -> (loss, metrics): the GRPO loss of the current policy on a batch of rollouts.

    batch: tokens/segment_ids [B, L], mask [B, L-1], advantages [B], logp_old/logp_ref [B, L-1].
    mesh: the mesh the step runs under."""
    from dsjax.rl.rollout import sequence_logprobs

    def loss(params, b):
        logp_new = sequence_logprobs(params, b["tokens"], b["segment_ids"], model_cfg, gcfg.temperature, mesh)
        value, m = grpo_loss(logp_new, b["logp_old"], b["logp_ref"], b["advantages"], b["mask"],
                             clip_eps=gcfg.clip_eps, beta=gcfg.beta, aggregation=gcfg.aggregation)
        return value, dict(m, loss=value)

    return loss


def make_update(model_cfg: ModelConfig, gcfg: GRPOConfig):
    """update(state, batch) -> (state, metrics): one optimiser step on the GRPO loss (the engine's step,
    dsjax.train.step.make_step). The metrics (loss, clip_frac, kl, ratio) are those of the parameters
    *before* the update."""
    from dsjax.train.step import make_step

    return make_step(optimizer_config(gcfg, model_cfg), model_cfg, grpo_objective(model_cfg, gcfg))


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
# The task: rollouts as batches, mu updates on each, the R1-Zero curves as log rows
# ---------------------------------------------------------------------------------------------------

class GRPOTask(engine.Task):
    name = "grpo"

    def __init__(self, gcfg: GRPOConfig, problems, eval_problems, tok, ref_params, verbose: bool):
        self.cfg, self.problems, self.eval_problems, self.tok = gcfg, problems, eval_problems, tok
        self.eval_at_start = bool(eval_problems)
        self.verbose = verbose
        self.ref_params = ref_params
        self.reward_fn = combine_rewards(list(gcfg.rewards), list(gcfg.reward_weights))
        self.prompt_ids = [encode_prompt(p, tok, gcfg.prompt_style) for p in problems]
        self.row_len = -(-(max(len(p) for p in self.prompt_ids) + gcfg.max_new_tokens) // 32) * 32
        if self.row_len > gcfg.model.max_position_embeddings:
            raise ConfigError(f"longest prompt + max_new_tokens ({self.row_len}) exceeds max_position_embeddings")

    def start(self, run):
        self.run = run
        self.loss = grpo_objective(self.cfg.model, self.cfg, run.mesh)
        self.logp = logprob_fn(self.cfg.model, float(self.cfg.temperature), run.mesh)
        # Frozen, on the mesh. A copy: the update donates the policy's buffers, which the reference may share.
        self.ref_params = run.place_params(jax.tree.map(jnp.copy, self.ref_params))

    def next_batch(self, step, state):
        from dsjax.api import Model

        g, tok = self.cfg, self.tok
        self.t0 = time.perf_counter()
        # The prompt order is a fixed function of (seed, step): a resumed run sees the same prompts.
        pick = np.random.default_rng([g.seed, step]).choice(len(self.problems), g.prompts_per_step,
                                                            replace=len(self.problems) < g.prompts_per_step)
        probs = [self.problems[i] for i in pick]
        rep_prompts = [self.prompt_ids[i] for i in pick for _ in range(g.group_size)]
        rep_probs = [p for p in probs for _ in range(g.group_size)]
        comps = sample_completions(Model(state.params, g.model), rep_prompts, max_new_tokens=g.max_new_tokens,
                                   temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                   seed=g.seed * 1_000_003 + step, stop_tokens=[tok.eos_id], pad_id=tok.pad_id)
        self.t_sample = time.perf_counter() - self.t0
        texts = decode_completions(comps, tok)
        self.rewards = np.array([self.reward_fn(p["prompt"], t, p) for p, t in zip(rep_probs, texts)], np.float32)
        self.acc = np.array([accuracy_reward(p["prompt"], t, p) for p, t in zip(rep_probs, texts)])
        self.fmt = np.array([format_reward(p["prompt"], t, p) for p, t in zip(rep_probs, texts)])
        adv = group_advantages(self.rewards.reshape(g.prompts_per_step, g.group_size),
                               scale_by_std=g.scale_by_std).reshape(-1)
        rb = pack_rollouts(rep_prompts, comps, self.row_len, tok.pad_id)
        self.completion_lens = rb.completion_lens
        batch = self.run.place_batch({"tokens": rb.tokens, "segment_ids": rb.segment_ids, "mask": rb.mask,
                                      "advantages": np.asarray(adv, np.float32)})
        batch["logp_old"] = self.logp(state.params, batch["tokens"], batch["segment_ids"])
        batch["logp_ref"] = self.logp(self.ref_params, batch["tokens"], batch["segment_ids"]) if g.beta \
            else batch["logp_old"]
        return batch

    def tokens(self, batch):
        return float(self.completion_lens.sum())

    def row(self, step, inner, seconds, tokens):
        g, n_new = self.cfg, int(self.completion_lens.sum())
        return {"step": step, "reward": float(self.rewards.mean()), "accuracy": float(self.acc.mean()),
                "format": float(self.fmt.mean()), "response_length": float(self.completion_lens.mean()),
                "kl": inner[0]["kl"], "clip_frac": float(np.mean([m["clip_frac"] for m in inner])),
                "loss": inner[0]["loss"], "loss_last_inner": inner[-1]["loss"], "grad_norm": inner[0]["grad_norm"],
                "zero_std_groups": float((self.rewards.reshape(g.prompts_per_step, -1).std(-1) == 0).mean()),
                "rollout_tokens": n_new, "rollout_seconds": self.t_sample,
                "rollout_tokens_per_sec": n_new / max(self.t_sample, 1e-9),
                "step_time": time.perf_counter() - self.t0}

    def evaluate(self, params):
        from dsjax.api import Model

        if not self.eval_problems:
            return {}
        e = evaluate(Model(params, self.cfg.model), self.eval_problems, self.tok,
                     max_new_tokens=self.cfg.max_new_tokens, prompt_style=self.cfg.prompt_style)
        if self.verbose:
            print(f"grpo: held-out accuracy {e['accuracy']:.3f} format {e['format']:.3f}", file=sys.stderr)
        return {f"eval_{k}": v for k, v in e.items()}

    def describe(self, row):
        if "reward" not in row:
            return {}
        return {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.3f}", "kl": f"{row['kl']:.4f}",
                "len": f"{row['response_length']:.1f}"}


def train_grpo(gcfg: GRPOConfig, workdir: str, *, model=None, ref_model=None, problems=None, eval_problems=None,
               tokenizer=None, verbose: bool = True) -> tuple:
    """Run (or resume) GRPO in `workdir` -> (Model, rows). Writes metrics.jsonl, checkpoints, grpo.png and
    the final model (workdir/final). `model`/`ref_model`/`problems` override the config's sources."""
    from dsjax.api import Model
    from dsjax.checkpoint import native
    from dsjax.train.tokenizer import load_tokenizer

    engine.start_runtime()
    tok = tokenizer or load_tokenizer(gcfg.tokenizer)
    kw = dict(seed=gcfg.seed, difficulty=gcfg.difficulty, max_value=gcfg.max_value)
    if problems is None:  # the data first: a bad path fails before any model is built
        problems = load_problems(gcfg.task, "train", gcfg.num_train_problems, **kw)
    if eval_problems is None and (gcfg.eval_task or gcfg.task == "toy"):
        eval_problems = load_problems(gcfg.eval_task or "toy", "test", gcfg.num_eval_problems, **kw)
    policy = model if model is not None else load_policy(gcfg.init, gcfg.model, gcfg.seed)
    gcfg = optimizer_config(gcfg, policy.config)
    ref = ref_model if ref_model is not None else (load_policy(gcfg.ref, gcfg.model, gcfg.seed) if gcfg.ref
                                                   else policy)
    task = GRPOTask(gcfg, problems, eval_problems, tok, ref.params, verbose)
    state, rows = engine.run(task, workdir, policy.params, verbose=verbose)
    final = Model(state.params, gcfg.model)
    native.save(final.params, gcfg.model, workdir_io.join(workdir, FINAL_DIR))
    if gcfg.plot:
        from dsjax.rl.plot import plot_grpo

        plot_grpo(workdir_io.join(workdir, "metrics.jsonl"), workdir_io.join(workdir, "grpo.png"))
    return final, rows
