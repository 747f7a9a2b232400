"""`dsjax grpo --config configs/rl_toy.yaml --workdir DIR [key=value ...]`: GRPO with rule rewards.

Samples group_size completions per prompt, scores them with the registered rewards (accuracy + format
by default), and optimises the clipped GRPO objective with a k3 KL to the frozen reference. Logs the
R1-Zero curves to DIR/metrics.jsonl and DIR/grpo.png; the final model goes to DIR/final.
"""
from __future__ import annotations


def run(args) -> int:
    from dsjax.train.engine import start_runtime

    start_runtime()  # a multi-host launch joins its peers before anything touches a device
    from dsjax.rl.grpo_trainer import GRPOConfig, train_grpo
    from dsjax.train.config import load_run_config

    cfg = load_run_config(GRPOConfig, args.config, args.overrides)
    _, rows = train_grpo(cfg, args.workdir)
    last = rows[-1] if rows else {}
    if "eval_accuracy" in last:
        print(f"held-out accuracy {last['eval_accuracy']:.3f}; ", end="")
    print(f"model in {args.workdir}/final, curves in {args.workdir}/grpo.png")
    return 0


def register(sub, help_):
    p = sub.add_parser("grpo", help=help_, description=__doc__)
    p.add_argument("--config", default=None, help="GRPO YAML (fields of dsjax.rl.grpo_trainer.GRPOConfig)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, grpo.png and the final model")
    p.add_argument("overrides", nargs="*", help="key=value, model.key=value or mesh.key=value")
    p.set_defaults(func=run)
