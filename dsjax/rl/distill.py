"""Distillation the R1 way (DeepSeek-R1 paper): sample a teacher, keep what the rule reward accepts (rejection
sampling), then plain SFT of a (smaller) student on the kept samples — no RL for the student.

    problems --teacher, k samples each--> completions --rejection_filter(reward >= threshold)-->
    workdir/distill_data.jsonl (chat JSONL: user question, assistant completion) --sft--> workdir/student
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable, Sequence

from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.errors import DataError
from dsjax.rl.distill_filter import rejection_filter
from dsjax.rl.rewards import resolve_reward
from dsjax.rl.rollout import PROMPT_STYLES, decode_completions, encode_prompt, sample_completions
from dsjax.rl.sft import SFTConfig, load_policy, sft
from dsjax.rl.toy_task import check_max_value
from dsjax.train import workdir_io
from dsjax.train.config import check_positive, to_yaml

# A stub-able teacher: (problems, prompt token ids) -> one completion text per problem.
TeacherFn = Callable[[Sequence[dict], Sequence[Sequence[int]]], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = None  # checkpoint dir or dsjax sft/grpo/train workdir
    tokenizer: str | None = None
    task: str = "toy"  # "toy" or a JSONL of {"prompt" or "question", "answer"}
    difficulty: int = 2
    max_value: int = 99
    num_prompts: int = 256
    samples_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float | None = None
    max_new_tokens: int = 64
    prompt_style: str = "chat"
    reward: str = "accuracy"  # any registered reward
    threshold: float = 1.0
    sample_batch: int = 256
    seed: int = 0
    # The student: its architecture (used when sft.init is "random"; it replaces sft.model) and its SFT run.
    model: ModelConfig = dataclasses.field(default_factory=lambda: load_config("tiny"))
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)  # sft.init, sft.steps, sft.lr, ...

    def __post_init__(self):
        if self.sft.model != self.model:
            object.__setattr__(self, "sft", dataclasses.replace(self.sft, model=self.model))
        check_max_value(self)
        check_positive(self, ("num_prompts", "samples_per_prompt", "max_new_tokens", "sample_batch"))
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"DistillConfig field 'prompt_style': one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        try:
            resolve_reward(self.reward)
        except KeyError as e:
            raise ConfigError(f"DistillConfig field 'reward': {e.args[0]}") from None


def sample_teacher(teacher, problems: Sequence[dict], tokenizer, dcfg: DistillConfig) -> list[dict]:
    """samples_per_prompt completions per problem -> rejection_filter samples {prompt, completion, reference,
    question}. `teacher` is a dsjax Model (sampled with generate) or a TeacherFn."""
    rep = [p for p in problems for _ in range(dcfg.samples_per_prompt)]
    ids = [encode_prompt(p, tokenizer, dcfg.prompt_style) for p in rep]
    texts: list[str] = []
    for i in range(0, len(rep), dcfg.sample_batch):
        chunk_p, chunk_ids = rep[i:i + dcfg.sample_batch], ids[i:i + dcfg.sample_batch]
        if callable(teacher) and not hasattr(teacher, "params"):
            texts += list(teacher(chunk_p, chunk_ids))
        else:
            comps = sample_completions(teacher, chunk_ids, max_new_tokens=dcfg.max_new_tokens,
                                       temperature=dcfg.temperature, top_p=dcfg.top_p, seed=dcfg.seed + i,
                                       stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id)
            texts += decode_completions(comps, tokenizer)
    if len(texts) != len(rep):
        raise ValueError(f"teacher returned {len(texts)} completions for {len(rep)} prompts")
    return [{"prompt": p["prompt"], "question": p.get("question", p["prompt"]), "completion": t, "reference": p}
            for p, t in zip(rep, texts)]


def to_chat(samples: Sequence[dict]) -> list[list[dict]]:
    return [[{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["completion"]}]
            for s in samples]


def distill(dcfg: DistillConfig, workdir: str, *, teacher=None, problems=None, tokenizer=None,
            verbose: bool = True):
    """-> (student Model, kept samples, filter stats). Writes distill_data.jsonl, distill_stats.json and
    the student's SFT run under workdir/student (its final model: workdir/student/final)."""
    from dsjax.rl.grpo_trainer import load_problems
    from dsjax.train.tokenizer import load_tokenizer

    from dsjax.train import engine

    engine.start_runtime()
    workdir_io.makedirs(workdir)
    tok = tokenizer or load_tokenizer(dcfg.tokenizer)
    if teacher is None:
        if not dcfg.teacher:
            raise ConfigError("distill: set teacher=PATH (a checkpoint dir or a dsjax sft/grpo workdir)")
        teacher = load_policy(dcfg.teacher)
    if problems is None:
        problems = load_problems(dcfg.task, "train", dcfg.num_prompts, seed=dcfg.seed, difficulty=dcfg.difficulty,
                                 max_value=dcfg.max_value)
    workdir_io.write_atomic(workdir_io.join(workdir, "run_config.yaml"), to_yaml(dcfg))
    samples = sample_teacher(teacher, problems, tok, dcfg)
    kept, stats = rejection_filter(samples, dcfg.reward, dcfg.threshold)
    workdir_io.write_atomic(workdir_io.join(workdir, "distill_data.jsonl"),
                            "".join(json.dumps({"messages": conv}) + "\n" for conv in to_chat(kept)))
    workdir_io.write_atomic(workdir_io.join(workdir, "distill_stats.json"), json.dumps(stats))
    if verbose:
        print(f"distill: kept {stats['accepted']}/{stats['total']} teacher samples "
              f"({stats['accepted_fraction']:.1%}, mean reward {stats['mean_reward']:.3f})", file=sys.stderr)
    if not kept:
        raise DataError(f"distill: the filter rejected all {stats['total']} teacher samples ({dcfg.reward} >= "
                        f"{dcfg.threshold}); nothing to train the student on (a stronger teacher, more samples "
                        f"or a lower threshold)")
    student, _ = sft(dcfg.sft, workdir_io.join(workdir, "student"), examples=to_chat(kept), tokenizer=tok,
                     verbose=verbose)
    return student, kept, stats
