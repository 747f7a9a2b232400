"""A verifiable synthetic reasoning task for R1-Zero-style RL on tiny models: chained integer arithmetic.

    "Start with 5, add 3, multiply by 2. What is the result?"  ->  "16"

Everything is generated in code and deterministic from (seed, difficulty, split). `difficulty` is the
number of operations; every intermediate value stays in [0, max_value] so a byte-level LM with a few
million parameters can learn the task. The held-out split is defined by a hash of the question text, so
no question can ever be in both splits, whatever seeds or sizes are used.
"""
from __future__ import annotations

import hashlib
import random

from dsjax.config import ConfigError

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant:"
)
"""The DeepSeek-R1-Zero instruction (paper, Table 1): a fixed format instruction and no content priors."""

TOY_TEMPLATE = (
    "Think inside <think> </think>, then give the final answer inside <answer> </answer>.\n"
    "User: {question}\nAssistant:"
)
"""The same instruction, shortened so that prompts stay short for tiny byte-level models."""

HELD_OUT_BUCKETS = 10  # one question in 10 (by hash) is held out
_OPS = ("add", "subtract", "multiply by")
_SYMBOL = {"add": "+", "subtract": "-", "multiply by": "*"}


# The smallest max_value make_problems accepts; the RL configs check it when they are built.
MIN_MAX_VALUE = 10


def check_max_value(cfg) -> None:
    """A config's `max_value` against make_problems' bound, as a ConfigError naming the field."""
    if cfg.max_value < MIN_MAX_VALUE:
        raise ConfigError(f"{type(cfg).__name__} field 'max_value': must be >= {MIN_MAX_VALUE}, got {cfg.max_value}")


def format_prompt(question: str, template: str = TOY_TEMPLATE) -> str:
    return template.format(question=question)


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split (a fixed function of its text)."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return h % HELD_OUT_BUCKETS == 0


def apply_op(value: int, op: str, operand: int) -> int:
    if op == "add":
        return value + operand
    if op == "subtract":
        return value - operand
    if op == "multiply by":
        return value * operand
    raise ValueError(f"unknown operation {op!r}; expected one of {_OPS}")


def _sample_chain(rng: random.Random, difficulty: int, max_value: int) -> tuple[int, list[list]]:
    value = start = rng.randint(1, 9)
    ops: list[list] = []
    for _ in range(difficulty):
        choices = [("add", rng.randint(1, 9))]
        if value >= 1:
            choices.append(("subtract", rng.randint(1, min(9, value))))
        if value >= 1 and value * 2 <= max_value:
            choices.append(("multiply by", rng.randint(2, min(3, max_value // value))))
        choices = [(op, k) for op, k in choices if 0 <= apply_op(value, op, k) <= max_value]
        op, k = rng.choice(choices)
        value = apply_op(value, op, k)
        ops.append([op, k])
    return start, ops


def question_text(start: int, ops: list[list]) -> str:
    steps = ", ".join(f"{op} {k}" for op, k in ops)
    return f"Start with {start}, {steps}. What is the result?"


def solve(start: int, ops: list[list]) -> int:
    value = start
    for op, k in ops:
        value = apply_op(value, op, k)
    return value


def make_problems(n: int, seed: int, difficulty: int = 2, *, split: str = "train", max_value: int = 99,
                  template: str = TOY_TEMPLATE) -> list[dict]:
    """n problems of one split, deterministic from (seed, difficulty, split, max_value).

    Each is {"prompt", "question", "answer", "start", "ops", "difficulty"}: "prompt" is the question in
    the instruction template, "answer" the result as a decimal string, "start"/"ops" the chain
    (ops = [[op, operand], ...]). A problem dict can be passed as `reference` to the rewards.
    Questions may repeat within a split when n exceeds the number of distinct questions.
    """
    if split not in ("train", "test"):
        raise ValueError(f"make_problems: split must be 'train' or 'test', got {split!r}")
    if difficulty < 1:
        raise ValueError(f"make_problems: difficulty (number of operations) must be >= 1, got {difficulty}")
    if max_value < MIN_MAX_VALUE:
        raise ValueError(f"make_problems: max_value must be >= {MIN_MAX_VALUE}, got {max_value}")
    rng = random.Random(f"dsjax-toy:{seed}:{difficulty}:{max_value}:{split}")
    want_held_out = split == "test"
    problems: list[dict] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 1000 * max(n, 1):  # unreachable for the supported knobs, but never loop forever
            raise RuntimeError(f"make_problems: could not draw {n} {split} problems")
        start, ops = _sample_chain(rng, difficulty, max_value)
        q = question_text(start, ops)
        if is_held_out(q) != want_held_out:
            continue
        problems.append({"prompt": format_prompt(q, template), "question": q, "answer": str(solve(start, ops)),
                         "start": start, "ops": ops, "difficulty": difficulty})
    return problems


def reference_completion(problem: dict) -> str:
    """A correct worked solution in the R1 format, e.g. "<think>5 + 3 = 8. 8 * 2 = 16.</think>
    <answer>16</answer>" (SFT warm-up / cold-start data)."""
    value = problem["start"]
    steps = []
    for op, k in problem["ops"]:
        new = apply_op(value, op, k)
        steps.append(f"{value} {_SYMBOL[op]} {k} = {new}.")
        value = new
    return f"<think>{' '.join(steps)}</think>\n<answer>{value}</answer>"


def toy_chat_examples(n: int, seed: int, difficulty: int = 2, *, max_value: int = 99) -> list[list[dict]]:
    """n chat conversations of the train split, each the question and its reference solution: offline SFT
    warm-up data in the {"messages"} form of a chat JSONL line (`dsjax sft data=toy`)."""
    return [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": reference_completion(p)}]
            for p in make_problems(n, seed, difficulty, max_value=max_value)]
