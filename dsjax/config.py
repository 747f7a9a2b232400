"""Model configuration: one frozen dataclass with every field of a DeepSeek-V3 `config.json`.

Loadable from the project's YAML files (`configs/*.yaml`, or the copies packaged under
`dsjax/configs/`), from a Hugging Face `config.json`, and overridable with `key=value` strings.
Everything is validated on construction; errors name the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import yaml

# model.remat_policy values (what each keeps: dsjax.model.remat)
REMAT_POLICIES = ("none", "full", "dots_saveable", "offload_inputs")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` / `rope_parameters` in HF configs)."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- fields of a DeepSeek-V3 config.json (HF names) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    model_type: str = "deepseek_v3"
    # --- dsjax-only fields ---
    init_std: float = 0.006  # V3 report, not HF's initializer_range
    dtype: str = "float32"  # compute dtype of matmuls: float32 | bfloat16
    param_dtype: str = "float32"  # master weights
    moe_impl: str = "blocked"  # blocked | ragged_dot | dense | pallas
    moe_block_size: int = 64  # rows per expert block in the blocked / pallas paths
    attention_impl: str = "xla"  # xla | pallas
    kernel_interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)
    remat_policy: str = "none"  # none | full | dots_saveable | offload_inputs (dsjax.model.remat)
    # Layers per scan iteration (lax.scan's unroll). 1 keeps compile time flat in depth; unrolling a
    # small model's stack lets XLA:CPU skip the per-iteration residual stacking (cpu_bench: -26% step).
    scan_unroll: int = 1
    # DeepSeek-V3's FP8 recipe for the dense projections and expert matmuls (dsjax.model.fp8), and
    # how it runs: auto (native where the device has FP8 units, else emulated) | emulated | native.
    # The experts' grouped products run natively only with moe_impl pallas (the Pallas FP8 kernels,
    # CUDA) or blocked (FP8 dots per block); moe_impl ragged_dot's are always emulated.
    fp8: bool = False
    fp8_impl: str = "auto"
    # Expert parallelism: rows each device receives per dispatch round, as a multiple of its mean
    # share T*K (T local tokens, top-K). 0: one round into a worst-case buffer of n*T*min(K, E/n) rows.
    # > 0 (e.g. 1.25): a buffer of that many rows, and as many exact rounds as the routing needs.
    ep_capacity_factor: float = 0.0
    # Where the routed experts' weights are stored: split over ("dcn", "fsdp") on the hidden dimension
    # when the run's mesh.fsdp_over_dcn is on, else over "fsdp". The run config sets it from its mesh
    # (dsjax.train.config.RunConfig); the expert-parallel layer gathers each layer's weights over the same
    # axes (else XLA reshards the whole layer stack across the slices in every step of the layer scan).
    fsdp_over_dcn: bool = False

    def __post_init__(self):
        _validate(self)

    # --- derived sizes ---
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def mtp_is_moe(self) -> bool:
        """The MTP block sits at layer index num_hidden_layers, so it is MoE iff that index is."""
        return self.num_hidden_layers >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 times mscale(factor, mscale_all_dim)^2 (HF and the official code)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_hf_dict(self) -> dict:
        """The config.json that HF transformers reads (DeepseekV3Config / DeepseekV2Config)."""
        d = {}
        for f in dataclasses.fields(self):
            if f.name in _DSJAX_ONLY:
                continue
            d[f.name] = getattr(self, f.name)
        rs = self.rope_scaling
        d["rope_scaling"] = None if rs is None else {k: v for k, v in dataclasses.asdict(rs).items() if v is not None}
        if self.model_type == "deepseek_v3":
            d["architectures"] = ["DeepseekV3ForCausalLM"]
        else:
            d["architectures"] = ["DeepseekV2ForCausalLM"]
            d["num_experts"] = self.n_routed_experts
        d["head_dim"] = self.qk_rope_head_dim
        d["torch_dtype"] = "bfloat16" if self.param_dtype == "bfloat16" else "float32"
        return d


# Fields that change how the model runs, not its parameters: a run may resume with other values.
RUNTIME_ONLY = frozenset({"dtype", "moe_impl", "moe_block_size", "attention_impl", "kernel_interpret",
                          "remat_policy", "scan_unroll", "fp8", "fp8_impl", "ep_capacity_factor",
                          "fsdp_over_dcn"})
# Fields HF's config.json does not have.
_DSJAX_ONLY = RUNTIME_ONLY | {"init_std", "param_dtype"}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _validate(c: ModelConfig) -> None:
    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config field '{field}': {msg}")

    for f in dataclasses.fields(c):  # a value of the wrong type (e.g. an override `rope_theta=abc`)
        v, t = getattr(c, f.name), f.type
        if t in ("int", "float") or t in (int, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            need(ok and (isinstance(v, int) or t in ("float", float)), f.name, f"expected a finite {t}, got {v!r}")
        elif t in ("bool", bool):
            need(isinstance(v, bool), f.name, f"expected true or false, got {v!r}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim"):
        v = getattr(c, name)
        need(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
    need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even (rotated in pairs), got {c.qk_rope_head_dim}")
    need(c.q_lora_rank is None or (isinstance(c.q_lora_rank, int) and c.q_lora_rank > 0), "q_lora_rank",
         f"must be null or a positive integer, got {c.q_lora_rank!r}")
    need(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", f"must be >= 0, got {c.num_nextn_predict_layers}")
    need(c.first_k_dense_replace >= 0, "first_k_dense_replace", f"must be >= 0, got {c.first_k_dense_replace}")
    need(c.moe_layer_freq == 1, "moe_layer_freq", f"only 1 is supported (every layer after the dense ones is MoE), got {c.moe_layer_freq}")
    need(c.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {c.hidden_act!r}")
    need(c.scoring_func in ("sigmoid", "softmax"), "scoring_func", f"must be 'sigmoid' or 'softmax', got {c.scoring_func!r}")
    need(c.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
         f"must be one of noaux_tc, greedy, group_limited_greedy; got {c.topk_method!r}")
    if c.num_moe_layers > 0 or c.num_nextn_predict_layers > 0:
        need(c.n_routed_experts > 0, "n_routed_experts", f"must be > 0, got {c.n_routed_experts}")
        need(c.moe_intermediate_size > 0, "moe_intermediate_size", f"must be > 0, got {c.moe_intermediate_size}")
        need(c.n_group >= 1, "n_group", f"must be >= 1, got {c.n_group}")
        need(c.n_routed_experts % c.n_group == 0, "n_routed_experts",
             f"{c.n_routed_experts} is not divisible by n_group={c.n_group}")
        need(1 <= c.topk_group <= c.n_group, "topk_group", f"must be in [1, n_group={c.n_group}], got {c.topk_group}")
        per_group = c.n_routed_experts // c.n_group
        need(1 <= c.num_experts_per_tok <= per_group * c.topk_group, "num_experts_per_tok",
             f"must be in [1, experts in the kept groups = {per_group * c.topk_group}], got {c.num_experts_per_tok}")
        if c.topk_method == "noaux_tc" and c.n_group > 1:
            need(per_group >= 2, "n_group", f"noaux_tc scores a group by its top-2 experts; {per_group} expert(s) per group")
        need(c.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {c.n_shared_experts}")
    if c.num_dense_layers > 0:
        need(c.intermediate_size > 0, "intermediate_size", f"must be > 0, got {c.intermediate_size}")
    need(c.num_key_value_heads == c.num_attention_heads, "num_key_value_heads",
         f"MLA has one latent shared by all heads; HF requires num_key_value_heads == num_attention_heads "
         f"({c.num_attention_heads}), got {c.num_key_value_heads}")
    need(c.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}, got {c.model_type!r}")
    need(c.dtype in ("float32", "bfloat16"), "dtype", f"must be float32 or bfloat16, got {c.dtype!r}")
    need(c.param_dtype in ("float32", "bfloat16"), "param_dtype", f"must be float32 or bfloat16, got {c.param_dtype!r}")
    need(c.moe_impl in ("blocked", "ragged_dot", "dense", "pallas"), "moe_impl",
         f"must be one of blocked, ragged_dot, dense, pallas; got {c.moe_impl!r}")
    need(c.attention_impl in ("xla", "pallas"), "attention_impl", f"must be xla or pallas, got {c.attention_impl!r}")
    need(c.remat_policy in REMAT_POLICIES, "remat_policy",
         f"must be one of {', '.join(REMAT_POLICIES)}; got {c.remat_policy!r}")
    need(c.moe_block_size > 0, "moe_block_size", f"must be > 0, got {c.moe_block_size}")
    need(isinstance(c.fp8, bool), "fp8", f"must be true or false, got {c.fp8!r}")
    need(isinstance(c.fsdp_over_dcn, bool), "fsdp_over_dcn", f"must be true or false, got {c.fsdp_over_dcn!r}")
    need(c.fp8_impl in ("auto", "emulated", "native"), "fp8_impl", f"must be auto, emulated or native; got {c.fp8_impl!r}")
    need(c.ep_capacity_factor >= 0, "ep_capacity_factor", f"must be >= 0 (0: worst-case buffer), got {c.ep_capacity_factor}")
    need(isinstance(c.scan_unroll, int) and c.scan_unroll >= 1, "scan_unroll", f"must be an integer >= 1, got {c.scan_unroll!r}")
    need(c.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {c.rms_norm_eps}")
    rs = c.rope_scaling
    if rs is not None:
        need(rs.type in ("yarn",), "rope_scaling.type", f"only 'yarn' is supported, got {rs.type!r}")
        need(rs.factor > 0, "rope_scaling.factor", f"must be > 0, got {rs.factor}")


# ----------------------------------------------------------------------------- loading

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_ROPE_FIELDS = {f.name for f in dataclasses.fields(RopeScaling)}
# HF config.json keys that carry no information for us (or that we derive).
_HF_IGNORED = {"architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "head_dim", "qk_head_dim",
               "output_router_logits", "router_aux_loss_coef", "quantization_config", "_name_or_path",
               "num_experts", "num_local_experts", "ep_size", "mlp_bias", "return_dict", "use_return_dict",
               "is_encoder_decoder", "id2label", "label2id", "tie_encoder_decoder", "chunk_size_feed_forward",
               "output_attentions", "output_hidden_states", "problem_type", "layer_types"}


def _rope_from_dict(d: Mapping[str, Any] | None, where: str) -> tuple[RopeScaling | None, float | None]:
    """Parse `rope_scaling` or `rope_parameters`; returns (scaling or None, rope_theta if inside)."""
    if d is None:
        return None, None
    d = dict(d)
    theta = d.pop("rope_theta", None)
    rtype = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    if rtype == "default":
        return None, theta
    unknown = set(d) - _ROPE_FIELDS - {"partial_rotary_factor"}
    if unknown:
        raise ConfigError(f"{where}: unknown rope scaling field(s) {sorted(unknown)}")
    d.pop("partial_rotary_factor", None)
    return RopeScaling(type=rtype, **{k: v for k, v in d.items() if v is not None}), theta


def config_from_dict(d: Mapping[str, Any], *, where: str = "config", strict: bool = True) -> ModelConfig:
    """Build a ModelConfig from a dict (YAML or HF config.json). Unknown keys are errors when strict."""
    d = dict(d)
    kw: dict[str, Any] = {}
    rope_src = d.pop("rope_parameters", None)
    rope_old = d.pop("rope_scaling", None)
    rs, theta = _rope_from_dict(rope_old if rope_old is not None else rope_src, where)
    if rope_old is None and rope_src is None:
        rs = None
    kw["rope_scaling"] = rs
    if theta is not None and "rope_theta" not in d:
        kw["rope_theta"] = float(theta)
    if "n_routed_experts" not in d:
        for alt in ("num_experts", "num_local_experts"):
            if d.get(alt) is not None:
                d["n_routed_experts"] = d[alt]
                break
    unknown = []
    for k, v in d.items():
        if k in _FIELDS:
            kw[k] = v
        elif k not in _HF_IGNORED:
            unknown.append(k)
    if unknown and strict:
        raise ConfigError(f"{where}: unknown config field(s) {sorted(unknown)}")
    if kw.get("model_type") == "deepseek_v2":
        # HF's V2 has no bias-corrected gate; its greedy top-k ignores n_group.
        kw.setdefault("scoring_func", "softmax")
        kw.setdefault("topk_method", "greedy")
        kw.setdefault("num_nextn_predict_layers", 0)
    for k in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "init_std", "initializer_range"):
        if k in kw and kw[k] is not None:
            kw[k] = float(kw[k])
    try:
        return ModelConfig(**kw)
    except (TypeError, ConfigError) as e:  # wrong type for a field, or a failed check: name the file too
        raise ConfigError(f"{where}: {e}") from None


def parse_override(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise ConfigError(f"override {s!r} is not of the form key=value")
    k, v = s.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{k.strip()}': cannot parse value {v!r}: {str(e).splitlines()[0]}") from None


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("float", float)}


def _as_float(v):
    """YAML reads `1e-6` (no dot) as a string; a float field takes it as the number it spells."""
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        try:
            return float(v)
        except ValueError:
            return v  # the validation names the field
    return v


def apply_overrides(cfg: ModelConfig, overrides: Sequence[str] | Mapping[str, Any]) -> ModelConfig:
    items = overrides.items() if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    kw = {}
    rope = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    for k, v in items:
        if k.startswith("rope_scaling."):
            sub = k.split(".", 1)[1]
            if sub not in _ROPE_FIELDS:
                raise ConfigError(f"unknown config field '{k}'")
            rope = rope or dataclasses.asdict(RopeScaling())
            rope[sub] = v
        elif k in _FIELDS:
            kw[k] = _as_float(v) if k in _FLOAT_FIELDS else v
        else:
            raise ConfigError(f"unknown config field '{k}'")
    if rope is not None:
        kw["rope_scaling"] = RopeScaling(**rope)
    return dataclasses.replace(cfg, **kw)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ModelConfig:
    """Load a model config from a YAML file, an HF config.json, or a checkpoint directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        resolved = _packaged_config(path)
        if resolved is None:
            raise ConfigError(f"{path}: no such config file")
        path = resolved
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    cfg = config_from_text(text, path)
    return apply_overrides(cfg, overrides) if overrides else cfg


