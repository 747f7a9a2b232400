"""AdamW with V3's schedule (warm-up, constant, cosine, floor), global-norm clipping, optional bf16
moments, no weight decay on norms, and the balancing bias frozen (it moves by its own rule)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsjax.model.params import is_spec, param_specs


def lr_schedule(tcfg) -> optax.Schedule:
    """Linear warm-up to lr, constant to decay_start, cosine to lr*final_lr_ratio by decay_end, then flat.
    The fractions are of the run's optimiser updates (`optimizer_steps`: steps x updates per step)."""
    total = tcfg.optimizer_steps
    warm = min(tcfg.warmup_steps, total)
    start = max(int(total * tcfg.decay_start_fraction), warm)
    end = max(int(total * tcfg.decay_end_fraction), start)
    peak, final = tcfg.lr, tcfg.lr * tcfg.final_lr_ratio
    return optax.join_schedules([
        optax.linear_schedule(0.0 if warm else peak, peak, max(warm, 1)),
        optax.constant_schedule(peak),
        optax.cosine_decay_schedule(peak, max(end - start, 1), alpha=tcfg.final_lr_ratio),
        optax.constant_schedule(final),
    ], [warm, start, end])


class ScaleByAdamState(NamedTuple):
    count: jnp.ndarray
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
    """Adam with both moments stored in `moment_dtype` (V3 keeps them in bf16); math in float32."""
    dt = jnp.dtype(moment_dtype)

    def init(params):
        z = jax.tree.map(lambda p: jnp.zeros(p.shape, dt), params)
        return ScaleByAdamState(jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.copy, z))

    def update(g, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, x: b1 * m.astype(jnp.float32) + (1 - b1) * x.astype(jnp.float32), state.mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(x.astype(jnp.float32)),
                          state.nu, g)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        upd = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda t: jax.tree.map(lambda a: a.astype(dt), t)
        return upd, ScaleByAdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def _labels(model_cfg):
    """'frozen' for the balancing bias, 'no_decay' for norms, 'decay' for every matrix."""
    def lab(path, spec):
        if path[-1].key == "e_score_correction_bias":
            return "frozen"
        return "no_decay" if spec.init == "ones" else "decay"

    return jax.tree_util.tree_map_with_path(lab, param_specs(model_cfg), is_leaf=is_spec)


def make_optimizer(tcfg) -> optax.GradientTransformation:
    sched = lr_schedule(tcfg)
    adam = scale_by_adam(tcfg.b1, tcfg.b2, tcfg.eps, tcfg.moment_dtype)

    # The state tree must not depend on the values of weight_decay or clip_norm (a run may resume with
    # other values): a switched-off stage is an identity with the same (empty) state, not a missing one.
    # (The layouts are those of the default config, so its earlier checkpoints still restore.)
    decay = optax.add_decayed_weights(tcfg.weight_decay) if tcfg.weight_decay else optax.identity()
    inner = optax.multi_transform(
        {"decay": optax.chain(adam, decay, optax.scale_by_learning_rate(sched)),
         "no_decay": optax.chain(adam, optax.scale_by_learning_rate(sched)), "frozen": optax.set_to_zero()},
        _labels(tcfg.model))
    clip = optax.clip_by_global_norm(tcfg.clip_norm) if tcfg.clip_norm else optax.identity()
    return optax.chain(clip, inner)
