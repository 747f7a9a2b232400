"""Import and export of HF-layout checkpoints (config.json + safetensors, single or sharded).

Import accepts the HF layout and the official DeepSeek FP8 layout (float8_e4m3fn weights with a float32
`NAME_scale_inv` per 128x128 block, dequantised on load), including the MTP layer stored as layer index
`num_hidden_layers`. Both directions stream tensor by tensor: peak host memory stays near one copy of
the parameters.
"""
from __future__ import annotations

import glob
import json
import os
import re
import warnings

import jax
import numpy as np

from dsjax.checkpoint.hf_names import Entry, hf_entries, hf_shape
from dsjax.checkpoint.safetensors_io import (PICKLE_SUFFIXES, CheckpointError, SafetensorsFile, check_finite,
                                             require_regular_file, write_safetensors)
from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.model.params import abstract_params

INDEX = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"  # MTP weights kept outside the index so HF sees no unexpected keys


def _tensor_files(path: str) -> dict[str, str]:
    """name -> file for every tensor of the checkpoint in directory `path`."""
    idx = os.path.join(path, INDEX)
    files: list[str]
    if os.path.exists(idx):
        require_regular_file(idx)
        try:
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            files = sorted(set(wm.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{idx}: malformed index: {e}") from None
        root = os.path.realpath(path)
        for fn in files:
            # Shards live in the checkpoint directory: no absolute paths, no '..', no symlink out of it.
            if (not isinstance(fn, str) or os.path.isabs(fn) or os.path.dirname(fn)
                    or os.path.dirname(os.path.realpath(os.path.join(path, fn))) != root):
                raise CheckpointError(f"{idx}: shard path {fn!r} is outside the checkpoint directory {path}; refused")
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"{idx}: lists shard {fn}, which is missing from {path}")
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if os.path.exists(os.path.join(path, MTP_FILE)) and MTP_FILE not in files:
        files.append(MTP_FILE)
    if not files:
        pickles = [p for p in os.listdir(path) if p.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(f"{os.path.join(path, pickles[0])}: pickle-based checkpoints are refused "
                                  "(unpickling can run arbitrary code); convert to safetensors")
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX}")
    where: dict[str, str] = {}
    for fn in files:
        full = os.path.join(path, fn)
        for k in SafetensorsFile(full).keys():
            where[k] = full
    return where


def _dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str, file: str) -> np.ndarray:
    out_d, in_d = w.shape
    want = (-(-out_d // block[0]), -(-in_d // block[1]))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{file}: tensor {name}_scale_inv has shape {tuple(scale_inv.shape)}, "
                              f"expected {want} for weight {w.shape} at block {block}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)[:out_d, :in_d]
    return w.astype(np.float32) * s


def _read_config(path: str) -> tuple[ModelConfig, dict]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    require_regular_file(cfg_path)
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: invalid JSON: {e}") from None
    return load_config(cfg_path), raw


def load_hf(path: str, cfg: ModelConfig | None = None, param_dtype: str | None = None, *,
            allow_nonfinite: bool = False) -> tuple[dict, ModelConfig]:
    """Read an HF-layout checkpoint directory into (params as numpy arrays, config). A tensor holding
    NaN or Inf is refused, naming it, unless allow_nonfinite."""
    raw = {}
    if cfg is None:
        cfg, raw = _read_config(path)
    if param_dtype:
        cfg = cfg.replace(param_dtype=param_dtype)
    qc = raw.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    where = _tensor_files(path)
    mtp_prefix = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(cfg.num_nextn_predict_layers))
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in where):
        warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP weights (HF transformers drops them); MTP disabled")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    entries = hf_entries(cfg)
    abstract = abstract_params(cfg)
    dt = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    params = jax.tree.map(lambda a: np.zeros(a.shape, dt), abstract)
    expected = {e.name for e in entries}
    missing = [e.name for e in entries if e.name not in where and not e.copy_of_shared]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}")
    unexpected = [k for k in where if k not in expected and not (k.endswith("_scale_inv") and k[:-10] in expected)]
    if unexpected:
        raise CheckpointError(f"{where[unexpected[0]]}: unexpected tensor(s) for this config, e.g. {unexpected[:3]}")
    handles: dict[str, SafetensorsFile] = {}

    def read(name: str) -> np.ndarray:
        f = where[name]
        h = handles.get(f) or handles.setdefault(f, SafetensorsFile(f))
        return h.get(name)

    for e in entries:
        if e.copy_of_shared:
            continue
        leaf = _leaf(params, e.path)
        want = hf_shape(e, leaf.shape)
        f = handles.get(where[e.name]) or handles.setdefault(where[e.name], SafetensorsFile(where[e.name]))
        got = f.shape(e.name)
        if got != want:
            raise CheckpointError(f"{where[e.name]}: tensor {e.name} has shape {list(got)}, config expects {list(want)}")
        w = read(e.name)
        if w.dtype in (np.dtype("float8_e4m3fn"), np.dtype("float8_e5m2")):
            sname = e.name + "_scale_inv"
            if sname not in where:
                raise CheckpointError(f"{where[e.name]}: FP8 tensor {e.name} has no {sname}")
            w = _dequantize(w, read(sname), block, e.name, where[e.name])
        elif w.dtype.kind not in "f" and w.dtype != np.dtype("bfloat16"):
            raise CheckpointError(f"{where[e.name]}: tensor {e.name} has unsupported dtype {w.dtype}")
        if not allow_nonfinite:
            check_finite(e.name, w, where[e.name])
        leaf[e.index] = (w.T if e.transpose else w).astype(dt)
    return params, cfg


