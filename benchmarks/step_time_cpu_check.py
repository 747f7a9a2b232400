"""CPU sanity check of `dsjax compile`'s step-time model (dsjax.parallel.step_time): estimate a training
step of a small config from its compiled CPU program exactly as for a TPU (analytic FLOPs over the
"peak", HBM bytes read from the optimised HLO with loop trip counts over the memory bandwidth; one
device, so no collectives), with this CPU's measured float32 matmul rate as the peak and its measured
streaming bandwidth (x = x / 2 + 1 in place over 256 MiB) as the memory bandwidth, then time the same step.

    JAX_PLATFORMS=cpu python benchmarks/step_time_cpu_check.py                       # cpu_bench, 8 x 512
    JAX_PLATFORMS=cpu python benchmarks/step_time_cpu_check.py --config tiny --batch 8 --seq 128

This checks the method (are the byte counts and trip counts plausible, is the truth between the
bounds), not any TPU number: a CPU's caches make "HBM traffic" an upper bound on DRAM traffic.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.config import load_config  # noqa: E402
from dsjax.model.params import init_params  # noqa: E402
from dsjax.parallel.aot import step_flops  # noqa: E402
from dsjax.parallel.hlo_stats import hlo_stats  # noqa: E402
from dsjax.parallel.step_time import estimate  # noqa: E402
from dsjax.train.config import TrainConfig  # noqa: E402
from dsjax.train.metrics import measured_cpu_peak  # noqa: E402
from dsjax.train.step import init_state, jit_step, make_train_step  # noqa: E402


def measured_bandwidth(mib: int = 256, reps: int = 5) -> float:
    f = jax.jit(lambda x: x * 0.5 + 1, donate_argnums=0)  # in place: no fresh pages to fault in
    x = f(jnp.ones((mib * 2**18,), jnp.float32)).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best  # read x, write it back


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu_bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    cfg = load_config(f"configs/{a.config}.yaml").replace(num_nextn_predict_layers=0)
    tcfg = TrainConfig(model=cfg, batch_size=a.batch, seq_len=a.seq, lr=1e-3, warmup_steps=1, mtp_lambda=0.0)
    state = init_state(init_params(cfg, 0), tcfg)
    step = jit_step(make_train_step(cfg, tcfg), donate_argnums=0)
    rng = np.random.default_rng(0)
    data = [{"tokens": rng.integers(3, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)} for _ in range(a.steps + 1)]
    compiled = step.lower(state, data[0]).compile()
    stats = hlo_stats(compiled.as_text(), num_devices=1)
    peak, bw = measured_cpu_peak(), measured_bandwidth()
    chip = types.SimpleNamespace(peak_flops=peak, hbm_bw=bw, ici_bw=1.0, dcn_bw=1.0)
    flops = step_flops(cfg, a.batch, a.seq, with_mtp=False)["total"]
    est = estimate(flops, a.batch * a.seq, 1, chip, stats.hbm_bytes, 0.0, 0.0)
    state, m = step(state, data[0])
    jax.block_until_ready(m)
    times = []
    for b in data[1:]:
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    t = min(times)
    print(f"config {a.config}, batch {a.batch} x {a.seq}, float32, 1 CPU device ({os.cpu_count()} cores)")
    print(f"measured peak {peak / 1e9:.1f} GFLOP/s (float32 matmul), bandwidth {bw / 1e9:.1f} GB/s; "
          f"FLOPs per step {flops:.3g}, HLO bytes per step {stats.hbm_bytes / 1e9:.2f} GB "
          f"(trip counts {sorted(set(stats.trip_counts.values()))}, unknown {len(stats.unknown_trips)})")
    for line in est.lines()[:2]:
        print(line)
    print(f"measured step time: {t * 1e3:.1f} ms (best of {len(times)}); measured / overlapped estimate = "
          f"{t / est.overlapped_s:.2f}, measured / not-overlapped estimate = {t / est.serial_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
