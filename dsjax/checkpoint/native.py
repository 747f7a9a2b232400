"""The project's native checkpoint for a model alone: `config.yaml` + an Orbax PyTree of the params,
with a checksum per array (checksums.json, see dsjax.train.checksums) verified on load.

A path is a local directory or a URL (gs://, through dsjax.train.workdir_io and Orbax's own gs:// support),
so a post-training run on a pod writes its final model next to its checkpoints in the bucket.

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
from dsjax.config import ConfigError, ModelConfig, config_from_text
from dsjax.checkpoint import checksums
from dsjax.train import workdir_io

MARKER = "dsjax_native.yaml"
CHECKSUMS = "checksums.json"


def _norm(path) -> str:
    path = os.fspath(path)
    return path if workdir_io.is_url(path) else os.path.abspath(path)


def read_config(yaml_path: str) -> ModelConfig:
    """The model config in a YAML file, local or a URL (a native checkpoint's marker, a workdir's
    run_config.yaml)."""
    try:
        text = workdir_io.read_text(yaml_path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{yaml_path}: cannot read config: {e}") from None
    return config_from_text(text, yaml_path)


def is_native(path: str) -> bool:
    return workdir_io.exists(workdir_io.join(_norm(path), MARKER))


def save(params, cfg: ModelConfig, path: str) -> None:
    """The marker is written last: a directory without it (a crash mid-save) is not taken for a model."""
    import orbax.checkpoint as ocp

    path = _norm(path)
    workdir_io.makedirs(path)
    ckpt = ocp.PyTreeCheckpointer()
    params = jax.tree.map(np.asarray, params)
    ckpt.save(workdir_io.orbax_path(workdir_io.join(path, "params")), params, force=True)
    workdir_io.write_atomic(workdir_io.join(path, CHECKSUMS), json.dumps(checksums.checksums(params)))
    workdir_io.write_atomic(workdir_io.join(path, MARKER), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def load(path: str):
    import orbax.checkpoint as ocp

    path = _norm(path)
    cfg = read_config(workdir_io.join(path, MARKER))
    try:
        params = ocp.PyTreeCheckpointer().restore(workdir_io.orbax_path(workdir_io.join(path, "params")))
    except Exception as e:  # noqa: BLE001 — any unreadable file: name the checkpoint, not Orbax's internals
        raise CheckpointError(f"{path}: checkpoint unreadable ({type(e).__name__}: {str(e)[:300]})") from None
    sums = workdir_io.join(path, CHECKSUMS)
    if workdir_io.exists(sums):  # (checkpoints written before checksums existed have none)
        bad = checksums.mismatches(params, json.loads(workdir_io.read_text(sums)))
        if bad:
            raise CheckpointError(f"{path}: checksum mismatch in {len(bad)} array(s), e.g. {bad[:3]}: the data "
                                  "files changed after the save (corrupt copy or disk)")
    return params, cfg
