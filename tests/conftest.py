"""Test-wide setup: CPU only, 8 emulated devices for the sharding tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests use tiny shapes, so XLA:CPU's compile time dominates them; its LLVM optimisation passes are
# switched off (about half the suite's wall time; numerics are unchanged: no fast-math either way).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
