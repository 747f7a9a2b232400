"""Supervised fine-tuning on chat data (R1's cold start and its distillation step, SPEC §7).

    JSONL {"messages": [{"role", "content"}, ...]}  --render (chat template, loss mask)-->
    --pack into seq_len rows with segment ids-->  --masked next-token loss, AdamW-->  checkpoints

The template is `dsjax.infer.chat`'s (byte specials `<|user|>`/`<|assistant|>`, or DeepSeek's
`<｜User｜>`/`<｜Assistant｜>` for HF tokenizers), so a fine-tuned model sees at inference exactly the
prompt layout it was trained on. The loss covers only assistant tokens: each assistant turn's content
and the end-of-turn eos that follows it (the model must learn to stop); bos, system, user turns and the
assistant marker are context. As in R1's template, the reasoning of non-final assistant turns is dropped.

Also here, shared by `dsjax.rl.grpo_trainer` and `dsjax.rl.distill`: the YAML + `key=value` loader for
the post-training configs and `load_policy`, which starts a model from random init, an HF / native
checkpoint directory, or a `dsjax train` / `dsjax sft` / `dsjax grpo` workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from dsjax.config import ConfigError, ModelConfig, load_config, parse_override
from dsjax.errors import DataError
from dsjax.infer.chat import THINK_CLOSE, markers_for
from dsjax.model.mtp import shifted
from dsjax.model.transformer import forward
from dsjax.rl.toy_task import check_max_value, toy_chat_examples
from dsjax.train.step import jit_step

FINAL_DIR = "final"  # a post-training workdir's final model (native checkpoint), what load_policy picks up


# ---------------------------------------------------------------------------------------------------
# Configs: flat dataclasses + `model:` section, YAML and key=value overrides (as dsjax.train.config)
# ---------------------------------------------------------------------------------------------------

def _optim_fields():
    return dict(lr=1e-3, warmup_steps=10, decay_start_fraction=0.5, decay_end_fraction=1.0, final_lr_ratio=0.1,
                b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, moment_dtype="float32")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    data: str | None = None  # chat JSONL file, or "toy": toy-task solutions generated in code (offline)
    tokenizer: str | None = None  # None/"bytes" = byte tokenizer, else a tokenizer.json (or its dir)
    init: str = "random"  # "random", an HF/native checkpoint dir, or a dsjax train/sft/grpo workdir
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    lr: float = 1e-3
    warmup_steps: int = 10
    decay_start_fraction: float = 0.5
    decay_end_fraction: float = 1.0
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    moment_dtype: str = "float32"
    mtp_lambda: float = 0.0  # > 0: also train the MTP block on the assistant tokens
    bias_gamma: float = 0.001  # aux-loss-free balancing bias update speed (0 = frozen)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True
    # data=toy only: how many dsjax.rl.toy_task problems (train split), with how many operations, values <= max_value
    num_toy_examples: int = 2000
    difficulty: int = 2
    max_value: int = 99
    model: ModelConfig = dataclasses.field(default_factory=lambda: load_config("tiny"))

    def __post_init__(self):
        _check_positive(self, ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "keep_checkpoints",
                               "num_toy_examples", "difficulty"))
        if self.moment_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"sft config field 'moment_dtype': must be float32 or bfloat16, got {self.moment_dtype!r}")
        check_max_value(self)
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"sft config field 'seq_len': {self.seq_len} exceeds model.max_position_embeddings "
                              f"{self.model.max_position_embeddings}")


def _check_positive(cfg, names):
    for f in names:
        v = getattr(cfg, f)
        if not (isinstance(v, int) and v > 0):
            raise ConfigError(f"{type(cfg).__name__} field '{f}': must be a positive integer, got {v!r}")


def _coerce(cls, name: str, value):
    """YAML gives ints for '1' and strings for '1e-3': cast to the field's declared scalar type."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    t = str(f.type)
    if value is None:
        return None
    if t.startswith("float") and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{cls.__name__} field '{name}': expected a number, got {value!r}") from None
    if t.startswith("tuple") and isinstance(value, (list, tuple)):
        return tuple(value)
    if t.startswith("tuple") and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def load_rl_config(cls, path: str | None, overrides: Sequence[str] = (), *, raw: Mapping[str, Any] | None = None):
    """Read a post-training YAML (top-level fields of `cls`, `model:` as in dsjax train, and nested
    dataclass sections such as distill's `sft:`) and apply `key=value` / `model.key=value` /
    `section.key=value` overrides. Unknown keys are errors naming the key."""
    from dsjax.config import apply_overrides
    from dsjax.train.config import _model_config

    d: dict[str, Any] = dict(raw or {})
    base_dir = os.getcwd()
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        with open(path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        base_dir = os.path.dirname(os.path.abspath(path))
    return _build(cls, d, list(overrides), base_dir, path or cls.__name__, apply_overrides, _model_config)


def _build(cls, d, overrides, base_dir, where, apply_overrides, model_config, inherited_model=None):
    """cls(**d) after the overrides. A nested section (e.g. distill's `sft:`) takes the parent's `model`
    (the model being trained is always the top-level `model:` section), so setting it inside is an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = {n for n, f in fields.items() if n != "model" and f.default_factory is not dataclasses.MISSING
                and dataclasses.is_dataclass(f.default_factory())}
    d = dict(d)
    model_raw = d.pop("model", None)
    if inherited_model is not None and (model_raw is not None or any(o.startswith("model.") for o in overrides)):
        raise ConfigError(f"{where}: set the model in the top-level 'model:' section (model.key=value), not here")
    model_over, sec_raw = [], {s: dict(d.pop(s, None) or {}) for s in sections}
    sec_over: dict[str, list[str]] = {s: [] for s in sections}
    for o in overrides:
        k, v = parse_override(o)
        head = k.split(".", 1)[0]
        if k.startswith("model."):
            model_over.append(o[len("model."):])
        elif head in sections and "." in k:
            sec_over[head].append(o[len(head) + 1:])
        elif k in fields and k != "model" and k not in sections:
            d[k] = v
        else:
            raise ConfigError(f"{where}: unknown config key '{k}' ({cls.__name__} fields: "
                              f"{', '.join(sorted(set(fields) - {'model'} - sections))}; or model.*"
                              + "".join(f", {s}.*" for s in sorted(sections)) + ")")
    bad = sorted(set(d) - set(fields))
    if bad:
        raise ConfigError(f"{where}: unknown config key(s) {bad}")
    kw = {k: _coerce(cls, k, v) for k, v in d.items()}
    model = inherited_model
    if "model" in fields and model is None:
        model = model_config(model_raw, base_dir)
        if model_over:
            model = apply_overrides(model, model_over)
    if "model" in fields:
        kw["model"] = model
    for s in sections:
        sub_cls = type(fields[s].default_factory())
        kw[s] = _build(sub_cls, sec_raw[s], sec_over[s], base_dir, f"{where}: {s}", apply_overrides, model_config,
                       model)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------------
# Starting points
# ---------------------------------------------------------------------------------------------------

def load_policy(init: str, model_cfg: ModelConfig | None = None, seed: int = 0):
    """A `dsjax.Model` from "random" (model_cfg, seed), an HF / native checkpoint directory, a workdir of
    `dsjax sft/grpo/distill` (its final model), or a `dsjax train` workdir (its latest checkpoint)."""
    import dsjax
    from dsjax.checkpoint import native

    if init in (None, "", "random"):
        if model_cfg is None:
            raise ConfigError("init=random needs a model config")
        return dsjax.init(model_cfg, seed)
    path = os.fspath(init)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init: {path} is not a checkpoint directory or workdir")
    if native.is_native(os.path.join(path, FINAL_DIR)):
        return dsjax.from_pretrained(os.path.join(path, FINAL_DIR))
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, "run_config.yaml")):
        return _from_train_workdir(path)
    return dsjax.from_pretrained(path)


def _from_train_workdir(path: str):
    """The params of the latest checkpoint of a `dsjax train` workdir."""
    from dsjax.api import Model
    from dsjax.model.params import init_params
    from dsjax.train.checkpointing import Checkpointer, abstract_of
    from dsjax.train.config import load_train_config
    from dsjax.train.step import init_state

    tcfg = load_train_config(os.path.join(path, "run_config.yaml"))
    abstract = jax.eval_shape(lambda: init_state(init_params(tcfg.model, 0), tcfg))
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), keep=10 ** 6, async_save=False, read_only=True)
    try:
        restored = ckpt.restore(abstract_of(abstract))
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{path}/checkpoints: no restorable checkpoint")
    return Model(restored[1].params, tcfg.model)


# ---------------------------------------------------------------------------------------------------
# Data: chat JSONL -> (token ids, loss mask) -> packed rows
# ---------------------------------------------------------------------------------------------------

def load_chat_jsonl(path: str) -> list[list[dict]]:
    """The conversations of a JSONL file with one {"messages": [...]} per non-blank line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: chat data file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e}") from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{path}:{n}: expected an object with a non-empty 'messages' list")
            for m in msgs:
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                        or not isinstance(m.get("content"), str):
                    raise DataError(f"{path}:{n}: each message needs role system|user|assistant and string content")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{path}:{n}: conversation has no assistant message to train on")
            out.append(msgs)
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the conversation in dsjax.infer.chat's template and a 0/1 mask that is 1 exactly
    on each assistant turn's content tokens and its end-of-turn eos.

    The ids before an assistant turn's content equal `encode_chat(previous messages)` (generation prompt
    included), so training and inference prompts agree token for token."""
    mk = markers_for(tokenizer)
    ids, mask = [tokenizer.bos_id], [0]
    last_assistant = max(i for i, m in enumerate(messages) if m.get("role") == "assistant") \
        if any(m.get("role") == "assistant" for m in messages) else -1

    def add(seq, m):
        ids.extend(seq)
        mask.extend([m] * len(seq))

    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content", "")
        if role == "system":
            add(tokenizer.encode(mk.system + content), 0)
        elif role == "user":
            add(tokenizer.encode(mk.user + content), 0)
        elif role == "assistant":
            if i != last_assistant and THINK_CLOSE in content:
                content = content.split(THINK_CLOSE)[-1].strip()  # R1: earlier turns lose their reasoning
            add(tokenizer.encode(mk.assistant), 0)
            add(tokenizer.encode(content), 1)
            add([tokenizer.eos_id], 1)
        else:
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
    return ids, mask


class PackedChatData:
    """Rendered examples packed greedily into [seq_len] rows, reshuffled every epoch; `batch(step)` is a
    pure function of (seed, step), so resuming needs no iterator state.

    A row holds whole examples (segment ids 1, 2, ...; positions restart at 0; padding has segment 0);
    an example longer than seq_len is truncated (with a warning) so it still trains on its beginning."""

    def __init__(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, batch_size: int,
                 seed: int = 0, pad_id: int = 0):
        if not examples:
            raise DataError("SFT: no training examples")
        self.examples = [(np.asarray(i, np.int32), np.asarray(m, np.int32)) for i, m in examples]
        long = sum(len(i) > seq_len for i, _ in self.examples)
        if long:
            warnings.warn(f"SFT: {long} of {len(self.examples)} examples exceed seq_len {seq_len} and are truncated")
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self._sizes: list[int] = []  # rows per epoch
        self._cache: dict[int, list[dict]] = {}

    def _pack_epoch(self, epoch: int) -> list[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        rows, cur, used = [], [], 0
        for j in order:
            n = min(len(self.examples[j][0]), self.seq_len)
            if used + n > self.seq_len and cur:
                rows.append(self._row(cur))
                cur, used = [], 0
            cur.append(j)
            used += n
        if cur:
            rows.append(self._row(cur))
        return rows

    def _row(self, idx: list[int]) -> dict:
        s = self.seq_len
        row = {"tokens": np.full(s, self.pad_id, np.int32), "segment_ids": np.zeros(s, np.int32),
               "positions": np.zeros(s, np.int32), "loss_mask": np.zeros(s, np.int32)}
        at = 0
        for seg, j in enumerate(idx, 1):
            ids, m = self.examples[j]
            n = min(len(ids), s - at)
            row["tokens"][at:at + n] = ids[:n]
            row["loss_mask"][at:at + n] = m[:n]
            row["segment_ids"][at:at + n] = seg
            row["positions"][at:at + n] = np.arange(n)
            at += n
        return row

    def _epoch(self, epoch: int) -> list[dict]:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # memory stays bounded: steps only move forward
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self._pack_epoch(epoch)
        return self._cache[epoch]

    def _rows(self, start: int, count: int) -> list[dict]:
        """Rows start..start+count-1 of the endless stream epoch 0, epoch 1, ..."""
        out, epoch, offset = [], 0, 0
        while len(out) < count:
            while len(self._sizes) <= epoch:
                self._sizes.append(len(self._epoch(len(self._sizes))))
            lo = start + len(out) - offset
            if lo < self._sizes[epoch]:
                rows = self._epoch(epoch)
                out.extend(rows[lo:lo + count - len(out)])
            offset += self._sizes[epoch]
            epoch += 1
        return out

    def batch(self, step: int) -> dict:
        """Batch number `step` (0-based): {"tokens", "segment_ids", "positions", "loss_mask"} [batch, seq_len]."""
        rows = self._rows(step * self.batch_size, self.batch_size)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------
# Loss and step
# ---------------------------------------------------------------------------------------------------

def sft_loss(params, batch: dict, cfg: ModelConfig, *, mtp_lambda: float = 0.0):
    """Mean next-token cross-entropy over the assistant tokens (loss_mask at the *target* position),
    plus mtp_lambda x the same for each MTP depth. Returns (loss, metrics)."""
    tokens, seg, lmask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    logits, aux = forward(params, tokens, cfg, positions=batch.get("positions"), segment_ids=seg,
                          with_mtp=mtp_lambda > 0)

    def masked_ce(lg, k):
        tgt, valid = shifted(tokens, seg, k)
        m = (shifted(lmask, seg, k)[0] * valid).astype(jnp.float32)
        logz = jax.nn.logsumexp(lg, axis=-1)
        ll = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
        n = m.sum()
        return jnp.sum((logz - ll) * m) / jnp.maximum(n, 1.0), n, ((jnp.argmax(lg, -1) == tgt) * m).sum()

    lm_loss, n, correct = masked_ce(logits, 1)
    loss = lm_loss
    metrics = {"lm_loss": lm_loss, "tokens": n, "token_accuracy": correct / jnp.maximum(n, 1.0)}
    if "mtp_logits" in aux:
        depth = aux["mtp_logits"].shape[0]
        mtp = sum(masked_ce(aux["mtp_logits"][k - 1], k + 1)[0] for k in range(1, depth + 1)) / depth
        loss = loss + mtp_lambda * mtp
        metrics["mtp_loss"] = mtp
    loads = [aux["expert_load"]] if "expert_load" in aux else []
    if "mtp_expert_load" in aux:
        loads.append(aux["mtp_expert_load"])
    if loads:
        metrics["expert_load"] = jnp.concatenate(loads, axis=0)
    metrics["loss"] = loss
    return loss, metrics


def make_sft_step(cfg: ModelConfig, scfg: SFTConfig):
    """step(state, batch) -> (state, metrics); state is dsjax.train.step.TrainState."""
    from dsjax.train.balance import apply_bias_updates
    from dsjax.train.optim import lr_schedule, make_optimizer
    from dsjax.train.step import TrainState

    tx, sched = make_optimizer(scfg), lr_schedule(scfg)
    grad_fn = jax.value_and_grad(lambda p, b: sft_loss(p, b, cfg, mtp_lambda=scfg.mtp_lambda), has_aux=True)

    def step(state, batch):
        (_, m), g = grad_fn(state.params, batch)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = m.pop("expert_load", None)
        params = apply_bias_updates(params, load, scfg.bias_gamma, cfg)
        m.update(grad_norm=optax.global_norm(g), lr=sched(state.step))
        return TrainState(state.step + 1, params, opt_state, state.rng), m

    return step


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------

def sft(scfg: SFTConfig, workdir: str, *, examples: Sequence[Sequence[Mapping[str, str]]] | None = None,
        model=None, tokenizer=None, verbose: bool = True):
    """Fine-tune (or resume) in `workdir` -> (Model, logged rows). Conversations come from `examples`
    or scfg.data (JSONL); the start from `model` or scfg.init. Writes metrics.jsonl, Orbax checkpoints
    and the final model to workdir/final (a native checkpoint that `load_policy(workdir)` reads)."""
    from dsjax.api import Model
    from dsjax.checkpoint import native
    from dsjax.train.checkpointing import Checkpointer, abstract_of
    from dsjax.train.metrics import MetricsLogger
    from dsjax.train.step import init_state
    from dsjax.train.tokenizer import load_tokenizer

    os.makedirs(workdir, exist_ok=True)
    tok = tokenizer or load_tokenizer(scfg.tokenizer)
    if examples is None:
        if not scfg.data:
            raise ConfigError("sft: set data=PATH to a chat JSONL file (or data=toy)")
        if scfg.data == "toy":
            examples = toy_chat_examples(scfg.num_toy_examples, scfg.seed, scfg.difficulty, max_value=scfg.max_value)
        else:
            examples = load_chat_jsonl(scfg.data)
    if model is None:
        model = load_policy(scfg.init, scfg.model, scfg.seed)
    cfg = model.config
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    with open(os.path.join(workdir, "run_config.yaml"), "w") as f:
        f.write(config_to_yaml(dataclasses.replace(scfg, model=cfg)))
    data = PackedChatData([render_chat(m, tok) for m in examples], scfg.seq_len, scfg.batch_size, scfg.seed,
                          tok.pad_id)
    state = init_state(jax.tree.map(jnp.copy, model.params), scfg)  # a copy: the step donates its buffers
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=scfg.keep_checkpoints, async_save=False)
    start = 0
    restored = ckpt.restore(abstract_of(state))
    if restored is not None:
        start, state, _ = restored
        if verbose:
            print(f"sft: resumed from {ckpt.directory}/{start}", file=sys.stderr)
    logger = MetricsLogger(workdir, start)
    step_fn = jit_step(make_sft_step(cfg, scfg), donate_argnums=0)
    rows, t0, toks = [], time.perf_counter(), 0
    try:
        for step in range(start + 1, scfg.steps + 1):
            batch = data.batch(step - 1)
            state, m = step_fn(state, jax.tree.map(jnp.asarray, batch))
            toks += int((batch["segment_ids"] > 0).sum())
            if step % scfg.log_every == 0 or step == scfg.steps:
                row = {"step": step, **{k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0}}
                row["tokens_per_sec"] = toks / (time.perf_counter() - t0)
                logger.log(row)
                rows.append(row)
                t0, toks = time.perf_counter(), 0
                if verbose and scfg.progress:
                    print(f"sft step {step}/{scfg.steps}: loss {row['loss']:.4f} token acc "
                          f"{row['token_accuracy']:.3f} ({row['tokens_per_sec']:,.0f} tok/s)", file=sys.stderr)
            if step % scfg.checkpoint_every == 0 or step == scfg.steps:
                ckpt.save(step, state, {"step": step})
    finally:
        ckpt.close()
        logger.close()
    final = Model(state.params, cfg)
    native.save(final.params, cfg, os.path.join(workdir, FINAL_DIR))
    return final, rows
