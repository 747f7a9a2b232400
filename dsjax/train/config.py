"""The run configuration: training hyper-parameters + the model, data and mesh sections.

A run YAML has top-level training fields and `model:` (a config name/path, or an inline mapping with an
optional `base:` name plus field overrides), `data:` and `mesh:` mappings. Command-line overrides are
`key=value` (training fields) or `model.key=value`, `data.key=value`, `mesh.key=value`.
Unknown keys anywhere are errors naming the key; numeric fields are range-checked on load.

Resuming a workdir with a changed field: bookkeeping and mesh fields change freely, optimiser/loss
hyper-parameters and `steps` apply from the resumed step, architecture, seed, batch_size, seq_len,
moment_dtype and the data source are refused (the classes are in dsjax.train.resume).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import yaml

from dsjax.config import ConfigError, ModelConfig, apply_overrides, load_config, parse_override


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    # optimiser (V3: AdamW 0.9/0.95, wd 0.1, clip 1.0)
    lr: float = 3e-3
    warmup_steps: int = 20
    decay_start_fraction: float = 0.67  # V3: constant until 10T of 14.8T tokens
    decay_end_fraction: float = 0.96  # cosine over the next 4.3T tokens
    final_lr_ratio: float = 0.1  # 2.2e-4 -> 2.2e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Adam moments: float32 | bfloat16 | auto (resolved on construction: bfloat16 under model.fp8, as in
    # V3's FP8 recipe, else float32)
    moment_dtype: str = "auto"
    grad_accum: int = 1
    # losses and balancing
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    z_loss: float = 0.0
    bias_gamma: float = 0.001
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 2
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    nan_policy: str = "stop"  # stop | skip
    peak_flops: float = 0.0  # per device; 0 = measure (CPU) or look up (TPU/GPU)
    progress: bool = True
    # sections
    model: ModelConfig = dataclasses.field(default_factory=lambda: load_config("tiny"))
    data: Any = None  # DataConfig
    mesh: Any = None  # MeshConfig

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"train config field '{field}': {msg}")

        if self.data is None:
            from dsjax.train.data import DataConfig

            object.__setattr__(self, "data", DataConfig())
        if self.mesh is None:
            from dsjax.parallel.mesh import MeshConfig

            object.__setattr__(self, "mesh", MeshConfig())

        for f in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("seed", "warmup_steps", "eval_batches"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, f, f"must be an integer >= 0, got {getattr(self, f)!r}")
        for f, lo, lo_open, hi in (("lr", 0, False, None), ("eps", 0, True, None), ("weight_decay", 0, False, None),
                                   ("clip_norm", 0, False, None), ("final_lr_ratio", 0, False, 1), ("b1", 0, False, 1),
                                   ("b2", 0, False, 1), ("mtp_lambda", 0, False, None), ("balance_alpha", 0, False, None),
                                   ("z_loss", 0, False, None), ("bias_gamma", 0, False, None), ("peak_flops", 0, False, None)):
            v = getattr(self, f)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
            need(ok and (hi is None or v <= hi) and not (f in ("b1", "b2") and v == 1), f,
                 f"must be a finite number {'>' if lo_open else '>='} {lo}" + (f" and < {hi}" if f in ("b1", "b2") else
                                                                               f" and <= {hi}" if hi else "") + f", got {v!r}")
        for f in ("async_checkpointing", "progress"):
            need(isinstance(getattr(self, f), bool), f, f"must be true or false, got {getattr(self, f)!r}")
        need(self.nan_policy in ("stop", "skip"), "nan_policy", f"must be stop or skip, got {self.nan_policy!r}")
        if self.moment_dtype == "auto":
            object.__setattr__(self, "moment_dtype", "bfloat16" if self.model.fp8 else "float32")
        need(self.moment_dtype in ("float32", "bfloat16"), "moment_dtype",
             f"must be float32, bfloat16 or auto, got {self.moment_dtype!r}")
        need(0 <= self.decay_start_fraction <= self.decay_end_fraction <= 1, "decay_start_fraction",
             "need 0 <= decay_start_fraction <= decay_end_fraction <= 1")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        need(self.seq_len <= self.model.max_position_embeddings, "seq_len",
             f"{self.seq_len} exceeds model.max_position_embeddings {self.model.max_position_embeddings}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "data", "mesh"}


def _data_config(d: Mapping[str, Any] | None):
    from dsjax.train.data import DataConfig

    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(DataConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ConfigError(f"unknown data config field(s) {['data.' + b for b in bad]}")
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(v)
    return DataConfig(**d)


def _mesh_config(d: Mapping[str, Any] | None):
    from dsjax.parallel.mesh import MeshConfig

    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(MeshConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ConfigError(f"unknown mesh config field(s) {['mesh.' + b for b in bad]}")
    return MeshConfig(**d)


def _model_config(m, base_dir: str) -> ModelConfig:
    if m is None:
        return load_config("tiny")
    if isinstance(m, str):
        cand = os.path.join(base_dir, m)
        return load_config(cand if os.path.exists(cand) else m)
    if isinstance(m, Mapping):
        m = dict(m)
        base = m.pop("base", None)
        if base is not None:
            return apply_overrides(_model_config(base, base_dir), m)
        from dsjax.config import config_from_dict

        return config_from_dict(m, where="model")
    raise ConfigError(f"model: expected a config name/path or a mapping, got {type(m).__name__}")


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a run YAML (None = the embedded default) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    base_dir = os.getcwd()
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        base_dir = os.path.dirname(os.path.abspath(path))
        if "train" not in raw and "model" not in raw and "vocab_size" in raw:
            raw = {"model": os.path.abspath(path)}  # a bare model config: train it with default settings
    raw = dict(raw)
    model_raw, data_raw, mesh_raw = raw.pop("model", None), dict(raw.pop("data", None) or {}), dict(raw.pop("mesh", None) or {})
    train_raw = dict(raw.pop("train", None) or {})
    train_raw.update(raw)
    model_over: list[str] = []
    for o in overrides:
        k, v = parse_override(o)
        if k.startswith("model."):
            model_over.append(o[len("model."):])
        elif k.startswith("data."):
            data_raw[k[5:]] = v
        elif k.startswith("mesh."):
            mesh_raw[k[5:]] = v
        elif k in _TRAIN_FIELDS:
            train_raw[k] = v
        else:
            raise ConfigError(f"unknown config key '{k}' (training fields: {', '.join(sorted(_TRAIN_FIELDS))}; "
                              "or model.*, data.*, mesh.*)")
    bad = sorted(set(train_raw) - _TRAIN_FIELDS)
    if bad:
        raise ConfigError(f"{path or 'train config'}: unknown config key(s) {bad}")
    model = _model_config(model_raw, base_dir)
    if model_over:
        model = apply_overrides(model, model_over)
    for k in ("lr", "eps", "weight_decay", "clip_norm", "mtp_lambda", "balance_alpha", "z_loss", "bias_gamma",
              "b1", "b2", "final_lr_ratio", "decay_start_fraction", "decay_end_fraction", "peak_flops"):
        if k in train_raw and not isinstance(train_raw[k], bool):
            try:
                train_raw[k] = float(train_raw[k])
            except (TypeError, ValueError):
                raise ConfigError(f"train config field '{k}': expected a number, got {train_raw[k]!r}") from None
    try:
        return TrainConfig(model=model, data=_data_config(data_raw), mesh=_mesh_config(mesh_raw), **train_raw)
    except TypeError as e:
        raise ConfigError(f"train config: {e}") from None


def to_yaml(cfg: TrainConfig) -> str:
    d = dataclasses.asdict(cfg)
    return yaml.safe_dump(d, sort_keys=False)
