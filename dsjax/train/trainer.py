"""Pretraining as a task of the training engine (dsjax.train.engine): packed documents from
dsjax.train.data, next-token + MTP loss with V3's balancing (dsjax.train.loss), held-out loss and MFU
in the log rows. The loop, the mesh, checkpoints and resumption are the engine's."""
from __future__ import annotations

import jax
import numpy as np

from dsjax.config import ConfigError
from dsjax.model.params import init_params
from dsjax.parallel.distributed import gather_json
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

    def _shards(self) -> list[int]:
        """The data shards this process reads (shard s goes to process s % process_count)."""
        n, p = self.num_shards, jax.process_count()
        if n % p:
            raise ConfigError(f"data_shards: {n} shards do not divide over {p} processes")
        return list(range(jax.process_index(), n, p))

    def _datasets(self, split):
        from dsjax.train.data import make_dataset

        t = self.cfg
        return [make_dataset(t.data, seq_len=t.seq_len, batch_size=t.batch_size // self.num_shards, seed=t.seed,
                             split=split, process_index=s, process_count=self.num_shards) for s in self._shards()]

    def start(self, run):
        self.run = run
        self.loss, self.split_loss = pretrain_loss(self.cfg.model, self.cfg, run.mesh)
        self.num_shards = self.cfg.data_shards or jax.process_count()
        self.data = self._datasets("train")
        self.peak = device_peak(self.cfg) * len(jax.devices())

    def next_batch(self, step, state):
        parts = [next(d) for d in self.data]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def data_state(self, step):
        if self.num_shards == 1:
            return self.data[0].get_state()  # (the format of single-stream workdirs)
        mine = {str(s): d.get_state() for s, d in zip(self._shards(), self.data)}
        merged = {}
        for part in gather_json(mine):
            merged.update(part)
        return {"shards": merged}

    def set_data_state(self, data_state):
        if self.num_shards == 1 and "shards" not in data_state:
            self.data[0].set_state(data_state)
            return
        saved = data_state.get("shards", {}) if isinstance(data_state, dict) else {}
        if len(saved) != self.num_shards:
            raise ConfigError(f"data_shards: the checkpoint's data position has {len(saved) or 1} shard(s), this "
                              f"run reads {self.num_shards}; set data_shards={len(saved) or 1}")
        for s, d in zip(self._shards(), self.data):
            d.set_state(saved[str(s)])

    def tokens(self, batch):
        return float(self.cfg.tokens_per_step)

    def row(self, step, metrics, seconds, tokens):
        row = super().row(step, metrics, seconds, tokens)
        row["mfu"] = row["tokens_per_sec"] * self.flops_per_token / self.peak
        return row

    def evaluate(self, params):
        if self.eval_fn is None:
            self.eval_fn = jit_step(make_eval_step(self.cfg.model, self.cfg, self.run.mesh))
        its = self._datasets("eval")
        rows = (self.cfg.batch_size // self.num_shards, self.cfg.seq_len)
        tot, n = 0.0, 0.0
        for _ in range(self.cfg.eval_batches):
            # Every process runs the same number of eval steps: a shard that ran out gives padding rows
            # (segment 0: no tokens), so the shards' different lengths cannot desynchronise the collectives.
            parts = [next(it, None) for it in its]
            if all(p is None for p in parts) and jax.process_count() == 1:
                break
            parts = [p if p is not None else {k: np.zeros(rows, np.int32) for k in ("tokens", "segment_ids",
                                                                                   "positions")} for p in parts]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            m = self.eval_fn(params, self.run.place_batch(batch))
            tot += float(m["loss"])
            n += float(m["tokens"])
        # No held-out tokens (eval_batches=0, or an empty split): no eval_loss, rather than a loss of 0.
        return {"eval_loss": tot / n} if n > 0 else {}

    def describe(self, row):
        return {"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_sec']:,.0f}", "mfu": f"{row['mfu']:.1%}"}


def train(tcfg: TrainConfig, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Train (or resume) in `workdir`. Returns the logged metric rows of this invocation.

    stop_after: checkpoint and return after this step (a planned interruption, e.g. before a
    preemption); running again resumes exactly where it stopped. SIGTERM (a preemption notice) does the
    same at the step it arrives in (see dsjax.train.preemption).

    One trainer per workdir (dsjax.train.workdir_lock); a changed run config is resumed or refused
    field by field (dsjax.train.resume)."""
    engine.start_runtime()  # first: PretrainTask's FLOP count traces the model, which starts the backend
    _, rows = engine.run(PretrainTask(tcfg), workdir, lambda: init_params(tcfg.model, tcfg.seed),
                         stop_after=stop_after, batch_size=tcfg.batch_size // tcfg.grad_accum)
    return rows

