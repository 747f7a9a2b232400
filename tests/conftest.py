"""Test-wide setup: CPU only, 8 emulated devices for the sharding tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests use tiny shapes, so XLA:CPU's compile time dominates them; its LLVM optimisation passes are
# switched off (about half the suite's wall time; numerics are unchanged: no fast-math either way).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the whole session, this process and the `dsjax` subprocesses the tests start
# (which inherit the environment): many tests compile the same tiny training step again, in a resumed
# run or a second process. A fresh folder each session, so nothing from an earlier checkout is reused;
# the cache is keyed on the program and the compile options, so hits compute the same bits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsjax-test-jit-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def cuda_target():
    """Lower Triton kernels for CUDA on this CPU host: jax >= 0.11 asks which GPU to target (an
    abstract device on the abstract mesh) and refuses without one; jax 0.10 ignores it."""
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu)):
        yield
