"""Auxiliary-loss-free load balancing (V3): after each step, for every MoE layer,
`b_i += gamma * sign(mean_load - load_i)`, outside the gradient."""
from __future__ import annotations

import jax.numpy as jnp


def update_bias(bias: jnp.ndarray, load: jnp.ndarray, gamma: float) -> jnp.ndarray:
    """bias, load [layers, E] -> the new bias (underloaded experts up, overloaded down)."""
    mean = load.mean(axis=-1, keepdims=True)
    return bias + gamma * jnp.sign(mean - load).astype(bias.dtype)


def apply_bias_updates(params: dict, expert_load: jnp.ndarray, gamma: float, model_cfg) -> dict:
    """expert_load [moe layers (+ MoE MTP layers), E], in the order loss_fn stacks them."""
    if gamma == 0 or expert_load is None:
        return params
    params = dict(params)
    n = model_cfg.num_moe_layers
    groups = [("moe_layers", 0, n)]
    if model_cfg.num_nextn_predict_layers and model_cfg.mtp_is_moe and "mtp_layers" in params:
        groups.append(("mtp_layers", n, n + model_cfg.num_nextn_predict_layers))
    for name, lo, hi in groups:
        if name not in params or hi <= lo or expert_load.shape[0] < hi:
            continue
        g = dict(params[name])
        mlp = dict(g["mlp"])
        gate = dict(mlp["gate"])
        gate["e_score_correction_bias"] = update_bias(gate["e_score_correction_bias"], expert_load[lo:hi], gamma)
        mlp["gate"] = gate
        g["mlp"] = mlp
        params[name] = g
    return params


def load_max_over_mean(expert_load: jnp.ndarray) -> jnp.ndarray:
    """max_i load_i / mean load, averaged over layers: 1.0 is perfectly balanced."""
    return jnp.mean(expert_load.max(-1) / jnp.maximum(expert_load.mean(-1), 1e-9))
