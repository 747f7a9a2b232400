"""Logging: metrics.jsonl (one object per logged step), TensorBoard event files, the progress bar,
and MFU against the device's peak (measured on CPU)."""
from __future__ import annotations

import functools
import json
import time
import warnings

import jax
import jax.numpy as jnp

from dsjax.errors import storage_error
from dsjax.model.params import count_params
from dsjax.train import workdir_io

PEAKS = {"tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6": 918e12, "tpu v5 lite": 197e12, "tpu v4": 275e12,
         "h100": 989e12, "h200": 989e12, "a100": 312e12}


@functools.lru_cache(maxsize=1)
def measured_cpu_peak(n: int = 1024, reps: int = 8) -> float:
    """float32 FLOP/s of a large jnp matmul on this host (the CPU's practical peak)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        a = f(a) * 1e-3
    a.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def device_peak(tcfg) -> float:
    if tcfg.peak_flops:
        return tcfg.peak_flops
    d = jax.devices()[0]
    kind = d.device_kind.lower()
    for k, v in PEAKS.items():
        if k in kind:
            return v
    return measured_cpu_peak()


def train_flops_per_token(mcfg, seq_len: int, with_mtp: bool) -> float:
    """6 x active matmul params (no embedding lookup) + causal attention, per trained token."""
    c = count_params(mcfg)
    active = c["active"] - mcfg.vocab_size * mcfg.hidden_size
    layers = mcfg.num_hidden_layers
    if with_mtp and mcfg.num_nextn_predict_layers:
        active += c["mtp_active"] + mcfg.num_nextn_predict_layers * mcfg.vocab_size * mcfg.hidden_size
        layers += mcfg.num_nextn_predict_layers
    attn = 3 * layers * mcfg.num_attention_heads * seq_len * (mcfg.qk_head_dim + mcfg.v_head_dim)
    return 6 * active + attn


def trim_jsonl(path: str, resume_step: int) -> None:
    """Keep the rows of the JSONL log `path` up to `resume_step`: rows past it were written by an
    interrupted run and the resumed run writes them again. A torn row (a crash or a full disk
    mid-write, usually the last line) is dropped with a warning naming the file and line; the file is
    rewritten atomically (workdir_io.write_atomic), so a crash here loses nothing."""
    keep, torn = [], []
    for n, raw in enumerate(workdir_io.read_bytes(path).splitlines(keepends=True), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            step = row.get("step", 0) if isinstance(row, dict) else None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            step = None
        if step is None:
            torn.append(n)
        elif step <= resume_step:
            keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if torn:
        warnings.warn(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; "
                      "a torn write from an interrupted run)")
    workdir_io.write_atomic(path, b"".join(keep))


class MetricsLogger:
    """metrics.jsonl (workdir_io.AppendLog: on an object store flushed every 30 s, on flush() and at
    close) and TensorBoard event files (a local workdir, or gs:// where tensorboardX can write there)."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir_io.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if workdir_io.exists(self.path):
            trim_jsonl(self.path, resume_step)
        self.out = workdir_io.AppendLog(self.path)
        self.tb_dir = workdir_io.join(workdir_io.local_path(workdir) or workdir, "tensorboard")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        try:
            # purge_step: TensorBoard drops the earlier files' events from the resumed step on, as
            # trim_jsonl does for metrics.jsonl (an interrupted run's steps are logged again).
            # The suffix names the file by its first step (two runs in one second would share a name).
            self.tb = SummaryWriter(self.tb_dir, filename_suffix=f".from{resume_step + 1}",
                                    purge_step=resume_step + 1 if resume_step else None)
        except Exception as e:  # noqa: BLE001 — an object store tensorboardX cannot write (gs:// needs google-cloud-storage)
            if not workdir_io.is_url(self.tb_dir):
                raise
            warnings.warn(f"{self.tb_dir}: no TensorBoard events ({type(e).__name__}: {e}); metrics.jsonl has every row")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        try:  # a full disk shows at the close's flush, as an OSError naming no file
            self.out.append(json.dumps(row) + "\n")
        except OSError as e:
            raise storage_error(e, self.path) or e
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        """Everything logged so far is in metrics.jsonl (the trainer calls this before a checkpoint)."""
        if self.enabled:
            try:
                self.out.flush()
            except OSError as e:
                raise storage_error(e, self.path) or e

    def close(self):
        self.flush()
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as e:
                raise storage_error(e, self.tb_dir) or e
