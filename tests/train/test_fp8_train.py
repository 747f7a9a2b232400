"""Training quality of DeepSeek-V3's FP8 recipe on CPU (emulated): the embedded default model trained
300 steps with model.fp8=true ends within 2% of the BF16 run's eval loss (same seed, same data).

To fit CI (2 cores, < 20 minutes for the suite) both runs use 4 sequences of 64 tokens per step
instead of the default 8 x 128; benchmarks/fp8_train.py runs the full default and plots both curves."""
import numpy as np

from dsjax.train.config import load_train_config
from dsjax.train.trainer import train

STEPS = 300


def _run(tmp_path, fp8: bool):
    cfg = load_train_config(None, [f"steps={STEPS}", "batch_size=4", "seq_len=64", "model.dtype=bfloat16",
                                   f"model.fp8={'true' if fp8 else 'false'}", "log_every=10",
                                   f"eval_every={STEPS}", "eval_batches=4", f"checkpoint_every={STEPS}",
                                   "async_checkpointing=false", "progress=false"])
    assert cfg.moment_dtype == ("bfloat16" if fp8 else "float32")  # V3 keeps Adam moments in BF16 under FP8
    return train(cfg, str(tmp_path / ("fp8" if fp8 else "bf16")))


def test_fp8_training_ends_within_2_percent_of_bf16(tmp_path, capfd):
    bf16, fp8 = _run(tmp_path, False), _run(tmp_path, True)
    err = capfd.readouterr().err
    assert "fp8: on" in err and "emulated on cpu" in err  # the start-up line says how FP8 runs here
    first, end_bf16, end_fp8 = bf16[0]["loss"], bf16[-1]["eval_loss"], fp8[-1]["eval_loss"]
    assert end_bf16 < first - 1.0, (first, end_bf16)  # the baseline learned something
    assert abs(end_fp8 / end_bf16 - 1) < 0.02, (end_bf16, end_fp8)
    # and the two runs stay together along the way, not only at the end
    a, b = (np.array([r["loss"] for r in rows]) for rows in (bf16, fp8))
    assert np.max(np.abs(b / a - 1)) < 0.05, np.max(np.abs(b / a - 1))
