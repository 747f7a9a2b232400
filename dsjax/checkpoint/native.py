"""The project's native checkpoint for a model alone: `config.yaml` + an Orbax PyTree of the params,
with a checksum per array (checksums.json, see dsjax.train.checksums) verified on load.

(Training checkpoints, with optimiser state, live under a run's workdir and are managed by the trainer.)
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import yaml

from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.config import ModelConfig, load_config
from dsjax.checkpoint import checksums

MARKER = "dsjax_native.yaml"
CHECKSUMS = "checksums.json"


def is_native(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def save(params, cfg: ModelConfig, path: str) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.PyTreeCheckpointer()
    params = jax.tree.map(np.asarray, params)
    ckpt.save(os.path.join(path, "params"), params, force=True)
    with open(os.path.join(path, CHECKSUMS), "w") as f:
        json.dump(checksums.checksums(params), f)
    d = dataclasses.asdict(cfg)
    with open(os.path.join(path, MARKER), "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)


def load(path: str):
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg = load_config(os.path.join(path, MARKER))
    try:
        params = ocp.PyTreeCheckpointer().restore(os.path.join(path, "params"))
    except Exception as e:  # noqa: BLE001 — any unreadable file: name the checkpoint, not Orbax's internals
        raise CheckpointError(f"{path}: checkpoint unreadable ({type(e).__name__}: {str(e)[:300]})") from None
    sums = os.path.join(path, CHECKSUMS)
    if os.path.exists(sums):  # (checkpoints written before checksums existed have none)
        with open(sums) as f:
            bad = checksums.mismatches(params, json.load(f))
        if bad:
            raise CheckpointError(f"{path}: checksum mismatch in {len(bad)} array(s), e.g. {bad[:3]}: the data "
                                  "files changed after the save (corrupt copy or disk)")
    return params, cfg
