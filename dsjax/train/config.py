"""Run configurations and their one loader.

`RunConfig` holds what every training run shares (steps, seed, the optimiser, the NaN policy,
accumulation, logging and checkpoint cadence, the mesh and the model); `TrainConfig` (pretraining) and
the post-training configs (`dsjax.rl.sft.SFTConfig`, `dsjax.rl.grpo_trainer.GRPOConfig`, and
`dsjax.rl.distill.DistillConfig`, which nests an SFT run) subclass it, adding their task's fields and
re-declaring only the defaults that differ.

A run YAML has top-level fields, `model:` (a config name/path, or a mapping with an optional `base:`
name plus field overrides) and nested sections (`data:`, `mesh:`, distill's `sft:`). Command-line
overrides are `key=value`, `model.key=value` or `section.key=value`. Values are cast to the field's
declared type (YAML reads `1e-3` as a string). Unknown keys anywhere are errors naming the key;
numeric fields are range-checked on load.

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


def _mesh_default():
    from dsjax.parallel.mesh import MeshConfig

    return MeshConfig()


def _data_default():
    from dsjax.train.data import DataConfig

    return DataConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The fields every training task shares; read by `dsjax.train.engine` and `dsjax.train.optim`."""

    steps: int = 300
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
    grad_accum: int = 1  # micro-batches per optimiser step (the batch is split along its rows)
    bias_gamma: float = 0.001  # aux-loss-free balancing bias update speed (0 = frozen)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    nan_policy: str = "stop"  # stop | skip
    progress: bool = True
    # sections
    mesh: Any = dataclasses.field(default_factory=_mesh_default)  # dsjax.parallel.mesh.MeshConfig
    model: ModelConfig = dataclasses.field(default_factory=lambda: load_config("tiny"))

    def __post_init__(self):
        self.check_positive("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints")
        self.check_ranges(("seed", "warmup_steps"), (("lr", 0, False, None), ("eps", 0, True, None),
                          ("weight_decay", 0, False, None), ("clip_norm", 0, False, None),
                          ("final_lr_ratio", 0, False, 1), ("b1", 0, False, 1), ("b2", 0, False, 1),
                          ("bias_gamma", 0, False, None)), ("async_checkpointing", "progress"))
        need = self.need
        need(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every",
             f"must be a non-negative integer, got {self.eval_every!r}")
        need(self.nan_policy in ("stop", "skip"), "nan_policy", f"must be stop or skip, got {self.nan_policy!r}")
        if self.moment_dtype == "auto":
            object.__setattr__(self, "moment_dtype", "bfloat16" if self.model.fp8 else "float32")
        over_dcn = bool(getattr(self.mesh, "fsdp_over_dcn", False))
        if self.model.fsdp_over_dcn != over_dcn:  # the model's copy of the mesh's state layout
            object.__setattr__(self, "model", self.model.replace(fsdp_over_dcn=over_dcn))
        need(self.moment_dtype in ("float32", "bfloat16"), "moment_dtype",
             f"must be float32, bfloat16 or auto, got {self.moment_dtype!r}")
        need(0 <= self.decay_start_fraction <= self.decay_end_fraction <= 1, "decay_start_fraction",
             "need 0 <= decay_start_fraction <= decay_end_fraction <= 1")

    @property
    def updates_per_step(self) -> int:
        """Optimiser updates per loop step (GRPO takes several on one batch of rollouts)."""
        return 1

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.updates_per_step

    def need(self, cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{type(self).__name__} field '{field}': {msg}")

    def check_positive(self, *names: str) -> None:
        check_positive(self, names)

    def check_ranges(self, counts=(), numbers=(), flags=()) -> None:
        """counts: integers >= 0; numbers: (field, lo, lo_open, hi) finite, above lo, at most hi (b1/b2
        below 1); flags: booleans."""
        for f in counts:
            v = getattr(self, f)
            self.need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, f"must be an integer >= 0, got {v!r}")
        for f, lo, lo_open, hi in numbers:
            v = getattr(self, f)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
            self.need(ok and (hi is None or v <= hi) and not (f in ("b1", "b2") and v == 1), f,
                      f"must be a finite number {'>' if lo_open else '>='} {lo}" + (f" and < {hi}" if f in ("b1", "b2") else
                                                                                    f" and <= {hi}" if hi else "") + f", got {v!r}")
        for f in flags:
            self.need(isinstance(getattr(self, f), bool), f, f"must be true or false, got {getattr(self, f)!r}")

    def check_rows(self) -> None:
        """For tasks with `batch_size` rows of `seq_len` tokens: both fit the run."""
        self.check_positive("batch_size", "seq_len")
        self.need(self.batch_size % self.grad_accum == 0, "grad_accum",
                  f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        self.need(self.seq_len <= self.model.max_position_embeddings, "seq_len",
                  f"{self.seq_len} exceeds model.max_position_embeddings {self.model.max_position_embeddings}")


def check_positive(cfg, names: Sequence[str]) -> None:
    """ConfigError naming the first field of `cfg` among `names` that is not a positive integer."""
    for f in names:
        v = getattr(cfg, f)
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{type(cfg).__name__} field '{f}': must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """Pretraining: packed documents from `data`, next-token + MTP loss, V3's balancing."""

    batch_size: int = 8
    seq_len: int = 128
    # losses and balancing
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    z_loss: float = 0.0
    # Cross-entropy over sequence chunks of this many tokens, never holding [batch, seq, vocab] float32
    # logits or their gradient (each chunk's logits are recomputed in the backward pass). 0: unchunked.
    ce_chunk: int = 0
    eval_batches: int = 2
    peak_flops: float = 0.0  # per device; 0 = measure (CPU) or look up (TPU/GPU)
    # The documents are split into data_shards streams, each giving batch_size / data_shards rows of every
    # batch; each process reads its own shards (0: one per process). The batches depend on this number,
    # not on how many processes read them.
    data_shards: int = 0
    data: Any = dataclasses.field(default_factory=_data_default)  # dsjax.train.data.DataConfig

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("eval_every")
        self.check_rows()
        self.need(self.data_shards == 0 or self.batch_size % (self.data_shards * self.grad_accum) == 0, "data_shards",
                  f"batch_size {self.batch_size} is not divisible by data_shards {self.data_shards} x grad_accum "
                  f"{self.grad_accum}")
        self.check_ranges(("eval_batches", "ce_chunk", "data_shards"),
                          (("mtp_lambda", 0, False, None), ("balance_alpha", 0, False, None),
                           ("z_loss", 0, False, None), ("peak_flops", 0, False, None)))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


# ------------------------------------------------------------------------------------------ loading

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


def _coerce(cls, name: str, value, where: str):
    """YAML gives ints for '1' and strings for '1e-3': cast to the field's declared scalar type."""
    t = str({x.name: x for x in dataclasses.fields(cls)}[name].type)
    if value is None:
        return None
    if t.startswith("float") and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: field '{name}': expected a number, got {value!r}") from None
    if t.startswith("tuple") and isinstance(value, (list, tuple)):
        return tuple(value)
    if t.startswith("tuple") and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _sections(cls) -> dict[str, type]:
    """Nested dataclass sections of `cls` (data, mesh, sft, ...): fields whose default is a dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name != "model" and f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
            if dataclasses.is_dataclass(d):
                out[f.name] = type(d)
    return out


def _build(cls, d: Mapping[str, Any], overrides: Sequence[str], base_dir: str, where: str, prefix: str = "",
           inherited_model: ModelConfig | None = None):
    """cls(**d) after the overrides. A nested run section (distill's `sft:`) takes the parent's model
    (the model being trained is always the top-level `model:` section), so setting it inside is an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    sections = _sections(cls)
    d = dict(d)
    model_raw = d.pop("model", None)
    if inherited_model is not None and (model_raw is not None or any(o.startswith("model.") for o in overrides)):
        raise ConfigError(f"{where}: set the model in the top-level 'model:' section (model.key=value), not here")
    plain = sorted(fields - {"model"} - set(sections))
    model_over: list[str] = []
    sec_raw = {s: dict(d.pop(s, None) or {}) for s in sections}
    sec_over: dict[str, list[str]] = {s: [] for s in sections}
    for o in overrides:
        k, v = parse_override(o)
        head = k.split(".", 1)[0]
        if k.startswith("model.") and "model" in fields:
            model_over.append(o[len("model."):])
        elif head in sections and "." in k:
            sec_over[head].append(o[len(head) + 1:])
        elif k in plain:
            d[k] = v
        else:
            raise ConfigError(f"{where}: unknown config key '{k}' ({prefix}{k}; {cls.__name__} fields: "
                              f"{', '.join(plain)}" + ("; or model.*" if "model" in fields else "")
                              + "".join(f", {s}.*" for s in sections) + ")")
    bad = sorted(set(d) - set(plain))
    if bad:
        raise ConfigError(f"{where}: unknown config key(s) {bad} ({', '.join(prefix + b for b in bad)})")
    kw = {k: _coerce(cls, k, v, where) for k, v in d.items()}
    model = inherited_model
    if "model" in fields and model is None:
        model = _model_config(model_raw, base_dir)
        if model_over:
            model = apply_overrides(model, model_over)
    if "model" in fields:
        kw["model"] = model
    for s, sub in sections.items():
        kw[s] = _build(sub, sec_raw[s], sec_over[s], base_dir, f"{where}: {s}", f"{prefix}{s}.",
                       model if "model" in {f.name for f in dataclasses.fields(sub)} else None)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: str) -> dict:
    """A YAML mapping from a local path or a URL (a gs:// workdir's run_config.yaml)."""
    from dsjax.train import workdir_io

    if not workdir_io.exists(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        d = yaml.safe_load(workdir_io.read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return d


def load_run_config(cls, path: str | None, overrides: Sequence[str] = (), *, raw: Mapping[str, Any] | None = None):
    """Read a run YAML (None = the class defaults, or `raw`) into `cls` and apply `key=value` /
    `model.key=value` / `section.key=value` overrides."""
    d: dict[str, Any] = dict(raw or {})
    base_dir = os.getcwd()
    if path is not None:
        d = _read_yaml(path)
        base_dir = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))
        if cls is TrainConfig and "train" not in d and "model" not in d and "vocab_size" in d:
            d = {"model": os.path.abspath(path)}  # a bare model config: train it with default settings
    if "train" in d and "train" not in {f.name for f in dataclasses.fields(cls)}:
        d = {**dict(d.pop("train") or {}), **d}  # a `train:` mapping holds top-level fields
    where = path or ("train config" if cls is TrainConfig else cls.__name__)
    return _build(cls, d, list(overrides), base_dir, where)


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a pretraining run YAML (None = the embedded default) and apply `key=value` overrides."""
    return load_run_config(TrainConfig, path, overrides)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
