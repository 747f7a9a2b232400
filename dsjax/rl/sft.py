"""Supervised fine-tuning on chat data (R1's cold start and its distillation step, DeepSeek-R1 paper).

    JSONL {"messages": [{"role", "content"}, ...]}  --render (chat template, loss mask)-->
    --pack into seq_len rows with segment ids-->  --masked next-token loss, AdamW-->  checkpoints

The template is `dsjax.infer.chat`'s (byte specials `<|user|>`/`<|assistant|>`, or DeepSeek's
`<｜User｜>`/`<｜Assistant｜>` for HF tokenizers), so a fine-tuned model sees at inference exactly the
prompt layout it was trained on. The loss covers only assistant tokens: each assistant turn's content
and the end-of-turn eos that follows it (the model must learn to stop); bos, system, user turns and the
assistant marker are context. As in R1's template, the reasoning of non-final assistant turns is dropped.

The loop, the mesh, the NaN guard, accumulation, checkpoints and resumption are the training engine's
(dsjax.train.engine); this module supplies the loss and the batches. Also here, shared by
`dsjax.rl.grpo_trainer` and `dsjax.rl.distill`: `load_policy`, which starts a model from random init, an
HF / native checkpoint directory, or a `dsjax train` / `dsjax sft` / `dsjax grpo` workdir.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ConfigError, ModelConfig
from dsjax.errors import DataError
from dsjax.infer.chat import THINK_CLOSE, markers_for
from dsjax.model.mtp import shifted
from dsjax.model.transformer import forward
from dsjax.rl.toy_task import check_max_value, toy_chat_examples
from dsjax.train import engine, workdir_io
from dsjax.train.config import RunConfig, load_run_config

FINAL_DIR = "final"  # a post-training workdir's final model (native checkpoint), what load_policy picks up


# ---------------------------------------------------------------------------------------------------
# Config: the shared run fields (dsjax.train.config.RunConfig) + SFT's data
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(RunConfig):
    data: str | None = None  # chat JSONL file, or "toy": toy-task solutions generated in code (offline)
    tokenizer: str | None = None  # None/"bytes" = byte tokenizer, else a tokenizer.json (or its dir)
    init: str = "random"  # "random", an HF/native checkpoint dir, or a dsjax train/sft/grpo workdir
    batch_size: int = 16
    seq_len: int = 256
    mtp_lambda: float = 0.0  # > 0: also train the MTP block on the assistant tokens
    # data=toy only: how many dsjax.rl.toy_task problems (train split), with how many operations, values <= max_value
    num_toy_examples: int = 2000
    difficulty: int = 2
    max_value: int = 99
    # RunConfig defaults that differ for fine-tuning
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    decay_start_fraction: float = 0.5
    decay_end_fraction: float = 1.0
    eval_every: int = 0  # no held-out evaluation
    keep_checkpoints: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("num_toy_examples", "difficulty")
        self.check_rows()
        check_max_value(self)


def load_rl_config(cls, path: str | None, overrides: Sequence[str] = (), *, raw: Mapping[str, Any] | None = None):
    """A post-training config (SFTConfig, GRPOConfig, DistillConfig) from YAML + overrides: the one run
    config loader, dsjax.train.config.load_run_config."""
    return load_run_config(cls, path, overrides, raw=raw)


# ---------------------------------------------------------------------------------------------------
# Starting points
# ---------------------------------------------------------------------------------------------------

def load_policy(init: str, model_cfg: ModelConfig | None = None, seed: int = 0):
    """A `dsjax.Model` from "random" (model_cfg, seed), an HF / native checkpoint directory, a workdir of
    `dsjax sft/grpo/distill` (its final model), or a `dsjax train` workdir (its latest checkpoint)."""
    import dsjax

    if init in (None, "", "random"):
        if model_cfg is None:
            raise ConfigError("init=random needs a model config")
        return dsjax.init(model_cfg, seed)
    path = os.fspath(init)
    if not workdir_io.isdir(path):
        raise FileNotFoundError(f"init: {path} is not a checkpoint directory or workdir")
    return dsjax.from_pretrained(path)  # (a post-training workdir's final model, a train workdir's latest, ...)


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

def loss_denominators(batch: dict, depth: int) -> jnp.ndarray:
    """Trained-token counts [1 + depth] of a whole batch (the LM target t+1 and each MTP depth), which
    gradient accumulation divides every micro-batch's loss sums by."""
    seg, lmask = batch["segment_ids"], batch["loss_mask"]
    out = []
    for k in range(1, depth + 2):
        tgt_mask, valid = shifted(lmask, seg, k)
        out.append((tgt_mask * valid).astype(jnp.float32).sum())
    return jnp.stack(out)


