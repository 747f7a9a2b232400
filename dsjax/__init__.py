"""dsjax: DeepSeek-V3 / R1 in JAX."""
from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.model.params import init_params, param_specs
from dsjax.model.transformer import DeepseekV3, forward
from dsjax.api import Model, from_pretrained, init
from dsjax.checkpoint.safetensors_io import CheckpointError

__all__ = ["DeepseekV3", "ModelConfig", "ConfigError", "CheckpointError", "load_config", "forward", "init",
           "init_params", "param_specs", "from_pretrained", "Model"]
