"""Rejection sampling for R1's distillation data (DeepSeek-R1 paper): keep the generated samples a rule accepts."""
from __future__ import annotations

import math
from typing import Sequence

from dsjax.rl.rewards import RewardFn, resolve_reward


def rejection_filter(samples: Sequence[dict], reward_fn: str | RewardFn, threshold: float) -> tuple[list[dict], dict]:
    """Keep exactly the samples with reward_fn(prompt, completion, reference) >= threshold.

    samples: dicts with "prompt", "completion", "reference" (other keys are carried along untouched; the
    kept dicts are the input objects, in input order). A NaN reward rejects. Returns (kept, stats) with
    stats = {"total", "accepted", "accepted_fraction", "mean_reward"}.
    """
    fn = resolve_reward(reward_fn)
    kept: list[dict] = []
    total_reward = 0.0
    for i, s in enumerate(samples):
        missing = [k for k in ("prompt", "completion", "reference") if k not in s]
        if missing:
            raise ValueError(f"rejection_filter: sample {i} lacks {missing}")
        r = float(fn(s["prompt"], s["completion"], s["reference"]))
        if not math.isnan(r):
            total_reward += r
        if r >= threshold:
            kept.append(s)
    n = len(samples)
    stats = {"total": n, "accepted": len(kept), "accepted_fraction": len(kept) / n if n else 0.0,
             "mean_reward": total_reward / n if n else 0.0}
    return kept, stats
