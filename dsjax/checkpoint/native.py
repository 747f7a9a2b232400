"""The project's native checkpoint for a model alone: `config.yaml` + an Orbax PyTree of the params.

(Training checkpoints, with optimiser state, live under a run's workdir and are managed by the trainer.)
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import yaml

from dsjax.config import ModelConfig, load_config

MARKER = "dsjax_native.yaml"


def is_native(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def save(params, cfg: ModelConfig, path: str) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(os.path.join(path, "params"), jax.tree.map(np.asarray, params), force=True)
    d = dataclasses.asdict(cfg)
    with open(os.path.join(path, MARKER), "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)


def load(path: str):
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg = load_config(os.path.join(path, MARKER))
    params = ocp.PyTreeCheckpointer().restore(os.path.join(path, "params"))
    return params, cfg
