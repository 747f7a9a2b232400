"""Decode benchmark: tokens/s with the MLA latent cache, cache size vs plain MHA, MTP speculative speed-up.

    JAX_PLATFORMS=cpu python benchmarks/generate.py             # --quick (default): tiny + small_moe, < 3 min
    python benchmarks/generate.py --full --new-tokens 128       # longer runs (GPU/TPU)

Models: `tiny` is the embedded default trained for --train-steps steps by `dsjax train` (so its MTP block
has learnt something and the prompts are held-out text of the embedded corpus); `small_moe` is random
(its MTP block almost never guesses right, so there speculation can only cost time: that row shows the
overhead, not what a trained V3 MTP head with 85-90% acceptance gives). Per config and batch size:
prefill time, plain greedy decode tokens/s (all batch rows, every step timed inside the compiled
while_loop, compile excluded by a warm-up run), then MTP speculative decoding of the same tokens:
acceptance rate, tokens per main-model forward, and its decode speed-up over plain decoding.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsjax  # noqa: E402
from dsjax.infer import cache as cache_lib  # noqa: E402
from dsjax.infer.generate import _loop_fn, _start  # noqa: E402


def _run(model, prompts, n, speculative, moe_impl):
    """(prefill seconds, decode seconds, info) for one generation; compile is excluded by the caller."""
    t0 = time.perf_counter()
    cfg, opts, params, state, info = _start(model, prompts, n, 0.0, None, None, 0, [], speculative, None, None,
                                            None, moe_impl, "jnp")
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    state = _loop_fn(cfg, opts)(params, state)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    info = dict(info, count=np.asarray(state["count"]))
    if speculative:
        info.update({k: int(np.asarray(state[k]).sum()) for k in ("forwards", "drafted", "accepted")})
    return t1 - t0, t2 - t1, info


def trained_tiny(steps: int):
    """The embedded default after `steps` training steps (a temporary workdir)."""
    import tempfile

    from dsjax.train.config import load_train_config
    from dsjax.train.trainer import train

    wd = tempfile.mkdtemp(prefix="gen_bench_")
    train(load_train_config(None, [f"steps={steps}", f"checkpoint_every={steps}", "progress=false",
                                   "eval_every=100000"]), wd)
    return dsjax.from_pretrained(wd)


def text_prompts(batch, prompt_len):
    """Held-out documents of the embedded corpus, byte-tokenised."""
    from dsjax.data.corpus import embedded_documents
    from dsjax.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    docs = [d for d in embedded_documents("eval") if len(d.encode()) >= prompt_len][:batch]
    return np.array([[tok.bos_id] + tok.encode(d)[:prompt_len - 1] for d in docs])


def bench(name, model, batch, prompt_len, n, moe_impl, reps, text=False):
    rng = np.random.default_rng(0)
    prompts = text_prompts(batch, prompt_len) if text else rng.integers(3, model.config.vocab_size, (batch, prompt_len))
    rows = []
    for spec in (False, True):
        _run(model, prompts, n, spec, moe_impl)  # compile + warm up
        times = [_run(model, prompts, n, spec, moe_impl) for _ in range(reps)]
        pre, dec, info = min(times, key=lambda x: x[1])
        decoded = int((info["count"] - 1).sum())  # tokens produced by decode steps (the first is prefill's)
        row = dict(config=name, batch=batch, mode="mtp-spec" if spec else "plain", prefill_s=pre, decode_s=dec,
                   tok_s=decoded / dec)
        if spec:
            row.update(accept=info["accepted"] / max(info["drafted"], 1),
                       tok_per_fwd=decoded / max(info["forwards"], 1))
        rows.append(row)
    rows[1]["speedup"] = rows[0]["decode_s"] / rows[1]["decode_s"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/tiny.yaml", "configs/small_moe.yaml"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=150, help="dsjax train steps for tiny (0: random init)")
    ap.add_argument("--moe-impl", default="auto", help="expert path in decode: auto | gather | dense | blocked | ...")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", default=True, help="(default) few tokens; CPU-friendly")
    g.add_argument("--full", dest="quick", action="store_false")
    args = ap.parse_args()
    plen = args.prompt_len or (16 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 3)
    print(f"backend {jax.default_backend()}, devices {jax.devices()[0].device_kind}; prompt {plen} tokens, "
          f"moe_impl {args.moe_impl}")
    rows, sizes = [], []
    t_start = time.perf_counter()
    for path in args.configs:
        cfg = dsjax.load_config(path)
        name = os.path.splitext(os.path.basename(path))[0]
        big = cfg.hidden_size >= 512
        n = args.new_tokens or ((8 if big else 32) if args.quick else 128)
        t = time.perf_counter()
        trained = name == "tiny" and args.train_steps > 0
        model = trained_tiny(args.train_steps) if trained else dsjax.init(cfg, seed=0)
        jax.block_until_ready(model.params)
        how = f"trained {args.train_steps} steps" if trained else "random init"
        print(f"{name} ({how}): {time.perf_counter() - t:.1f}s, {n} new tokens per sequence", flush=True)
        ours, mha = cache_lib.bytes_per_token(cfg), cache_lib.bytes_per_token(cfg, mha=True)
        sizes.append((name, cache_lib.numbers_per_token(cfg), cache_lib.mha_numbers_per_token(cfg), ours, mha))
        for b in args.batches:
            rows += bench(name, model, b, plen, n, args.moe_impl, reps, text=trained)
            r = rows[-2:]
            print(f"  batch {b}: plain {r[0]['tok_s']:.1f} tok/s, spec {r[1]['tok_s']:.1f} tok/s", flush=True)
    print()
    print("| config | batch | mode | prefill s | decode s | decode tok/s | MTP accept | tok/main fwd | spec speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['accept']:.2f}" if "accept" in r else "-"
        tpf = f"{r['tok_per_fwd']:.2f}" if "tok_per_fwd" in r else "1.00"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"| {r['config']} | {r['batch']} | {r['mode']} | {r['prefill_s']:.3f} | {r['decode_s']:.3f} | "
              f"{r['tok_s']:.1f} | {acc} | {tpf} | {sp} |")
    print()
    print("| config | latent cache numbers/token/layer | MHA numbers/token/layer | latent bytes/token (all layers) "
          "| MHA bytes/token | MHA / latent |")
    print("|---|---|---|---|---|---|")
    for name, a, m, ob, mb in sizes:
        print(f"| {name} | {a} | {m} | {ob} | {mb} | {m / a:.1f}x |")
    v3 = dsjax.load_config("configs/deepseek_v3_671b.yaml")
    print(f"| deepseek_v3_671b (bf16) | {cache_lib.numbers_per_token(v3)} | {cache_lib.mha_numbers_per_token(v3)} | "
          f"{cache_lib.bytes_per_token(v3, 'bfloat16')} | {cache_lib.bytes_per_token(v3, 'bfloat16', mha=True)} | "
          f"{cache_lib.mha_numbers_per_token(v3) / cache_lib.numbers_per_token(v3):.1f}x |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
