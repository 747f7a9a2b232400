"""`dsjax distill --config configs/rl_distill_toy.yaml --workdir DIR [key=value ...]`: rejection-sample a
teacher and SFT a student on the accepted samples.

teacher=PATH (checkpoint dir or dsjax workdir); the student's model is the top-level `model:` section
(model.key=value) and its training run the `sft:` section (sft.init, sft.steps, ...). Writes DIR/distill_data.jsonl, DIR/distill_stats.json and the student under DIR/student.
"""
from __future__ import annotations


def run(args) -> int:
    from dsjax.train.engine import start_runtime

    start_runtime()  # a multi-host launch joins its peers before anything touches a device
    from dsjax.rl.distill import DistillConfig, distill
    from dsjax.train.config import load_run_config

    cfg = load_run_config(DistillConfig, args.config, args.overrides)
    _, kept, stats = distill(cfg, args.workdir)
    print(f"kept {stats['accepted']}/{stats['total']} teacher samples; student in {args.workdir}/student/final")
    return 0


def register(sub, help_):
    p = sub.add_parser("distill", help=help_, description=__doc__)
    p.add_argument("--config", default=None, help="distill YAML (fields of dsjax.rl.distill.DistillConfig)")
    p.add_argument("--workdir", required=True, help="data, stats and the student's run go here")
    p.add_argument("overrides", nargs="*", help="key=value, model.key=value, sft.key=value or sft.mesh.key=value")
    p.set_defaults(func=run)
