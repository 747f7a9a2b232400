"""The training loop: data -> jitted step -> logging, eval, checkpoints; resumes where it stopped."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model.params import init_params
from dsjax.train.checkpointing import Checkpointer, abstract_of
from dsjax.train.config import TrainConfig, to_yaml
from dsjax.train.metrics import MetricsLogger, device_peak, train_flops_per_token
from dsjax.train.preemption import PreemptionWatch
from dsjax.train.resume import check_workdir_config, resume_lines
from dsjax.train.step import init_state, jit_step, make_eval_step, make_train_step
from dsjax.train.workdir_lock import hold_workdir


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss under nan_policy=stop)."""


def _mesh_setup(tcfg: TrainConfig):
    """(mesh or None, state placement fn, batch placement fn). One device (or a mesh whose sizes all
    multiply to 1, e.g. mesh.fsdp=1): no mesh, everything on the first device."""
    sizes = [getattr(tcfg.mesh, a) for a in ("dcn", "data", "fsdp", "expert", "tensor")]
    if len(jax.devices()) == 1 or (-1 not in sizes and int(np.prod(sizes)) == 1):
        return None, (lambda s: s), (lambda b: jax.tree.map(jnp.asarray, b))
    from dsjax.parallel import mesh as pm

    mesh = pm.make_mesh(tcfg.mesh)
    bsh = pm.batch_sharding(mesh, tcfg.batch_size // tcfg.grad_accum)
    split = int(np.prod([mesh.shape[a] for a in pm.batch_axes(mesh, tcfg.batch_size // tcfg.grad_accum)]))
    want = int(np.prod([mesh.shape[a] for a in pm.batch_axes(mesh)]))
    if split < want:
        warnings.warn(f"batch_size {tcfg.batch_size} (per micro-batch {tcfg.batch_size // tcfg.grad_accum}) does not "
                      f"divide over the {want} data-parallel shards of mesh {dict(mesh.shape)}; the batch is split "
                      f"{split} ways and replicated otherwise")

    def place_state(state):
        return jax.device_put(state, pm.state_shardings(mesh, tcfg.model, abstract_of(state)))

    return mesh, place_state, (lambda b: jax.tree.map(lambda a: jax.device_put(a, bsh), b))


def _eval(eval_fn, params, tcfg, place_batch) -> float:
    from dsjax.train.data import make_dataset

    it = make_dataset(tcfg.data, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed, split="eval")
    tot, n = 0.0, 0.0
    for _ in range(tcfg.eval_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        m = eval_fn(params, place_batch(batch))
        tot += float(m["loss"])
        n += float(m["tokens"])
    return tot / max(n, 1.0)


def train(tcfg: TrainConfig, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Train (or resume) in `workdir`. Returns the logged metric rows of this invocation.

    stop_after: checkpoint and return after this step (a planned interruption, e.g. before a
    preemption); running again resumes exactly where it stopped. SIGTERM (a preemption notice) does the
    same at the step it arrives in (see dsjax.train.preemption).

    One trainer per workdir (dsjax.train.workdir_lock); a changed run config is resumed or refused
    field by field (dsjax.train.resume)."""
    from dsjax.train.data import make_dataset

    os.makedirs(workdir, exist_ok=True)
    with hold_workdir(workdir), PreemptionWatch() as preempt:
        notes = check_workdir_config(workdir, to_yaml(tcfg))
        mcfg = tcfg.model
        main = jax.process_index() == 0
        if main and mcfg.fp8:  # whether this backend runs DeepSeek-V3's FP8 recipe natively or emulated
            from dsjax.model.fp8 import startup_line

            print(startup_line(mcfg), file=sys.stderr)
        mesh, place_state, place_batch = _mesh_setup(tcfg)
        # The steps get the mesh explicitly (expert parallelism over its "expert" axis); it is also set
        # as the current mesh, which Pallas (Mosaic) lowering reads the TPU kind from.
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return _train(tcfg, workdir, mcfg, main, mesh, place_state, place_batch, make_dataset, stop_after,
                          preempt, notes)


def _train(tcfg, workdir, mcfg, main, mesh, place_state, place_batch, make_dataset, stop_after, preempt, notes):
    state = place_state(init_state(init_params(mcfg, tcfg.seed), tcfg))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                        async_save=tcfg.async_checkpointing)
    data = make_dataset(tcfg.data, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed, split="train")
    start = 0
    restored = ckpt.restore(abstract_of(state))
    if restored is not None:
        start, state, dstate = restored
        data.set_state(dstate)
        if main:
            print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr)
            for line in resume_lines(notes, start):
                print(line, file=sys.stderr)
    logger = MetricsLogger(workdir, start, enabled=main)
    step_fn = jit_step(make_train_step(mcfg, tcfg, mesh), donate_argnums=0)
    eval_fn = jit_step(make_eval_step(mcfg, tcfg, mesh))
    flops_tok = train_flops_per_token(mcfg, tcfg.seq_len, tcfg.mtp_lambda > 0)
    peak = device_peak(tcfg) * len(jax.devices())
    bar = None
    if main and tcfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    rows, t0, toks, step = [], time.perf_counter(), 0.0, start
    try:
        for step in range(start + 1, tcfg.steps + 1):
            batch = place_batch(next(data))
            state, m = step_fn(state, batch)
            toks += float(tcfg.tokens_per_step)
            if not bool(m["finite"]):
                msg = f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])})"
                if tcfg.nan_policy == "stop":
                    raise TrainingError(msg + "; stopping (set nan_policy=skip to skip such batches)")
                warnings.warn(msg + "; batch skipped, parameters unchanged")
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                dt = time.perf_counter() - t0
                tps = toks / dt
                row = {"step": step}
                row.update({k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0})
                row.update(tokens_per_sec=tps, mfu=tps * flops_tok / peak)
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    row["eval_loss"] = _eval(eval_fn, state.params, tcfg, place_batch)
                logger.log(row)
                rows.append(row)
                t0, toks = time.perf_counter(), 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.1%}")
            if bar is not None:
                bar.update(1)
            stop = step == stop_after or preempt.should_stop(step)
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stop:
                ckpt.save(step, state, data.get_state())
            if stop:
                break
    except KeyboardInterrupt:
        if step > start and int(state.step) == step:
            ckpt.save(step, state, data.get_state())  # nothing lost on Ctrl-C
        raise
    finally:
        ckpt.close()
        logger.close()
        if bar is not None:
            bar.close()
    if preempt.signal_received is not None and main:
        print(f"preempted (signal {preempt.signal_received}): checkpoint saved at step {step} in "
              f"{ckpt.directory}; run the same command again to resume", file=sys.stderr)
    return rows
