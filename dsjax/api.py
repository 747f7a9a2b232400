"""The small façade over the functional core: `init`, `from_pretrained`, and `Model`."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, apply_overrides, load_config
from dsjax.model.params import init_params
from dsjax.model.transformer import forward


@functools.lru_cache(maxsize=16)
def _jitted_logits(cfg: ModelConfig):
    return jax.jit(lambda p, t: forward(p, t, cfg, with_mtp=False)[0])


class Model:
    """Params (a pytree) + config. Everything it does is a call into the pure functions."""

    def __init__(self, params: dict, config: ModelConfig):
        self.params = params
        self.config = config

    def __repr__(self):
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"experts={c.n_routed_experts}x top-{c.num_experts_per_tok}, mtp={c.num_nextn_predict_layers})")

    def logits(self, tokens) -> np.ndarray:
        """tokens [batch, seq] ints -> logits [batch, seq, vocab] float32 (numpy)."""
        tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        bad = (tokens < 0) | (tokens >= self.config.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}); "
                             f"got {int(tokens[bad][0])}")
        return np.asarray(_jitted_logits(self.config)(self.params, tokens))

    def forward(self, tokens, **kw):
        return forward(self.params, jnp.asarray(tokens), self.config, **kw)

    def save_pretrained(self, path: str, max_shard_size="5GB", *, dtype: str | None = None,
                        mtp_layout: str = "separate") -> None:
        """HF layout: config.json, model-0000i-of-0000N.safetensors shards and the index json."""
        from dsjax.checkpoint.hf_io import save_hf

        save_hf(self.params, self.config, path, max_shard_size=max_shard_size, dtype=dtype, mtp_layout=mtp_layout)

    def generate(self, tokens, max_new_tokens: int = 32, temperature: float = 0.0, **kw):
        from dsjax.infer.generate import generate

        return generate(self, tokens, max_new_tokens=max_new_tokens, temperature=temperature, **kw)


def _resolve_config(cfg) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else load_config(cfg)


def init(cfg: ModelConfig | str, seed: int = 0) -> Model:
    """A model with random parameters (normal(0, cfg.init_std), V3 report: 0.006)."""
    cfg = _resolve_config(cfg)
    return Model(init_params(cfg, seed), cfg)


def from_pretrained(path: str, *, param_dtype: str | None = None, overrides=(), allow_nonfinite: bool = False) -> Model:
    """Load an HF-layout (or official FP8) safetensors checkpoint directory, a dsjax native checkpoint, or
    a workdir: a `dsjax train` workdir gives its latest restorable checkpoint's params, a post-training
    workdir (`dsjax sft/grpo/distill`) its final model (WORKDIR/final). Read-only: nothing in `path` is
    written. An HF tensor holding NaN/Inf is refused naming it, unless allow_nonfinite. Workdirs and
    native checkpoints may be URLs (gs://bucket/run, as a pod run writes them); HF checkpoints are read
    from a local directory."""
    from dsjax.checkpoint import native
    from dsjax.checkpoint.hf_io import load_hf
    from dsjax.train import workdir_io

    path = os.fspath(path)
    if not workdir_io.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    if native.is_native(workdir_io.join(path, "final")):
        path = workdir_io.join(path, "final")
    if native.is_native(path):
        params, cfg = native.load(path)
    elif is_train_workdir(path):
        params, cfg = load_train_workdir(path)
    elif workdir_io.is_url(path):
        raise FileNotFoundError(f"{path}: neither a dsjax workdir nor a native checkpoint (an HF safetensors "
                                "checkpoint is read from a local directory: copy it there first)")
    else:
        params, cfg = load_hf(path, param_dtype=param_dtype, allow_nonfinite=allow_nonfinite)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return Model(jax.tree.map(jnp.asarray, params), cfg)


def is_train_workdir(path: str) -> bool:
    """A workdir that `dsjax train` (or any task's engine) wrote: run_config.yaml and checkpoints/."""
    from dsjax.train import workdir_io

    return (workdir_io.isdir(workdir_io.join(path, "checkpoints"))
            and workdir_io.exists(workdir_io.join(path, "run_config.yaml")))


def load_train_workdir(path: str, step: int | None = None):
    """(params, model config) of a `dsjax train` workdir's checkpoint `step` (default: the latest
    restorable one: an unreadable or corrupt newer one is skipped with a warning). Read-only: nothing
    in the workdir is written, moved or deleted."""
    from dsjax.train.checkpointing import Checkpointer, abstract_of
    from dsjax.train.config import load_train_config
    from dsjax.train.step import init_state

    from dsjax.train import workdir_io

    tcfg = load_train_config(workdir_io.join(path, "run_config.yaml"))
    ckpt = Checkpointer(workdir_io.join(path, "checkpoints"), keep=10 ** 6, async_save=False, read_only=True)
    try:
        if not ckpt.steps():
            raise FileNotFoundError(f"{path}/checkpoints: no checkpoint")
        abstract = jax.eval_shape(lambda: init_state(init_params(tcfg.model, 0), tcfg))
        restored = ckpt.restore(abstract_of(abstract), step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{path}/checkpoints: no restorable checkpoint")
    return restored[1].params, tcfg.model
