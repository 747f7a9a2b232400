"""Training throughput on this machine: dsjax's jitted train step (AdamW, balance loss, bias update) vs
Hugging Face transformers training the same DeepseekV3 architecture on torch CPU, in the same run.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py                  # cpu_bench (the CPU peers measured it), 8 x 512
    python benchmarks/train_step.py --config tiny --batch 8 --seq 128
    python benchmarks/train_step.py --config small_moe --batch 2 --seq 256 --steps 2
    python benchmarks/train_step.py --moe-impls blocked,dense,ragged_dot   # compare expert paths
    JAX_PLATFORMS=cuda python benchmarks/train_step.py --config small_moe --no-hf --dtype bfloat16 \
        --attention-impl pallas --moe-impls pallas,blocked                # a GPU
    ... --moe-impls pallas,blocked --fp8 both     # each expert path with model.fp8 off and on, and the ratio

Prints per implementation: seconds per step (best of --steps after a compiled warm-up), tokens/s, the
model FLOPs per token (6 x active params + attention, as dsjax train's MFU) and MFU against the peak
(measured float32 matmul rate on CPU, the table in dsjax.train.metrics elsewhere); then the ratio of the
dsjax default to HF transformers. Both sides train in float32 on identical shapes and batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.config import load_config  # noqa: E402
from dsjax.model.params import init_params  # noqa: E402
from dsjax.train.config import TrainConfig  # noqa: E402
from dsjax.train.metrics import device_peak, train_flops_per_token  # noqa: E402
from dsjax.train.step import init_state, jit_step, make_train_step  # noqa: E402


def _batches(cfg, batch, seq, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32) for _ in range(n)]


def bench_dsjax(cfg, batch, seq, steps, moe_impl, dtype="float32", attention_impl="xla", fp8=False):
    cfg = cfg.replace(moe_impl=moe_impl, dtype=dtype, attention_impl=attention_impl, fp8=fp8)
    tcfg = TrainConfig(model=cfg, batch_size=batch, seq_len=seq, lr=1e-3, warmup_steps=1, mtp_lambda=0.0)
    state = init_state(init_params(cfg, 0), tcfg)
    step = jit_step(make_train_step(cfg, tcfg), donate_argnums=0)
    data = [{"tokens": t} for t in _batches(cfg, batch, seq, steps + 1)]
    t0 = time.perf_counter()
    state, m = step(state, data[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for b in data[1:]:
        t0 = time.perf_counter()
        state, m = step(state, b)
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t0)
    return min(times), compile_s, losses


def bench_hf(cfg, batch, seq, steps, threads):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = dict(cfg.to_hf_dict(), num_nextn_predict_layers=0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = [torch.as_tensor(t, dtype=torch.long) for t in _batches(cfg, batch, seq, steps + 1)]
    times, losses = [], []
    for i, t in enumerate(data):
        t0 = time.perf_counter()
        loss = model(input_ids=t, labels=t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    return min(times), losses, getattr(model.config, "_attn_implementation", "?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu_bench", help="config name(s), comma-separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up/compile step)")
    ap.add_argument("--moe-impls", default="blocked,dense", help="dsjax expert paths to time; the first is the "
                    "one compared with HF")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--dtype", default="float32", help="dsjax compute dtype (bfloat16 on accelerators; "
                    "the HF baseline always trains float32)")
    ap.add_argument("--attention-impl", default="xla", choices=("xla", "pallas"))
    ap.add_argument("--fp8", default="off", choices=("off", "on", "both"),
                    help="model.fp8 (DeepSeek-V3's FP8 recipe; native where the device has FP8 units); both: "
                    "each expert path twice and the FP8 speed-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the HF baseline")
    a = ap.parse_args(argv)

    peak = device_peak(TrainConfig())
    how = "measured float32 matmul" if jax.default_backend() == "cpu" else "bf16 datasheet peak"
    print(f"peak {peak / 1e9:.0f} GFLOP/s ({jax.devices()[0].device_kind}, {how}), jax {jax.__version__}")
    for name in a.config.split(","):
        run_config(name, a, peak)
    return 0


def run_config(name, a, peak):
    cfg = load_config(name)
    tokens = a.batch * a.seq
    fpt = train_flops_per_token(cfg.replace(num_nextn_predict_layers=0), a.seq, with_mtp=False)
    print(f"{name}: batch {a.batch} x {a.seq} = {tokens} tokens/step, {fpt / 1e6:.1f} MFLOP/token")
    rows = []
    fp8s = {"off": (False,), "on": (True,), "both": (False, True)}[a.fp8]
    for impl in a.moe_impls.split(","):
        secs = []
        for fp8 in fp8s:
            sec, comp, losses = bench_dsjax(cfg, a.batch, a.seq, a.steps, impl, a.dtype, a.attention_impl, fp8)
            secs.append(sec)
            rows.append((f"dsjax moe_impl={impl}" + (" fp8" if fp8 else ""), sec, losses))
            label = impl + (" fp8" if fp8 else "")
            print(f"  dsjax {label:<16} {sec:7.3f} s/step  {tokens / sec:9,.0f} tok/s  MFU "
                  f"{fpt * tokens / sec / peak:6.1%}  (compile {comp:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f})",
                  flush=True)
        if len(secs) == 2:
            print(f"  dsjax {impl}: FP8 step speed-up {secs[0] / secs[1]:.2f}x", flush=True)
    if not a.no_hf:
        import torch
        import transformers

        sec, losses, attn = bench_hf(cfg, a.batch, a.seq, a.steps, a.threads)
        print(f"  HF transformers {transformers.__version__} torch {torch.__version__} ({attn}, {a.threads} threads)"
              f" {sec:7.3f} s/step  {tokens / sec:9,.0f} tok/s  MFU {fpt * tokens / sec / peak:6.1%}"
              f"  (loss {losses[0]:.3f} -> {losses[-1]:.3f})")
        print(f"{name}: dsjax ({rows[0][0]}) / HF transformers tokens/s ratio: {sec / rows[0][1]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
