"""The one training loop under every task: pretraining (dsjax.train.trainer), SFT (dsjax.rl.sft),
GRPO (dsjax.rl.grpo_trainer) and distillation (SFT on teacher samples).

A task supplies its loss, its batches and its logging (`Task`); the engine owns the rest:
  multi-host start-up (dsjax.parallel.distributed) -> the mesh, state and batch placement
  -> the jitted step (dsjax.train.step.make_step: accumulation, AdamW, balancing bias, NaN guard)
  -> the loop: batch -> step(s) -> NaN policy -> log row (+ eval) -> metrics.jsonl / TensorBoard /
     progress bar (process 0 only) -> Orbax checkpoint (all processes, collectively)
  -> exact resume from the newest restorable checkpoint (state + the task's data state).
Around it, for every task: one trainer per workdir (dsjax.train.workdir_lock), the run config's
changes on resume classed free/schedule/fixed (dsjax.train.resume), and SIGTERM saving the current
step (dsjax.train.preemption).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from dsjax.config import ConfigError
from dsjax.train.checkpointing import Checkpointer, abstract_of
from dsjax.train.config import RunConfig, to_yaml
from dsjax.train.metrics import MetricsLogger
from dsjax.train.preemption import PreemptionWatch
from dsjax.train.resume import check_workdir_config, resume_lines
from dsjax.train.step import init_state, jit_step, make_step
from dsjax.train import workdir_io
from dsjax.train.workdir_lock import hold_workdir


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss under nan_policy=stop)."""


class Task:
    """What a training task supplies. Subclasses set `cfg` (a RunConfig whose `model` is the model
    being trained) and `name`, and override `loss` and `next_batch`; the rest has defaults."""

    name = "train"
    cfg: RunConfig
    eval_at_start = False  # also evaluate before the first step of a fresh run

    def loss(self, params, batch) -> tuple[Any, dict]:
        """(scalar loss, metrics) of a whole batch; pure and jittable."""
        raise NotImplementedError

    split_loss: Callable | None = None  # see dsjax.train.step.make_step (None: a mean over rows)

    def start(self, run: "Run") -> None:
        """Called once the mesh is set up, before the state is restored (build data iterators here)."""

    def next_batch(self, step: int, state) -> dict:
        """The host's rows of the batch of loop step `step` (1-based): numpy or placed arrays."""
        raise NotImplementedError

    def data_state(self, step: int):
        """JSON-able state of the batch source after `step` (saved with the checkpoint)."""
        return {"step": step}

    def set_data_state(self, data_state) -> None:
        """Restore what data_state returned (batches that are a function of the step need nothing)."""

    def tokens(self, batch) -> float:
        """Tokens trained on in `batch`, for tokens_per_sec."""
        a = batch["tokens"]
        return float(np.prod(a.shape))

    def row(self, step: int, metrics: list[dict], seconds: float, tokens: float) -> dict:
        """The logged row of `step` from the metrics of its updates (host floats), the wall time and
        tokens since the last logged row."""
        row = {"step": step, **{k: v for k, v in metrics[-1].items() if k != "finite"}}
        row["tokens_per_sec"] = tokens / max(seconds, 1e-9)
        return row

    def evaluate(self, params) -> dict:
        """Held-out metrics (added to the row); {} for none."""
        return {}

    def describe(self, row: dict) -> dict:
        """Progress-bar fields of a logged row."""
        return {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}


@dataclasses.dataclass
class Run:
    """What the engine set up for a task: the mesh and the placement functions."""

    mesh: Any  # jax.sharding.Mesh, or None on one device
    place_params: Callable
    place_batch: Callable  # host rows -> global arrays sharded over the batch axes
    host_rows: Callable[[int], slice]  # global batch size -> this process's rows
    main: bool  # process 0: writes logs, metrics and the progress bar
    verbose: bool


def start_runtime() -> None:
    """Before any device is touched: join the other processes of a multi-host run (Cloud TPU pods,
    or JAX_COORDINATOR_ADDRESS set; see dsjax.parallel.distributed). A no-op on one host."""
    from dsjax.parallel import distributed

    distributed.maybe_initialize()


