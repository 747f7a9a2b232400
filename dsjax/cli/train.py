"""`dsjax train --config configs/NAME.yaml --workdir DIR [key=value ...]`.

Without --config it trains the embedded default: the tiny model on a corpus generated in code, offline,
in a few minutes on a CPU. Running the same command again resumes from the latest checkpoint.
"""
from __future__ import annotations


def run(args) -> int:
    from dsjax.train.engine import start_runtime

    start_runtime()  # a multi-host launch joins its peers before anything touches a device
    from dsjax.train.config import load_train_config
    from dsjax.train.trainer import TrainingError, train

    tcfg = load_train_config(args.config, args.overrides)
    try:
        rows = train(tcfg, args.workdir)
    except TrainingError as e:
        print(f"dsjax train: {e}")
        return 3
    if rows:
        last = rows[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
              + f"; metrics in {args.workdir}/metrics.jsonl")
    return 0


def register(sub, help_):
    p = sub.add_parser("train", help=help_, description=__doc__)
    p.add_argument("--config", default=None, help="run YAML (default: the embedded tiny default)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard events go here")
    p.add_argument("overrides", nargs="*", help="key=value, model.key=value, data.key=value, mesh.key=value")
    p.set_defaults(func=run)
