"""Pretraining as a task of the training engine (dsjax.train.engine): packed documents from
dsjax.train.data, next-token + MTP loss with V3's balancing (dsjax.train.loss), held-out loss and MFU
in the log rows. The loop, the mesh, checkpoints and resumption are the engine's."""
from __future__ import annotations

import jax

from dsjax.model.params import init_params
from dsjax.train import engine
from dsjax.train.config import TrainConfig
from dsjax.train.engine import TrainingError  # noqa: F401  (re-exported: the CLI and tests catch it here)
from dsjax.train.metrics import device_peak, train_flops_per_token
from dsjax.train.step import jit_step, make_eval_step, pretrain_loss


class PretrainTask(engine.Task):
    name = "train"

    def __init__(self, tcfg: TrainConfig):
        self.cfg = tcfg
        self.flops_per_token = train_flops_per_token(tcfg.model, tcfg.seq_len, tcfg.mtp_lambda > 0)
        self.eval_fn = None

    def _dataset(self, split):
        from dsjax.train.data import make_dataset

        t = self.cfg
        return make_dataset(t.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed, split=split)

    def start(self, run):
        self.run = run
        self.loss, self.split_loss = pretrain_loss(self.cfg.model, self.cfg, run.mesh)
        self.data = self._dataset("train")
        self.peak = device_peak(self.cfg) * len(jax.devices())

    def next_batch(self, step, state):
        return next(self.data)

    def data_state(self, step):
        return self.data.get_state()

    def set_data_state(self, data_state):
        self.data.set_state(data_state)

    def tokens(self, batch):
        return float(self.cfg.tokens_per_step)

    def row(self, step, metrics, seconds, tokens):
        row = super().row(step, metrics, seconds, tokens)
        row["mfu"] = row["tokens_per_sec"] * self.flops_per_token / self.peak
        return row

    def evaluate(self, params):
        if self.eval_fn is None:
            self.eval_fn = jit_step(make_eval_step(self.cfg.model, self.cfg, self.run.mesh))
        it = self._dataset("eval")
        tot, n = 0.0, 0.0
        for _ in range(self.cfg.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            m = self.eval_fn(params, self.run.place_batch(batch))
            tot += float(m["loss"])
            n += float(m["tokens"])
        return {"eval_loss": tot / max(n, 1.0)}

    def describe(self, row):
        return {"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_sec']:,.0f}", "mfu": f"{row['mfu']:.1%}"}


def train(tcfg: TrainConfig, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Train (or resume) in `workdir`. Returns the logged metric rows of this invocation.

    stop_after: checkpoint and return after this step (a planned interruption, e.g. before a
    preemption); running again resumes exactly where it stopped. SIGTERM (a preemption notice) does the
    same at the step it arrives in (see dsjax.train.preemption).

    One trainer per workdir (dsjax.train.workdir_lock); a changed run config is resumed or refused
    field by field (dsjax.train.resume)."""
    _, rows = engine.run(PretrainTask(tcfg), workdir, lambda: init_params(tcfg.model, tcfg.seed),
                         stop_after=stop_after, batch_size=tcfg.batch_size // tcfg.grad_accum)
    return rows

