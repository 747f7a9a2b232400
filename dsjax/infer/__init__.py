"""Inference: the MLA latent cache, absorbed decode, sampling, MTP speculative decoding, prefix cache.

    from dsjax.infer import generate, stream, PrefixCache
    generate(model, tokens, max_new_tokens=32, temperature=0.0) -> np.ndarray [batch, max_new_tokens]
"""
from dsjax.infer.generate import generate, stream
from dsjax.infer.prefix_cache import PrefixCache

__all__ = ["generate", "stream", "PrefixCache"]
