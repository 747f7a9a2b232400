"""FP8 training (DeepSeek-V3's recipe, dsjax.model.fp8, emulated on CPU) against the same BF16 run, 300 steps:
the embedded default model (configs/tiny.yaml), its default seed (0), same batches, two real `dsjax train`
processes side by side, 4 sequences of 64 tokens per step (the default is 8 x 128: smaller for CI time), both
with model.dtype=bfloat16 and Adam moments in bfloat16 (V3's FP8-recipe optimizer), so that the two runs
differ only in model.fp8. The runs are exactly benchmarks/fp8_train.py's pair (same overrides, XLA's default
flags, one CPU device each), so the benchmark reproduces this test's numbers to the last digit.

Two checks:
1. Steps 1-20 (the warm-up, loss 8.39 -> 4.82): the runs see the same batches from the same weights, so
   their losses differ only by what FP8 changes. Measured here: largest per-step gap 0.30%, 20-step mean
   +0.12%.
2. The issue's bound: the final eval loss (the whole held-out split, ~20.7k tokens, the same for both) of
   the FP8 run within 2% of the BF16 run's. Measured here: 1.0017 vs 1.0101, -0.83%.

How much check 2 says (benchmarks/results/fp8_train_seeds.txt, section 6): after a few dozen steps any two
runs follow different trajectories, and their final losses differ by the run-to-run spread of the model,
not by FP8 alone. A BF16 run against itself with Adam's eps 2e-8 instead of 1e-8 (a perturbation of no
substance) differs by 1.40% on average (sd 2.1%) at this shape. FP8 vs BF16 over seeds 0-7 at this shape:
-0.83, +2.98, +1.14, +1.67, +3.23, +2.31, +1.85, -0.47% (mean +1.48%, standard error 0.52%): the recipe's cost
at hidden size 64 is about 1.5%, within the bound on average, and a single pair lands outside it for 3 of 8
seeds. So a change that moves the model's numerics at all (a different summation order) can send this pair
past 2% without anything being wrong with FP8: before loosening anything, rerun `python
benchmarks/fp8_train.py --seeds 0-7 batch_size=4 seq_len=64` and look at the mean. Check 1 is the tight one.
"""
import json
import os
import subprocess
import sys

from benchmarks.fp8_train import pair_overrides
from tests.train.cli_util import env

STEPS = 300


def _cmd(workdir, fp8: bool):
    """The benchmark's run of a pair (its overrides, so the two cannot drift apart), seed 0, at 4 x 64."""
    over = pair_overrides(STEPS, 0, fp8, ["batch_size=4", "seq_len=64"])
    return [sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(workdir), *over]


def _start(cmd):
    """The benchmark's environment: one CPU device, XLA's default optimisation (the suite's faster-compile
    flags change the floating-point schedule, hence the trajectory; at -O0 the FP8 run also takes 1.5x as
    long)."""
    e = env()
    e.pop("XLA_FLAGS", None)
    e.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fp8_training_300_steps_ends_within_2_percent_of_bf16(tmp_path):
    procs = {name: _start(_cmd(tmp_path / name, name == "fp8")) for name in ("bf16", "fp8")}
    out = {name: p.communicate(timeout=900) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][1][-3000:])
    assert "fp8: on" in out["fp8"][1] and "emulated on cpu" in out["fp8"][1]  # the start-up line says how
    rows = {}
    for name in procs:
        with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
            rows[name] = [json.loads(line) for line in f]
    bf16, fp8 = ([r["loss"] for r in rows[n]] for n in ("bf16", "fp8"))
    assert len(bf16) == len(fp8) == STEPS
    assert bf16[19] < bf16[0] - 2.0, bf16[:20]  # the baseline learns (8.39 -> 4.82 in 20 steps)

    gaps = [abs(b / a - 1) for a, b in zip(bf16[:20], fp8[:20])]
    assert max(gaps) < 0.01, gaps  # measured: 0.30%
    assert abs(sum(fp8[:20]) / sum(bf16[:20]) - 1) < 0.004, (sum(bf16[:20]), sum(fp8[:20]))  # measured: 0.12%

    final = {n: rows[n][-1]["eval_loss"] for n in rows}
    assert final["bf16"] < 1.2, final  # trained: 8.39 at step 1, 1.01 evaluated at the end
    assert abs(final["fp8"] / final["bf16"] - 1) < 0.02, final  # measured: -0.83%
