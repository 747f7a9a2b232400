"""`dsjax convert --from DIR --to DIR`: HF safetensors <-> the native (Orbax) checkpoint, either way.

The direction follows the source: an HF/FP8 safetensors directory becomes a native checkpoint and a
native checkpoint becomes HF safetensors (`--format` forces the target).
"""
from __future__ import annotations

import os


def run(args) -> int:
    from dsjax.api import from_pretrained
    from dsjax.checkpoint import native

    src, dst = args.src, args.dst
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    target = args.format or ("hf" if native.is_native(src) else "native")
    model = from_pretrained(src, allow_nonfinite=args.allow_nonfinite)
    print(f"loaded {src}: {model}")
    if target == "hf":
        model.save_pretrained(dst, max_shard_size=args.max_shard_size, dtype=args.dtype)
    else:
        native.save(model.params, model.config, dst)
    print(f"wrote {target} checkpoint to {dst}")
    return 0


def register(sub, help_):
    p = sub.add_parser("convert", help=help_, description=__doc__)
    p.add_argument("--from", dest="src", required=True, help="source checkpoint directory")
    p.add_argument("--to", dest="dst", required=True, help="destination directory")
    p.add_argument("--format", choices=["hf", "native"], help="target format (default: the other one)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="HF export dtype")
    p.add_argument("--allow-nonfinite", action="store_true", help="load tensors holding NaN/Inf (refused by default)")
    p.set_defaults(func=run)
