"""`dsjax compile --config PATH --topology v5p-512 [key=value ...]`: AOT-compile the training step
for a TPU topology on this machine (needs libtpu, no TPU) and report per-chip memory against the
limit XLA applies, the largest buffers live at the memory peak, FLOPs per step and an estimated step
time and MFU (a roofline from the compiled program: launch/README.md). Exit status 0 when the step
fits in HBM, 3 when it does not, 2 on a user error.

--max-batch searches batch_size (doubling, then bisection, in multiples of the mesh's batch axes)
and ends with `max batch: B sequences x S tokens = N tokens per chip`; exit 3 if not even the
smallest batch fits. mesh.dcn=N compiles for N slices of the topology joined over DCN.

--compare-fp8 compiles the config twice, model.fp8=false and model.fp8=true (DeepSeek-V3's FP8 recipe;
emulated on TPUs without FP8 units), prints both reports and a side-by-side table of per-chip memory,
each collective's bytes and the step estimate; exit 0 when both fit.

Topologies: v5p-N (N TensorCores, 2 per chip), v6e-N (N chips), or a shape like v5p:4x8x8.
Overrides as for `dsjax train`: mesh.fsdp=32 mesh.expert=8 batch_size=256 seq_len=4096 model.remat_policy=full.
Without batch_size / seq_len (on the command line or in the file) the batch is --per-chip-batch
sequences per chip of --seq-len tokens (at most the model's max_position_embeddings).
"""
from __future__ import annotations

import dataclasses
import os

import yaml

EXIT_DOES_NOT_FIT = 3


def _given(path: str, overrides, key: str) -> bool:
    if any(o.split("=", 1)[0].strip() == key for o in overrides):
        return True
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and (key in raw or key in (raw.get("train") or {}))


def run(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; TPU devices come from the topology
    from dsjax.config import ConfigError
    from dsjax.parallel import aot
    from dsjax.train.config import load_train_config

    # ConfigErrors (bad topology, mesh, batch) reach the CLI, which prints them and exits 2.
    topo = aot.parse_topology(args.topology)
    overrides = list(args.overrides)
    if not _given(args.config, overrides, "batch_size"):
        overrides.append(f"batch_size={args.per_chip_batch * topo.chips}")
    tcfg = load_train_config(args.config, overrides)
    if not _given(args.config, overrides, "seq_len"):
        tcfg = dataclasses.replace(tcfg, seq_len=min(args.seq_len, tcfg.model.max_position_embeddings))
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        raise ConfigError(f"--hbm-gib: {args.hbm_gib} is not a positive number of GiB")
    limit = args.hbm_gib * 2**30 if args.hbm_gib else None
    if args.max_batch and args.compare_fp8:
        raise ConfigError("--max-batch and --compare-fp8: one at a time")
    if args.max_batch:
        start = tcfg.batch_size if _given(args.config, overrides, "batch_size") else None
        best, rep = aot.max_batch(tcfg, topo, progress=lambda m: print(m, flush=True), start=start, hbm_limit=limit)
        print(rep.text())
        if not best:
            print(f"max batch: none fits (the smallest batch, {rep.batch} sequences, does not)")
            return EXIT_DOES_NOT_FIT
        print(f"max batch: {best} sequences x {tcfg.seq_len} tokens = {best * tcfg.seq_len / rep.topology.chips:.0f} "
              f"tokens per chip (batch_size={best})")
        return 0
    if args.compare_fp8:
        if args.hlo_out:
            raise ConfigError("--hlo-out: not with --compare-fp8 (two programs are compiled)")
        reps = {}
        for name, on in (("bf16", False), ("fp8", True)):
            print(f"=== model.fp8={str(on).lower()} ===", flush=True)
            reps[name] = aot.compile_report(dataclasses.replace(tcfg, model=dataclasses.replace(tcfg.model, fp8=on)),
                                            topo, buffers=args.buffers, hbm_limit=limit)
            print(reps[name].text(), flush=True)
        print(aot.comparison_text(reps))
        return 0 if all(r.fits for r in reps.values()) else EXIT_DOES_NOT_FIT
    rep = aot.compile_report(tcfg, topo, buffers=args.buffers, hbm_limit=limit, hlo_out=args.hlo_out)
    print(rep.text())
    return 0 if rep.fits else EXIT_DOES_NOT_FIT


def register(sub, help_):
    p = sub.add_parser("compile", help=help_, description=__doc__)
    p.add_argument("--config", required=True, help="model or run YAML")
    p.add_argument("--topology", required=True, help="v5p-N, v6e-N, or v5p:AxBxC / v6e:AxB")
    p.add_argument("--per-chip-batch", type=int, default=1, help="sequences per chip when batch_size is not given")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence when seq_len is not given")
    p.add_argument("--max-batch", action="store_true", help="search the largest batch_size that fits")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="judge 'fits' against this many GiB per chip instead of XLA's limit (headroom)")
    p.add_argument("--buffers", type=int, default=15,
                   help="list this many of the largest buffers live at the memory peak (0: skip the dump) and "
                        "of the collectives with the most bytes")
    p.add_argument("--compare-fp8", action="store_true",
                   help="compile with model.fp8=false and =true and compare memory, collectives and step estimate")
    p.add_argument("--hlo-out", default=None, help="write the optimised HLO text to this file")
    p.add_argument("overrides", nargs="*", help="key=value, model.key=value, mesh.key=value")
    p.set_defaults(func=run)