def mesh_setup(cfg: RunConfig, batch_size: int | None, *, verbose: bool = True) -> Run:
    """The mesh of cfg.mesh over every process's devices, and how to place state and batches on it.
    One device (or a mesh whose sizes all multiply to 1, e.g. mesh.fsdp=1): no mesh, everything on the
    first device. `batch_size`: rows per optimiser micro-batch (None: decided per batch)."""
    from dsjax.parallel import distributed
    from dsjax.parallel import mesh as pm

    main = jax.process_index() == 0
    sizes = [getattr(cfg.mesh, a) for a in pm.AXES]
    if len(jax.devices()) == 1 or (-1 not in sizes and int(np.prod(sizes)) == 1):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh: {jax.process_count()} processes need a mesh over their devices; "
                              f"mesh {dict(zip(pm.AXES, sizes))} has one device")
        return Run(None, lambda p: p, lambda b: jax.tree.map(jnp.asarray, b), lambda n: slice(0, n), main, verbose)
    mesh = pm.make_mesh(cfg.mesh)
    if batch_size is not None:
        split = int(np.prod([mesh.shape[a] for a in pm.batch_axes(mesh, batch_size)]))
        want = int(np.prod([mesh.shape[a] for a in pm.batch_axes(mesh)]))
        if split < want and main:
            warnings.warn(f"batch of {batch_size} rows per micro-batch does not divide over the {want} "
                          f"data-parallel shards of mesh {dict(mesh.shape)}; the batch is split {split} ways and "
                          "replicated otherwise")

    def place_params(tree):
        rules = pm.rules_for(cfg.mesh)  # mesh.fsdp_over_dcn: the state is sharded over the slices too
        return jax.device_put(tree, pm.state_shardings(mesh, cfg.model, abstract_of(tree), rules))

    def host_rows(global_rows: int) -> slice:
        return distributed.host_batch_slice(global_rows)

    def place_batch(batch):
        """Host rows -> global arrays: rows split over the batch axes (each process supplies its rows)."""
        def one(a):
            if isinstance(a, jax.Array) and getattr(a.sharding, "mesh", None) == mesh:
                return a  # already placed (e.g. log-probs computed on the mesh)
            a = np.asarray(a)
            rows = a.shape[0] * jax.process_count() if a.ndim else 0
            sh = pm.batch_sharding(mesh, rows // cfg.grad_accum if rows else None) if a.ndim else \
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            return jax.make_array_from_process_local_data(sh, a, (rows,) + a.shape[1:] if a.ndim else ())

        return jax.tree.map(one, batch)

    return Run(mesh, place_params, place_batch, host_rows, main, verbose)


def run(task: Task, workdir: str, params, *, stop_after: int | None = None, verbose: bool = True,
        batch_size: int | None = None) -> tuple[Any, list[dict]]:
    """Train (or resume) `task` in `workdir` from `params` -> (final TrainState, logged rows of this call).

    stop_after: checkpoint and return after this step (a planned interruption); running again resumes
    exactly where it stopped. `params` may be a function () -> params (built under the mesh)."""
    cfg = task.cfg
    start_runtime()
    workdir_io.makedirs(workdir)
    with hold_workdir(workdir), PreemptionWatch() as preempt:
        notes = check_workdir_config(workdir, to_yaml(cfg), write=jax.process_index() == 0)
        if jax.process_index() == 0 and cfg.model.fp8:  # whether this backend runs V3's FP8 recipe natively
            from dsjax.model.fp8 import startup_line

            print(startup_line(cfg.model), file=sys.stderr)
        r = mesh_setup(cfg, batch_size, verbose=verbose)
        # The steps get the mesh explicitly (Task.start); it is also set as the current mesh, which
        # Pallas (Mosaic) lowering reads the TPU kind from.
        with jax.set_mesh(r.mesh) if r.mesh is not None else contextlib.nullcontext():
            return _loop(task, workdir, params, r, stop_after, preempt, notes)


def _loop(task: Task, workdir: str, params, r: Run, stop_after, preempt, notes):
    cfg = task.cfg
    task.start(r)
    params = params() if callable(params) else params
    # A copy on one device: the step donates its input buffers, which the caller's params may share.
    state = r.place_params(init_state(jax.tree.map(jnp.copy, params) if r.mesh is None else params, cfg))
    ckpt = Checkpointer(workdir_io.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpointing)
    start = 0
    restored = ckpt.restore(abstract_of(state))
    if restored is not None:
        start, state, dstate = restored
        task.set_data_state(dstate)
        if r.main and r.verbose:
            print(f"{task.name}: resumed from {ckpt.directory}/{start}", file=sys.stderr)
            for line in resume_lines(notes, start):
                print(line, file=sys.stderr)
    logger = MetricsLogger(workdir, start, enabled=r.main)
    step_fn = jit_step(make_step(cfg, cfg.model, task.loss, task.split_loss), donate_argnums=0)
    bar = None
    if r.main and r.verbose and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=task.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    rows: list[dict] = []

    def log(row):
        logger.log(row)
        rows.append(row)
        if bar is not None:
            bar.set_postfix(task.describe(row))

    if start == 0 and task.eval_at_start:
        log({"step": 0, **task.evaluate(state.params)})
    t0, toks, step, pending = time.perf_counter(), 0.0, start, []
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = r.place_batch(task.next_batch(step, state))
            for _ in range(cfg.updates_per_step):
                state, m = step_fn(state, batch)
                pending.append(m)
                if not bool(m["finite"]):
                    msg = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                           f"grad_norm={float(m['grad_norm'])})")
                    if cfg.nan_policy == "stop":
                        raise TrainingError(msg + "; stopping (set nan_policy=skip to skip such batches)")
                    warnings.warn(msg + "; batch skipped, parameters unchanged")
            toks += task.tokens(batch)
            evaluate = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate:
                got = [{k: float(v) for k, v in x.items() if np.ndim(v) == 0} for x in jax.device_get(pending)]
                row = task.row(step, got, time.perf_counter() - t0, toks)
                if evaluate:
                    row.update(task.evaluate(state.params))
                log(row)
                t0, toks = time.perf_counter(), 0.0
            pending = []
            if bar is not None:
                bar.update(1)
            stop = step == stop_after or preempt.should_stop(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                logger.flush()  # (an object store's metrics.jsonl: every row up to a checkpoint is kept)
                ckpt.save(step, state, task.data_state(step))
            if stop:
                break
    except KeyboardInterrupt:
        if step > start and int(state.step) == step * cfg.updates_per_step:
            ckpt.save(step, state, task.data_state(step))  # nothing lost on Ctrl-C
        raise
    finally:
        ckpt.close()
        logger.close()
        if bar is not None:
            bar.close()
    if preempt.signal_received is not None:  # every process: on a pod each host has its own log
        print(f"preempted (signal {preempt.signal_received}): checkpoint saved at step {step} in "
              f"{ckpt.directory}; run the same command again to resume", file=sys.stderr)
    return state, rows
