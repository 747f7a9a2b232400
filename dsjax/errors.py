"""The errors a user can cause. The CLI prints their message (which names the file, key or value) and
exits 2 instead of showing a traceback."""
from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.config import ConfigError


class DataError(ValueError):
    """An input data file is missing, unreadable, empty or malformed."""


UserError = (ConfigError, CheckpointError, DataError, FileNotFoundError)
