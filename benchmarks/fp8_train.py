"""DeepSeek-V3's FP8 recipe vs BF16: the same run (seed, data, steps) trained twice, for one or more seeds.

    python benchmarks/fp8_train.py                                   # the embedded default, 300 steps, seed 0
    python benchmarks/fp8_train.py --seeds 0-7 batch_size=4 seq_len=64   # 8 pairs at the CI test's shape
    python benchmarks/fp8_train.py --steps 1000 model.num_hidden_layers=4   # any dsjax train override
    python benchmarks/fp8_train.py --seeds 2,3 --rounding bfloat16 batch_size=4 seq_len=64   # the control below

Both runs of a pair use model.dtype=bfloat16 (the BF16 baseline) and Adam moments in bfloat16 (moment_dtype=
bfloat16, the optimizer of V3's FP8 recipe, for both: moments are not a matmul-precision question) and differ
only in model.fp8. An override such as moment_dtype=float32 applies to both runs. On a backend without FP8
units the FP8 run is emulated (dsjax.model.fp8): the numerics of the recipe, not its speed.

The measure: the final eval loss over the whole held-out split of the data (eval_batches is set past its
end, so the evaluation stops when the split runs out: ~20.7k tokens for the embedded corpus, the same tokens
for both runs). One pair is one sample: after a few dozen steps the two runs follow different trajectories
(the same happens to a BF16 run perturbed by anything), so the ratio of one pair carries the run-to-run
spread of the final loss (benchmarks/results/fp8_train_seeds.txt). --seeds gives the mean ratio over seeds
with its standard error.

--rounding bfloat16 is a control: the FP8 run keeps the whole FP8 code path (tiles, scales, custom VJPs, float32
products) with E4M3 rounding replaced by bfloat16 rounding, so a gap that remains is the implementation's and a
gap that goes away is E4M3's precision.

Writes benchmarks/results/fp8_train.png (both loss curves of every seed) and fp8_train.txt (per seed: the
final eval losses and their ratio; the mean and standard error over seeds; per-10-step training losses of
the first seed; seconds per step of each run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from dsjax.model import fp8 as fp8_lib  # noqa: E402
from dsjax.train.config import load_train_config  # noqa: E402
from dsjax.train.trainer import train  # noqa: E402

WHOLE_SPLIT = 100_000  # eval_batches past the end of any split used here: the evaluation reads all of it


def pair_overrides(steps: int, seed: int, fp8: bool, overrides=()) -> list[str]:
    """The dsjax train overrides of one run of a pair (the CI test uses the same)."""
    return [f"steps={steps}", f"seed={seed}", "model.dtype=bfloat16", "moment_dtype=bfloat16", "log_every=1",
            f"eval_every={steps}", f"eval_batches={WHOLE_SPLIT}", f"checkpoint_every={steps}",
            "async_checkpointing=false", "progress=false", *overrides, f"model.fp8={'true' if fp8 else 'false'}"]


def run_pair(steps: int, seed: int = 0, overrides=(), workdir: str | None = None) -> dict:
    """Train BF16 then FP8 (same seed and data) -> {"bf16"|"fp8": {"loss": [...], "eval": x, "seconds": s}}."""
    out = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in ("bf16", "fp8"):
            cfg = load_train_config(None, pair_overrides(steps, seed, name == "fp8", overrides))
            t0 = time.perf_counter()
            rows = train(cfg, os.path.join(tmp, name))
            out[name] = {"loss": [r["loss"] for r in rows], "eval": rows[-1]["eval_loss"],
                         "seconds": time.perf_counter() - t0, "moment_dtype": cfg.moment_dtype}
    return out


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0", help="seeds of the pairs: 0 | 0-7 | 0,3,5")
    ap.add_argument("--rounding", choices=("e4m3", "bfloat16"), default="e4m3",
                    help="bfloat16: the control run (E4M3 rounding replaced, everything else FP8's)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp8_train"))
    ap.add_argument("overrides", nargs="*", help="dsjax train key=value overrides for both runs")
    a = ap.parse_args()
    seeds = parse_seeds(a.seeds)
    if a.rounding == "bfloat16":  # quantize() rounds through fp8_lib.to_e4m3: the one place E4M3 is chosen
        fp8_lib.to_e4m3 = lambda x: jnp.clip(x, -fp8_lib.E4M3_MAX, fp8_lib.E4M3_MAX).astype(jnp.bfloat16)
    res = {}
    for s in seeds:
        res[s] = run_pair(a.steps, s, a.overrides)
        r = res[s]
        print(f"seed {s}: bf16 {r['bf16']['eval']:.4f} fp8 {r['fp8']['eval']:.4f} "
              f"({100 * (r['fp8']['eval'] / r['bf16']['eval'] - 1):+.2f}%)", flush=True)
    ratios = [res[s]["fp8"]["eval"] / res[s]["bf16"]["eval"] for s in seeds]
    cmd = "python benchmarks/fp8_train.py " + " ".join([f"--steps {a.steps}", f"--seeds {a.seeds}",
                                                         f"--rounding {a.rounding}", *a.overrides])
    first = res[seeds[0]]
    lines = [f"# {cmd}", f"# FP8 (DeepSeek-V3 recipe) vs BF16, same seed and data, {a.steps} steps; final eval loss "
             f"over the whole held-out split; Adam moments {first['bf16']['moment_dtype']} in both; FP8 rounding "
             f"{a.rounding}",
             "seed  bf16    fp8     fp8/bf16"]
    lines += [f"{s:4d}  {res[s]['bf16']['eval']:.4f}  {res[s]['fp8']['eval']:.4f}  {100 * (q - 1):+.2f}%"
              for s, q in zip(seeds, ratios)]
    mean = statistics.fmean(ratios)
    if len(ratios) > 1:
        sd = statistics.stdev(ratios)
        lines.append(f"mean fp8/bf16 over {len(ratios)} seeds: {100 * (mean - 1):+.2f}% (standard error "
                     f"{100 * sd / len(ratios) ** 0.5:.2f}%, one pair's sd {100 * sd:.2f}%)")
    lines += [f"s/step incl. compile, seed {seeds[0]}: " + ", ".join(
        f"{k} {v['seconds'] / a.steps:.3f}" for k, v in first.items()), f"step  bf16_loss  fp8_loss (seed {seeds[0]})"]
    lines += [f"{s:4d}  {first['bf16']['loss'][s - 1]:.4f}  {first['fp8']['loss'][s - 1]:.4f}"
              for s in range(1, a.steps + 1) if s == 1 or s % 10 == 0]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(seeds) + 5]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(seeds):
        for k, style in (("bf16", "-"), ("fp8", "--")):
            ax.plot(range(1, a.steps + 1), res[s][k]["loss"], style, lw=1, color=f"C{i % 10}",
                    label=f"seed {s} {k} (eval {res[s][k]['eval']:.3f})" if len(seeds) <= 4 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"FP8 (dashed) vs BF16, {len(seeds)} seed(s): mean eval ratio {mean:.4f}", fontsize=10)
    if len(seeds) <= 4:
        ax.legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)
    print(f"wrote {a.out}.png and .txt")


if __name__ == "__main__":
    main()
