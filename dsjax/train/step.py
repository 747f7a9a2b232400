"""The training step as one pure function, shared by every task (pretraining, SFT, GRPO): grads of the
task's loss (with optional accumulation), AdamW, the bias update of auxiliary-loss-free balancing, and
the NaN guard."""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsjax.train.balance import apply_bias_updates, load_max_over_mean
from dsjax.train.loss import loss_fn, token_denominators
from dsjax.train.optim import lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # uint32 key data


# XLA:CPU (jax 0.10-0.11) hands dots, reductions and elementwise fusions to YNNPACK by default. Keeping
# only the reductions there (XLA's own emitters take the dots) ran the cpu_bench train step 1.35-1.40 s
# vs 1.46-1.50 s with the default and 1.37-1.44 s with none (alternating runs); an MLA layer fwd+bwd
# 52 -> 47 ms (none: 58), a MoE layer 122 -> 112-122 ms; tiny at par.
_CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),)


@functools.cache
def compiler_options(backend: str) -> dict | None:
    """XLA options for jitting training steps on `backend` (None: the defaults). Only on CPU, only when
    XLA_FLAGS does not set the option itself, and only when this jaxlib knows it (it is experimental)."""
    opts = dict(_CPU_OPTIONS)
    if backend != "cpu" or any(k in os.environ.get("XLA_FLAGS", "") for k in opts):
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return opts


def jit_step(fn, **kwargs):
    """jax.jit of a training step with this backend's compiler_options."""
    opts = compiler_options(jax.default_backend())
    return jax.jit(fn, **kwargs, **({"compiler_options": dict(opts)} if opts else {}))


def init_state(params, tcfg, seed: int | None = None) -> TrainState:
    tx = make_optimizer(tcfg)
    rng = jax.random.key_data(jax.random.key(tcfg.seed if seed is None else seed))
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), rng)


def mean_split(loss):
    """The default `split_loss` of `make_step`, for a loss that is a mean over equal rows: each of n
    equal micro-batches contributes 1/n of its loss and of every metric."""
    def split(batch, n):
        def micro(params, mb):
            value, m = loss(params, mb)
            return value / n, m
        return micro, None  # None: every metric is averaged

    return split


def make_step(tcfg, model_cfg, loss, split_loss=None):
    """The one training step of every task: step(state, batch) -> (state, metrics).

    loss(params, batch) -> (scalar, metrics) on a whole batch; metrics may hold "expert_load" (routed
    tokens per expert, [moe layers, E]) for the balancing bias update. With tcfg.grad_accum = n > 1 the
    batch's rows are split into n micro-batches and `split_loss(batch, n) -> (micro_loss, averaged)` gives
    a micro-batch loss whose n values add up to the whole batch's (so the summed gradient is the
    one-batch gradient) and the names of the metrics to average instead of add (None: all of them);
    the default is `mean_split(loss)`. Then AdamW (dsjax.train.optim), the bias update, and the NaN
    guard: a non-finite loss or gradient norm leaves the parameters and moments as they were."""
    tx = make_optimizer(tcfg)
    sched = lr_schedule(tcfg)
    n = tcfg.grad_accum
    split_loss = split_loss or mean_split(loss)

    def grads_and_metrics(params, batch):
        if n == 1:
            (_, m), g = jax.value_and_grad(loss, has_aux=True)(params, batch)
            return g, m
        micro_loss, averaged = split_loss(batch, n)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        micro = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), batch)

        def body(acc, mb):
            (_, m), g = grad_fn(params, mb)
            m = {k: (v / n if averaged is None or k in averaged else v) for k, v in m.items()}
            return jax.tree.map(jnp.add, acc, (g, m)), None

        (_, m0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda a: a[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, m0))
        (g, m), _ = jax.lax.scan(body, zeros, micro)
        return g, m

    def train_step(state: TrainState, batch):
        grads, m = grads_and_metrics(state.params, batch)
        gnorm = optax.global_norm(grads)
        load = m.pop("expert_load", None)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return apply_bias_updates(params, load, tcfg.bias_gamma, model_cfg), opt_state

        finite = jnp.isfinite(m["loss"]) & jnp.isfinite(gnorm)
        # A non-finite step leaves params and optimizer state as they were. A cond, not a select per
        # element: that was one more pass over every parameter and moment (25 of 55 ms at cpu_bench).
        params, opt_state = jax.lax.cond(finite, update, lambda *s: s, state.params, state.opt_state)
        new = TrainState(state.step + 1, params, opt_state, state.rng)
        m.update(grad_norm=gnorm, lr=sched(state.step), finite=finite)
        if load is not None:
            m["expert_load_max_over_mean"] = load_max_over_mean(load)
        return new, m

    return train_step


def pretrain_loss(model_cfg, tcfg, mesh=None):
    """Pretraining's (loss, split_loss) for make_step: next-token + MTP + balance (+ z) loss.
    mesh: the mesh the step runs under (None: one device)."""
    lfn = functools.partial(loss_fn, cfg=model_cfg, mtp_lambda=tcfg.mtp_lambda, balance_alpha=tcfg.balance_alpha,
                            z_loss=tcfg.z_loss, mesh=mesh, ce_chunk=tcfg.ce_chunk)

    def split(batch, n):
        # LM/MTP losses are micro-batch sums divided by the whole batch's token counts, and the
        # per-sequence balance loss is weighted 1/n: the micro-batch gradients then add up exactly to
        # the one-batch gradient, however padding falls.
        denoms = token_denominators(batch, model_cfg.num_nextn_predict_layers if tcfg.mtp_lambda > 0 else 0)
        return functools.partial(lfn, balance_alpha=tcfg.balance_alpha / n, denoms=denoms), ("balance_loss",)

    return lfn, split


def make_train_step(model_cfg, tcfg, mesh=None):
    """Pretraining's step: train_step(state, batch) -> (state, metrics); batch arrays are [batch, seq]
    (split into tcfg.grad_accum micro-batches). mesh: the mesh the step runs under (None: one device)."""
    return make_step(tcfg, model_cfg, *pretrain_loss(model_cfg, tcfg, mesh))


def make_eval_step(model_cfg, tcfg, mesh=None):
    def eval_step(params, batch):
        _, m = loss_fn(params, batch, model_cfg, mtp_lambda=tcfg.mtp_lambda, balance_alpha=0.0, z_loss=0.0,
                       mesh=mesh)
        return {"loss": m["lm_loss"] * m["tokens"], "tokens": m["tokens"]}

    return eval_step
