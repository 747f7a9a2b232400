"""`dsjax sft --config configs/rl_*.yaml --workdir DIR [key=value ...]`: supervised fine-tuning on chat JSONL.

The data is `data=PATH` ({"messages": [{"role", "content"}, ...]} per line), rendered with the chat
template; only assistant tokens are trained. Start from `init=` random | an HF/native checkpoint dir |
a dsjax train/sft/grpo workdir. Running again resumes; the final model goes to DIR/final.
"""
from __future__ import annotations


def run(args) -> int:
    from dsjax.train.engine import start_runtime

    start_runtime()  # a multi-host launch joins its peers before anything touches a device
    from dsjax.rl.sft import SFTConfig, sft
    from dsjax.train.config import load_run_config

    cfg = load_run_config(SFTConfig, args.config, args.overrides)
    _, rows = sft(cfg, args.workdir)
    if rows:
        print(f"step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}; model in {args.workdir}/final, "
              f"metrics in {args.workdir}/metrics.jsonl")
    return 0


def register(sub, help_):
    p = sub.add_parser("sft", help=help_, description=__doc__)
    p.add_argument("--config", default=None, help="SFT YAML (fields of dsjax.rl.sft.SFTConfig)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and the final model go here")
    p.add_argument("overrides", nargs="*", help="key=value, model.key=value or mesh.key=value")
    p.set_defaults(func=run)
