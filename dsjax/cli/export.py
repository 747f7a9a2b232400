"""`dsjax export --workdir DIR --out OUT [--step N]`: HF safetensors from a training checkpoint."""
from __future__ import annotations

import os


def run(args) -> int:
    import jax

    from dsjax.checkpoint.hf_io import save_hf
    from dsjax.model.params import init_params
    from dsjax.train.checkpointing import Checkpointer, abstract_of
    from dsjax.train.config import load_train_config
    from dsjax.train.step import init_state

    cfg_path = os.path.join(args.workdir, "run_config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{args.workdir}: not a dsjax training workdir (no run_config.yaml)")
    tcfg = _load_run_config(cfg_path)
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=tcfg.keep_checkpoints, async_save=False)
    if not ckpt.steps():
        raise FileNotFoundError(f"{args.workdir}/checkpoints: no checkpoint to export")
    abstract = jax.eval_shape(lambda: init_state(init_params(tcfg.model, 0), tcfg))
    got = ckpt.restore(abstract_of(abstract), step=args.step)
    step, state, _ = got
    save_hf(state.params, tcfg.model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    ckpt.close()
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


def _load_run_config(path: str):
    """Rebuild the TrainConfig that `dsjax train` wrote into the workdir."""
    import yaml

    from dsjax.config import config_from_dict
    from dsjax.train.config import TrainConfig, _data_config, _mesh_config

    with open(path) as f:
        raw = yaml.safe_load(f)
    model = config_from_dict(raw.pop("model"), where=f"{path}: model")
    data, mesh = _data_config(raw.pop("data")), _mesh_config(raw.pop("mesh"))
    return TrainConfig(model=model, data=data, mesh=mesh, **raw)


def register(sub, help_):
    p = sub.add_parser("export", help=help_, description=__doc__)
    p.add_argument("--workdir", required=True, help="a `dsjax train` workdir")
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=run)