def _leaf(params, path):
    for k in path:
        params = params[k]
    return params


def _parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", s.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {s!r} (e.g. '5GB', '500MB', or bytes)")
    mult = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def save_hf(params: dict, cfg: ModelConfig, path: str, *, max_shard_size="5GB", dtype: str | None = None,
            mtp_layout: str = "separate") -> None:
    """Write config.json, model-0000i-of-0000N.safetensors shards and model.safetensors.index.json.

    mtp_layout: "separate" keeps the MTP layer (index num_hidden_layers) in mtp.safetensors, outside the
    index, so HF transformers (which has no MTP) loads with no unexpected keys while dsjax still finds it;
    "index" lists it in the index like the official release (for vLLM/SGLang); "none" drops it.
    """
    if mtp_layout not in ("separate", "index", "none"):
        raise ValueError(f"mtp_layout must be separate, index or none; got {mtp_layout!r}")
    os.makedirs(path, exist_ok=True)
    out_dt = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    entries = hf_entries(cfg, include_mtp=mtp_layout != "none")
    mtp_prefix = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(cfg.num_nextn_predict_layers))
    main = [e for e in entries if mtp_layout == "index" or not e.name.startswith(mtp_prefix)]
    mtp = [e for e in entries if mtp_layout == "separate" and e.name.startswith(mtp_prefix)]
    limit = _parse_size(max_shard_size)

    def shape_of(e: Entry):
        return hf_shape(e, _leaf(params, e.path).shape)

    def nbytes(e):
        return int(np.prod(shape_of(e))) * out_dt.itemsize

    shards: list[list[Entry]] = [[]]
    size = 0
    for e in main:
        if shards[-1] and size + nbytes(e) > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        _write_entries(params, os.path.join(path, fn), shard, out_dt, shape_of)
        for e in shard:
            weight_map[e.name] = fn
            total += nbytes(e)
    if mtp:
        _write_entries(params, os.path.join(path, MTP_FILE), mtp, out_dt, shape_of)
    elif os.path.exists(os.path.join(path, MTP_FILE)):
        os.remove(os.path.join(path, MTP_FILE))
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dt.name]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


def _write_entries(params, file, entries, out_dt, shape_of):
    def gen():
        for e in entries:
            a = np.asarray(jax.device_get(_leaf(params, e.path)[e.index] if e.index else _leaf(params, e.path)))
            yield e.name, (a.T if e.transpose else a)

    write_safetensors(file, gen(), {e.name: shape_of(e) for e in entries}, {e.name: out_dt for e in entries},
                      {"format": "pt"})
