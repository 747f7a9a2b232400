"""Multi-host helpers on one process: environment detection and per-host batch slices."""
import numpy as np

from dsjax.parallel import distributed as dist
from dsjax.parallel import mesh as pm


def test_multi_process_detection():
    assert not dist._is_multi_process_env({})
    assert not dist._is_multi_process_env({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert dist._is_multi_process_env({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"})
    assert dist._is_multi_process_env({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"})
    assert dist._is_multi_process_env({"SLURM_NTASKS": "4"})
    assert not dist._is_multi_process_env({"JAX_PLATFORMS": "cpu", "SLURM_NTASKS": "4"})
    assert dist.maybe_initialize({}) is False


def test_single_process_helpers():
    assert dist.is_main_process() and dist.process_count() == 1
    assert dist.host_batch_slice(8) == slice(0, 8)
    assert dist.gather_json({"a": [1, 2]}) == [{"a": [1, 2]}]


def test_engine_places_host_rows_on_the_batch_axes():
    """The training engine's batch placement (jax.make_array_from_process_local_data): one process
    supplies every row; each device holds its rows of the global batch."""
    from dsjax.train.config import TrainConfig
    from dsjax.train.engine import mesh_setup

    run = mesh_setup(TrainConfig(mesh=pm.MeshConfig(data=2, expert=4, fsdp=1)), 8)
    host = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    g = run.place_batch(host)["tokens"]
    assert g.sharding == pm.batch_sharding(run.mesh, 8)
    np.testing.assert_array_equal(np.asarray(g), host["tokens"])
    assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (1, 4)


def test_explicit_launch_arguments():
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_PLATFORMS": "cpu"}
    assert dist._is_multi_process_env(env)  # an explicit coordinator counts on CPU too
    assert dist.initialize_args(env) == {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
    assert dist.initialize_args({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}  # Cloud TPU: JAX detects the rest
