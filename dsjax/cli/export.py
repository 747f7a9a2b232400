"""`dsjax export --workdir DIR --out OUT [--step N]`: HF safetensors from a training checkpoint."""
from __future__ import annotations

import errno
import os

from dsjax.errors import StorageError


def run(args) -> int:
    from dsjax.api import load_train_workdir, is_train_workdir
    from dsjax.checkpoint.hf_io import save_hf

    if not is_train_workdir(args.workdir):
        raise FileNotFoundError(f"{args.workdir}: not a dsjax training workdir (no run_config.yaml and checkpoints/)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before the (long) load, not after
        raise StorageError(errno.EEXIST, f"{args.out}: cannot write: exists and is a file, not a directory")
    params, cfg = load_train_workdir(args.workdir, args.step)
    save_hf(params, cfg, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    step = args.step if args.step is not None else "latest"
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


def register(sub, help_):
    p = sub.add_parser("export", help=help_, description=__doc__)
    p.add_argument("--workdir", required=True, help="a `dsjax train` workdir")
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=run)
