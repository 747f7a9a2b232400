"""`dsjax compile`: topology names, the analytic FLOP count, and AOT compilation for a small TPU
topology (needs libtpu: pip install 'jax[tpu]==<jax version>'). Reference for FLOPs: hand-counted below."""
import re

import pytest

from dsjax.cli import main
from dsjax.config import ConfigError, load_config
from dsjax.parallel import aot


@pytest.mark.parametrize("name, want, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-512", "v5p:4x8x8", 256), ("v5p-1024", "v5p:8x8x8", 512),
    ("v6e-8", "v6e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v5p:8x8x4", "v5p:8x8x4", 256),
])
def test_parse_topology(name, want, chips):
    t = aot.parse_topology(name)
    assert (t.name, t.chips) == (want, chips)


@pytest.mark.parametrize("bad", ["v5p-7", "v4-8", "v6e:2x2x2", "v5p-24"])
def test_parse_topology_errors(bad):
    with pytest.raises(ConfigError, match="topology"):
        aot.parse_topology(bad)


def test_step_flops_by_hand():
    cfg = load_config("configs/tiny.yaml").replace(num_nextn_predict_layers=0)
    f = aot.step_flops(cfg, batch=2, seq=8)
    d, v, h = 64, 512, 4
    attn = d * 32 + 32 + 32 * h * 24 + d * (32 + 8) + 32 + 32 * h * 32 + h * 16 * d
    dense, shared, routed = 3 * d * 128, 3 * d * 32, 4 * 3 * d * 32
    gate = d * 16 + 16
    norms = 2 * d
    active = 3 * (attn + norms) + (dense) + 2 * (shared + routed + gate) + d + d * v  # + final norm + head
    assert f["active_params"] == active
    assert f["matmul"] == 6 * active * 16
    assert f["attention"] == 6 * 3 * h * (24 + 16) * 8 / 2 * 16


def _tpu_available():
    try:
        aot.topology_devices(aot.parse_topology("v5p:2x2x1"))
        return True
    except ConfigError:
        return False


needs_tpu_compiler = pytest.mark.skipif(not _tpu_available(), reason="libtpu is not importable (pip install 'jax[tpu]')")


@needs_tpu_compiler
def test_compile_tiny_fits(capsys):
    rc = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "mesh.fsdp=2",
               "mesh.expert=2", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FITS" in out and "per-chip total" in out and "FLOPs per step" in out
    assert "of 95.74 GiB" in out  # XLA's own v5p limit, not 95e9 bytes
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("largest live buffers at peak"))
    assert all(" at dsjax/" in line or "(" in line for line in lines[head + 1:head + 6])
    assert any(line.startswith("estimated step time: ") for line in lines)
    top = next(i for i, line in enumerate(lines) if line.startswith("largest collectives per step"))
    assert re.match(r"\s+[\d.]+ \w+\s+(all-gather|all-reduce|ragged-all-to-all|all-to-all|reduce-scatter)\s+x\d", lines[top + 1])
    mfu = next(line for line in lines if line.startswith("estimated MFU: "))
    over, serial = (float(x) for x in re.findall(r"([\d.]+)%", mfu))
    assert 0 < serial <= over <= 100
    assert "180K H800 GPU-hours" in out


@needs_tpu_compiler
def test_compile_compare_fp8(capsys):
    """Both programs compiled for the TPU target (FP8 emulated: v5p has no FP8 units) and compared."""
    rc = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "mesh.fsdp=2",
               "mesh.expert=2", "model.num_hidden_layers=2", "model.num_nextn_predict_layers=0",  # dense + MoE
               "--seq-len", "32", "--buffers", "0", "--compare-fp8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "=== model.fp8=false ===" in out and "=== model.fp8=true ===" in out
    table = out[out.index("per chip, bf16 vs fp8"):].splitlines()
    rows = {line[:32].strip(): line[32:].rsplit(None, 1) if "%" in line else line[32:].split()
            for line in table[2:] if line.startswith("  ") and not line.startswith("  (")}
    assert rows["fits"] == ["yes", "yes"]
    for key in ("arguments", "temporaries", "total", "HBM traffic", "all-gather", "est. step, overlapped"):
        assert key in rows and rows[key][1].endswith("%"), (key, rows)
    assert float(rows["arguments"][1][:-1]) == 0.0  # same params and optimizer state
    assert float(rows["temporaries"][1][:-1]) != 0.0  # another program


@pytest.mark.parametrize("start, limit", [(1, 1), (1, 13), (4, 13), (16, 13), (1, 0), (8, 0), (5, 5)])
def test_search_batch_finds_the_largest(start, limit):
    calls = []
    fits = lambda k: calls.append(k) or k <= limit  # noqa: E731
    assert aot.search_batch(fits, start) == limit
    assert len(calls) <= 2 * (max(limit, start).bit_length() + 1)


@needs_tpu_compiler
@pytest.mark.slow
def test_compile_max_batch(capsys):
    # tiny on 4 chips with a 0.1 GiB budget: the search prints each try and the largest that fits;
    # the try one batch shard above it (4 sequences: dcn x data x fsdp x expert = 4) did not fit.
    rc = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "mesh.fsdp=4",
               "--seq-len", "128", "--hbm-gib", "0.1", "--max-batch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"^max batch: (\d+) sequences x 128 tokens = (\d+) tokens per chip", out, re.M)
    assert m, out
    best = int(m.group(1))
    assert int(m.group(2)) == best * 128 // 4
    tries = dict(re.findall(r"^max batch: batch_size=(\d+) .* -> (fits|does not fit)$", out, re.M))
    assert tries[str(best)] == "fits" and tries[str(best + 4)] == "does not fit", out


def test_compile_bad_hbm_limit_is_a_user_error(capsys):
    rc = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "--hbm-gib", "-1"])
    assert rc == 2
    assert "--hbm-gib" in capsys.readouterr().err


@needs_tpu_compiler
def test_compile_oversized_exits_3(capsys):
    # 671B on 4 chips: the parameters and AdamW state alone are ~2 TB per chip
    rc = main(["compile", "--config", "configs/deepseek_v3_671b.yaml", "--topology", "v5p-8"])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "DOES NOT FIT" in out


def test_compile_bad_mesh_is_a_user_error(capsys):
    rc = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "mesh.fsdp=3"])
    assert rc == 2
    assert "mesh.fsdp" in capsys.readouterr().err
