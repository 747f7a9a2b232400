"""Next-token choice: greedy (temperature 0), or temperature sampling with optional top-k and top-p."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or t < 0 or t != t:
            raise ConfigError(f"temperature must be >= 0, got {t!r}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"top_k must be a positive integer, got {k!r}")
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


    def params(self) -> dict:
        """Traced (changing them does not recompile): greedy, temperature, top_k (0 = off), top_p (1 = off)."""
        return {"greedy": jnp.bool_(self.greedy),
                "temperature": jnp.float32(self.temperature if self.temperature > 0 else 1.0),
                "top_k": jnp.int32(self.top_k or 0), "top_p": jnp.float32(self.top_p or 1.0)}


def sample(logits: jnp.ndarray, key, sp: dict) -> jnp.ndarray:
    """logits [b, vocab] -> token ids [b] int32; sp = Sampler.params(). One compiled program serves greedy
    and sampling (lax.cond runs only the chosen branch, so greedy pays for no sort)."""
    logits = logits.astype(jnp.float32)
    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(sp["greedy"], greedy, lambda: _sample(logits, key, sp))


def _sample(logits, key, sp):
    b, v = logits.shape
    logits = logits / sp["temperature"]
    neg = jnp.finfo(jnp.float32).min
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = jnp.where(sp["top_k"] > 0, rank < sp["top_k"], True)  # top-k, in sorted order
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, neg), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
    keep = keep & jnp.where(sp["top_p"] < 1, before < sp["top_p"], True)  # the top token always stays
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, neg), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
