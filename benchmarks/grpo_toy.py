"""GRPO on the toy arithmetic task: a tiny model gets a brief, imperfect SFT warm-up, then GRPO raises
its held-out (greedy) accuracy. Prints accuracy before/after GRPO, wall time and rollout tokens/s; the
last line reads `accuracy before X after Y`.

The warm-up data imitates a sloppy cold-start teacher: a fraction `lazy` of the reference completions
stops one operation early (the reasoning skips the last step and the answer is the intermediate value).
The SFT model therefore mostly answers lazily under greedy decoding, while sampling at temperature 1
still finds the full solution in part of a group: exactly the headroom the accuracy reward turns into a
policy change (and, as in R1-Zero, response length grows).

    python benchmarks/grpo_toy.py                # the default run (~7 min on a 2-core CPU)
    python benchmarks/grpo_toy.py --grpo-steps 5 --sft-steps 20   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.config import apply_overrides, load_config  # noqa: E402
from dsjax.rl.grpo_trainer import GRPOConfig, train_grpo  # noqa: E402
from dsjax.rl.sft import SFTConfig, sft  # noqa: E402
from dsjax.rl.toy_task import _SYMBOL, apply_op, make_problems, reference_completion  # noqa: E402
from dsjax.train.tokenizer import ByteTokenizer  # noqa: E402


def lazy_completion(problem: dict) -> str:
    """The reference solution with its last operation skipped (a wrong answer in the right format)."""
    value, steps = problem["start"], []
    for op, k in problem["ops"][:-1]:
        new = apply_op(value, op, k)
        steps.append(f"{value} {_SYMBOL[op]} {k} = {new}.")
        value = new
    return f"<think>{' '.join(steps)}</think>\n<answer>{value}</answer>"


def sft_examples(problems, lazy: float, seed: int):
    rng = random.Random(seed)
    return [[{"role": "user", "content": p["question"]},
             {"role": "assistant", "content": lazy_completion(p) if rng.random() < lazy else reference_completion(p)}]
            for p in problems]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--max-value", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--lazy", type=float, default=0.65, help="fraction of warm-up completions that stop early")
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval", type=int, default=200, help="held-out problems")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    workdir = a.workdir or tempfile.mkdtemp(prefix="grpo_toy_")
    model_cfg = apply_overrides(load_config("tiny"), {"first_k_dense_replace": 3, "num_nextn_predict_layers": 0})
    tok = ByteTokenizer()
    train_problems = make_problems(4000, a.seed, a.difficulty, max_value=a.max_value)
    eval_problems = make_problems(a.eval, a.seed, a.difficulty, split="test", max_value=a.max_value)

    scfg = SFTConfig(steps=a.sft_steps, batch_size=a.sft_batch, seq_len=256, lr=a.sft_lr, warmup_steps=10,
                     seed=a.seed, log_every=25, checkpoint_every=10 ** 6, model=model_cfg)
    t0 = time.perf_counter()
    model, _ = sft(scfg, os.path.join(workdir, "sft"), examples=sft_examples(train_problems, a.lazy, a.seed))
    t_sft = time.perf_counter() - t0

    gcfg = GRPOConfig(steps=a.grpo_steps, prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=40,
                      temperature=a.temperature, mu=a.mu, lr=a.lr, beta=a.beta, seed=a.seed,
                      difficulty=a.difficulty, max_value=a.max_value, eval_every=10, checkpoint_every=10 ** 6,
                      model=model_cfg)
    t0 = time.perf_counter()
    _, rows = train_grpo(gcfg, os.path.join(workdir, "grpo"), model=model, problems=train_problems,
                         eval_problems=eval_problems, tokenizer=tok)
    t_grpo = time.perf_counter() - t0
    before = next(r for r in rows if r["step"] == 0)
    after = rows[-1]
    # Rollout throughput over the steps after the first (whose sampling time includes compiling generate).
    steps = [r for r in rows if r["step"] > 1 and "rollout_tokens" in r] or [r for r in rows if r["step"] > 0]
    tps = sum(r["rollout_tokens"] for r in steps) / max(sum(r["rollout_seconds"] for r in steps), 1e-9)
    print(json.dumps({"sft_seconds": round(t_sft, 1), "grpo_seconds": round(t_grpo, 1),
                      "wall_seconds": round(time.perf_counter() - t_start, 1),
                      "rollout_tokens_per_sec": round(tps, 1),
                      "response_length_before": before["eval_response_length"],
                      "response_length_after": after["eval_response_length"],
                      "format_before": before["eval_format"], "format_after": after["eval_format"],
                      "plot": os.path.join(workdir, "grpo", "grpo.png"),
                      "metrics": os.path.join(workdir, "grpo", "metrics.jsonl")}))
    print(f"wall time {time.perf_counter() - t_start:.0f} s (SFT {t_sft:.0f} s, GRPO {t_grpo:.0f} s), "
          f"rollout {tps:,.0f} tokens/s")
    print(f"accuracy before {before['eval_accuracy']:.2f} after {after['eval_accuracy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
