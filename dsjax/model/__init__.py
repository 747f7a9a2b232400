"""The DeepSeek-V3 model: Flax modules (dsjax.model.transformer.DeepseekV3) over pure functions."""
from dsjax.model.transformer import DeepseekV3

__all__ = ["DeepseekV3"]
