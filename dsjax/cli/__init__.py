"""`dsjax SUBCOMMAND ...`: each subcommand lives in its own module `dsjax.cli.<name>` with a
`register(subparsers)` that adds its parser and sets `func`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "info": "config summary, parameter counts and cache size of a config or checkpoint",
    "convert": "convert between HF safetensors and the native checkpoint",
    "train": "pretrain (embedded default without --config)",
    "export": "write HF safetensors from a training checkpoint",
    "compile": "AOT-compile the training step for a TPU topology and report memory",
    "generate": "generate text from a checkpoint",
    "sft": "supervised fine-tuning on chat JSONL",
    "grpo": "GRPO reinforcement learning with rule-based rewards",
    "distill": "rejection-sample a teacher and SFT a student",
}


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="dsjax", description="DeepSeek-V3 / R1 in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        try:
            mod = importlib.import_module(f"dsjax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dsjax.cli.{name}":
                raise
            continue
        mod.register(sub, help_)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dsjax.errors import UserError, storage_error
    from pallas_kernels.unavailable import PallasUnavailableError  # impl=pallas lowered for CPU

    try:
        return int(args.func(args) or 0)
    except (*UserError, PallasUnavailableError) as e:
        print(f"dsjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — a full, read-only or misnamed output path is the user's
        err = storage_error(e)
        if err is None:
            raise
        print(f"dsjax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