def config_from_text(text: str, where: str) -> ModelConfig:
    """The model config in the text of the file `where` (JSON: an HF config.json; else YAML: a model
    config, or a run config's `model:` section). Reading the file is the caller's: load_config for local
    paths, dsjax.train.workdir_io for gs:// ones (a native checkpoint's marker, a workdir's run config)."""
    try:
        raw = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    if where.endswith((".yaml", ".yml")) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]  # a combined run config: model section
    if where.endswith(".json"):
        _check_hf_config(raw, where)
    return config_from_dict(raw, where=where, strict=not where.endswith(".json"))


MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# Architecture fields an HF config.json must state: a missing one would silently take the 671B default.
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "first_k_dense_replace")
_HF_REQUIRED_MOE = ("moe_intermediate_size", "num_experts_per_tok")


def _check_hf_config(raw: Mapping[str, Any], path: str) -> None:
    mt = raw.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type {mt!r} is not a DeepSeek V2/V3 model (expected one of {MODEL_TYPES})")
    moe = any(raw.get(k) for k in ("n_routed_experts", "num_experts", "num_local_experts"))
    missing = [k for k in _HF_REQUIRED + (_HF_REQUIRED_MOE if moe else ()) if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing architecture field(s) {missing} (no default is assumed for these)")


def _packaged_config(name: str) -> str | None:
    """`tiny` or `configs/tiny.yaml` resolve to the copy shipped inside the package."""
    here = os.path.join(os.path.dirname(__file__), "configs")
    base = os.path.basename(name)
    for cand in (base, base + ".yaml"):
        p = os.path.join(here, cand)
        if os.path.exists(p):
            return p
    return None
