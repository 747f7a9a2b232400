"""DeepSeek-V3's FP8 recipe vs BF16: the same run (seed, data, steps) trained twice, side by side.

    python benchmarks/fp8_train.py                         # the embedded default, 300 steps, on this machine
    python benchmarks/fp8_train.py --steps 1000 model.num_hidden_layers=4   # any dsjax train override

Both runs use model.dtype=bfloat16 (the BF16 baseline) and Adam moments in bfloat16 (moment_dtype=bfloat16,
the optimizer of V3's FP8 recipe, for both: moments are not a matmul-precision question, and at 4 x 64 tokens
per step bf16 moments alone move the BF16 run's final eval loss by +3.6%), and differ only in model.fp8.
An override such as moment_dtype=float32 applies to both runs. On a backend
without FP8 units the FP8 run is emulated (dsjax.model.fp8): the numerics of the recipe, not its speed.
Writes benchmarks/results/fp8_train.png (both loss curves) and fp8_train.txt (the numbers: per-10-step
training losses, the final eval losses, their ratio, seconds per step of each run).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.train.config import load_train_config  # noqa: E402
from dsjax.train.trainer import train  # noqa: E402


def run_pair(steps: int, overrides=(), workdir: str | None = None) -> dict:
    """Train BF16 then FP8 (same seed and data) -> {"bf16"|"fp8": {"loss": [...], "eval": x, "seconds": s}}."""
    base = [f"steps={steps}", "model.dtype=bfloat16", "moment_dtype=bfloat16", "log_every=1", f"eval_every={steps}",
            f"checkpoint_every={steps}", "progress=false", *overrides]
    out = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in ("bf16", "fp8"):
            cfg = load_train_config(None, base + [f"model.fp8={'true' if name == 'fp8' else 'false'}"])
            t0 = time.perf_counter()
            rows = train(cfg, os.path.join(tmp, name))
            out[name] = {"loss": [r["loss"] for r in rows], "eval": rows[-1]["eval_loss"],
                         "seconds": time.perf_counter() - t0, "moment_dtype": cfg.moment_dtype}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp8_train"))
    ap.add_argument("overrides", nargs="*", help="dsjax train key=value overrides for both runs")
    a = ap.parse_args()
    res = run_pair(a.steps, a.overrides)
    ratio = res["fp8"]["eval"] / res["bf16"]["eval"]
    cmd = "python benchmarks/fp8_train.py " + " ".join([f"--steps {a.steps}", *a.overrides])
    lines = [f"# {cmd}", f"# FP8 (DeepSeek-V3 recipe) vs BF16, same seed and data, {a.steps} steps",
             *(f"{k}: final eval loss {v['eval']:.4f}, Adam moments {v['moment_dtype']}, "
               f"{v['seconds'] / a.steps:.3f} s/step (incl. compile)" for k, v in res.items()),
             f"fp8 / bf16 final eval loss: {ratio:.4f} ({100 * (ratio - 1):+.2f}%)",
             "step  bf16_loss  fp8_loss"]
    lines += [f"{s:4d}  {res['bf16']['loss'][s - 1]:.4f}  {res['fp8']['loss'][s - 1]:.4f}"
              for s in range(1, a.steps + 1) if s == 1 or s % 10 == 0]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, style in (("bf16", "-"), ("fp8", "--")):
        ax.plot(range(1, a.steps + 1), res[k]["loss"], style, lw=1, label=f"{k} (final eval {res[k]['eval']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"FP8 (1x128 / 128x128 E4M3 scales) vs BF16: eval ratio {ratio:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)
    print(f"wrote {a.out}.png and .txt")


if __name__ == "__main__":
    main()
