"""Which fields of a run config may change when a workdir is resumed.

A workdir records the run config it was last run with (WORKDIR/run_config.yaml). Running it again with
a different config compares the two field by field; every field is in exactly one class:

  FREE        bookkeeping and layout: how often to log, evaluate and checkpoint, how many checkpoints
              to keep, the progress bar, nan_policy, peak_flops, ce_chunk (the same loss in chunks),
              the mesh (Orbax reshards the checkpoint onto the new one), the model's runtime-only fields (compute dtype, kernels,
              remat, scan unroll) and the data loader's threads/prefetch. Changed silently.
  SCHEDULE    optimiser and loss hyper-parameters whose state the checkpoint holds in the same tree:
              steps (the lr schedule is laid over the new total), lr, warmup and decay points,
              b1/b2/eps, weight_decay, clip_norm, grad_accum, mtp_lambda, balance_alpha, z_loss,
              bias_gamma. The state is restored as saved; the new value applies from the resumed step,
              and one log line per field says so ("resume: weight_decay 0.1 -> 0.0 applies from step 5").
  FIXED       what the checkpoint's state or data position means: every model architecture field and
              param_dtype, moment_dtype (the moments' stored dtype), seed, batch_size, seq_len and the
              data source fields (the data iterator's saved position indexes that stream). A change is
              refused: ResumeConfigError (exit 2) naming the field and both values. The workdir is
              left untouched.
"""
from __future__ import annotations

import yaml

from dsjax.config import RUNTIME_ONLY, ConfigError
from dsjax.train import workdir_io

FREE = frozenset({"log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                  "async_checkpointing", "nan_policy", "peak_flops", "progress", "ce_chunk",
                  "data.num_threads", "data.prefetch"} | {f"model.{k}" for k in RUNTIME_ONLY})
SCHEDULE = frozenset({"steps", "lr", "warmup_steps", "decay_start_fraction", "decay_end_fraction", "final_lr_ratio",
                      "b1", "b2", "eps", "weight_decay", "clip_norm", "grad_accum", "mtp_lambda", "balance_alpha",
                      "z_loss", "bias_gamma"})
# Everything else (model.*, data.*, seed, batch_size, seq_len, moment_dtype) is FIXED.


class ResumeConfigError(ConfigError):
    """The run config changes a field that a resumed run cannot take."""


def field_class(name: str) -> str:
    """'free', 'schedule' or 'fixed' for a dotted run-config field name ('lr', 'model.hidden_size')."""
    if name in FREE or name.startswith("mesh."):
        return "free"
    if name in SCHEDULE:
        return "schedule"
    return "fixed"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = prefix + k
        if isinstance(v, dict) and k in ("model", "data", "mesh") and not prefix:
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted field: (old value, new value)} for the fields present in both configs that differ."""
    a, b = _flat(old), _flat(new)
    return {k: (a[k], b[k]) for k in b if k in a and a[k] != b[k]}


def check_resume(old: dict, new: dict, where: str) -> list[tuple[str, object, object]]:
    """Refuse FIXED changes (naming each field and both values); return the SCHEDULE changes."""
    diff = changes(old, new)
    fixed = {k: v for k, v in diff.items() if field_class(k) == "fixed"}
    if fixed:
        what = "; ".join(f"{k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in sorted(fixed.items()))
        raise ResumeConfigError(
            f"{where}: cannot resume this workdir with a changed {', '.join(sorted(fixed))} ({what}). "
            "These fields fix what the checkpoint's state and data position mean; run with the workdir's values, "
            "or use a new --workdir")
    return [(k, a, b) for k, (a, b) in sorted(diff.items()) if field_class(k) == "schedule"]


def check_workdir_config(workdir: str, new_yaml: str, write: bool = True) -> list[tuple[str, object, object]]:
    """Compare WORKDIR/run_config.yaml with `new_yaml` (refusing FIXED changes), then record `new_yaml`
    there (if `write`: on a pod only process 0 writes). Returns the SCHEDULE changes [(field, old, new)]
    for the resume log line."""
    path = workdir_io.join(workdir, "run_config.yaml")
    notes = []
    if workdir_io.exists(path):
        try:
            old = yaml.safe_load(workdir_io.read_text(path)) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the workdir's run config: {e}") from None
        notes = check_resume(old, yaml.safe_load(new_yaml), path)
    if write:
        workdir_io.write_atomic(path, new_yaml)
    return notes


def resume_lines(notes, step: int) -> list[str]:
    return [f"resume: {k} {a!r} -> {b!r} applies from step {step + 1}" for k, a, b in notes]