def sft_loss(params, batch: dict, cfg: ModelConfig, *, mtp_lambda: float = 0.0, denoms=None, mesh=None):
    """Mean next-token cross-entropy over the assistant tokens (loss_mask at the *target* position),
    plus mtp_lambda x the same for each MTP depth. Returns (loss, metrics).
    denoms: optional [1 + depth] token counts to divide by (default: this batch's own).
    mesh: the mesh the step runs under (expert parallelism over its "expert" axis)."""
    tokens, seg, lmask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    logits, aux = forward(params, tokens, cfg, positions=batch.get("positions"), segment_ids=seg,
                          with_mtp=mtp_lambda > 0, mesh=mesh)

    def masked_ce(lg, k):
        tgt, valid = shifted(tokens, seg, k)
        m = (shifted(lmask, seg, k)[0] * valid).astype(jnp.float32)
        logz = jax.nn.logsumexp(lg, axis=-1)
        ll = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
        n = m.sum()
        d = jnp.maximum(n if denoms is None else denoms[k - 1], 1.0)
        return jnp.sum((logz - ll) * m) / d, n, ((jnp.argmax(lg, -1) == tgt) * m).sum() / d

    lm_loss, n, acc = masked_ce(logits, 1)
    loss = lm_loss
    metrics = {"lm_loss": lm_loss, "tokens": n, "token_accuracy": acc}
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


class SFTTask(engine.Task):
    """SFT for the training engine: packed chat rows, the masked loss."""

    name = "sft"

    def __init__(self, scfg: SFTConfig, data: PackedChatData):
        self.cfg, self.data, self.mesh = scfg, data, None
        self.depth = scfg.model.num_nextn_predict_layers if scfg.mtp_lambda > 0 else 0

    def loss(self, params, batch, denoms=None):
        return sft_loss(params, batch, self.cfg.model, mtp_lambda=self.cfg.mtp_lambda, denoms=denoms, mesh=self.mesh)

    def split_loss(self, batch, n):
        # Sums over the micro-batch divided by the whole batch's trained-token counts: the n micro-batch
        # gradients add up to the one-batch gradient exactly.
        return functools.partial(self.loss, denoms=loss_denominators(batch, self.depth)), ()

    def start(self, run):
        self.mesh = run.mesh
        self.rows = run.host_rows(self.cfg.batch_size)

    def next_batch(self, step, state):
        # Every process derives the same global batch from (seed, step) and keeps its own rows.
        return {k: v[self.rows] for k, v in self.data.batch(step - 1).items()}

    def tokens(self, batch):
        return float((np.asarray(batch["segment_ids"]) > 0).sum()) * jax.process_count()

    def describe(self, row):
        return {"loss": f"{row['loss']:.4f}", "token_acc": f"{row['token_accuracy']:.3f}",
                "tok_s": f"{row['tokens_per_sec']:,.0f}"}


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
    from dsjax.train.tokenizer import load_tokenizer

    engine.start_runtime()
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
    scfg = dataclasses.replace(scfg, model=cfg)
    data = PackedChatData([render_chat(m, tok) for m in examples], scfg.seq_len, scfg.batch_size, scfg.seed,
                          tok.pad_id)
    state, rows = engine.run(SFTTask(scfg, data), workdir, model.params, verbose=verbose,
                             batch_size=scfg.batch_size // scfg.grad_accum)
    final = Model(state.params, cfg)
    native.save(final.params, cfg, workdir_io.join(workdir, FINAL_DIR))
    return final, rows
