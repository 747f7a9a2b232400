"""The optimised-HLO reader (dsjax.parallel.hlo_stats) and the peak-buffer reader
(dsjax.parallel.memory_peak) on small programs whose answers are derived by hand in each test:
an all-gather of a known shard inside a scan of known length, a psum outside it, on 4 devices;
compiled for this CPU and for a v5p:2x2x1 TPU topology (libtpu's compiler, no TPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax.config import ConfigError
from dsjax.parallel import aot, hlo_stats, memory_peak

ROWS, COLS, TRIPS, N = 64, 256, 7, 4  # per-device shard f32[16, 256] = 16 KiB


def _line_of(text: str) -> int:
    """This file's line number of the first line containing text (so edits above it keep the test true)."""
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


def _program(devices):
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))  # (in the given order: tests choose the slices)

    def f(x):
        def body(c, _):
            g = jax.lax.all_gather(c, "x", tiled=True)  # [ROWS, COLS] from [ROWS/N, COLS]
            return c + g[: c.shape[0]] * 2, None

        c, _ = jax.lax.scan(body, x, None, length=TRIPS)
        return c + jax.lax.psum(c, "x")

    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((ROWS, COLS), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    return fn.lower(x)


_ALL_GATHER_LINE = _line_of("g = jax.lax.all_gather(c")


SHARD = ROWS // N * COLS * 4
WANT_AG = TRIPS * (N - 1) * SHARD  # ring all-gather: each chip sends its shard to the other n-1
WANT_AR = 2 * (N - 1) / N * SHARD  # ring all-reduce: reduce-scatter + all-gather of 1/n pieces


def _check(stats):
    assert list(stats.trip_counts.values()) == [TRIPS] and not stats.unknown_trips
    ag, ar = stats.collectives["all-gather"], stats.collectives["all-reduce"]
    assert ag == [TRIPS, pytest.approx(WANT_AG)]
    assert ar == [1, pytest.approx(WANT_AR)]
    assert stats.ici_bytes == pytest.approx(WANT_AG + WANT_AR) and stats.dcn_bytes == 0
    # HBM: at least the gathered [ROWS, COLS] f32 array read once per trip
    assert stats.hbm_bytes >= TRIPS * ROWS * COLS * 4


def test_hlo_stats_cpu():
    compiled = _program(jax.devices("cpu")[:N]).compile()
    _check(hlo_stats.hlo_stats(compiled.as_text(), num_devices=N))


def test_hlo_stats_dcn_groups():
    # the same program with devices 0,1 in slice 0 and 2,3 in slice 1: every group crosses slices
    compiled = _program(jax.devices("cpu")[:N]).compile()
    stats = hlo_stats.hlo_stats(compiled.as_text(), num_devices=N, slice_of=[0, 0, 1, 1])
    assert stats.ici_bytes == 0 and stats.dcn_bytes == pytest.approx(WANT_AG + WANT_AR)


@pytest.mark.parametrize("text, want", [
    ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups={}", [list(range(8))]),
])
def test_replica_groups(text, want):
    assert hlo_stats.replica_groups(text, 8) == want


def test_array_bytes():
    assert hlo_stats.array_bytes("(f32[2,3]{1,0}, bf16[4]{0:T(128)}, s32[])") == 24 + 8 + 4
    assert hlo_stats.array_bytes("f32[256,256]{1,0:T(8,128)S(1)}", hbm_only=True) == 0


def _tpu_devices():
    try:
        return aot.topology_devices(aot.parse_topology("v5p:2x2x1"))
    except ConfigError:
        return None


needs_tpu_compiler = pytest.mark.skipif(_tpu_devices() is None, reason="libtpu is not importable")


@needs_tpu_compiler
def test_hlo_stats_two_tpu_slices_counts_the_megascale_sends_as_dcn():
    """The same program on 2 chips in each of two v5p slices: TPU XLA splits each collective into an ICI
    part and host-transfer sends over DCN (the megascale runtime). All-gather per trip: the shard
    (16 KiB) to the other slice over DCN, then the pair [2, 16, 256] within the slice over ICI (32 KiB);
    psum: reduce-scatter within the slice (8 KiB), the half over DCN (8 KiB), all-gather back (8 KiB).
    ICI + DCN equal the ring formula over all 4 chips."""
    d = aot.topology_devices(aot.Topology("v5p", (2, 2, 1), slices=2))
    devices = [d[0], d[1], d[4], d[5]]  # chips 0, 1 of slice 0 and of slice 1
    assert [x.slice_index for x in devices] == [0, 0, 1, 1]
    stats = hlo_stats.hlo_stats(_program(devices).compile().as_text(), num_devices=N,
                                slice_of=[x.slice_index for x in devices])
    assert stats.collectives["all-gather (DCN)"] == [TRIPS, TRIPS * SHARD]
    assert stats.collectives["all-reduce (DCN)"] == [1, SHARD / 2]
    assert stats.dcn_bytes == TRIPS * SHARD + SHARD / 2
    assert stats.ici_bytes + stats.dcn_bytes == pytest.approx(WANT_AG + WANT_AR)


@needs_tpu_compiler
def test_hlo_stats_tpu_and_peak_buffers(tmp_path):
    compiled = _program(_tpu_devices()).compile(
        compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
    _check(hlo_stats.hlo_stats(compiled.as_text(), num_devices=N))
    peak = memory_peak.peak_buffers(memory_peak.find_dump(str(tmp_path)))
    # the gathered f32[64, 256] (64 KiB) is the largest temporary, made by the all-gather in _program
    top = peak.buffers[0]
    assert (top.bytes, top.shape, top.opcode) == (ROWS * COLS * 4, f"f32[{ROWS},{COLS}]", "all-gather")
    assert top.source.endswith(f"test_hlo_stats.py:{_ALL_GATHER_LINE}") and "all_gather" in top.op_name
    assert top.bytes <= peak.peak_bytes <= peak.temp_bytes <= compiled.memory_analysis().temp_size_in_bytes


def _scan_program(devices):
    # a scan over a stacked [T, 64, 256] f32 array writing a stacked result: each trip reads and
    # writes one 64 KiB slice, in place; the whole 1 MiB stack is never re-read per trip.
    def f(xs):
        return jax.lax.scan(lambda c, x: (c + x.sum(), x * 2 + c), 0.0, xs)[1]

    sh = jax.sharding.SingleDeviceSharding(devices[0])
    x = jax.ShapeDtypeStruct((16, 64, 256), jnp.float32, sharding=sh)
    return jax.jit(f).lower(x).compile()


SLICE = 64 * 256 * 4


@pytest.mark.parametrize("where", ["cpu", "tpu"])
def test_hlo_stats_counts_slices_of_scanned_stacks(where):
    devices = jax.devices("cpu") if where == "cpu" else _tpu_devices()
    if devices is None:
        pytest.skip("libtpu is not importable")
    stats = hlo_stats.hlo_stats(_scan_program(devices).as_text(), num_devices=1)
    assert list(stats.trip_counts.values()) == [16]
    # per trip: read the x slice, write the y slice (>= 2 slices; XLA CPU slices x twice, for the sum
    # and for y: 5), plus one initialisation of the 16-slice output stack: at most 6 x 16 slices.
    # Counting the whole 1 MiB stack per trip would be >= 16 x 2 x 16 slices.
    assert 2 * 16 * SLICE <= stats.hbm_bytes <= 6.1 * 16 * SLICE, stats.hbm_bytes / (16 * SLICE)


def test_hlo_stats_counts_one_branch_of_a_conditional():
    def f(p, x):
        return jax.lax.cond(p, lambda x: jnp.sin(x) * 3, lambda x: x, x)

    x = jnp.zeros((256, 1024), jnp.float32)
    text = jax.jit(f).lower(True, x).compile().as_text()
    if "conditional(" not in text:
        pytest.skip("XLA turned the cond into a select")
    stats = hlo_stats.hlo_stats(text, num_devices=1)
    # the costly branch reads and writes 1 MiB once (plus the copies around it), not both branches
    assert stats.hbm_bytes < 6 * x.nbytes
