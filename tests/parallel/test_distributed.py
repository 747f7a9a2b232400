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
    mesh = pm.make_mesh(pm.MeshConfig(data=2, expert=4, fsdp=1))
    host = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    g = dist.global_batch_from_host(host, mesh, 8)["tokens"]
    assert g.sharding == pm.batch_sharding(mesh, 8)
    np.testing.assert_array_equal(np.asarray(g), host["tokens"])
    assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (1, 4)
