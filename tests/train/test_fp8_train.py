"""FP8 training (DeepSeek-V3's recipe, dsjax.model.fp8, emulated on CPU) against the same BF16 run: the embedded
default model (configs/tiny.yaml), same seed, same batches, two real `dsjax train` processes side by side (each
XLA compile on its own core), 4 sequences of 64 tokens per step (the default is 8 x 128: smaller for CI time),
both with model.dtype=bfloat16 and Adam moments in bfloat16 (V3's FP8-recipe optimizer), so that the two runs
differ only in model.fp8.

What this checks, and why over the first 20 steps (the warm-up, loss 8.10 -> 5.43) rather than at step 300:
the two runs see the same batches and start from the same weights, so step by step their losses differ only
by what FP8 changes in the forward pass and in the updates. Until about step 25 that difference stays small:
over 13 pairs measured (seeds 0-7, Adam eps and warm-up variants) the largest per-step gap in steps 1-20 was
0.39% and the 20-step mean loss 0.03%; a BF16 run perturbed by Adam's eps (1e-8 -> 2e-8) differs from the
unperturbed one by 0.07% there (these at commit 85009d6). In this test's processes (the suite's XLA flags, one
device each): 0.14% and 0.014% at 85009d6, 0.06% and 0.011% at 9975acd. From steps 25-70 on, loss spikes at
the peak learning rate (gradient norms of 10^1-10^3 before clipping, in BF16 runs as in FP8 ones, in the
embedding and MLA's kv projections) send any two runs onto different trajectories, and the final loss of one
pair is one sample of a wide distribution.

The issue's bound, "300 steps with model.fp8=true ends within 2% of the BF16 run's loss", is NOT MET and is
not asserted here. Measured with benchmarks/fp8_train.py at this shape, at 85009d6 (final eval loss over the whole
held-out split, ~20.7k tokens, the same for both runs), fp8/bf16 per seed 0-7: -4.5, +2.9, +11.4, +12.1,
+2.2, +0.6, +8.4, -1.4%: mean +4.0% (standard error 2.1%). It is FP8's E4M3 rounding, not the implementation:
the same code with bfloat16 in place of E4M3 ends at -1.2% and -1.6% in the two worst seeds (2 and 3).
benchmarks/results/fp8_train_seeds.txt has every run and the commands."""
import json
import os
import subprocess
import sys

from tests.train.cli_util import env

STEPS = 20
COMMON = [f"steps={STEPS}", "batch_size=4", "seq_len=64", "model.dtype=bfloat16", "moment_dtype=bfloat16",
          "log_every=1", f"eval_every={STEPS}", "eval_batches=0", f"checkpoint_every={STEPS}",
          "async_checkpointing=false", "progress=false"]


def _cmd(workdir, fp8: bool):
    return [sys.executable, "-m", "dsjax.cli", "train", "--workdir", str(workdir), *COMMON,
            f"model.fp8={'true' if fp8 else 'false'}"]


def _start(cmd):
    """One CPU device per run (the suite's 8 emulated ones would replicate the 4-row batch over 8)."""
    e = env()
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fp8_training_tracks_bf16_through_the_warmup(tmp_path):
    procs = {name: _start(_cmd(tmp_path / name, name == "fp8")) for name in ("bf16", "fp8")}
    out = {name: p.communicate(timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][1][-3000:])
    assert "fp8: on" in out["fp8"][1] and "emulated on cpu" in out["fp8"][1]  # the start-up line says how
    loss = {}
    for name in procs:
        with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
            loss[name] = [r["loss"] for r in map(json.loads, f)]
    bf16, fp8 = loss["bf16"], loss["fp8"]
    assert len(bf16) == len(fp8) == STEPS
    assert bf16[-1] < bf16[0] - 2.0, bf16  # the baseline learns (8.10 -> 5.43)
    gaps = [abs(b / a - 1) for a, b in zip(bf16, fp8)]
    assert max(gaps) < 0.01, gaps  # measured: 0.06% here, at most 0.39% over 13 pairs
    assert abs(sum(fp8) / sum(bf16) - 1) < 0.002, (sum(bf16), sum(fp8))  # measured: 0.011%, at most 0.03%
